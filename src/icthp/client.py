"""Python client of ``icthp serve``, with retries, timeouts and the ``reward_fn`` shape RL trainers use.

Needs ``httpx`` (``pip install "icthp[client]"``); no torch import unless you pass tensors.

Images can be file paths (read here, sent as bytes), encoded bytes, PIL images, numpy arrays (channels-last
``[H, W, C]`` / ``[B, H, W, C]``, uint8 or float in [0, 1]) or torch tensors (channels-first ``[C, H, W]`` /
``[B, C, H, W]``, float in [0, 1] or uint8). Arrays and tensors of one shape travel as one raw uint8 array
(no encoding); float pixels are quantised to uint8 (``round(x * 255)``), exactly what saving them as PNG does.

Example:
    >>> from icthp.client import RewardClient
    >>> with RewardClient("http://127.0.0.1:8000") as client:  # doctest: +SKIP
    ...     result = client.score(["I1.jpg", "I2.jpg", "I3.png"], "a wooden Ferrari")
    ...     result["ict_hp"], result.ranking["order"]
"""

from __future__ import annotations

import io
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TOKEN_ENV = "ICTHP_SERVE_TOKEN"
_RETRY_STATUS = {429, 502, 503, 504}


class ServiceError(RuntimeError):
    """The service answered with an error (``status``, machine-readable ``code``, ``message``)."""

    def __init__(self, status: int, code: str, message: str, index: int | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.index = status, code, message, index


@dataclass
class ScoreResult:
    """Scores of one :meth:`RewardClient.score` call, in input order.

    ``result["ict"]`` is a float32 array; ``result.main`` names the model's main column (``ict_hp``...).
    """

    scores: dict[str, list[float]]
    main: str
    untrained: bool = False
    ranking: dict | None = None
    timing_ms: list[dict] = field(default_factory=list)

    def __getitem__(self, column: str) -> np.ndarray:
        try:
            return np.asarray(self.scores[column], dtype=np.float32)
        except KeyError:
            raise KeyError(f"no score column {column!r}; the service returned {sorted(self.scores)}") from None

    def __len__(self) -> int:
        return len(self.scores[self.main])

    @property
    def columns(self) -> list[str]:
        return list(self.scores)


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _to_hwc_uint8(x: Any) -> np.ndarray:
    """One image or a batch as channels-last uint8 numpy."""
    if _is_tensor(x):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.float()
        arr = x.numpy()
        arr = np.moveaxis(arr, -3, -1)  # [.., C, H, W] -> [.., H, W, C]
    else:
        arr = np.asarray(x)
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"image array: expected uint8 or float pixels in [0, 1], got dtype {arr.dtype}")
        if arr.size and (np.nanmin(arr) < -1e-3 or np.nanmax(arr) > 1 + 1e-3):
            raise ValueError(f"float image array: expected pixels in [0, 1], got range "
                             f"[{np.nanmin(arr):.3f}, {np.nanmax(arr):.3f}] (scale [-1, 1] images with (x + 1) / 2)")
        arr = np.rint(np.clip(arr, 0, 1) * 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image array of shape {arr.shape}: expected channels-last numpy [..., H, W, C] or "
                         "channels-first torch [..., C, H, W] with C in 1, 3, 4")
    return np.ascontiguousarray(arr)


def _encode(item: Any) -> bytes:
    """One image item as encoded bytes (paths read here; the server never opens paths)."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"image {path}: no such file")
        return path.read_bytes()
    from PIL import Image

    if isinstance(item, Image.Image):
        image = item
    else:
        arr = _to_hwc_uint8(item)
        if arr.ndim != 3:
            raise ValueError(f"image of shape {arr.shape}: expected one image [H, W, C]")
        image = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # lossless; fast compression: the network is local
    return buf.getvalue()


class RewardClient:
    """Client of an ``icthp serve`` instance.

    Args:
        url: base URL of the service.
        token: bearer token (default: ``$ICTHP_SERVE_TOKEN``).
        timeout: seconds per HTTP request (connect, read, write).
        retries: extra attempts after a connection error, timeout, 429, 502, 503 or 504 (scoring is
            idempotent, so retrying is safe); 4xx input errors are raised at once.
        backoff_s: first retry delay; doubles each attempt (with jitter), capped by ``max_backoff_s``;
            a ``Retry-After`` header from the service takes precedence.
        chunk_size: most images per HTTP request; larger inputs are split and the results joined.

    Example:
        >>> client = RewardClient("http://gpu-box:8000", token="secret", timeout=30)  # doctest: +SKIP
        >>> client.wait_ready()  # doctest: +SKIP
        >>> client.score(images_uint8_bhwc, prompts)["ict_hp"]  # doctest: +SKIP
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", *, token: str | None = None, timeout: float = 60.0,
                 retries: int = 3, backoff_s: float = 0.5, max_backoff_s: float = 10.0, chunk_size: int = 32):
        import httpx

        if chunk_size < 1:
            raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.chunk_size = chunk_size
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    # -- plumbing
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, *, retry_statuses=_RETRY_STATUS, **kwargs):
        import httpx

        attempt = 0
        while True:
            delay = None
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:  # refused, reset, timed out: worth another try
                if attempt >= self.retries:
                    raise ConnectionError(f"{method} {self.url}{path} failed after {attempt + 1} attempt(s): "
                                          f"{type(exc).__name__}: {exc}") from exc
            else:
                if response.status_code < 400:
                    return response
                error = _error_of(response)
                if response.status_code not in retry_statuses or error.code == "load_failed" \
                        or attempt >= self.retries:
                    raise error
                after = response.headers.get("retry-after")
                if after and after.replace(".", "", 1).isdigit():
                    delay = min(float(after), self.max_backoff_s)
            if delay is None:
                delay = min(self.max_backoff_s, self.backoff_s * 2**attempt) * (0.5 + random.random() / 2)
            time.sleep(delay)
            attempt += 1

    # -- API
    def health(self) -> dict:
        """``GET /health`` (no retries; a loading or failed service answers with its status, not an error)."""
        response = self._http.get("/health")
        return response.json()

    def wait_ready(self, timeout_s: float = 600.0, poll_s: float = 1.0) -> dict:
        """Block until the service has loaded its models; raises ``TimeoutError`` or :class:`ServiceError`."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                body = self.health()
                if body.get("status") == "ready":
                    return body
                if body.get("status") == "failed":
                    raise ServiceError(503, "load_failed", str(body.get("error")))
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.url} not ready after {timeout_s} s")
            time.sleep(poll_s)

    def models(self) -> dict:
        """``GET /v1/models``: the loaded model, its score columns, device and limits."""
        return self._request("GET", "/v1/models").json()

    def score(self, images: Any, prompts: str | Sequence[str] | None = None) -> ScoreResult:
        """Score images against one prompt or one prompt per image.

        Raises:
            ServiceError: the service rejected the input (the message says why, with the image index).
            ConnectionError: the service stayed unreachable after the retries.
        """
        items = self._items(images)
        n = len(items) if isinstance(items, list) else items.shape[0]
        if n == 0:
            raise ValueError("images: expected at least one image")
        if prompts is not None and not isinstance(prompts, str):
            prompts = list(prompts)
            if len(prompts) != n:
                raise ValueError(f"prompts: expected one prompt or {n} (one per image), got {len(prompts)}")
        results = []
        for start in range(0, n, self.chunk_size):
            stop = min(n, start + self.chunk_size)
            chunk_prompts = prompts if prompts is None or isinstance(prompts, str) else prompts[start:stop]
            try:
                results.append(self._score_chunk(items[start:stop], chunk_prompts))
            except ServiceError as exc:
                if exc.index is None or start == 0:
                    raise
                # The service numbers images within the request; name the caller's index instead.
                raise ServiceError(exc.status, exc.code, f"image {start + exc.index} (request of images "
                                   f"{start}..{stop - 1}): {exc.message}", start + exc.index) from None
        scores = {k: [v for r in results for v in r["scores"][k]] for k in results[0]["scores"]}
        # A ranking across chunks would mix groups normalised separately: only one request's is kept.
        ranking = results[0].get("ranking") if len(results) == 1 else None
        return ScoreResult(scores, results[0]["main"], bool(results[0].get("untrained")), ranking,
                           [r.get("timing_ms", {}) for r in results])

    def reward_fn(self, column: str | None = None) -> Callable:
        """``reward_fn(images, prompts, metadata) -> (scores, info)``, the shape DDPO-style RL trainers call.

        ``scores`` is a float32 numpy array of ``column`` (default: the model's main score, ``ict_hp``);
        ``info`` holds every other column.

        Example:
            >>> reward_fn = RewardClient("http://gpu-box:8000").reward_fn("ict_hp")  # doctest: +SKIP
            >>> rewards, info = reward_fn(images, prompts, metadata)  # doctest: +SKIP
        """

        def reward_fn(images, prompts, metadata=None):
            result = self.score(images, prompts)
            key = column or result.main
            return result[key], {k: result[k] for k in result.columns if k != key}

        return reward_fn

    # -- encoding
    @staticmethod
    def _items(images: Any) -> list | np.ndarray:
        """A uint8 ``[B, H, W, C]`` array when every image is an array of one shape, else a list of items."""
        if _is_tensor(images) or isinstance(images, np.ndarray):
            dims = images.dim() if _is_tensor(images) else images.ndim
            arr = _to_hwc_uint8(images)
            return arr if dims == 4 else arr[None]
        if isinstance(images, (str, os.PathLike, bytes, bytearray)) or not isinstance(images, Sequence):
            images = [images]
        images = list(images)
        if images and all(_is_tensor(x) or isinstance(x, np.ndarray) for x in images):
            arrays = [_to_hwc_uint8(x) for x in images]
            if all(a.ndim == 3 for a in arrays) and len({a.shape for a in arrays}) == 1:
                return np.stack(arrays)
        return images

    def _score_chunk(self, items: list | np.ndarray, prompts: str | list[str] | None) -> dict:
        data: dict[str, Any] = {}
        if isinstance(prompts, str):
            data["prompt"] = prompts
        elif prompts is not None:
            data["prompts"] = prompts
        if isinstance(items, np.ndarray):
            data["shape"] = ",".join(str(s) for s in items.shape)
            files = [("array", ("array.u8", items.tobytes(), "application/octet-stream"))]
        else:
            files = [("images", (f"image{i}", _encode(x), "application/octet-stream")) for i, x in enumerate(items)]
        return self._request("POST", "/v1/score", data=data, files=files).json()


def _error_of(response) -> ServiceError:
    try:
        err = response.json().get("error", {})
        return ServiceError(response.status_code, err.get("code", "error"), err.get("message", response.text),
                            err.get("index"))
    except Exception:
        return ServiceError(response.status_code, "error", response.text[:500])
