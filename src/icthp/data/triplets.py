"""Triplets: the :class:`Triplet` row, reading the released Pick-High layout and icthp manifests, writing
manifests and the released layout."""

from __future__ import annotations

import math
import os
import pickle
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..files import ROLE_ALIASES, ROLES, atomic_path, check_table_path, iter_jsonl, open_parquet

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
        pf = open_parquet(path)
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
    from ..files import write_table

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
