"""The remote-reward protocol of RL trainers (ddpo-pytorch, flow_grpo, reward-server), read safely.

Those trainers POST a pickle of ``{"images": [JPEG bytes, ...], "prompts": [...], "metadata" | "meta_datas":
..., ...}`` to a URL and read back a pickle of ``{"scores": [...]}`` (or ``"outputs"``). ``icthp serve``
answers it on ``--pickle-path`` (default ``/``, where those clients post) so their configs point at icthp
unchanged.

The body comes from the network, so it is never given to :func:`pickle.loads`. :func:`safe_loads` runs
pickle's own machine with a ``find_class`` that resolves **no importable global**: the only names it accepts
are the few that plain data needs when pickled by those clients (``_codecs.encode`` for ``bytes`` in protocols
0-2; numpy's array and scalar reconstructors, because flow_grpo sends ``np.array_split`` slices as prompts),
and each maps to a decoder of icthp's own that builds plain Python values (``str``, ``bytes``, numbers, lists)
or a uint8/float numpy array from raw bytes after checking the dtype, never calling numpy's reconstructors.
Every other global, persistent id or extension code is an ``UnpicklingError`` raised before anything of it
is built: a 400. The result is then walked once with a bound on nodes (shared references counted each time:
a "billion laughs" of nested references is refused) and on depth.
"""

from __future__ import annotations

import io
import math
import pickle
import re
import struct
from typing import Any, ClassVar

import numpy as np

from .config import ServeConfig
from .inputs import RequestError, ScoreRequest, check_count, check_prompts

#: Most values (containers, strings, numbers; shared references counted each time they are reached) in a body.
MAX_NODES = 200_000
#: Deepest nesting of containers in a body (a trainer's body is 3 deep; its metadata a few more).
MAX_DEPTH = 32
#: Most elements of one numpy array in a body (prompts, metadata values; images travel as encoded bytes).
MAX_ARRAY_ELEMENTS = 64 * 4096 * 4096
#: Keys the trainers send besides images and prompts, read and ignored (they are still bounded).
IGNORED_KEYS = ("metadata", "meta_datas", "metadatas", "only_strict", "queries", "answers")
#: pickle protocol of the answers (Python 3.4+ reads it)
ANSWER_PROTOCOL = 4

_DTYPE = re.compile(r"^([<>|=]?)([USfiub])(\d{1,4})$|^([<>|=]?)(O)(\d{0,2})$|^(b1|\?)$")


class _Stub:
    """Base of the stand-ins: no instance dictionary, and BUILD only through the ``__setstate__`` they define."""

    __slots__ = ()

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"{type(self).__name__}: unexpected state")

    def __reduce__(self):  # pragma: no cover - never pickled back
        raise TypeError("not picklable")


class _NdarrayType(_Stub):
    """Stands for ``numpy.ndarray`` as the first argument of ``_reconstruct``; nothing else."""


class _Dtype(_Stub):
    """Stands for ``numpy.dtype(spec, align, copy)``: a checked spec (``U5``, ``<f4``, ``O8``, ``b1``...)."""

    __slots__ = ("order", "spec")

    def __init__(self, spec: Any = None, align: Any = False, copy: Any = True):
        if not isinstance(spec, str) or not _DTYPE.match(spec):
            raise pickle.UnpicklingError(f"numpy dtype {spec!r} is not accepted (strings, bytes, numbers, bool, object)")
        self.spec, self.order = spec, "|"

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise pickle.UnpicklingError("numpy dtype: unexpected state")
        self.order = state[1]

    @property
    def is_object(self) -> bool:
        return "O" in self.spec

    def numpy(self) -> np.dtype:
        spec = self.spec.lstrip("<>|=")
        return np.dtype(spec if spec in ("b1", "?") else (self.order if self.order in "<>" else "=") + spec)


class _Array(_Stub):
    """Stands for an ndarray built by ``_reconstruct`` then BUILD with ``(version, shape, dtype, fortran, data)``,
    or by ``_frombuffer(data, dtype, shape, order)`` (protocol 5)."""

    __slots__ = ("data", "dtype", "fortran", "shape")

    def __init__(self):
        self.shape, self.dtype, self.fortran, self.data = None, None, False, None

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("numpy array: unexpected state")
        shape, dtype, fortran, data = state[-4:]
        self._set(shape, dtype, fortran, data)

    def _set(self, shape, dtype, fortran, data):
        if (not isinstance(shape, tuple) or len(shape) > 8
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise pickle.UnpicklingError(f"numpy array: bad shape {shape!r}")
        if not isinstance(dtype, _Dtype):
            raise pickle.UnpicklingError("numpy array: bad dtype")
        if math.prod(shape) > MAX_ARRAY_ELEMENTS:
            raise pickle.UnpicklingError(f"numpy array of shape {shape}: more than {MAX_ARRAY_ELEMENTS} elements")
        if dtype.is_object:
            if not isinstance(data, list) or len(data) != math.prod(shape):
                raise pickle.UnpicklingError("numpy object array: its data must be a list of its elements")
        elif not isinstance(data, (bytes, bytearray)):
            raise pickle.UnpicklingError("numpy array: its data must be bytes")
        self.shape, self.dtype, self.fortran, self.data = shape, dtype, bool(fortran), data

    def plain(self) -> Any:
        """A numeric array as numpy (copied from the bytes), strings / objects as (nested) lists."""
        if self.dtype is None:
            raise pickle.UnpicklingError("numpy array without data")
        if self.dtype.is_object:
            flat = list(self.data)
            return _nest(flat, self.shape)
        dt = self.dtype.numpy()
        if len(self.data) != math.prod(self.shape) * dt.itemsize:
            raise pickle.UnpicklingError(f"numpy array of shape {self.shape} and dtype {dt}: "
                                         f"{len(self.data)} data bytes")
        arr = np.frombuffer(bytes(self.data), dtype=dt).reshape(self.shape, order="F" if self.fortran else "C")
        if dt.kind in "US":
            return arr.tolist()
        return np.array(arr)


def _nest(flat: list, shape: tuple) -> Any:
    if len(shape) <= 1:
        return flat
    step = math.prod(shape[1:])
    return [_nest(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def _reconstruct(cls: Any, shape: Any = (0,), dtype_code: Any = b"b") -> _Array:
    if not isinstance(cls, type) or not issubclass(cls, _NdarrayType):
        raise pickle.UnpicklingError("numpy _reconstruct: only plain arrays are accepted")
    return _Array()


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> _Array:
    arr = _Array()
    arr._set(shape, dtype, order == "F", bytes(buffer) if isinstance(buffer, (bytes, bytearray)) else buffer)
    return arr


class _Scalar(_Stub):
    """Stands for a numpy scalar ``scalar(dtype, raw bytes)`` (``np.str_``, ``np.float32``...)."""

    __slots__ = ("value",)

    def __init__(self, dtype: Any = None, raw: Any = None):
        if not isinstance(dtype, _Dtype) or dtype.is_object or not isinstance(raw, (bytes, bytearray)):
            raise pickle.UnpicklingError("numpy scalar: only strings, bytes, numbers and bools are accepted")
        dt = dtype.numpy()
        if len(raw) != dt.itemsize:
            raise pickle.UnpicklingError(f"numpy scalar of dtype {dt}: {len(raw)} bytes")
        self.value = np.frombuffer(bytes(raw), dtype=dt)[0].item()


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """``bytes`` in pickle protocols 0-2 are ``_codecs.encode(latin-1 text, "latin1")``."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode: only bytes as pickled by protocols 0-2 are accepted")
    return text.encode("latin-1")


_ALLOWED: dict[tuple[str, str], Any] = {("_codecs", "encode"): _codecs_encode}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_mod, "_reconstruct")] = _reconstruct
    _ALLOWED[(_mod, "scalar")] = _Scalar
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[(_mod, "_frombuffer")] = _frombuffer
_ALLOWED[("numpy", "ndarray")] = _NdarrayType
_ALLOWED[("numpy", "dtype")] = _Dtype


#: Most pickle opcodes run for one body: each builds at most one value, so this bounds the memory a body can make
#: the service hold whatever its size (a trainer's body needs a few per image and prompt, plus its metadata).
MAX_OPCODES = 1_000_000


class _RestrictedUnpickler(pickle._Unpickler):
    """pickle's own (pure Python) machine, with: no importable global (:data:`_ALLOWED` stand-ins only), no
    persistent ids, an opcode budget, and counted reads that never allocate more than the body holds.

    The pure-Python unpickler rather than the C one: the C one allocates a ``BINBYTES8`` value of the length the
    body claims before reading it (an 8-byte claim of 60 GB), and cannot count opcodes.
    """

    dispatch: ClassVar[dict] = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, max_opcodes: int):
        super().__init__(io.BytesIO(data))
        self._size, self._opcodes = len(data), max_opcodes

    def find_class(self, module: str, name: str) -> Any:
        target = _ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed (only plain data is accepted: "
                                         "dict, list, tuple, str, bytes, numbers, bool, None, numpy arrays of those)")
        return target

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")

    def _load_bytearray8(self) -> None:
        (n,) = struct.unpack("<Q", self.read(8))
        if n > self._size:  # pickle's own handler zero-fills a bytearray of the claimed length first
            raise pickle.UnpicklingError(f"BYTEARRAY8 of {n} bytes in a body of {self._size}")
        data = self.read(n)
        if len(data) != n:
            raise pickle.UnpicklingError("pickle data was truncated")
        self.append(bytearray(data))


def _counted(handler):
    def run(self: _RestrictedUnpickler) -> None:
        self._opcodes -= 1
        if self._opcodes < 0:
            raise pickle.UnpicklingError(f"more than {MAX_OPCODES} pickle opcodes")
        handler(self)

    return run


_RestrictedUnpickler.dispatch[pickle.BYTEARRAY8[0]] = _RestrictedUnpickler._load_bytearray8
_RestrictedUnpickler.dispatch = {k: _counted(v) for k, v in _RestrictedUnpickler.dispatch.items()}


def safe_loads(data: bytes, *, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH,
               max_opcodes: int = MAX_OPCODES) -> Any:
    """Unpickle untrusted ``data`` into plain Python values, or raise ``pickle.UnpicklingError``.

    No importable global is ever resolved (see the module's docstring); numpy arrays of numbers come back as
    numpy arrays (copies), of strings or objects as lists; tuples come back as lists.

    Example:
        >>> safe_loads(pickle.dumps({"images": [b"\\xff\\xd8"], "prompts": ["a cat"]}))
        {'images': [b'\\xff\\xd8'], 'prompts': ['a cat']}
        >>> safe_loads(pickle.dumps(print))
        Traceback (most recent call last):
        ...
        _pickle.UnpicklingError: global builtins.print is not allowed (only plain data is accepted: dict, list, tuple, str, bytes, numbers, bool, None, numpy arrays of those)
    """
    try:
        raw = _RestrictedUnpickler(data, max_opcodes).load()
    except pickle.UnpicklingError:
        raise
    except RecursionError:
        raise pickle.UnpicklingError("nested too deeply") from None
    except Exception as exc:  # truncated data, bad opcodes, a stand-in refusing its arguments...
        raise pickle.UnpicklingError(f"{type(exc).__name__}: {exc}") from None
    budget = [max_nodes]
    return _plain(raw, 0, max_depth, budget)


def _plain(obj: Any, depth: int, max_depth: int, budget: list[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise pickle.UnpicklingError("too many values (shared references count each time they are reached)")
    if depth > max_depth:
        raise pickle.UnpicklingError(f"nested deeper than {max_depth} levels")
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if isinstance(obj, bytearray):
        return bytes(obj)
    if isinstance(obj, (list, tuple)):
        return [_plain(x, depth + 1, max_depth, budget) for x in obj]
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, bytes)) and k is not None:
                raise pickle.UnpicklingError(f"dict key of type {type(k).__name__} is not accepted")
            out[k] = _plain(v, depth + 1, max_depth, budget)
        return out
    if isinstance(obj, _Array):
        value = obj.plain()
        if isinstance(value, np.ndarray):
            budget[0] -= 1
            return value
        return _plain(value, depth, max_depth, budget)
    if isinstance(obj, _Scalar):
        return obj.value
    if isinstance(obj, (set, frozenset, complex)):
        raise pickle.UnpicklingError(f"{type(obj).__name__} values are not accepted")
    raise pickle.UnpicklingError(f"values of type {type(obj).__name__} are not accepted")


# ------------------------------------------------------------------------------------------------ requests


def parse_pickle(body: bytes, config: ServeConfig, needs_prompt: bool) -> ScoreRequest:
    """A trainer's pickled body -> :class:`ScoreRequest` (CPU-bound: run it in a worker thread).

    ``images``: encoded images (bytes; JPEG as those trainers send, or any format ``/v1/score`` reads) or a
    uint8 array ``[B, H, W, C]``; ``prompts`` (or ``prompt``): one string per image or one for all (a list,
    a tuple or a numpy array of strings); ``advantages``: ask for per-prompt normalised rewards.
    """
    try:
        payload = safe_loads(body)
    except pickle.UnpicklingError as exc:
        raise RequestError(400, "invalid_pickle", f"request body refused: {exc}") from None
    if not isinstance(payload, dict):
        raise RequestError(400, "invalid_pickle", f"request body: expected a pickled dict, got {type(payload).__name__}")
    known = {"images", "prompts", "prompt", "advantages", *IGNORED_KEYS}
    unknown = sorted(str(k) for k in payload if k not in known)
    if unknown:
        raise RequestError(400, "invalid_pickle", f"unknown key(s) {unknown}; expected images, prompts, advantages "
                                                  f"(and, ignored, {', '.join(IGNORED_KEYS)})")
    images = payload.get("images")
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise RequestError(400, "invalid_array", f"images: an array must be uint8 [B, H, W, C], got {images.dtype} "
                                                     f"of shape {list(images.shape)}")
        from .inputs import parse_shape

        parse_shape(list(images.shape), config)
        check_count(images.shape[0], config)
        blobs, array, n = None, np.ascontiguousarray(images), int(images.shape[0])
    elif isinstance(images, list):
        check_count(len(images), config)
        for i, blob in enumerate(images):
            if not isinstance(blob, bytes):
                raise RequestError(400, "invalid_image", f"images[{i}]: expected encoded image bytes, got "
                                                         f"{type(blob).__name__}", index=i)
        blobs, array, n = images, None, len(images)
    else:
        raise RequestError(400, "no_images", "images: expected a list of encoded images (JPEG bytes) or a uint8 "
                                             f"array [B, H, W, C], got {type(images).__name__}")
    prompt, prompts = payload.get("prompt"), payload.get("prompts")
    if isinstance(prompts, str):
        prompt, prompts = prompts, None
    advantages = payload.get("advantages")
    if advantages is not None and not isinstance(advantages, bool):
        raise RequestError(400, "invalid_pickle", f"advantages: expected True or False, got {advantages!r}")
    return ScoreRequest(blobs, array, check_prompts(prompt, prompts, n, needs_prompt, config), advantages)


def answer(values: list[float], columns: dict[str, list[float]], *, reward: str, model: str, untrained: bool,
           advantages: list[float] | None) -> bytes:
    """The pickled answer.

    ``scores`` is what ddpo / flow_grpo / reward-server clients read (``outputs`` holds the same list, the
    key other clients of that protocol read): the served reward, or its per-prompt advantages when they were
    asked for. ``rewards`` is always the reward itself, ``columns`` every score column; ``reward``, ``model``
    and ``untrained`` say what made them.
    """
    returned = advantages if advantages is not None else values
    body = {"scores": returned, "outputs": returned, "rewards": values, "advantages": advantages,
            "columns": columns, "reward": reward, "model": model, "untrained": untrained}
    return pickle.dumps(body, protocol=ANSWER_PROTOCOL)


def error(status: int, code: str, message: str, index: int | None = None) -> bytes:
    """A pickled error answer, ``{"error": "code: message", "code", "status", "index"}`` (verl-omni's HTTP scorer
    client reads ``error``; the others fail on the missing ``scores`` with this in the body)."""
    return pickle.dumps({"error": f"{code}: {message}", "code": code, "status": status, "index": index},
                        protocol=ANSWER_PROTOCOL)
