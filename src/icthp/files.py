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

import contextlib
import csv
import json
import math
import os
import secrets
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError, JobError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST_EXTENSIONS = (".jsonl", ".csv", ".parquet")
TABLE_EXTENSIONS = (".csv", ".jsonl", ".parquet")
IMAGE_COLUMN_CANDIDATES = ("image", "image_path", "path", "file", "filename")
#: the images of a triplet, I1 < I2 < I3: the one vocabulary of triplet manifests (icthp.data reads it too)
ROLES = ("lose", "win", "refined")
#: other names of those columns (``high`` in the demo manifests, the paper's I1 / I2 / I3)
ROLE_ALIASES = {"high": "refined", "I1": "lose", "I2": "win", "I3": "refined"}
PAIR_COLUMNS = ("image_a", "image_b")
#: Bytes pyarrow reads from a Parquet file at once when streaming it (:func:`open_parquet`).
PARQUET_READ_BUFFER = 4 << 20


def triplet_columns(columns: Sequence[str]) -> list[str]:
    """The columns of a manifest that hold a triplet's images (by :data:`ROLES` or :data:`ROLE_ALIASES`), in
    ``lose, win, refined`` order.

    Example:
        >>> triplet_columns(["prompt", "high", "lose", "win"])
        ['lose', 'win', 'high']
    """
    found = {ROLE_ALIASES.get(c, c): c for c in columns if ROLE_ALIASES.get(c, c) in ROLES}
    return [found[r] for r in ROLES if r in found]


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


def cache_dir() -> Path:
    """Root of icthp's cache (``$ICTHP_CACHE``, else ``$XDG_CACHE_HOME/icthp``, else ``~/.cache/icthp``)."""
    env = os.environ.get("ICTHP_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "icthp"


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


def open_parquet(path: str | os.PathLike):
    """A ``pyarrow.parquet.ParquetFile`` that reads as it streams: ``pre_buffer`` off and a bounded read buffer.

    With pyarrow's default (``pre_buffer=True``), ``iter_batches`` keeps every column chunk it has fetched until
    the file is closed, so a pass over a file of embedded images holds the whole file (measured: 20k Pick-a-Pic
    rows, 590 MB, peak RSS 713 MB with the default against 172 MB with this reader).
    """
    pq = _require_pyarrow(f"reading {path}")
    return pq.ParquetFile(path, pre_buffer=False, buffer_size=PARQUET_READ_BUFFER)


def iter_parquet(path: str | os.PathLike, columns: list[str] | None = None,
                 batch_size: int = 256) -> Iterator[dict[str, Any]]:
    """Rows of a Parquet file as dicts, ``batch_size`` at a time, in bounded memory (see :func:`open_parquet`)."""
    for batch in open_parquet(path).iter_batches(batch_size=batch_size, columns=columns):
        yield from batch.to_pylist()


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
    return os.path.abspath(p if p.is_absolute() else base / p)


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
            # A triplet's images (each tagged with its column as role), else a pair's.
            roles = [(c, c) for c in triplet_columns(columns)] or [(c, c) for c in PAIR_COLUMNS if c in columns]
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

    Image paths are absolute (``os.path.abspath``: symlinks are not resolved), whatever the input: a manifest's
    relative paths are taken relative to the manifest's folder. Outputs therefore mean the same from any
    working directory, and ``--resume`` works from another one.

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
            items.extend(ImageItem(image=os.path.abspath(f)) for f in found)
        elif p.suffix.lower() in MANIFEST_EXTENSIONS:
            items.extend(items_from_manifest(p, image_columns, prompt_column))
        elif p.exists() or p.suffix.lower() in IMAGE_EXTENSIONS:
            # A missing image file is kept: it is reported with its path when scoring, like a corrupt one.
            items.append(ImageItem(image=os.path.abspath(p)))
        else:
            raise InputError(f"{p} does not exist (expected image files, folders or {'/'.join(MANIFEST_EXTENSIONS)} manifests)")
    return items


# --------------------------------------------------------------------------------------------- writing


def _sibling_name(path: Path, suffix: str = ".tmp") -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}{suffix}")


def new_temp_file(path: str | os.PathLike) -> Path:
    """Create an empty, uniquely named file beside ``path`` with the permissions the umask gives.

    ``tempfile.mkstemp`` creates 0600 files: an output renamed from one would be unreadable by the group
    and others whatever the user's umask says.
    """
    path = Path(path)
    while True:
        tmp = _sibling_name(path)
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


def new_temp_dir(path: str | os.PathLike) -> Path:
    """Create a uniquely named directory beside ``path`` with the permissions the umask gives (not mkdtemp's
    0700), for directories written in full and then renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _sibling_name(path)
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue


@contextmanager
def atomic_directory(target: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield a new temporary folder beside ``target``; once the block has written it in full, it becomes
    ``target`` (one rename), with the permissions the umask gives. If the block fails, nothing changes.

    ``replace=True``: an existing ``target`` is replaced (a checkpoint written again). ``replace=False``: an
    existing ``target`` is kept and the new copy discarded (caches that concurrent processes may fill at the
    same time: the first complete copy wins).

    Example:
        >>> with atomic_directory("exports/ict") as tmp:  # doctest: +SKIP
        ...     (tmp / "model.safetensors").write_bytes(data)
    """
    import shutil

    target = Path(target)
    tmp = new_temp_dir(target)
    try:
        yield tmp
        honour_umask(tmp)  # safetensors (and others) write 0600 files
        if target.exists() and replace:
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if replace or not target.exists():
                raise  # (with replace=False, another process put its complete copy there first: keep it)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def current_umask() -> int:
    """The process's umask, read without changing it where the system says (Linux ``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (a brief change, at most once per written tree)
    os.umask(mask)
    return mask


def honour_umask(root: str | os.PathLike) -> None:
    """Give a tree icthp just wrote the permissions the umask gives new files (0644 / 0755 under 022).

    Some writers create private files whatever the umask: safetensors writes a 0600 temporary file and
    renames it, so weights (and LoRA files) would be unreadable to the group and others.
    """
    root = Path(root)
    mask = current_umask()
    for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    The file gets the permissions the umask gives (0644 under umask 022), as a file written in place would.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_file(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse, before any work, an output that cannot be written: its folder cannot be created or written
    (``/proc``, a read-only mount, a file standing where a folder should be), or the path is a folder.

    Creates the missing parent folders (the output would need them anyway) and a probe file, removed at once.

    Raises:
        InputError: naming the output and the reason.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        new_temp_file(path).unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise InputError(f"{what} {path} cannot be written: {reason}"
                         + (f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else "")) from None
    return path


def check_output(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), *, resume: bool = False,
                 overwrite: bool = False, what: str = "output") -> Path:
    """The checks every batch job runs on its output table before loading a model or reading an image.

    Refuses an output that is one of the ``inputs`` (it would be overwritten), that cannot be written, that
    exists without ``resume`` or ``overwrite``, or that has an interrupted job's journal beside it without
    either (rerunning would delete finished work).

    Raises:
        InputError: saying which of ``--resume`` / ``--overwrite`` to pass, or what else to do.
    """
    out = check_table_path(path)
    target = out.resolve()
    for source in inputs:
        source = Path(source)
        if source.exists() and source.resolve() == target:
            raise InputError(f"{what} {out} is the input {source}; write the results to a new file")
    check_writable(out, what)
    journal = journal_path(out)
    if not (resume or overwrite):
        if out.exists():
            raise InputError(f"{what} {out} exists; pass --resume to continue it or --overwrite to replace it")
        if journal.exists():
            raise InputError(f"{journal} holds the finished rows of an interrupted job writing {out}; pass --resume "
                             "to continue it or --overwrite to discard them and start again")
    return out


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
    to ``<path>.meta.json`` when given. Both files are written in full before either replaces an old one,
    so a full disk leaves the old pair (or nothing) in place, never a table beside another job's metadata.
    """
    path = check_table_path(path)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    suffix = path.suffix.lower()
    with contextlib.ExitStack() as stack:
        meta_tmp = stack.enter_context(atomic_path(meta_path(path))) if metadata is not None else None
        tmp = stack.enter_context(atomic_path(path))
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
        if meta_tmp is not None:
            meta_tmp.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
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


#: key of a journal's first line, which describes the job (the model and settings that wrote its rows)
JOURNAL_HEADER = "icthp_journal"


class Journal:
    """Append-only JSONL of finished rows; every append is flushed and fsynced, so a kill loses at most
    the line being written.

    The first line is a header, ``{"icthp_journal": 1, ...}``, describing the job that writes the rows
    (``header=``): a resume compares it with its own and refuses another model or setting. A torn last line
    (a kill or a full disk during a write) is cut off when the journal is opened again, so new rows never
    join it; lines that cannot be decoded are skipped when reading.

    Example:
        >>> j = Journal("out.csv.partial.jsonl", header={"model": "ict-hp"})  # doctest: +SKIP
        >>> j.append([{"image": "a.png", "ict": 0.3}]); j.close()  # doctest: +SKIP
        >>> Journal.header("out.csv.partial.jsonl"), Journal.read("out.csv.partial.jsonl")  # doctest: +SKIP
        ({'icthp_journal': 1, 'model': 'ict-hp'}, [{'image': 'a.png', 'ict': 0.3}])
    """

    def __init__(self, path: str | os.PathLike, header: dict[str, Any] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._cut_torn_tail()
        self._f = self.path.open("a", encoding="utf-8")
        if header is not None and self._f.tell() == 0:
            self._write([{JOURNAL_HEADER: 1, **header}])

    def _cut_torn_tail(self) -> None:
        if not self.path.is_file():
            return
        with self.path.open("rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            # Find the end of the last complete line, reading backwards a block at a time.
            end, block = size, 1 << 16
            while end > 0:
                start = max(0, end - block)
                f.seek(start)
                chunk = f.read(end - start)
                if end == size and chunk.endswith(b"\n"):
                    return  # intact
                nl = chunk.rfind(b"\n")
                if nl >= 0:
                    f.truncate(start + nl + 1)
                    return
                end = start
            f.truncate(0)

    def _put(self, text: str) -> None:
        self._f.write(text)
        self._f.flush()
        os.fsync(self._f.fileno())

    def _write(self, rows: Iterable[dict[str, Any]]) -> None:
        try:
            self._put("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        except OSError as exc:
            raise JobError(f"cannot write the journal {self.path}: {exc.strerror or exc}; the rows finished before are "
                           "kept in it: free space (or fix the disk) and rerun with --resume") from exc

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        self._write(rows)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # the data of a failed write; the journal holds what was fsynced
            self._f.close()

    @staticmethod
    def _lines(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
        path = Path(path)
        if not path.is_file():
            return
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn line (of a killed run, or of an older icthp that appended to one)
                if isinstance(obj, dict):
                    yield obj

    @staticmethod
    def read(path: str | os.PathLike) -> list[dict[str, Any]]:
        """The journaled rows (without the header)."""
        return [r for r in Journal._lines(path) if JOURNAL_HEADER not in r]

    @staticmethod
    def header(path: str | os.PathLike) -> dict[str, Any] | None:
        """The journal's header line, or None (no journal, or one written before journals had headers)."""
        return next((r for r in Journal._lines(path) if JOURNAL_HEADER in r), None)
