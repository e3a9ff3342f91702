"""Inputs and outputs of batch jobs: image discovery, manifests, tables, atomic writes, resume journals.

Manifests are JSONL, CSV or Parquet files with one row per image (an ``image`` column and, usually, a
``prompt`` column) or one row per triplet (``lose`` / ``win`` / ``high`` or ``refined`` columns, as in
``shared/data/demo/triplets.jsonl``). Image paths are taken relative to the manifest's folder unless
absolute.

Outputs are never left half-written: tables are written to a temporary file in the same folder and
renamed into place, and long jobs append finished rows to a journal (``<output>.partial.jsonl``) that
``--resume`` reads back.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST_EXTENSIONS = (".jsonl", ".csv", ".parquet")
TABLE_EXTENSIONS = (".csv", ".jsonl", ".parquet")
IMAGE_COLUMN_CANDIDATES = ("image", "image_path", "path", "file", "filename")
# Multi-image rows: triplets (lose / win / high or refined) and pairs (image_a / image_b), first match wins.
ROLE_COLUMN_GROUPS = (("lose", "win", "high", "refined"), ("image_a", "image_b"))


@dataclass(frozen=True)
class ImageItem:
    """One image to score. ``image`` is the path as resolved; ``role`` is lose/win/high for triplets."""

    image: str
    prompt: str | None = None
    role: str | None = None
    group: str | None = None

    @property
    def key(self) -> tuple[str, str | None]:
        return (self.image, self.prompt)


def _require_pyarrow(what: str):
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{what} needs pyarrow: pip install 'icthp[data]'") from None
    return pq


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSONL, CSV or Parquet table into a list of dicts.

    Raises:
        InputError: unknown extension, unreadable file, or a malformed line (named with its number).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return list(iter_jsonl(path))
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            return [dict(r) for r in csv.DictReader(f)]
    if suffix == ".parquet":
        pq = _require_pyarrow(f"reading {path}")
        return pq.read_table(path).to_pylist()
    raise InputError(f"{path}: unknown table format {suffix!r}; expected one of {', '.join(MANIFEST_EXTENSIONS)}")


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """JSON objects of a JSONL file, one line at a time (streamed); a bad line is an InputError naming it."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}, line {n}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}, line {n}: expected a JSON object, got {type(obj).__name__}")
            yield obj


def check_prompt_text(prompt: str, where: str) -> str:
    """Return ``prompt`` if it can be written as UTF-8 (every output is), else an InputError naming ``where``.

    A lone surrogate (from a JSON ``\\ud800`` escape, or bytes that were not UTF-8 on the command line)
    cannot be written to a CSV, JSONL or Parquet output: the job would fail at its first write.
    """
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{where}: the prompt is not valid Unicode ({exc.reason} at character {exc.start}: "
                         f"{prompt[max(0, exc.start - 20):exc.start]!r} ...)") from None
    return prompt


def _resolve(base: Path, value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise InputError(f"{where}: expected an image path, got {value!r}")
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else base / p)


def items_from_manifest(
    path: str | os.PathLike,
    image_columns: Sequence[str] | None = None,
    prompt_column: str = "prompt",
) -> list[ImageItem]:
    """Image items of a manifest, one per (row, image column).

    Without ``image_columns``, an ``image``-like column is used, else triplet columns
    (``lose``, ``win``, ``high``/``refined``), each image tagged with its role.

    Example:
        >>> items = items_from_manifest("shared/data/demo/triplets.jsonl")  # doctest: +SKIP
        >>> [i.role for i in items[:3]]  # doctest: +SKIP
        ['lose', 'win', 'high']
    """
    path = Path(path)
    rows = read_rows(path)
    if not rows:
        raise InputError(f"manifest {path} has no rows")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    roles: list[tuple[str, str | None]]
    if image_columns:
        unknown = [c for c in image_columns if c not in columns]
        if unknown:
            raise InputError(f"manifest {path}: no column {', '.join(map(repr, unknown))}; columns are {columns}")
        roles = [(c, c if len(image_columns) > 1 else None) for c in image_columns]
    else:
        single = next((c for c in IMAGE_COLUMN_CANDIDATES if c in columns), None)
        if single is not None:
            roles = [(single, None)]
        else:
            roles = next(([(c, c) for c in group if c in columns] for group in ROLE_COLUMN_GROUPS
                          if any(c in columns for c in group)), [])
            if not roles:
                raise InputError(
                    f"manifest {path}: no image column; expected one of {', '.join(IMAGE_COLUMN_CANDIDATES)} "
                    f"or triplet columns lose/win/high, or pair columns image_a/image_b (or name them with --image-column); "
                    f"columns are {columns}"
                )
    has_prompt = prompt_column in columns
    items = []
    for n, row in enumerate(rows):
        prompt = row.get(prompt_column) if has_prompt else None
        if has_prompt and not isinstance(prompt, str):
            raise InputError(f"manifest {path}, row {n}: column {prompt_column!r} must be a string, got {prompt!r}")
        if prompt is not None:
            check_prompt_text(prompt, f"manifest {path}, row {n}, column {prompt_column!r}")
        for col, role in roles:
            value = row.get(col)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            image = _resolve(path.parent, value, f"manifest {path}, row {n}, column {col!r}")
            items.append(ImageItem(image=image, prompt=prompt, role=role, group=str(n) if role else None))
    return items


def discover(
    inputs: Iterable[str | os.PathLike],
    recursive: bool = False,
    image_columns: Sequence[str] | None = None,
    prompt_column: str = "prompt",
) -> list[ImageItem]:
    """Expand files, folders and manifests into image items (folders sorted by name).

    Raises:
        InputError: a path that does not exist, or a folder with no images.
    """
    items: list[ImageItem] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            pattern = "**/*" if recursive else "*"
            found = sorted(f for f in p.glob(pattern) if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise InputError(f"folder {p} has no images ({', '.join(IMAGE_EXTENSIONS)})"
                                 + ("" if recursive else "; use --recursive for sub-folders"))
            items.extend(ImageItem(image=str(f)) for f in found)
        elif p.suffix.lower() in MANIFEST_EXTENSIONS:
            items.extend(items_from_manifest(p, image_columns, prompt_column))
        elif p.exists() or p.suffix.lower() in IMAGE_EXTENSIONS:
            # A missing image file is kept: it is reported with its path when scoring, like a corrupt one.
            items.append(ImageItem(image=str(p)))
        else:
            raise InputError(f"{p} does not exist (expected image files, folders or {'/'.join(MANIFEST_EXTENSIONS)} manifests)")
    return items


# --------------------------------------------------------------------------------------------- writing


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_table_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() not in TABLE_EXTENSIONS:
        raise InputError(f"output {path}: unknown format {path.suffix!r}; expected one of {', '.join(TABLE_EXTENSIONS)}")
    if path.suffix.lower() == ".parquet":
        _require_pyarrow(f"writing {path}")
    return path


def write_table(rows: Sequence[dict[str, Any]], path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Write rows as CSV, JSONL or Parquet (by extension), atomically.

    Parquet files carry ``metadata`` in their schema (key ``icthp``); for every format it is also written
    to ``<path>.meta.json`` when given.
    """
    path = check_table_path(path)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    suffix = path.suffix.lower()
    with atomic_path(path) as tmp:
        if suffix == ".csv":
            with tmp.open("w", encoding="utf-8", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                for r in rows:
                    writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
        elif suffix == ".jsonl":
            with tmp.open("w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in rows])
            if metadata:
                table = table.replace_schema_metadata({"icthp": json.dumps(metadata)})
            pq.write_table(table, tmp)
    if metadata is not None:
        with atomic_path(meta_path(path)) as tmp:
            tmp.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return path


def _json_default(value: Any) -> Any:
    # Extra columns carried from pandas pickles: numpy arrays / scalars and timestamps.
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, bytes):
        raise TypeError("bytes cannot be written to JSONL; use Parquet for columns holding encoded images")
    return str(value)


def meta_path(path: str | os.PathLike) -> Path:
    return Path(f"{path}.meta.json")


def journal_path(path: str | os.PathLike) -> Path:
    return Path(f"{path}.partial.jsonl")


class Journal:
    """Append-only JSONL of finished rows; every append is flushed and fsynced, so a kill loses at most
    the line being written (a torn last line is ignored on reading)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a", encoding="utf-8")

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        for r in rows:
            self._f.write(json.dumps(r, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    @staticmethod
    def read(path: str | os.PathLike) -> list[dict[str, Any]]:
        path = Path(path)
        if not path.is_file():
            return []
        rows = []
        with path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # torn last line of a killed run
        return rows
