"""Reading WebDataset shards: finding them (brace patterns, globs, fsspec URLs) and streaming their samples.

- :func:`expand_shards`: brace patterns (``shards/{00000..00099}.tar``) and globs (``shards/*.tar``), local or
  any fsspec URL whose filesystem package is installed (``s3://``, ``gs://``, ``hf://``, ``https://``).
- :func:`iter_samples`: the samples of one shard, streamed: fsspec opens it, ``webdataset`` reads its members
  and groups them by ``__key__``; only the members named by :class:`ShardFormat` are read, each bounded in size
  (a larger one stops the shard), captions bounded in length (a longer one is that sample's error).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError

#: Shard names and the compression fsspec applies to them (tar's own detection would inflate a member unbounded).
SHARD_SUFFIXES = {".tar": None, ".tar.gz": "gzip", ".tgz": "gzip", ".tar.bz2": "bz2", ".tar.xz": "xz"}
#: Default member bounds: an encoded image (its pixels are bounded when it is decoded, by
#: :data:`icthp.preprocess.MAX_IMAGE_PIXELS`, as every image icthp reads), a caption member, and a caption's
#: characters (as ``icthp serve``).
MAX_IMAGE_BYTES = 64 << 20
MAX_TEXT_BYTES = 1 << 20
MAX_PROMPT_CHARS = 2000
#: What the tar reader may read past a member's end before the next one is announced (its record buffer).
_READ_SLACK = 64 << 10
#: Leading bytes of compressed data (gzip, bzip2, xz / lzma, zstd).
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x5d\x00\x00", b"\x28\xb5\x2f\xfd")


@dataclass(frozen=True)
class ShardRef:
    """One shard: where it is (a local path or an fsspec URL) and its ``name`` (file name less its suffix),
    which names its sidecar."""

    url: str
    name: str

    def sidecar(self, out_dir: str | os.PathLike) -> Path:
        return Path(out_dir) / f"{self.name}.parquet"


@dataclass(frozen=True)
class ShardFormat:
    """Which members of a sample are read, and their bounds.

    ``image_keys``: image member extensions, first present wins. ``caption_keys``: ``EXT`` (the member's UTF-8
    text) or ``EXT:KEY`` (the string ``KEY`` of a JSON member), first present wins. ``prompt``: one prompt for
    every sample (captions are then not read).
    """

    image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
    caption_keys: tuple[str, ...] = ("txt", "caption", "json:caption", "json:prompt")
    prompt: str | None = None
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_text_bytes: int = MAX_TEXT_BYTES
    max_prompt_chars: int = MAX_PROMPT_CHARS

    def __post_init__(self) -> None:
        if not self.image_keys:
            raise ValueError("image_keys: expected at least one image extension")
        for name in ("max_image_bytes", "max_text_bytes", "max_prompt_chars"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        for spec in self.caption_keys:
            ext, _, key = spec.partition(":")
            if not ext or (":" in spec and not key):
                raise ValueError(f"caption key {spec!r}: expected EXT (a text member) or EXT:KEY (a key of a JSON member)")

    @property
    def text_exts(self) -> set[str]:
        return set() if self.prompt is not None else {s.partition(":")[0].lower() for s in self.caption_keys}

    def describe(self) -> dict[str, Any]:
        """Every setting (recorded with the sidecars)."""
        return {**self.selection(), "max_image_bytes": self.max_image_bytes, "max_text_bytes": self.max_text_bytes,
                "max_prompt_chars": self.max_prompt_chars}

    def selection(self) -> dict[str, Any]:
        """What decides which image and prompt a sample is scored with: a resumed job must read the same (the bounds
        may change between runs)."""
        return {"image_keys": list(self.image_keys), "caption_keys": list(self.caption_keys), "prompt": self.prompt}


@dataclass
class Sample:
    """One sample of a shard: its ``__key__``, the image member's bytes, the prompt, or why it cannot be scored."""

    key: str
    image: bytes | None
    prompt: str | None
    error: str | None = None


class ShardError(RuntimeError):
    """A shard that cannot be read to its end (missing, not a tar, truncated, a member over its bound): it gets
    no sidecar."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"shard {url}: {reason}")
        self.url, self.reason = url, reason


# --------------------------------------------------------------------------------------------- finding shards


def require_webdataset() -> None:
    """Refuse WebDataset input, with the install line, when its packages are missing."""
    try:
        import braceexpand  # noqa: F401
        import fsspec  # noqa: F401
        import pyarrow  # noqa: F401
        import webdataset  # noqa: F401
    except ImportError as exc:
        raise InputError(f"WebDataset input needs {exc.name}: pip install 'icthp[webdataset]'") from None


def is_shard_pattern(value: str) -> bool:
    """Whether an input names WebDataset shards (``.tar``, ``.tar.gz`` ... after any pattern; an HTTP URL's query
    string aside)."""
    return _suffix(_path_part(str(value))) is not None


def _path_part(url: str) -> str:
    """The path of an HTTP(S) URL (a signed URL's ``?query`` is not part of the name, nor a glob); else ``url``."""
    if url.lower().startswith(("http://", "https://")):
        from urllib.parse import urlsplit

        return urlsplit(url).path
    return url


def _suffix(name: str) -> str | None:
    lower = name.lower()
    return next((s for s in sorted(SHARD_SUFFIXES, key=len, reverse=True) if lower.endswith(s)), None)


def _is_local(url: str) -> bool:
    from fsspec.core import split_protocol

    return split_protocol(url)[0] in (None, "file", "local")


def _check_filesystem(url: str) -> None:
    """Refuse a URL whose fsspec filesystem package is not installed (``s3://`` without s3fs), before any work."""
    import fsspec
    from fsspec.core import split_protocol

    try:
        fsspec.get_filesystem_class(split_protocol(url)[0])
    except ImportError as exc:
        raise InputError(f"{url}: {exc}") from None
    except ValueError as exc:  # an unknown protocol
        raise InputError(f"{url}: {exc}") from None


def expand_shards(patterns: Iterable[str]) -> list[ShardRef]:
    """Shards named by brace patterns and globs, in the order given (each glob's matches sorted).

    Raises:
        InputError: a pattern that matches nothing, a local shard that does not exist, a URL whose filesystem
            package is missing, or two shards whose sidecars would have the same name.

    Example:
        >>> [s.name for s in expand_shards(["shards/{00000..00002}.tar"])]  # doctest: +SKIP
        ['00000', '00001', '00002']
    """
    require_webdataset()
    import braceexpand
    from fsspec.core import url_to_fs

    urls: list[str] = []
    for pattern in patterns:
        for url in braceexpand.braceexpand(str(pattern)):
            if not any(c in _path_part(url) for c in "*?["):
                if _is_local(url):
                    path = url.removeprefix("file://")
                    if not os.path.isfile(path):
                        raise InputError(f"shard {url} does not exist")
                    url = os.path.abspath(path)
                else:
                    _check_filesystem(url)
                urls.append(url)
                continue
            try:
                fs, path = url_to_fs(url)
                found = sorted(fs.glob(path))
            except ImportError as exc:
                raise InputError(f"{url}: {exc}") from None
            except OSError as exc:
                raise InputError(f"{url}: {exc.strerror or exc}") from None
            found = [p for p in found if _suffix(p) is not None]
            if not found:
                raise InputError(f"no shard matches {url}")
            urls += [os.path.abspath(p) if _is_local(url) else fs.unstrip_protocol(p) for p in found]
    refs, names = [], {}
    for url in dict.fromkeys(urls):
        base = _path_part(url).rstrip("/").rsplit("/", 1)[-1]
        suffix = _suffix(base)
        if suffix is None:
            raise InputError(f"{url}: not a WebDataset shard (expected {', '.join(SHARD_SUFFIXES)})")
        name = base[: len(base) - len(suffix)]
        if name in names:
            raise InputError(f"shards {names[name]} and {url} would both write the sidecar {name}.parquet; "
                             "score them into separate --output folders")
        names[name] = url
        refs.append(ShardRef(url, name))
    if not refs:
        raise InputError("no shards to score")
    return refs


# --------------------------------------------------------------------------------------------- reading a shard


class _BoundedStream:
    """The file object webdataset's tar reader reads: refuses compressed data the name did not announce (the tar
    reader would inflate it unseen) and stops a selected member that runs past its bound, so a member is never
    read whole when it is too large."""

    def __init__(self, f, url: str):
        self._f, self.url = f, url
        self._first = True
        self._left: int | None = None
        self.member: str | None = None
        self.limit = 0
        self.image = True
        self.failure: str | None = None

    def __repr__(self) -> str:  # webdataset appends the stream to its error messages
        return self.url

    def arm(self, member: str, limit: int, image: bool) -> None:
        self.member, self.limit, self.image, self._left = member, limit, image, limit + _READ_SLACK

    def disarm(self) -> None:
        self._left = None

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n if n is not None and n >= 0 else 1 << 16)
        if self._first:
            self._first = False
            if data.startswith(_COMPRESSED):
                self.failure = (f"compressed data in a file named {self.url.rsplit('/', 1)[-1]}: name it "
                                f"{'/'.join(s for s in SHARD_SUFFIXES if s != '.tar')} so that it is decompressed "
                                "as it is read")
                raise OSError(self.failure)
        if self._left is not None:
            self._left -= len(data)
            if self._left < 0:
                self.failure = _too_large(self.member, self.limit, self.image)
                raise OSError(self.failure)
        return data


def _too_large(member: str | None, limit: int, image: bool) -> str:
    bound = "--max-image-mb raises the bound" if image else "caption members are bounded"
    return f"member {member} is larger than {limit} bytes ({bound}): the shard is not scored"


def _split(fname: str) -> tuple[str | None, str | None]:
    from webdataset.tariterators import base_plus_ext

    prefix, suffix = base_plus_ext(fname)
    return prefix, (suffix.lower() if suffix is not None else None)


def iter_samples(url: str, fmt: ShardFormat = ShardFormat()) -> Iterator[Sample]:
    """The samples of one shard in order, streamed (one sample's members in memory at a time).

    Raises:
        ShardError: the shard cannot be opened or read to its end, or a member is over its bound.
    """
    import fsspec
    from webdataset.tariterators import group_by_keys, tar_file_expander

    image_exts = {e.lower() for e in fmt.image_keys}
    text_exts = fmt.text_exts
    suffix = _suffix(_path_part(url).rsplit("/", 1)[-1]) or ".tar"
    try:
        f = fsspec.open(url, "rb", compression=SHARD_SUFFIXES[suffix]).open()
    except OSError as exc:
        raise ShardError(url, exc.strerror or str(exc)) from None
    except Exception as exc:  # a missing filesystem package, a network client's own errors
        raise ShardError(url, f"{type(exc).__name__}: {exc}") from None
    stream = _BoundedStream(f, url)

    def select(fname: str) -> bool:
        _, ext = _split(fname)
        if ext in image_exts:
            stream.arm(fname, fmt.max_image_bytes, image=True)
            return True
        if ext in text_exts:
            stream.arm(fname, fmt.max_text_bytes, image=False)
            return True
        stream.disarm()
        return False

    def read_members() -> Iterator[dict[str, Any]]:
        for member in tar_file_expander([{"url": url, "stream": stream}], select_files=select):
            stream.disarm()  # the member is read; what the reader reads next belongs to the next one
            if member:
                image = _split(member["fname"])[1] in image_exts
                limit = fmt.max_image_bytes if image else fmt.max_text_bytes
                if len(member["data"]) > limit:
                    stream.failure = _too_large(member["fname"], limit, image)
                    raise OSError(stream.failure)
            yield member

    seen: set[str] = set()
    try:
        for raw in group_by_keys(read_members()):
            sample = _sample(raw, fmt, image_exts)
            if sample.key in seen and sample.error is None:
                sample = Sample(sample.key, None, sample.prompt, f"duplicate __key__ {sample.key!r} in the shard")
            seen.add(sample.key)
            yield sample
    except ShardError:
        raise
    except Exception as exc:  # the tar reader's errors (truncated, not a tar, a duplicate member ...)
        reason = stream.failure or f"{type(exc).__name__}: {str(exc.args[0]) if exc.args else exc}"
        raise ShardError(url, reason.replace(f" @ {url}", "")) from None
    finally:
        with contextlib.suppress(Exception):
            f.close()


def _sample(raw: dict[str, Any], fmt: ShardFormat, image_exts: set[str]) -> Sample:
    key = str(raw["__key__"])
    image = next((raw[e.lower()] for e in fmt.image_keys if e.lower() in raw), None)
    prompt, error = fmt.prompt, None
    if prompt is None:
        prompt, error = _caption(raw, fmt)
    if error is None and prompt is not None and len(prompt) > fmt.max_prompt_chars:
        prompt, error = prompt[: fmt.max_prompt_chars], (f"caption has {len(prompt)} characters; the limit is "
                                                          f"{fmt.max_prompt_chars} (--max-prompt-chars)")
    if image is None and error is None:
        error = f"no image member ({', '.join(fmt.image_keys)}; --image-key names others)"
    return Sample(key, image, prompt, error)


def _caption(raw: dict[str, Any], fmt: ShardFormat) -> tuple[str | None, str | None]:
    """The first caption ``fmt.caption_keys`` finds in a sample, or None; or why a caption member is unusable."""
    parsed: dict[str, Any] = {}
    for spec in fmt.caption_keys:
        ext, _, key = spec.partition(":")
        ext = ext.lower()
        if ext not in raw:
            continue
        try:
            text = raw[ext].decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, f"member .{ext} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        if not key:
            return text, None  # strict UTF-8 decoding never gives a lone surrogate
        if ext not in parsed:
            try:
                parsed[ext] = json.loads(text)
            except json.JSONDecodeError as exc:
                return None, f"member .{ext} is not valid JSON ({exc.msg})"
        obj = parsed[ext]
        value = obj.get(key) if isinstance(obj, dict) else None
        if value is None:
            continue
        if not isinstance(value, str):
            return None, f"member .{ext}: {key!r} must be a string, got {type(value).__name__}"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return None, f"member .{ext}: {key!r} is not valid Unicode"
        return value, None
    return None, None


