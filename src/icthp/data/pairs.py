"""Pairwise preferences: :class:`PreferencePair` rows from manifests (``image_a`` / ``image_b`` /
``winner``) or Pick-a-Pic-style columns (``caption``, ``jpg_0`` / ``jpg_1``, ``label_0`` / ``label_1``)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..files import iter_jsonl, iter_parquet, read_rows
from .triplets import _is_missing, _resolve


@dataclass(frozen=True)
class PreferencePair:
    """Two images of one prompt and which one people preferred (``"a"``, ``"b"`` or ``"tie"``).

    Images are paths or encoded image bytes (Pick-a-Pic parquet files embed the JPEGs).
    """

    prompt: str
    image_a: str | bytes
    image_b: str | bytes
    winner: str
    index: int = 0



# --------------------------------------------------------------------------------------------- pairs


PICKAPIC_COLUMNS = {"prompt": "caption", "image_a": ("jpg_0", "image_0", "image_0_path"),
                    "image_b": ("jpg_1", "image_1", "image_1_path"), "label_a": "label_0", "label_b": "label_1"}


def iter_pairs(path: str | os.PathLike) -> Iterator[PreferencePair]:
    """Stream pairwise preferences from a manifest (icthp or Pick-a-Pic column names).

    icthp columns: ``prompt``, ``image_a``, ``image_b``, ``winner`` in {a, b, tie}. Pick-a-Pic columns:
    ``caption``, ``jpg_0`` / ``jpg_1`` (bytes) or ``image_0`` / ``image_1`` (paths), ``label_0`` / ``label_1``
    (1/0, 0.5/0.5 for a tie).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"pair manifest {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        rows: Iterable[dict[str, Any]] = _parquet_rows(path)
    elif suffix == ".jsonl":
        rows = iter_jsonl(path)
    else:
        rows = read_rows(path)  # CSV: small by nature (no embedded images)
    for n, row in enumerate(rows):
        yield _to_pair(n, row, path.parent, str(path))


def _parquet_rows(path: Path) -> Iterator[dict[str, Any]]:
    yield from iter_parquet(path, batch_size=1024)


def _to_pair(n: int, row: dict[str, Any], base: Path, where: str) -> PreferencePair:
    def pick(names) -> Any:
        for name in (names if isinstance(names, tuple) else (names,)):
            if name in row and not _is_missing(row[name]):
                return row[name]
        return None

    if "image_a" in row:
        prompt, a, b = row.get("prompt"), row.get("image_a"), row.get("image_b")
        winner = str(row.get("winner", "")).lower()
    else:
        prompt, a, b = pick("caption") or row.get("prompt"), pick(PICKAPIC_COLUMNS["image_a"]), pick(PICKAPIC_COLUMNS["image_b"])
        try:
            la, lb = float(row["label_0"]), float(row["label_1"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{where}, row {n}: expected winner (a/b/tie) or label_0/label_1 columns") from None
        if not (math.isfinite(la) and math.isfinite(lb)):
            raise InputError(f"{where}, row {n}: label_0/label_1 must be numbers, got {la}, {lb}")
        winner = "tie" if la == lb else ("a" if la > lb else "b")
    if not isinstance(prompt, str) or a is None or b is None:
        raise InputError(f"{where}, row {n}: expected a prompt and two images, got prompt={prompt!r}")
    if winner not in ("a", "b", "tie"):
        raise InputError(f"{where}, row {n}: winner must be a, b or tie, got {winner!r}")
    a = _resolve(base, a) if isinstance(a, str) else a
    b = _resolve(base, b) if isinstance(b, str) else b
    return PreferencePair(prompt=prompt, image_a=a, image_b=b, winner=winner, index=n)
