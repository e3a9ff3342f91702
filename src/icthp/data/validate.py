"""Validation of triplet data: columns, types, label invariants, and every image (exists, decodes)."""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..files import ROLES
from .triplets import LABEL_TOLERANCE, LABELS, REQUIRED, _is_missing, raw_rows

# --------------------------------------------------------------------------------------------- validation


@dataclass
class Problem:
    """One validation finding: its kind, the row (or None for the whole source), column, path and message."""

    kind: str
    message: str
    row: int | None = None
    column: str | None = None
    path: str | None = None


@dataclass
class ValidationReport:
    """Summary of :func:`validate`: row counts, splits, label coverage and problems by kind."""

    source: str
    rows: int = 0
    splits: Counter = field(default_factory=Counter)
    labelled: int = 0
    images_checked: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: list[Problem] = field(default_factory=list)
    max_examples_per_kind: int = 5

    @property
    def ok(self) -> bool:
        return not self.counts

    def add(self, problem: Problem) -> None:
        if self.counts[problem.kind] < self.max_examples_per_kind:
            self.examples.append(problem)
        self.counts[problem.kind] += 1

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "ok": self.ok, "rows": self.rows, "splits": dict(self.splits),
                "labelled": self.labelled, "images_checked": self.images_checked, "problems": dict(self.counts),
                "examples": [vars(p) for p in self.examples]}


def _check_image(path: str, decode: bool) -> str | None:
    """None if the image is fine, else the reason."""
    from ..preprocess import load_image

    if not isinstance(path, str) or not Path(path).is_file():
        return "missing"
    if not decode:
        return None
    try:
        load_image(path)
    except Exception as exc:  # ImageLoadError, or anything PIL raises on a hostile file
        return getattr(exc, "reason", str(exc))
    return None


def _check_row(n: int, row: dict[str, Any], report: ValidationReport) -> list[tuple[str, str]]:
    """Schema and label checks of one row; returns the (column, path) images to check."""
    for c in ("prompt",):
        v = row.get(c)
        if _is_missing(v):
            report.add(Problem("missing_value", f"no {c}", n, c))
        elif not isinstance(v, str):
            report.add(Problem("bad_type", f"{c} must be a string, got {type(v).__name__}", n, c))
    values = {}
    for k in LABELS:
        v = row.get(k)
        if _is_missing(v):
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            report.add(Problem("bad_type", f"{k} must be a number, got {v!r}", n, k))
        elif not math.isfinite(v) or v > 1 + LABEL_TOLERANCE:
            report.add(Problem("label_out_of_range", f"{k} = {v}: labels are finite and at most 1", n, k))
        else:
            values[k] = float(v)
    present = [k for k in LABELS if not _is_missing(row.get(k))]
    if present and len(present) < len(LABELS):
        report.add(Problem("partial_labels", f"only {', '.join(present)} of E1 E2 R1 R2 are set", n))
    if len(values) == len(LABELS):
        report.labelled += 1
        if values["E1"] > values["E2"] + LABEL_TOLERANCE:
            report.add(Problem("E1_above_E2", f"E1 = {values['E1']:.6g} > E2 = {values['E2']:.6g}", n, "E1"))
        for r, e in (("R1", "E1"), ("R2", "E2")):
            if abs(values[r]) > abs(values[e]) + LABEL_TOLERANCE:
                report.add(Problem("R_above_E", f"|{r}| = {abs(values[r]):.6g} > |{e}| = {abs(values[e]):.6g} "
                                   "(R = E x text cosine, so |R| <= |E|)", n, r))
    images = []
    for role in ROLES:
        v = row.get(role)
        if _is_missing(v):
            report.add(Problem("missing_value", f"no {role} image", n, role))
        else:
            images.append((role, v))
    return images


def validate(
    source: str | os.PathLike,
    *,
    split: str | Sequence[str] | None = None,
    allow_pickle: bool = False,
    decode: bool = True,
    num_workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    max_examples_per_kind: int = 5,
    on_total: Callable[[int | None], None] | None = None,
) -> ValidationReport:
    """Check a triplet source: columns, types, label ranges and invariants, and every referenced image.

    Rows are streamed (a manifest is never loaded whole) and images are checked in worker threads
    (existence, and full decoding unless ``decode=False``).

    Example:
        >>> report = validate("pick_high.parquet")  # doctest: +SKIP
        >>> report.ok, dict(report.counts)  # doctest: +SKIP
    """
    raw = raw_rows(source, split, allow_pickle)
    if on_total is not None:
        on_total(raw.total)
    report = ValidationReport(raw.description, max_examples_per_kind=max_examples_per_kind)
    for c in REQUIRED:
        if c not in raw.columns and raw.columns:
            report.add(Problem("missing_column", f"column {c!r} is missing (columns: {', '.join(raw.columns)})",
                               None, c))
    if report.counts["missing_column"]:
        return report  # every row would repeat the same problem
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    chunk: list[tuple[int, str, str]] = []

    def flush(pool) -> None:
        reasons = pool.map(lambda item: _check_image(item[2], decode), chunk)
        for (n, role, path), reason in zip(chunk, reasons, strict=True):
            report.images_checked += 1
            if reason is not None:
                kind = "missing_image" if reason == "missing" else "corrupt_image"
                report.add(Problem(kind, f"{role} image {path}: {reason}", n, role, path))
        chunk.clear()

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for n, row in raw.rows:
            report.rows += 1
            report.splits[row.get("split") or "-"] += 1
            chunk.extend((n, role, path) for role, path in _check_row(n, row, report))
            if len(chunk) >= 256:
                flush(pool)
            if progress is not None:
                progress(1)
        if chunk:
            flush(pool)
    if report.rows == 0:
        report.add(Problem("empty", "the source has no rows"))
    return report
