"""Parsing and checking ``POST /v1/score`` bodies. Every problem becomes a :class:`RequestError` (4xx JSON).

Three ways to send images (see docs/serve.md):

- ``multipart/form-data``: files in ``images`` (encoded PNG/JPEG/WebP/...), prompt in ``prompt`` or one
  ``prompts`` field per image;
- ``multipart/form-data`` with a raw ``array`` file (uint8, ``B*H*W*C`` bytes, row-major) and ``shape``
  ``"B,H,W,C"``: what RL trainers hold in memory, sent without encoding;
- ``application/json``: ``{"prompt" | "prompts", "images": [base64 or data URL]}`` or ``{..., "array":
  {"shape": [B, H, W, C], "data": base64}}``.

The server never opens paths it is sent: images are only ever bytes from the request.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import ImageLoadError
from ..preprocess import load_image
from .config import ServeConfig

#: Decoders the service runs on network input (no EPS/Ghostscript, no exotic plug-ins).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


class RequestError(Exception):
    """A client error: HTTP ``status``, a stable machine-readable ``code`` and a message for people."""

    def __init__(self, status: int, code: str, message: str, *, index: int | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.index = status, code, message, index
        self.headers = headers or {}

    def body(self) -> dict:
        err: dict = {"code": self.code, "message": self.message}
        if self.index is not None:
            err["index"] = self.index
        return {"error": err}


@dataclass
class ScoreRequest:
    """A checked request: either encoded ``blobs`` or a uint8 ``array`` ``[B, H, W, C]``; prompts per image; whether
    per-prompt advantages are asked for."""

    blobs: list[bytes] | None
    array: np.ndarray | None
    prompts: list[str] | None
    #: per-prompt advantages asked for (``None``: the service's default)
    advantages: bool | None = None

    @property
    def n(self) -> int:
        return len(self.blobs) if self.blobs is not None else int(self.array.shape[0])  # type: ignore[union-attr]


def _b64(data: object, what: str, index: int | None = None) -> bytes:
    if not isinstance(data, str):
        raise RequestError(400, "invalid_base64", f"{what}: expected a base64 string, got {type(data).__name__}",
                           index=index)
    if data.startswith("data:"):  # data URL from a browser: "data:image/png;base64,...."
        _, sep, data = data.partition(",")
        if not sep:
            raise RequestError(400, "invalid_base64", f"{what}: malformed data URL", index=index)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(400, "invalid_base64", f"{what}: not valid base64 ({exc})", index=index) from None


def parse_shape(shape: object, config: ServeConfig) -> tuple[int, int, int, int]:
    """Check an array shape ``[B, H, W, C]`` (C in 1, 3, 4) against the limits."""
    if isinstance(shape, str):
        try:
            shape = [int(s) for s in shape.replace(" ", "").split(",")]
        except ValueError:
            raise RequestError(400, "invalid_array", f"shape: expected 'B,H,W,C' integers, got {shape!r}") from None
    if (not isinstance(shape, (list, tuple)) or len(shape) != 4
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)):
        raise RequestError(400, "invalid_array", f"shape: expected [B, H, W, C] integers, got {shape!r}")
    b, h, w, c = shape
    if b < 1 or h < 1 or w < 1:
        raise RequestError(400, "invalid_array", f"shape: every dimension must be >= 1, got {list(shape)}")
    if c not in (1, 3, 4):
        raise RequestError(400, "invalid_array", f"shape: channels must be 1, 3 or 4 (HWC layout), got {c}")
    if h * w > config.max_image_pixels:
        raise RequestError(400, "image_too_large",
                           f"array images are {w}x{h} = {h * w} pixels; the limit is {config.max_image_pixels}")
    return b, h, w, c


def array_from_bytes(raw: bytes, shape: tuple[int, int, int, int]) -> np.ndarray:
    expected = int(np.prod(shape))
    if len(raw) != expected:
        raise RequestError(400, "invalid_array",
                           f"array: shape {list(shape)} needs {expected} uint8 bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)


def check_prompts(prompt: object, prompts: object, n: int, needs_prompt: bool,
                  config: ServeConfig) -> list[str] | None:
    """One ``prompt`` for all images or ``prompts`` with one per image; lengths checked."""
    if prompt is not None and prompts is not None:
        raise RequestError(400, "invalid_prompt", "give either 'prompt' (one for all images) or 'prompts', not both")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise RequestError(400, "invalid_prompt", f"prompt: expected a string, got {type(prompt).__name__}")
        prompts = [prompt] * n
    elif prompts is not None:
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise RequestError(400, "invalid_prompt", "prompts: expected a list of strings")
        if len(prompts) == 1 and n > 1:
            prompts = prompts * n
        if len(prompts) != n:
            raise RequestError(400, "invalid_prompt", f"prompts: expected 1 or {n} (one per image), got {len(prompts)}")
    elif needs_prompt:
        raise RequestError(400, "missing_prompt", "this model scores images against a prompt: send 'prompt' or 'prompts'")
    if prompts is None:
        return None
    for i, p in enumerate(prompts):
        if len(p) > config.max_prompt_chars:
            raise RequestError(400, "prompt_too_long",
                               f"prompt {i} has {len(p)} characters; the limit is {config.max_prompt_chars}", index=i)
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate, from a JSON "\ud800" escape
            raise RequestError(400, "invalid_prompt", f"prompt {i} is not valid Unicode ({exc.reason} at "
                                                      f"character {exc.start})", index=i) from None
    return prompts


def check_count(n: int, config: ServeConfig) -> None:
    if n < 1:
        raise RequestError(400, "no_images", "send at least one image ('images' or 'array')")
    if n > config.max_images_per_request:
        raise RequestError(413, "too_many_images",
                           f"{n} images in one request; the limit is {config.max_images_per_request}")


def max_json_values(config: ServeConfig) -> int:
    """An upper bound on the ``{``, ``[`` and ``,`` bytes of a valid request body.

    A valid body holds a few fields, at most ``max_images_per_request`` images (one comma each, plus the
    comma of a ``data:`` URL) and as many prompts, whose characters may be anything. Counting these bytes
    (in C, before parsing) refuses a body such as ``{"images": [{}, {}, ...]}``, whose tens of millions of
    values would take gigabytes to parse, at the cost of a scan.
    """
    per_image = 4 + config.max_prompt_chars
    return 64 + 2 * config.max_images_per_request * per_image


def parse_json(body: bytes, config: ServeConfig, needs_prompt: bool) -> ScoreRequest:
    """A JSON request body -> :class:`ScoreRequest` (run it in a worker thread: it is CPU-bound)."""
    bound = max_json_values(config)
    values = body.count(b"{") + body.count(b"[") + body.count(b",")
    if values > bound:
        raise RequestError(400, "invalid_json", f"request body has {values} JSON objects, lists or items; a request "
                                                f"within the limits has at most {bound}")
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, "invalid_json", f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise RequestError(400, "invalid_json", "request body is nested too deeply") from None
    if not isinstance(payload, dict):
        raise RequestError(400, "invalid_json", "request body: expected a JSON object")
    unknown = set(payload) - {"prompt", "prompts", "images", "array", "advantages"}
    if unknown:
        raise RequestError(400, "invalid_json", f"unknown field(s) {sorted(unknown)}; expected prompt, prompts, "
                                                "images, array, advantages")
    advantages = payload.get("advantages")
    if advantages is not None and not isinstance(advantages, bool):
        raise RequestError(400, "invalid_json", f"advantages: expected true or false, got {advantages!r}")
    images, array = payload.get("images"), payload.get("array")
    if (images is None) == (array is None):
        raise RequestError(400, "no_images", "send exactly one of 'images' (base64 list) or 'array'")
    if images is not None:
        if not isinstance(images, list):
            raise RequestError(400, "invalid_json", "images: expected a list of base64 strings")
        check_count(len(images), config)
        blobs, arr = [_b64(im, f"images[{i}]", i) for i, im in enumerate(images)], None
    else:
        if not isinstance(array, dict) or set(array) - {"shape", "data", "dtype"}:
            raise RequestError(400, "invalid_array", "array: expected {'shape': [B, H, W, C], 'data': base64}")
        if array.get("dtype", "uint8") != "uint8":
            raise RequestError(400, "invalid_array", f"array.dtype: only uint8 is accepted, got {array['dtype']!r}")
        shape = parse_shape(array.get("shape"), config)
        check_count(shape[0], config)
        blobs, arr = None, array_from_bytes(_b64(array.get("data"), "array.data"), shape)
    n = len(blobs) if blobs is not None else shape[0]
    return ScoreRequest(blobs, arr, check_prompts(payload.get("prompt"), payload.get("prompts"), n, needs_prompt,
                                                  config), advantages)


async def parse_form(form, config: ServeConfig, needs_prompt: bool) -> ScoreRequest:
    """A parsed starlette form (``await request.form(...)``) -> :class:`ScoreRequest`."""
    unknown = set(form.keys()) - {"prompt", "prompts", "images", "array", "shape", "advantages"}
    if unknown:
        raise RequestError(400, "invalid_form", f"unknown form field(s) {sorted(unknown)}; expected prompt, "
                                                "prompts, images, array, shape, advantages")
    advantages = _form_bool(form.get("advantages"), "advantages")
    files, array = form.getlist("images"), form.get("array")
    if files and array is not None:
        raise RequestError(400, "invalid_form", "send either 'images' files or one 'array', not both")
    prompt = form.get("prompt")
    prompts = form.getlist("prompts") or None
    if array is not None:
        if isinstance(array, str):
            raise RequestError(400, "invalid_array", "array: expected a file part with the raw uint8 bytes")
        shape = parse_shape(form.get("shape"), config)
        check_count(shape[0], config)
        arr = array_from_bytes(await array.read(), shape)
        return ScoreRequest(None, arr, check_prompts(prompt, prompts, shape[0], needs_prompt, config), advantages)
    check_count(len(files), config)
    blobs = []
    for i, f in enumerate(files):
        if isinstance(f, str):
            raise RequestError(400, "invalid_form", f"images[{i}]: expected a file part, got a text field", index=i)
        blobs.append(await f.read())
    return ScoreRequest(blobs, None, check_prompts(prompt, prompts, len(blobs), needs_prompt, config), advantages)


def _form_bool(value: object, name: str) -> bool | None:
    if value is None:
        return None
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise RequestError(400, "invalid_form", f"{name}: expected true or false, got {value!r}")


def decode_one(request: ScoreRequest, i: int, config: ServeConfig) -> Image.Image:
    """Image ``i`` of a request as an RGB PIL image (runs in a decode thread)."""
    if request.array is not None:
        a = request.array[i]
        return Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("RGB")
    blob = request.blobs[i]  # type: ignore[index]
    if not blob:
        raise RequestError(400, "invalid_image", f"images[{i}] is empty", index=i)
    try:
        return load_image(blob, max_pixels=config.max_image_pixels, formats=IMAGE_FORMATS)
    except ImageLoadError as exc:
        too_large = "exceeds the limit" in exc.reason or "DecompressionBomb" in exc.reason
        code = "image_too_large" if too_large else "invalid_image"
        reason = exc.reason
        if "UnidentifiedImageError" in reason:  # PIL's text names a BytesIO object: useless to a client
            reason = f"not an image in a supported format ({', '.join(IMAGE_FORMATS)})"
        raise RequestError(400, code, f"images[{i}]: {reason}", index=i) from None
