"""Preference data: Pick-High triplets, icthp manifests, pairwise preferences; validation and conversion.

Triplet sources (all read into :class:`Triplet` rows):

- the **released Pick-High layout** (``root/Pick-High/{split}.pkl`` + ``root/pick_easy_img/{split}/`` +
  ``root/pick_refine_img/{split}/``). The ``.pkl`` files are pickled pandas DataFrames and unpickling runs
  code, so they are read only with ``allow_pickle=True`` (``--allow-pickle``), an explicit statement that
  the files are trusted. ``icthp data convert`` turns them into a safe manifest once. A root whose
  ``Pick-High/`` holds ``{split}.parquet`` instead is read without opt-in.
- **icthp manifests** (Parquet, JSONL or CSV), one row per triplet (``docs/data.md``):
  ``prompt``, ``refined_prompt``, ``lose``, ``win``, ``refined`` (``high`` accepted), optional ``E1 E2 R1 R2``
  and ``split``; image paths relative to the manifest's folder or absolute; other columns are kept.

``convert`` to the released layout copies (or hard-links) image files into the output, so it refuses images
that resolve outside the source's folder (``..``, absolute and ``~`` paths, symlinks) unless
``allow_outside_root=True`` (``--allow-outside-root``), and it replaces a previous conversion output whole
rather than merging into it (any other non-empty folder is refused).

Pairwise sources (:class:`PreferencePair`): manifests with ``prompt``, ``image_a``, ``image_b`` and
``winner`` (``a`` / ``b`` / ``tie``), or Pick-a-Pic-style columns (``caption``, ``jpg_0`` / ``jpg_1`` or
``image_0`` / ``image_1`` as paths or encoded bytes, ``label_0`` / ``label_1``).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import secrets
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError
from .files import atomic_path, check_table_path, iter_jsonl, read_rows

ROLES = ("lose", "win", "refined")
LABELS = ("E1", "E2", "R1", "R2")
SPLITS = ("train", "val", "test")
# Released column -> icthp column.
RELEASED_TO_ICTHP = {
    "easy_prompt": "prompt",
    "refine_prompt": "refined_prompt",
    "easy_image_0": "lose",
    "easy_image_1": "win",
    "refine_image": "refined",
}
ICTHP_TO_RELEASED = {v: k for k, v in RELEASED_TO_ICTHP.items()}
ROLE_ALIASES = {"high": "refined", "I1": "lose", "I2": "win", "I3": "refined"}
REQUIRED = ("prompt", *ROLES)
#: file suffixes of manifests (anything else written by `convert` is a released-layout folder)
MANIFEST_SUFFIXES = (".parquet", ".jsonl", ".csv")
# A released layout written by `convert` holds this file: only such a folder is replaced by a new conversion.
CONVERT_MARKER = ".icthp-convert.json"
LAYOUT_ENTRIES = frozenset({"Pick-High", "pick_easy_img", "pick_refine_img", CONVERT_MARKER})
# Labels are at most 1 (C = min(cos / theta, 1)) and negative where a cosine is (no clamp at 0 by default);
# E1 <= E2 and |R| <= |E| (R = E x a text cosine) hold by construction (docs/data.md), up to rounding.
LABEL_TOLERANCE = 1e-6


class UnsafePickleError(InputError):
    """Reading a pickle was refused because the user did not opt in."""


@dataclass(frozen=True)
class Triplet:
    """One prompt and three images: I1 = ``lose``, I2 = ``win``, I3 = ``refined``; expected I1 < I2 < I3.

    Image fields hold resolved paths. ``E1 E2 R1 R2`` are the ICT labels (docs/data.md), or None.
    ``extra`` keeps any other column of the source, so conversions lose nothing.
    """

    prompt: str
    lose: str
    win: str
    refined: str
    refined_prompt: str | None = None
    E1: float | None = None
    E2: float | None = None
    R1: float | None = None
    R2: float | None = None
    split: str | None = None
    index: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def has_labels(self) -> bool:
        return all(getattr(self, k) is not None for k in LABELS)

    @property
    def images(self) -> tuple[str, str, str]:
        return (self.lose, self.win, self.refined)

    def record(self, base: Path | None = None) -> dict[str, Any]:
        """The manifest row: paths relative to ``base`` when they are inside it, else absolute."""
        row: dict[str, Any] = {"prompt": self.prompt, "refined_prompt": self.refined_prompt}
        for role in ROLES:
            row[role] = _relative(getattr(self, role), base)
        for k in LABELS:
            row[k] = getattr(self, k)
        row["split"] = self.split
        row.update(self.extra)
        return row


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


def _relative(path: str, base: Path | None) -> str:
    if base is None:
        return path
    # abspath, not resolve: symlinked images (e.g. a hub snapshot's blobs) keep their own names.
    p, b = Path(os.path.abspath(path)), Path(os.path.abspath(base))
    try:
        return p.relative_to(b).as_posix()
    except ValueError:
        return str(p)


def _resolve(base: Path, value: Any) -> Any:
    if isinstance(value, str) and value:
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else base / p)
    return value


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


# --------------------------------------------------------------------------------------------- sources


@dataclass
class RawRows:
    """A triplet source as raw rows (icthp column names, image paths resolved), for reading and validating."""

    description: str
    columns: list[str]
    rows: Iterator[tuple[int, dict[str, Any]]]
    total: int | None = None


def is_released_layout(path: str | os.PathLike) -> bool:
    """True for a directory with ``Pick-High/`` (the released Pick-High layout)."""
    return (Path(path) / "Pick-High").is_dir()


def released_splits(root: str | os.PathLike) -> list[str]:
    """Splits present in a released-layout root (``train``, ``val``, ``test`` and any other)."""
    d = Path(root) / "Pick-High"
    names = {p.stem for p in d.iterdir() if p.suffix in (".pkl", ".parquet")}
    return [s for s in SPLITS if s in names] + sorted(names - set(SPLITS))


def _read_released_frame(root: Path, split: str, allow_pickle: bool):
    import pandas as pd

    parquet = root / "Pick-High" / f"{split}.parquet"
    if parquet.is_file():
        return pd.read_parquet(parquet)
    pkl = root / "Pick-High" / f"{split}.pkl"
    if not pkl.is_file():
        raise InputError(f"no split {split!r} in {root}/Pick-High (expected {split}.pkl or {split}.parquet); "
                         f"found: {', '.join(released_splits(root)) or 'nothing'}")
    if not allow_pickle:
        raise UnsafePickleError(
            f"{pkl} is a Python pickle: loading it runs whatever code it contains. Read it only if you trust "
            "its source: pass --allow-pickle (allow_pickle=True in Python). Better, convert it once to a safe "
            f"manifest: icthp data convert {root} --allow-pickle --output pick_high.parquet"
        )
    try:
        frame = pd.read_pickle(pkl)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as exc:
        raise InputError(f"{pkl}: not a readable pandas pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(frame, pd.DataFrame):
        raise InputError(f"{pkl}: expected a pickled pandas DataFrame, got {type(frame).__name__}")
    return frame


def _released_rows(root: Path, splits: Sequence[str], allow_pickle: bool) -> RawRows:
    frames = [(s, _read_released_frame(root, s, allow_pickle)) for s in splits]
    columns = [*dict.fromkeys(RELEASED_TO_ICTHP.get(c, c) for _, f in frames for c in f.columns), "split"]
    folders = {"lose": "pick_easy_img", "win": "pick_easy_img", "refined": "pick_refine_img"}

    def gen() -> Iterator[tuple[int, dict[str, Any]]]:
        n = 0
        for split, frame in frames:
            for rec in frame.to_dict("records"):
                row = {RELEASED_TO_ICTHP.get(k, k): _plain(v) for k, v in rec.items()}
                for role, folder in folders.items():
                    if isinstance(row.get(role), str) and row[role]:
                        row[role] = str(root / folder / split / row[role])
                row["split"] = split
                yield n, row
                n += 1

    return RawRows(f"{root} (released Pick-High layout, {', '.join(splits)})", columns, gen(),
                   sum(len(f) for _, f in frames))


def _plain(value: Any) -> Any:
    # numpy scalars -> Python scalars, so rows serialise to JSON and compare equal across formats.
    if hasattr(value, "item") and not isinstance(value, (bytes, str)):
        try:
            return value.item()
        except (ValueError, AttributeError):
            return value
    return value


def _manifest_rows(path: Path) -> RawRows:
    """Stream a manifest's rows (JSONL line by line, Parquet batch by batch) with aliases and paths resolved."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise InputError(f"manifest {path} does not exist")
    base = path.parent
    total = None
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        columns = list(pf.schema_arrow.names)
        total = pf.metadata.num_rows

        def source() -> Iterator[dict[str, Any]]:
            for batch in pf.iter_batches(batch_size=4096):
                yield from batch.to_pylist()
    elif suffix == ".jsonl":
        import json

        def source() -> Iterator[dict[str, Any]]:
            yield from iter_jsonl(path)

        columns = []
        with path.open(encoding="utf-8") as f:  # columns from the first row (the rest is checked per row)
            for line in f:
                if line.strip():
                    try:
                        first = json.loads(line)
                    except json.JSONDecodeError:
                        first = None
                    columns = list(first) if isinstance(first, dict) else []
                    break
    elif suffix == ".csv":
        import csv

        with path.open(encoding="utf-8", newline="") as f:
            columns = list(csv.DictReader(f).fieldnames or [])

        def source() -> Iterator[dict[str, Any]]:
            with path.open(encoding="utf-8", newline="") as f:
                for r in csv.DictReader(f):
                    yield {k: _csv_value(k, v) for k, v in r.items()}
    else:
        raise InputError(f"{path}: unknown manifest format {suffix!r}; expected .parquet, .jsonl or .csv")
    columns = [ROLE_ALIASES.get(c, c) for c in columns]

    def gen() -> Iterator[tuple[int, dict[str, Any]]]:
        for n, raw in enumerate(source()):
            row = {ROLE_ALIASES.get(k, k): v for k, v in raw.items()}
            for role in ROLES:
                row[role] = _resolve(base, row.get(role))
            yield n, row

    return RawRows(f"{path} (icthp manifest)", columns, gen(), total)


def _csv_value(key: str, value: str) -> Any:
    if value == "":
        return None
    if key in LABELS:
        try:
            return float(value)
        except ValueError:
            return value  # reported by validation as a bad type
    return value


def raw_rows(source: str | os.PathLike, split: str | Sequence[str] | None = None, allow_pickle: bool = False) -> RawRows:
    """Open a triplet source (released-layout root or manifest file) as raw rows."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not is_released_layout(path):
            raise InputError(f"{path} is a folder without Pick-High/: expected the released Pick-High layout "
                             "(Pick-High/{split}.pkl, pick_easy_img/, pick_refine_img/) or a manifest file")
        splits = [split] if isinstance(split, str) else list(split or released_splits(path))
        return _released_rows(path, splits, allow_pickle)
    rows = _manifest_rows(path)
    if split is None:
        return rows
    wanted = {split} if isinstance(split, str) else set(split)
    rows.rows = ((n, r) for n, r in rows.rows if r.get("split") in wanted)
    rows.total = None
    return rows


def _to_triplet(n: int, row: dict[str, Any], where: str) -> Triplet:
    missing = [c for c in REQUIRED if _is_missing(row.get(c))]
    if missing:
        raise InputError(f"{where}, row {n}: missing {', '.join(missing)}")
    labels = {}
    for k in LABELS:
        v = row.get(k)
        if _is_missing(v):
            labels[k] = None
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            labels[k] = float(v)
        else:
            raise InputError(f"{where}, row {n}: label {k} must be a number, got {v!r}")
    known = {*REQUIRED, "refined_prompt", *LABELS, "split"}
    extra = {k: v for k, v in row.items() if k not in known}
    rp = row.get("refined_prompt")
    return Triplet(
        prompt=str(row["prompt"]), lose=row["lose"], win=row["win"], refined=row["refined"],
        refined_prompt=None if _is_missing(rp) else str(rp), split=row.get("split") or None, index=n,
        extra=extra, **labels,
    )


def iter_triplets(source: str | os.PathLike, split: str | Sequence[str] | None = None,
                  allow_pickle: bool = False) -> Iterator[Triplet]:
    """Stream :class:`Triplet` rows from a released-layout root or a manifest.

    Example:
        >>> rows = list(iter_triplets("Pick-High-Dataset", split="test", allow_pickle=True))  # doctest: +SKIP
        >>> rows[0].lose, rows[0].E2  # doctest: +SKIP
    """
    raw = raw_rows(source, split, allow_pickle)
    for n, row in raw.rows:
        yield _to_triplet(n, row, raw.description)


def read_triplets(source: str | os.PathLike, split: str | Sequence[str] | None = None,
                  allow_pickle: bool = False) -> list[Triplet]:
    """Read every triplet of a source into memory (see :func:`iter_triplets`)."""
    return list(iter_triplets(source, split, allow_pickle))


# --------------------------------------------------------------------------------------------- writing


def write_manifest(triplets: Iterable[Triplet], path: str | os.PathLike) -> Path:
    """Write triplets as an icthp manifest (Parquet, JSONL or CSV by extension), atomically.

    Image paths are written relative to the manifest's folder when inside it, else absolute.

    Example:
        >>> write_manifest(read_triplets("demo.jsonl"), "demo.parquet")  # doctest: +SKIP
    """
    from .files import write_table

    path = check_table_path(path)
    base = path.parent
    return write_table([t.record(base) for t in triplets], path)


def write_released_layout(triplets: Iterable[Triplet], root: str | os.PathLike, *, link: bool = True) -> Path:
    """Write triplets in the released Pick-High layout (pickled DataFrames + image folders), atomically per file.

    Images are hard-linked when possible (``link=True``), else copied, into ``pick_easy_img/{split}/`` and
    ``pick_refine_img/{split}/`` under their file names. Rows without a split go to ``train``.
    """
    import pandas as pd

    root = Path(root)
    by_split: dict[str, list[Triplet]] = {}
    for t in triplets:
        by_split.setdefault(_split_folder_name(t), []).append(t)
    (root / "Pick-High").mkdir(parents=True, exist_ok=True)
    folders = {"lose": "pick_easy_img", "win": "pick_easy_img", "refined": "pick_refine_img"}
    for split, rows in by_split.items():
        records = []
        placed: dict[Path, str] = {}
        for t in rows:
            rec: dict[str, Any] = {}
            for ours, theirs in ICTHP_TO_RELEASED.items():
                value = getattr(t, ours)
                if ours in ROLES:
                    src = Path(value)
                    dst = root / folders[ours] / split / src.name
                    if placed.get(dst, str(src.resolve())) != str(src.resolve()):
                        raise InputError(f"two different images are both named {src.name} in split {split}")
                    placed[dst] = str(src.resolve())
                    if not dst.exists():
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        _link_or_copy(src, dst, link)
                    value = src.name
                rec[theirs] = value
            for k in LABELS:
                rec[k] = getattr(t, k)
            rec.update(t.extra)
            records.append(rec)
        with atomic_path(root / "Pick-High" / f"{split}.pkl") as tmp:
            pd.DataFrame.from_records(records).to_pickle(tmp)
    return root


def _split_folder_name(t: Triplet) -> str:
    """The row's split (``train`` when it has none), which names a file and folders of the layout: it must be
    one plain name, or ``../../x`` would write outside the output."""
    split = t.split or "train"
    if split in (".", "..") or any(c in split for c in ("/", "\\", "\x00")):
        raise InputError(f"row {t.index}: split {split!r} is not a plain name; in the released layout a split names "
                         "the file Pick-High/{split}.pkl and the folders pick_easy_img/{split}/, pick_refine_img/{split}/")
    return split


def _link_or_copy(src: Path, dst: Path, link: bool) -> None:
    if not src.is_file():
        raise InputError(f"image {src} does not exist")
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another filesystem: copy instead
    shutil.copy2(src, dst)


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
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        yield from batch.to_pylist()


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
    from .preprocess import load_image

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


# --------------------------------------------------------------------------------------------- conversion


def convert(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    split: str | Sequence[str] | None = None,
    allow_pickle: bool = False,
    link: bool = True,
    allow_outside_root: bool = False,
) -> Path:
    """Convert between the released Pick-High layout and icthp manifests (Parquet / JSONL / CSV).

    ``output`` ending in ``.parquet``, ``.jsonl`` or ``.csv`` writes a manifest (image paths only); any other
    path writes the released layout there, with the images hard-linked (``link``) or copied in. Every column
    is kept.

    A released layout is written to a new folder and put in place of ``output`` at the end: a previous
    conversion output (it holds :data:`CONVERT_MARKER`) is replaced whole, never merged into, and any other
    non-empty folder is refused. Images that resolve outside the source's folder (the manifest's folder, or
    the released root) are refused unless ``allow_outside_root``: a hostile manifest could otherwise copy
    ``~/.ssh/id_rsa`` into a dataset that is then shared.

    Example:
        >>> convert("Pick-High-Dataset", "pick_high.parquet", allow_pickle=True)  # doctest: +SKIP
    """
    out = Path(output)
    src = Path(source).expanduser()
    if out.exists() and out.resolve() == src.resolve():
        raise InputError(f"output {out} is the input; write the conversion elsewhere")
    manifest = out.suffix.lower() in MANIFEST_SUFFIXES
    if not manifest:
        if out.suffix:
            raise InputError(f"output {out}: expected a .parquet/.jsonl/.csv manifest or a folder for the released layout")
        check_replaceable(out)  # before reading a large source
    rows = read_triplets(source, split, allow_pickle)
    if manifest:
        return write_manifest(rows, out)
    if not allow_outside_root:
        check_inside_root(rows, src if src.is_dir() else src.parent, str(source))
    return _replace_released_layout(rows, out, link=link, source=src)


def check_inside_root(triplets: Iterable[Triplet], root: str | os.PathLike, where: str) -> None:
    """Refuse a triplet whose image resolves outside ``root`` (symlinks followed, ``..`` and ``~`` expanded).

    Raises:
        InputError: naming the row, the role, the path as given and where it leads, and the opt-in.
    """
    root = Path(root)
    base = root.resolve()
    for t in triplets:
        for role in ROLES:
            path = getattr(t, role)
            real = Path(path).resolve()
            if not real.is_relative_to(base):
                leads = "" if Path(os.path.abspath(path)) == real else f" (it leads to {real})"
                raise InputError(
                    f"{where}, row {t.index}: {role} image {path}{leads} is outside {root}, the folder of the source; "
                    "converting would copy a file from elsewhere on this machine into the dataset. If the source is "
                    "trusted and the file belongs in the dataset, pass --allow-outside-root (allow_outside_root=True "
                    "in Python)."
                )


def check_replaceable(out: str | os.PathLike) -> None:
    """Refuse a released-layout output that is not absent, an empty folder, or a previous conversion output.

    A previous output holds :data:`CONVERT_MARKER` and nothing but the layout's folders beside it; anything
    else may be someone's files, which a conversion must neither merge into nor delete.
    """
    out = Path(out)
    if out.is_symlink():
        raise InputError(f"output {out} is a symbolic link; give the folder it points to, or another --output")
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"output {out} exists and is not a folder")
    entries = {p.name for p in out.iterdir()}
    if entries and not (CONVERT_MARKER in entries and entries <= LAYOUT_ENTRIES):
        raise InputError(f"output {out} is a non-empty folder that is not an icthp conversion output (no "
                         f"{CONVERT_MARKER}, or other files beside Pick-High/, pick_easy_img/, pick_refine_img/): "
                         "it is neither merged into nor replaced. Remove it yourself, or choose another --output.")


def read_conversion_marker(out: str | os.PathLike) -> dict[str, Any]:
    """What :func:`convert` recorded in a released-layout output (source, rows, splits), read without
    unpickling anything; ``{}`` if the folder has no readable marker."""
    try:
        marker = json.loads((Path(out) / CONVERT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _replace_released_layout(rows: list[Triplet], out: Path, *, link: bool, source: Path) -> Path:
    """Write the layout into a new sibling folder, then swap it in for ``out``: nothing of a previous output
    survives, and a conversion that fails leaves ``out`` as it was."""
    from . import __version__

    new = _sibling_dir(out, "new")
    try:
        write_released_layout(rows, new, link=link)
        marker = {"icthp_version": __version__, "source": str(source), "rows": len(rows),
                  "splits": sorted({t.split or "train" for t in rows})}
        (new / CONVERT_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        check_replaceable(out)  # again: the folder may have changed while the images were copied
        _swap_in(new, out)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    return out


def _swap_in(new: Path, out: Path) -> None:
    """Put folder ``new`` at ``out`` (absent, empty, or a previous output, moved aside and then deleted)."""
    if out.exists() and any(out.iterdir()):
        old = _sibling_dir(out, "old")
        os.replace(out, old / out.name)
        os.replace(new, out)
        shutil.rmtree(old)
    else:
        os.replace(new, out)  # replaces an empty folder


def _sibling_dir(out: Path, tag: str) -> Path:
    """A new hidden folder beside ``out`` (same filesystem, so the swap is a rename). Not ``mkdtemp``: its
    0700 mode would end up on the dataset folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        path = out.parent / f".{out.name}.{secrets.token_hex(4)}.{tag}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise InputError(f"could not create a working folder beside {out}")
