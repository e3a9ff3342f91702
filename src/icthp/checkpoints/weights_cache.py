"""A verified safetensors copy of released ``.bin`` weights, kept in icthp's cache so later loads memory-map it.

A released ``pytorch_model.bin`` is a torch zip pickle: ``torch.load`` unpickles it and reads (or maps) every
record, and a mapped file the user owns must be copied out (rewriting it in place would change, or crash, a
model left on its pages). On the first load of such a file the loader checks it as usual (keys, shapes,
finite values) and then :func:`store` writes the tensors it uses into ``$ICTHP_CACHE/weights/v1/<key>.safetensors``
(``$ICTHP_CACHE``: :func:`icthp.files.cache_dir`); later loads :func:`load` that file with one ``mmap`` and
use its pages as the parameters (float32 on CPU: no copy at all).

Key: the source file's size, modification time (ns) and a sha256 of its first and last MiB (like
:func:`icthp.jobs.weights_fingerprint`; the end of a torch zip file is its central directory, which holds a
CRC32 of every record, so a change anywhere in the tensors changes it), and the part kept (``"all"``, or
``"vision"`` for an HP backbone whose text tower is never used). A changed source file gets a new entry.

Never trusted blindly:

- written into a temporary file, read back and compared byte for byte, tensor by tensor, with the tensors it
  was written from (after they passed the loader's checks), then renamed into place (one atomic rename:
  concurrent processes each write their own copy, and a reader never sees a partial file);
- every load re-checks the header (format, source fingerprint, part, tensor names equal to the recorded
  manifest, dtypes, shapes, offsets covering the file exactly) and, in one pass over the data, a CRC32 of
  every tensor and that every floating value is finite. Anything else (a truncated, overwritten or edited
  entry, extra or missing tensors, NaN/Inf) is a damaged entry: a warning is logged, the entry is deleted
  and rebuilt from the source file;
- the source file is still the reference: its fingerprint must match the one recorded in the entry.

Exact: every tensor starts on a 64-byte boundary of the file (:data:`ALIGN`, as torch's own allocations do),
so float32 kernels see the same alignment as after ``torch.load`` and scores are bit-identical.

The mapping is private (copy on write): writing to a parameter never reaches the file. icthp never rewrites
an entry in place (it replaces it by rename, and deletes by unlink), so a mapped entry cannot change under a
running model; deleting the cache while icthp runs is safe.

Memory: mapped pages count in a process's resident set only while touched. The check releases the pages it
read (``MADV_DONTNEED``; they stay in the page cache), a converted tensor (bfloat16) releases its float32
pages, and ICT's text tower releases its pages after each use (:func:`release_after_use`): what stays
resident is what the model keeps using, the image towers.

Bounded: entries are evicted, least recently used first, beyond ``$ICTHP_WEIGHTS_CACHE_MAX_GB`` (default 32)
in total. Files under ``$ICTHP_WEIGHTS_CACHE_MIN_MB`` (default 64) are read directly (``torch.load`` is
as fast there). ``ICTHP_WEIGHTS_CACHE=0`` turns the cache off; :func:`clear` (or deleting the folder)
empties it.

Example:
    >>> from icthp.checkpoints import weights_cache
    >>> weights_cache.cache_root().name
    'v1'
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import struct
import time
import weakref
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("icthp.checkpoints")

CACHE_FORMAT = 1
#: The ``__metadata__`` key that marks an icthp weights-cache entry (its value: :data:`CACHE_FORMAT`).
MARKER = "icthp_weights_cache"
PARTS = ("all", "vision")
_ENDS_BYTES = 1 << 20  # bytes hashed at each end of the source file
_CHUNK = 1 << 20  # bytes per step of the verifying pass (crc32 and min/max of one L2-sized chunk)
_MAX_HEADER = 64 << 20
#: Every tensor starts at a multiple of this many bytes of the file (and so of the page-aligned mapping), as
#: torch's allocator and torch.save's zip records align them: float32 kernels (MKL) may round differently on
#: data aligned otherwise, and exact-mode scores must not change. Padding entries fill the gaps.
ALIGN = 64
_PAD = "__icthp_pad_"
_STALE_TEMP_S = 6 * 3600
_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NUMPY_FLOATS = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}


class MappedState(dict):
    """A state dict whose tensors are views of one private mapping of a cache entry. ``release(tensor)`` drops
    that tensor's pages from the process's resident set (``MADV_DONTNEED``; they stay in the page cache): the
    loader calls it once a tensor has been converted (e.g. to bfloat16), so a conversion never holds the float32
    file and the converted weights in memory at once. Tensors outside the mapping are left alone."""

    def __init__(self, items=(), release=None):
        super().__init__(items)
        self.release = release or (lambda tensor: None)


def _releaser(mm: mmap.mmap, base: torch.Tensor):
    low, size, page = base.data_ptr(), len(mm), mmap.PAGESIZE

    advice = getattr(mmap, "MADV_DONTNEED", None)

    def release_bytes(a: int, b: int) -> None:
        lo, hi = -(-a // page) * page, b // page * page  # whole pages inside [a, b) only
        if advice is not None and 0 <= lo < hi <= size:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                mm.madvise(advice, lo, hi - lo)

    def release(tensor: torch.Tensor) -> None:
        offset = tensor.data_ptr() - low
        if 0 <= offset < size:
            release_bytes(offset, offset + tensor.numel() * tensor.element_size())

    release.bytes = release_bytes
    return release


def release_after_use(module: torch.nn.Module, release) -> int:
    """After each forward of a submodule of ``module`` that holds parameters, drop the pages of those parameters
    that are views of a cache mapping from the resident set (``release``: a :class:`MappedState`'s).

    For weights used once in a while, such as ICT's text tower (run once per distinct prompt, whose embeddings
    the scorer caches): they do not stay resident beside the image towers; the next use takes them back from
    the page cache (minor faults, no copy). A parameter written in place since loading (training) is never
    released (its pages may hold the only copy of the new values); one moved or converted is not a view of
    the mapping any more and is left alone. Returns the number of hooks registered.
    """
    hooks = 0
    for sub in module.modules():
        own = list(sub.parameters(recurse=False))
        if not own:
            continue
        versions = [(weakref.ref(p), p._version) for p in own]

        def hook(mod, args, output, versions=versions):
            for ref, version in versions:
                p = ref()
                if p is not None and p._version == version and p.device.type == "cpu":
                    release(p)

        sub.register_forward_hook(hook)
        hooks += 1
    return hooks


class DamagedEntry(Exception):
    """A cache entry that fails a check (the message says which); it is deleted and rebuilt."""


# --------------------------------------------------------------------------------------------- settings


def enabled() -> bool:
    """False when ``$ICTHP_WEIGHTS_CACHE`` is ``0`` / ``false`` / ``off`` / ``no``, or where private file mappings
    do not exist (Windows)."""
    if not hasattr(mmap, "MAP_PRIVATE"):
        return False
    return os.environ.get("ICTHP_WEIGHTS_CACHE", "1").strip().lower() not in ("0", "false", "off", "no")


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        logger.warning("$%s=%r is not a number; using %s", name, os.environ[name], default)
        return default


def min_bytes() -> int:
    """Smallest source file cached (``$ICTHP_WEIGHTS_CACHE_MIN_MB``, default 64 MiB)."""
    return int(_env_float("ICTHP_WEIGHTS_CACHE_MIN_MB", 64) * 2**20)


def max_bytes() -> int:
    """Total size the cache is kept under (``$ICTHP_WEIGHTS_CACHE_MAX_GB``, default 32 GiB)."""
    return int(_env_float("ICTHP_WEIGHTS_CACHE_MAX_GB", 32) * 2**30)


def cache_root() -> Path:
    """``<icthp cache>/weights/v1`` (:func:`icthp.files.cache_dir`, i.e. ``$ICTHP_CACHE`` when set)."""
    from ..files import cache_dir

    return cache_dir() / "weights" / f"v{CACHE_FORMAT}"


def eligible(source: str | os.PathLike) -> bool:
    """Whether loads of ``source`` go through the cache: a ``.bin`` file of at least :func:`min_bytes`, with the
    cache on."""
    path = Path(source)
    try:
        return enabled() and path.suffix == ".bin" and path.stat().st_size >= min_bytes()
    except OSError:
        return False


# --------------------------------------------------------------------------------------------- keys


def fingerprint(source: str | os.PathLike) -> dict[str, Any]:
    """Size, modification time (ns) and sha256 of the first and last MiB of ``source``.

    Example:
        >>> fingerprint("ICT/pytorch_model.bin")  # doctest: +SKIP
        {'size': 3944692767, 'mtime_ns': 1719..., 'sha256_ends': '5b0c...'}
    """
    path = Path(source)
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        h = hashlib.sha256()
        h.update(f.read(_ENDS_BYTES))
        if st.st_size > _ENDS_BYTES:
            f.seek(max(_ENDS_BYTES, st.st_size - _ENDS_BYTES))
            h.update(f.read())
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256_ends": h.hexdigest()}


def entry_path(source: str | os.PathLike, part: str, fp: Mapping[str, Any] | None = None) -> Path:
    """Where the cache entry of ``part`` of ``source`` is (whether or not it exists)."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; expected one of {', '.join(PARTS)}")
    fp = fingerprint(source) if fp is None else fp
    key = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "part": part, **fp}, sort_keys=True).encode()).hexdigest()
    return cache_root() / f"{key[:40]}.safetensors"


# --------------------------------------------------------------------------------------------- reading


def _parse_header(buf, size: int) -> tuple[int, dict[str, Any], dict[str, str]]:
    """``(data start, tensors, metadata)`` of a safetensors file of ``size`` bytes whose start is ``buf``,
    checked: offsets contiguous from 0 and covering the file exactly, each tensor on an :data:`ALIGN`-byte
    boundary of the file (padding entries, ``__icthp_pad_<i>``, fill the gaps and are left out)."""
    if size < 8:
        raise DamagedEntry(f"{size} bytes: shorter than a safetensors header")
    (n,) = struct.unpack("<Q", bytes(buf[:8]))
    if n > min(_MAX_HEADER, size - 8):
        raise DamagedEntry(f"header length {n} does not fit the file ({size} bytes)")
    try:
        header = json.loads(bytes(buf[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DamagedEntry(f"header is not JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise DamagedEntry("header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise DamagedEntry("no string metadata in the header")
    start = 8 + n
    tensors: dict[str, Any] = {}
    spans = []
    for name, spec in header.items():
        try:
            dtype = _DTYPES[spec["dtype"]]
            shape = [int(d) for d in spec["shape"]]
            begin, end = (int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise DamagedEntry(f"tensor {name!r}: malformed header entry") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if any(d < 0 for d in shape) or end - begin != int(np.prod(shape, dtype=np.int64)) * itemsize:
            raise DamagedEntry(f"tensor {name!r}: shape {shape} does not match its {end - begin} bytes")
        spans.append((begin, end))
        if name.startswith(_PAD):
            if dtype != torch.uint8 or len(shape) != 1 or shape[0] >= ALIGN:
                raise DamagedEntry(f"{name!r} is not a padding entry")
            continue
        if (start + begin) % ALIGN:
            raise DamagedEntry(f"tensor {name!r} does not start on a {ALIGN}-byte boundary")
        tensors[name] = (dtype, shape, begin, end)
    spans.sort()
    position = 0
    for begin, end in spans:
        if begin != position:
            raise DamagedEntry("tensor data overlap or leave gaps")
        position = end
    if start + position != size:
        raise DamagedEntry(f"tensor data end at byte {start + position}, the file has {size}")
    return start, tensors, meta


def _check_data(name: str, tensor: torch.Tensor, expected_crc: int, release=None) -> None:
    """One pass over ``tensor``'s bytes, a chunk at a time: its CRC32, and min/max of each floating chunk
    while the chunk is in cache (NaN propagates to both; an Inf is one of them). ``release(begin, end)`` is
    called with the byte range of each chunk checked (see :func:`_open_entry`)."""
    flat = tensor.reshape(-1)
    raw = flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0, np.uint8)
    np_float = _NUMPY_FLOATS.get(tensor.dtype)
    values = flat.numpy() if np_float is not None and flat.numel() else None
    itemsize = tensor.element_size()
    crc = 0
    finite = True
    step = max(1, _CHUNK // itemsize)
    for i in range(0, flat.numel(), step):
        crc = zlib.crc32(raw[i * itemsize : (i + step) * itemsize], crc)
        if values is not None:
            chunk = values[i : i + step]
            finite = finite and bool(np.isfinite(chunk.min()) and np.isfinite(chunk.max()))
        if release is not None and values is not None:
            release(i * itemsize, min(i + step, flat.numel()) * itemsize)
    if tensor.is_floating_point() and values is None and flat.numel():  # bfloat16: no numpy dtype
        low, high = torch.aminmax(flat)
        finite = bool(torch.isfinite(low) & torch.isfinite(high))
    if crc != expected_crc:
        raise DamagedEntry(f"tensor {name!r}: CRC32 {crc:08x}, recorded {expected_crc:08x}")
    if not finite:
        raise DamagedEntry(f"tensor {name!r} holds non-finite values (NaN or Inf)")


def _open_entry(path: Path, fp: Mapping[str, Any], part: str) -> tuple[MappedState, os.stat_result]:
    """Map ``path`` (private, copy on write) and check it all; the tensors are views of the mapping."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_size == 0:
            raise DamagedEntry("empty file")
        # One descriptor for the header and the data: a concurrent rename cannot mix two files.
        mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    start, tensors, meta = _parse_header(memoryview(mm), st.st_size)
    if meta.get(MARKER) != str(CACHE_FORMAT) or meta.get("part") != part:
        raise DamagedEntry(f"not an icthp weights cache entry of format {CACHE_FORMAT} for part {part!r}")
    try:
        recorded = json.loads(meta["source"])
        crcs = json.loads(meta["crc32"])
    except (KeyError, json.JSONDecodeError):
        raise DamagedEntry("its metadata has no source fingerprint or checksums") from None
    if recorded != {k: fp[k] for k in ("size", "mtime_ns", "sha256_ends")}:
        raise DamagedEntry("it was made from another file (source fingerprint differs)")
    if not isinstance(crcs, dict) or set(crcs) != set(tensors):
        extra = sorted(set(tensors) - set(crcs)) if isinstance(crcs, dict) else []
        missing = sorted(set(crcs) - set(tensors)) if isinstance(crcs, dict) else []
        raise DamagedEntry(f"its tensors differ from its manifest (extra: {extra[:5]}, missing: {missing[:5]})")
    base = torch.frombuffer(mm, dtype=torch.uint8)  # keeps the mapping alive as long as a view of it lives
    release = _releaser(mm, base)
    state = MappedState(release=release)
    for name, (dtype, shape, begin, end) in tensors.items():
        tensor = base[start + begin : start + end].view(dtype).view(shape)
        # Pages just checked leave the resident set again (nothing wrote to them: they stay in the page cache and
        # come back on the next touch without disk reads). So the check costs no memory, and tensors the model
        # never reads in full (the token embedding table: a few rows per prompt) never become resident.
        offset = start + begin
        _check_data(name, tensor, int(crcs[name]), lambda a, b, o=offset: release.bytes(o + a, o + b))
        state[name] = tensor
    return state, st


def _discard(path: Path, st: os.stat_result | None) -> None:
    """Delete a damaged entry, unless another process has already replaced it with a new file."""
    try:
        now = os.stat(path)
        if st is None or (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev):
            path.unlink()
    except OSError:
        pass


def load(source: str | os.PathLike, part: str = "all") -> dict[str, torch.Tensor] | None:
    """The cached tensors of ``part`` of ``source``, checked (see the module docstring), as views of one private
    mapping of the entry; None when there is no usable entry (none yet, the cache off, the source not
    :func:`eligible`, or a damaged entry, which is then deleted with a warning).

    Example:
        >>> state = load("ICT/pytorch_model.bin")  # doctest: +SKIP
    """
    source = Path(source)
    if not eligible(source):
        return None
    try:
        fp = fingerprint(source)
        path = entry_path(source, part, fp)
    except OSError:
        return None
    if not path.is_file():
        return None
    st = None
    try:
        state, st = _open_entry(path, fp, part)
    except (DamagedEntry, OSError, ValueError, TypeError, RuntimeError) as exc:
        logger.warning("weights cache entry %s of %s is damaged (%s): deleting it; it is rebuilt from the "
                       "source file", path, source, exc)
        _discard(path, st)
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # least recently used goes first when the cache is over its size
    return state


def discard(source: str | os.PathLike, part: str, reason: str) -> None:
    """Delete the entry of ``part`` of ``source`` with a warning: it passed its own checks but the loader refuses it
    (e.g. its tensors do not fit the model the config describes, which the source file does); the loader then
    reads the source file, which rebuilds the entry."""
    try:
        path = entry_path(source, part)
    except OSError:
        return
    logger.warning("weights cache entry %s of %s is damaged (%s): deleting it; it is rebuilt from the source file",
                   path, source, reason)
    _discard(path, None)


# --------------------------------------------------------------------------------------------- writing


def _crc(tensor: torch.Tensor) -> int:
    flat = tensor.reshape(-1)
    if not flat.numel():
        return 0
    raw = flat.view(torch.uint8).numpy()
    crc = 0
    for i in range(0, raw.size, 16 * _CHUNK):
        crc = zlib.crc32(raw[i : i + 16 * _CHUNK], crc)
    return crc


def _compare_written(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    """Read the written file back (streamed: nothing mapped) and compare it byte for byte, tensor by tensor."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
        start, tensors, _ = _parse_header(head + f.read(min(n, _MAX_HEADER)), size)
        if set(tensors) != set(state):
            raise DamagedEntry("the written file holds other tensors than were written")
        buf = bytearray(16 * _CHUNK)
        view = np.frombuffer(buf, dtype=np.uint8)
        for name, (dtype, shape, begin, end) in tensors.items():
            src = state[name]
            if src.dtype != dtype or list(src.shape) != shape:
                raise DamagedEntry(f"tensor {name!r} was written as {dtype} {shape}")
            flat = src.reshape(-1)
            raw = flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0, np.uint8)
            f.seek(start + begin)
            for i in range(0, end - begin, len(buf)):
                got = f.readinto(memoryview(buf)[: min(len(buf), end - begin - i)])
                if not np.array_equal(view[:got], raw[i : i + got]) or got != min(len(buf), end - begin - i):
                    raise DamagedEntry(f"tensor {name!r} reads back different from what was written")


def _write(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file whose tensors each start on an :data:`ALIGN`-byte boundary of the file."""
    layout: list[tuple[str, torch.Tensor | int]] = []
    header: dict[str, Any] = {}
    position = 0
    for i, (name, tensor) in enumerate(tensors.items()):
        gap = -position % ALIGN
        if gap:
            header[f"{_PAD}{i}"] = {"dtype": "U8", "shape": [gap], "data_offsets": [position, position + gap]}
            layout.append((f"{_PAD}{i}", gap))
            position += gap
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [position, position + nbytes]}
        layout.append((name, tensor))
        position += nbytes
    header["__metadata__"] = dict(metadata)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % ALIGN)  # the data start on a boundary too (safetensors allows the spaces)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, item in layout:
            if isinstance(item, int):
                f.write(bytes(item))
            elif item.numel():
                f.write(memoryview(item.reshape(-1).view(torch.uint8).numpy()))


def store(source: str | os.PathLike, part: str, state: Mapping[str, torch.Tensor]) -> Path | None:
    """Write ``state`` (the tensors of ``part`` of ``source`` the loader uses, already checked) as a cache entry:
    into a temporary file, read back and compared, then renamed into place; then trim the cache to its size.

    Returns the entry's path, or None when the cache is off, the source not :func:`eligible`, or the entry
    could not be written (a warning says why; loading goes on from the source either way).
    """
    from ..files import atomic_path

    source = Path(source)
    if not eligible(source):
        return None
    try:
        fp = fingerprint(source)
        path = entry_path(source, part, fp)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        metadata = {MARKER: str(CACHE_FORMAT), "part": part, "source": json.dumps(fp, sort_keys=True),
                    "source_name": source.name, "crc32": json.dumps({k: _crc(v) for k, v in tensors.items()})}
        path.parent.mkdir(parents=True, exist_ok=True)
        _trim(path.parent, keep=path, incoming=sum(v.numel() * v.element_size() for v in tensors.values()))
        with atomic_path(path) as tmp:
            _write(tmp, tensors, metadata)
            _compare_written(tmp, tensors)
    except (OSError, DamagedEntry, RuntimeError, ValueError, KeyError) as exc:
        logger.warning("could not write the weights cache entry of %s (%s: %s); it is read directly",
                       source, type(exc).__name__, exc)
        return None
    # Said once, on the first use of a file: the copy takes disk space the user did not ask for by name.
    logger.info("weights cache: wrote a verified safetensors copy of %s (%s, %.2f GB) to %s; later loads map it "
                "($ICTHP_WEIGHTS_CACHE=0 turns the cache off, $ICTHP_WEIGHTS_CACHE_MAX_GB bounds it)",
                source, part, path.stat().st_size / 1e9, path)
    return path


def _entries(root: Path) -> list[tuple[float, int, Path]]:
    out = []
    for p in root.glob("*.safetensors"):
        try:
            st = p.stat()
        except OSError:
            continue
        out.append((st.st_mtime, st.st_size, p))
    return sorted(out)


def _trim(root: Path, keep: Path, incoming: int) -> None:
    """Delete least recently used entries until the cache, with ``incoming`` bytes more, fits :func:`max_bytes`;
    and temporary files of writers that died long ago."""
    now = time.time()
    for tmp in root.glob(".*.tmp"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TEMP_S:
                tmp.unlink()
        except OSError:
            pass
    entries = [e for e in _entries(root) if e[2] != keep]
    total = sum(size for _, size, _ in entries) + incoming
    for _, size, p in entries:
        if total <= max_bytes():
            break
        try:
            p.unlink()
            total -= size
            logger.info("weights cache over %d bytes: deleted %s", max_bytes(), p)
        except OSError:
            pass


def clear() -> int:
    """Delete every entry of the weights cache; returns the bytes freed.

    Example:
        >>> from icthp.checkpoints import weights_cache
        >>> weights_cache.clear()  # doctest: +SKIP
        1197060728
    """
    root = cache_root()
    freed = 0
    for _, size, p in _entries(root) if root.is_dir() else []:
        try:
            p.unlink()
            freed += size
        except OSError:
            pass
    return freed
