"""On-disk cache of per-image model outputs for ``icthp bench``, keyed by image content and model.

One SQLite file (``<dir>/bench-cache.sqlite``, WAL mode): each row is one named float32 tensor for one
``(model key, image sha256, prompt)``; the prompt is empty for prompt-independent image state (ICT image
embeddings, HP logits), which is what most scorers store, so a second prompt or a re-run costs no forward.
Every batch is committed as it is computed, so an interrupted benchmark resumes where it stopped, and
several processes (multi-GPU runs) can write to the same file.

Values are raw float32 bytes with their shape: nothing is unpickled. Every row carries a CRC32 of its key,
shape and bytes, and only finite values are stored: a row whose checksum does not match, whose shape does not
fit its bytes or whose values are not finite was damaged on disk. :meth:`EmbeddingCache.get` never returns
it and :meth:`EmbeddingCache.drop_invalid` deletes it, so that the benchmark computes it again.

Rows written before checksums existed (table ``entries`` of earlier icthp versions) cannot be verified and
are not read: they are stale, and computed again into the checked table ``entries_v2`` on first use.

A file that is not a usable SQLite database (truncated, overwritten, not SQLite at all) raises
:class:`CacheError`, which names the file and the way out; nothing is moved or deleted.
"""

from __future__ import annotations

import hashlib
import math
import os
import sqlite3
import stat
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError

#: Bumped whenever what a scorer stores changes meaning; older rows are then ignored.
CACHE_FORMAT = 1
FILE_NAME = "bench-cache.sqlite"
#: The checked table. The unchecked ``entries`` table of earlier versions is left alone (and unread), so an
#: older icthp sharing the folder keeps working with its own rows.
TABLE = "entries_v2"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    model TEXT NOT NULL, image TEXT NOT NULL, prompt TEXT NOT NULL, name TEXT NOT NULL,
    shape TEXT NOT NULL, data BLOB NOT NULL, checksum INTEGER NOT NULL,
    PRIMARY KEY (model, image, prompt, name)
) WITHOUT ROWID;
"""
_SQLITE_MAGIC = b"SQLite format 3\x00"
_CHUNK = 400  # keys per query: SQLite's default limit on bound variables is 32766 (999 on old builds)

Key = tuple[str, str]  # (image sha256, prompt)


class CacheError(InputError):
    """The cache file cannot be used (damaged, not SQLite, not writable); the message names it and the way out."""


def content_hash(image: str | os.PathLike | bytes) -> str:
    """sha256 of an image file's bytes (or of encoded bytes): the cache key of an image.

    Example:
        >>> content_hash(b"abc")[:12]
        'ba7816bf8f01'
    """
    h = hashlib.sha256()
    if isinstance(image, (bytes, bytearray)):
        h.update(image)
    else:
        with open(image, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def model_key(scorer) -> str:
    """A key that changes when the weights, their precision or the scorer's computation change.

    Built from the scorer's class, dtype, the cache format and, for every checkpoint it read, the files'
    paths, sizes and modification times (hashing gigabytes of weights on every run would cost more than it
    saves). A scorer may add to it with a ``cache_identity()`` method.
    """
    parts = [type(scorer).__qualname__, str(scorer.dtype), f"format={CACHE_FORMAT}"]
    extra = getattr(scorer, "cache_identity", None)
    if callable(extra):
        parts.append(str(extra()))
    tokenization = getattr(scorer, "tokenization", None)
    if tokenization and not getattr(scorer, "has_image_state", False):
        # Entries of such a scorer are per (image, prompt): they depend on how prompts become ids.
        parts.append(f"tokenization={tokenization}")
    info = getattr(scorer, "info", None)
    if info is not None:
        parts.append(f"{info.kind}:{info.path}")
        for f in sorted(getattr(info, "files", []) or []):
            try:
                st = os.stat(f)
                parts.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
            except OSError:
                parts.append(f"{f}:missing")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def entry_checksum(model: str, image: str, prompt: str, name: str, shape: str, data: bytes) -> int:
    """CRC32 of a row's key, shape and bytes: a stored row is read only if it still matches.

    The key is included so that a row moved under another key (a damaged page) does not verify either.
    CRC32 runs at several GB/s: verifying costs far less than reading the rows.

    Example:
        >>> entry_checksum("m", "img", "", "hp_logit", "", b"\\x00\\x00\\x80?")
        637562357
    """
    head = "\x00".join((model, image, prompt, name, shape)).encode("utf-8", "surrogatepass")
    return zlib.crc32(data, zlib.crc32(head))


def _decode(shape: str, data: bytes) -> np.ndarray | None:
    """The stored array (a read-only view of ``data``), or None when the shape does not fit the bytes."""
    try:
        dims = tuple(map(int, shape.split(","))) if shape else ()
    except ValueError:
        return None
    if min(dims, default=0) < 0 or 4 * math.prod(dims) != len(data):
        return None
    return np.frombuffer(data, dtype=np.float32).reshape(dims)


def _verify(model: str, rows: Sequence[tuple]) -> tuple[list[tuple[Key, str, np.ndarray]], set[Key]]:
    """Split ``(image, prompt, name, shape, data, checksum)`` rows into ``(key, name, array)`` rows that verify
    and the keys of those that do not (checksum, shape, or a value that is not finite)."""
    good, bad = [], set()
    for image, prompt, name, shape, data, checksum in rows:
        # SQLite types values per cell: a damaged cell may come back as another type, which is damage too.
        typed = isinstance(name, str) and isinstance(shape, str) and isinstance(data, bytes)
        ok = typed and checksum == entry_checksum(model, image, prompt, name, shape, data)
        arr = _decode(shape, data) if ok else None
        if arr is None:
            bad.add((image, prompt))
        else:
            good.append(((image, prompt), name, arr))
    # Finiteness in one pass over the whole chunk (a call per row would cost more than the checksums); rows
    # are looked at one by one only when something is not finite.
    if good and not np.isfinite(np.concatenate([arr.ravel() for _, _, arr in good])).all():
        finite = [row for row in good if np.isfinite(row[2]).all()]
        bad.update(key for key, _, arr in good if not np.isfinite(arr).all())
        good = finite
    return good, bad


def _problem(path: Path, what: str) -> str:
    return (f"the bench cache {path} {what}. It only holds model outputs that can be computed again: delete it "
            f"(with {path.name}-wal and {path.name}-shm beside it, if present), or pass another --cache-dir "
            "(cache_dir= in Python).")


def check_cache_file(path: str | os.PathLike) -> None:
    """Refuse a file that cannot be a whole SQLite database before SQLite opens it.

    SQLite notices a truncated file only when a query reaches a missing page, possibly after minutes of
    computing; the header tells at once (page size x page count, valid when the header says so).
    """
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise CacheError(_problem(path, "is not a file"))
        with open(path, "rb") as f:
            head = f.read(100)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CacheError(_problem(path, f"cannot be read ({exc.strerror or exc})")) from None
    if st.st_size == 0:
        return  # SQLite's empty database: the schema is created in it
    if not head.startswith(_SQLITE_MAGIC):
        raise CacheError(_problem(path, "is not an SQLite database (its first bytes are not SQLite's header)"))
    if len(head) < 100:
        raise CacheError(_problem(path, f"is truncated ({st.st_size} bytes, less than SQLite's header)"))
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(head[28:32], "big")
    size_is_valid = head[24:28] == head[92:96]  # "in-header database size" is valid only then
    if size_is_valid and pages and pages * page_size > st.st_size:
        raise CacheError(_problem(path, f"is truncated ({st.st_size} bytes; its header says "
                                        f"{pages} pages of {page_size} bytes)"))


class EmbeddingCache:
    """Per-image tensors on disk. ``get``/``put`` take lists of image hashes (and prompts).

    Raises :class:`CacheError` (an :class:`~icthp.errors.InputError`) when the file cannot be used.

    Example:
        >>> cache = EmbeddingCache("/tmp/icthp-bench-cache")  # doctest: +SKIP
        >>> cache.put("model", ["<sha>"], {"hp_logit": torch.tensor([0.3])})  # doctest: +SKIP
        >>> cache.get("model", ["<sha>"])  # doctest: +SKIP
        {'<sha>': {'hp_logit': tensor(0.3000)}}
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / FILE_NAME
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file where the folder should be, no permission, ...
            raise CacheError(f"cannot use {self.directory} as the bench cache folder ({exc.strerror or exc}): "
                             "pass another --cache-dir (cache_dir= in Python)") from None
        check_cache_file(self.path)
        self._db = self._connect()

    def _connect(self) -> sqlite3.Connection:
        # check_same_thread=False: one connection used from the bench's thread only, but created elsewhere.
        try:
            db = sqlite3.connect(self.path, timeout=120, check_same_thread=False)
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            db.close()
            raise self._error(exc) from exc
        return db

    def _error(self, exc: sqlite3.Error) -> CacheError:
        code = getattr(exc, "sqlite_errorname", "")
        if code in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
            return CacheError(_problem(self.path, f"is damaged or not an SQLite database ({exc})"))
        if code in ("SQLITE_BUSY", "SQLITE_LOCKED"):  # nothing is wrong with the file: deleting it is no answer
            return CacheError(f"the bench cache {self.path} stayed locked by another process ({exc}): wait for it "
                              "to finish, or pass another --cache-dir (cache_dir= in Python)")
        return CacheError(_problem(self.path, f"could not be used ({exc})"))

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """SQLite errors (a page damaged after opening, a full disk) as a :class:`CacheError` naming the file."""
        try:
            yield
        except sqlite3.Error as exc:
            raise self._error(exc) from exc

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _rows(self, model: str, keys: Sequence[Key], columns: str = "") -> Iterator[list[tuple]]:
        """``(image, prompt, *columns)`` of every row of ``keys``, a list per query.

        Queried by image (``model = ? AND image IN (...)``, a primary-key search) and filtered on the prompt
        here: a disjunction of ``(image = ? AND prompt = ?)`` terms made SQLite test every row of the model
        against every term, which took seconds for a few thousand entries.
        """
        wanted = set(keys)
        images = list(dict.fromkeys(image for image, _ in wanted))
        select = f"SELECT image, prompt{', ' + columns if columns else ''} FROM {TABLE}"
        for start in range(0, len(images), _CHUNK):
            part = images[start : start + _CHUNK]
            with self._guard():
                rows = self._db.execute(f"{select} WHERE model = ? AND image IN ({', '.join('?' * len(part))})",
                                        [model, *part]).fetchall()
            yield [row for row in rows if (row[0], row[1]) in wanted]

    def _verified(self, model: str, keys: Sequence[Key]) -> tuple[dict[Key, dict[str, np.ndarray]], set[Key]]:
        """Rows of ``keys`` that verify, as arrays, and the keys with at least one row that does not."""
        found: dict[Key, dict[str, np.ndarray]] = {}
        bad: set[Key] = set()
        for rows in self._rows(model, keys, "name, shape, data, checksum"):
            good, failed = _verify(model, rows)
            bad |= failed
            for key, name, arr in good:
                found.setdefault(key, {})[name] = arr
        return found, bad

    def get(self, model: str, images: Sequence[str], prompts: Sequence[str] | None = None,
            names: Iterable[str] | None = None) -> dict:
        """Cached rows: ``{image: {name: Tensor}}`` (or ``{(image, prompt): ...}`` when ``prompts`` is given).

        Entries missing any of ``names``, or with a row that fails verification, are left out, so they are
        recomputed.
        """
        keys = list(zip(images, prompts, strict=True)) if prompts is not None else [(i, "") for i in images]
        found, bad = self._verified(model, keys)
        wanted = set(names) if names is not None else None
        out = {}
        for key, row in found.items():
            if key not in bad and (wanted is None or wanted <= set(row)):
                tensors = {name: torch.from_numpy(arr.copy()) for name, arr in row.items()}
                out[key if prompts is not None else key[0]] = tensors
        return out

    def drop_invalid(self, model: str, keys: Sequence[Key]) -> int:
        """Delete the entries of ``keys`` that are damaged, so that they are computed again; returns how many.

        An entry is damaged when one of its rows fails verification (checksum, shape, finiteness) or it lacks
        a tensor that the other entries asked for have (a row lost under a damaged key). Nothing is written
        when all verify (the common case); otherwise the damaged entries are checked again and deleted in one
        write transaction, so an entry another process has just rewritten is not deleted.
        """
        keys = list(keys)
        found, bad = self._verified(model, keys)
        expected = {name for row in found.values() for name in row}
        bad |= {key for key, row in found.items() if set(row) != expected}
        if not bad:
            return 0
        with self._guard():
            self._db.execute("BEGIN IMMEDIATE")  # the write lock: no other writer between check and delete
            try:
                again, still = self._verified(model, sorted(bad))
                still |= {key for key, row in again.items() if set(row) != expected}
                self._db.executemany(f"DELETE FROM {TABLE} WHERE model = ? AND image = ? AND prompt = ?",
                                     [(model, image, prompt) for image, prompt in still])
                self._db.commit()
            except BaseException:
                self._db.rollback()
                raise
        return len(still)

    def present(self, model: str, keys: Sequence[Key]) -> set[Key]:
        """Which ``(image, prompt)`` keys have entries (read without their data: a cheap check, unverified)."""
        return {(image, prompt) for rows in self._rows(model, list(keys)) for image, prompt in rows}

    def put(self, model: str, images: Sequence[str], values: dict[str, torch.Tensor],
            prompts: Sequence[str] | None = None) -> None:
        """Store row ``i`` of every tensor in ``values`` for ``images[i]`` (one transaction).

        Raises:
            ValueError: a value is NaN or infinite. Nothing is stored then: the cache holds finite values only,
                which is what lets a read tell damage from data.
        """
        prompts = list(prompts) if prompts is not None else [""] * len(images)
        rows = []
        for name, tensor in values.items():
            arr = tensor.detach().float().cpu().numpy()
            if arr.shape[0] != len(images):
                raise ValueError(f"{name}: {arr.shape[0]} rows for {len(images)} images")
            _check_finite(name, arr, images)
            for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
                row = np.array(arr[i], dtype=np.float32, order="C")  # ascontiguousarray would make 0-d rows 1-d
                shape, data = ",".join(str(d) for d in row.shape), row.tobytes()
                rows.append((model, image, prompt, name, shape, data,
                             entry_checksum(model, image, prompt, name, shape, data)))
        with self._guard(), self._db:
            self._db.executemany(f"INSERT OR REPLACE INTO {TABLE} VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def count(self, model: str | None = None) -> int:
        with self._guard():
            if model is None:
                return self._db.execute(f"SELECT COUNT(DISTINCT model || image || prompt) FROM {TABLE}").fetchone()[0]
            return self._db.execute(f"SELECT COUNT(DISTINCT image || prompt) FROM {TABLE} WHERE model = ?",
                                    (model,)).fetchone()[0]


def _check_finite(name: str, arr: np.ndarray, images: Sequence[str]) -> None:
    finite = np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
    if not finite.all():
        bad = [images[i] for i in np.flatnonzero(~finite)]
        raise ValueError(f"the scorer's {name} is NaN or infinite for {len(bad)} image(s) (sha256 {bad[0]}"
                         f"{', ...' if len(bad) > 1 else ''}): its weights or dtype are broken; nothing of this "
                         "batch was cached or scored")

