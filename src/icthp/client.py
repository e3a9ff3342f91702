"""Python clients of ``icthp serve``, with retries, timeouts and the reward-function shapes RL trainers call.

:class:`RewardClient` is synchronous and talks to one server; :class:`AsyncRewardClient` (asyncio) spreads
requests over one or several servers with back-pressure, and retries a failed request on another server.

Needs ``httpx`` (``pip install "icthp[client]"``); no torch import unless you pass tensors.

Images can be file paths (read here, sent as bytes), encoded bytes, PIL images, numpy arrays (channels-last
``[H, W, C]`` / ``[B, H, W, C]``, uint8 or float in [0, 1]) or torch tensors (channels-first ``[C, H, W]`` /
``[B, C, H, W]``, float in [0, 1] or uint8). Arrays and tensors of one shape travel as one raw uint8 array
(no encoding); float pixels are quantised to uint8 (``round(x * 255)``), exactly what saving them as PNG does.

Rewards: a service started with ``--reward`` (one column, or a weighted sum such as ``ict_hp:1,pickscore:0.5``)
returns that reward beside the score columns; :attr:`ScoreResult.reward` holds it (the main column, e.g.
``ict_hp``, from a service that predates ``--reward``). ``score(..., advantages=True)`` adds per-prompt
z-scores of the reward, ``(r - mean_prompt) / (std_prompt + 1e-4)`` (:func:`group_advantages`).

Example:
    >>> from icthp.client import RewardClient
    >>> with RewardClient("http://127.0.0.1:8000") as client:  # doctest: +SKIP
    ...     result = client.score(["I1.jpg", "I2.jpg", "I3.png"], "a wooden Ferrari")
    ...     result["ict_hp"], result.ranking["order"]
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .advantages import ADVANTAGE_EPS, group_advantages  # noqa: F401 (part of the client's API)

TOKEN_ENV = "ICTHP_SERVE_TOKEN"
_RETRY_STATUS = {429, 502, 503, 504}
REWARD_FN_SHAPES = ("ddpo", "flow_grpo")


class ServiceError(RuntimeError):
    """The service answered with an error (``status``, machine-readable ``code``, ``message``)."""

    def __init__(self, status: int, code: str, message: str, index: int | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.index = status, code, message, index


@dataclass
class ScoreResult:
    """Scores of one ``score`` call, in input order.

    ``result["ict"]`` is a float32 array; ``result.main`` names the model's main column (``ict_hp``...).
    ``result.reward`` (float32) is the reward the service was configured to return (``reward_name``: a column,
    or a weighted sum such as ``ict_hp:1,pickscore:0.5``); the main column when the service does not say.
    ``result.advantages`` (float32) are per-prompt z-scores of the reward when ``advantages=True`` was asked.
    """

    scores: dict[str, list[float]]
    main: str
    untrained: bool = False
    ranking: dict | None = None
    timing_ms: list[dict] = field(default_factory=list)
    reward: np.ndarray | None = None
    reward_name: str | None = None
    advantages: np.ndarray | None = None

    def __post_init__(self):
        if self.reward is None:
            self.reward = np.asarray(self.scores[self.main], dtype=np.float32)
            self.reward_name = self.reward_name or self.main
        else:
            self.reward = np.asarray(self.reward, dtype=np.float32)
            self.reward_name = self.reward_name or self.main
        if self.advantages is not None:
            self.advantages = np.asarray(self.advantages, dtype=np.float32)

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


# ------------------------------------------------------------------------------------------------ encoding


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


def _as_items(images: Any) -> list | np.ndarray:
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


def _check_call(images: Any, prompts: str | Sequence[str] | None) -> tuple[list | np.ndarray, int, Any]:
    """Validated ``(items, n, prompts)`` of a ``score`` call (prompts: None, one string or a list of n)."""
    items = _as_items(images)
    n = len(items) if isinstance(items, list) else items.shape[0]
    if n == 0:
        raise ValueError("images: expected at least one image")
    if prompts is not None and not isinstance(prompts, str):
        prompts = list(prompts)
        if len(prompts) != n:
            raise ValueError(f"prompts: expected one prompt or {n} (one per image), got {len(prompts)}")
    return items, n, prompts


def _spans(n: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(start, min(n, start + chunk_size)) for start in range(0, n, chunk_size)]


def _chunk_prompts(prompts: Any, start: int, stop: int) -> Any:
    return prompts if prompts is None or isinstance(prompts, str) else prompts[start:stop]


def _request_parts(items: list | np.ndarray, prompts: str | list[str] | None, advantages: bool = False) -> dict:
    """``httpx`` keyword arguments (``data``, ``files``) of one multipart ``POST /v1/score``."""
    data: dict[str, Any] = {}
    if isinstance(prompts, str):
        data["prompt"] = prompts
    elif prompts is not None:
        data["prompts"] = prompts
    if advantages:
        data["advantages"] = "true"
    if isinstance(items, np.ndarray):
        data["shape"] = ",".join(str(s) for s in items.shape)
        files = [("array", ("array.u8", items.tobytes(), "application/octet-stream"))]
    else:
        files = [("images", (f"image{i}", _encode(x), "application/octet-stream")) for i, x in enumerate(items)]
    return {"data": data, "files": files}


def _without_advantages(parts: dict) -> dict:
    return {**parts, "data": {k: v for k, v in parts["data"].items() if k != "advantages"}}


def _rejects_advantages(exc: ServiceError) -> bool:
    """A service that predates ``advantages`` refuses the field as unknown (400 invalid_form)."""
    return exc.status == 400 and "advantages" in exc.message


def _error_of(response) -> ServiceError:
    try:
        err = response.json().get("error", {})
        return ServiceError(response.status_code, err.get("code", "error"), err.get("message", response.text),
                            err.get("index"))
    except Exception:
        return ServiceError(response.status_code, "error", response.text[:500])


def _retry_after(response) -> float | None:
    after = response.headers.get("retry-after")
    if after and after.replace(".", "", 1).isdigit():
        return float(after)
    return None


def _backoff(attempt: int, backoff_s: float, max_backoff_s: float) -> float:
    return min(max_backoff_s, backoff_s * 2**attempt) * (0.5 + random.random() / 2)


def _callers_error(exc: ServiceError, start: int, stop: int) -> ServiceError:
    """The service numbers images within the request; name the caller's index instead."""
    if exc.index is None or start == 0:
        return exc
    return ServiceError(exc.status, exc.code, f"image {start + exc.index} (request of images "
                        f"{start}..{stop - 1}): {exc.message}", start + exc.index)


def _join(results: list[dict], prompts: Any, advantages: bool) -> ScoreResult:
    """The responses of a call's requests (in input order) -> one :class:`ScoreResult`."""
    first = results[0]
    columns = list(first["scores"])
    for r in results[1:]:
        if list(r["scores"]) != columns or r["main"] != first["main"]:
            raise RuntimeError(f"the services answered with different models: columns {columns} (main "
                               f"{first['main']}) and {list(r['scores'])} (main {r['main']}); serve one model")
    scores = {k: [v for r in results for v in r["scores"][k]] for k in columns}

    def reward_of(r: dict) -> dict:
        reward = r.get("reward")
        return reward if isinstance(reward, dict) else {"name": r["main"], "values": r["scores"][r["main"]]}

    rewards = [reward_of(r) for r in results]
    names = list(dict.fromkeys(str(w["name"]) for w in rewards))
    if len(names) > 1:
        raise RuntimeError(f"the services return different rewards ({', '.join(names)}); start them with one --reward")
    values = [v for w in rewards for v in w["values"]]
    served = [w.get("advantages") for w in rewards]
    adv = None
    if advantages or all(a is not None for a in served):  # asked for, or sent by default (serve --advantages)
        # The service normalises within one request: over several, the groups are the whole call's.
        adv = served[0] if len(results) == 1 and served[0] is not None else group_advantages(values, prompts).astype(np.float32)
    # A ranking across requests would mix groups normalised separately: only one request's is kept.
    ranking = first.get("ranking") if len(results) == 1 else None
    return ScoreResult(scores, first["main"], bool(first.get("untrained")), ranking,
                       [r.get("timing_ms", {}) for r in results], values, names[0], adv)


def _reward_fn_output(result: ScoreResult, column: str | None, shape: str, advantages: bool, prompts: Any):
    """What ``reward_fn`` returns for ``shape`` (see :meth:`RewardClient.reward_fn`)."""
    if column is None:
        name, values, adv = result.reward_name, result.reward, result.advantages
    else:
        name, values, adv = column, result[column], None
    if advantages and adv is None:
        adv = group_advantages(values, prompts).astype(np.float32)
    if shape == "flow_grpo":
        details: dict[str, list[float]] = {k: result[k].tolist() for k in result.columns}
        if advantages:
            details["reward"] = values.tolist()
        details["avg"] = (adv if advantages else values).tolist()
        return details, {}
    info = {k: result[k] for k in result.columns if k != name}
    if advantages:
        info[name] = values
        return adv, info
    return values, info


def _check_reward_fn_args(shape: str) -> None:
    if shape not in REWARD_FN_SHAPES:
        raise ValueError(f"shape: expected one of {', '.join(REWARD_FN_SHAPES)}, got {shape!r}")


def _auth_headers(token: str | None) -> dict[str, str]:
    token = token if token is not None else os.environ.get(TOKEN_ENV)
    return {"Authorization": f"Bearer {token}"} if token else {}


# ------------------------------------------------------------------------------------------------ sync client


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
        transport: an ``httpx`` transport to use instead of the network (tests, custom proxies).

    Example:
        >>> client = RewardClient("http://gpu-box:8000", token="secret", timeout=30)  # doctest: +SKIP
        >>> client.wait_ready()  # doctest: +SKIP
        >>> client.score(images_uint8_bhwc, prompts)["ict_hp"]  # doctest: +SKIP
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", *, token: str | None = None, timeout: float = 60.0,
                 retries: int = 3, backoff_s: float = 0.5, max_backoff_s: float = 10.0, chunk_size: int = 32,
                 transport=None):
        import httpx

        if chunk_size < 1:
            raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
        self.url = url.rstrip("/")
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.chunk_size = chunk_size
        self._server_advantages: bool | None = None  # False once the service refused the advantages field
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=_auth_headers(token),
                                  transport=transport)

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
                after = _retry_after(response)
                if after is not None:
                    delay = min(after, self.max_backoff_s)
            if delay is None:
                delay = _backoff(attempt, self.backoff_s, self.max_backoff_s)
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
        """``GET /v1/models``: the loaded model, its score columns (and reward), device and limits."""
        return self._request("GET", "/v1/models").json()

    def score(self, images: Any, prompts: str | Sequence[str] | None = None, *,
              advantages: bool = False) -> ScoreResult:
        """Score images against one prompt or one prompt per image.

        ``advantages=True`` fills :attr:`ScoreResult.advantages` (so does a service started with
        ``--advantages``): the service's when the call fits in one request, else computed here over the whole
        call (:func:`group_advantages`, the same formula), so that images of one prompt split over several
        requests still form one group. A service that predates advantages gets the request without the field,
        and the advantages are computed here.

        Raises:
            ServiceError: the service rejected the input (the message says why, with the image index).
            ConnectionError: the service stayed unreachable after the retries.
        """
        items, n, prompts = _check_call(images, prompts)
        spans = _spans(n, self.chunk_size)
        ask = advantages and len(spans) == 1 and self._server_advantages is not False
        results = []
        for start, stop in spans:
            parts = _request_parts(items[start:stop], _chunk_prompts(prompts, start, stop), ask)
            try:
                results.append(self._score_request(parts, ask))
            except ServiceError as exc:
                raise _callers_error(exc, start, stop) from None
        return _join(results, prompts, advantages)

    def _score_request(self, parts: dict, ask_advantages: bool) -> dict:
        try:
            return self._request("POST", "/v1/score", **parts).json()
        except ServiceError as exc:
            if not (ask_advantages and _rejects_advantages(exc)):
                raise
        self._server_advantages = False  # an older service: advantages are computed here
        return self._request("POST", "/v1/score", **_without_advantages(parts)).json()

    def reward_fn(self, column: str | None = None, shape: str = "ddpo", advantages: bool = False) -> Callable:
        """``reward_fn(images, prompts, metadata=None, **kwargs)``, in the shape an RL trainer calls.

        Args:
            column: the score to return (default: the service's reward, :attr:`ScoreResult.reward`: its
                ``--reward``, or the main column ``ict_hp`` of a service without one).
            shape: ``"ddpo"`` -> ``(rewards, info)``: a float32 numpy array and ``{other column: array}``
                (ddpo-pytorch, :meth:`icthp.finetune.rewards.Reward.reward_fn`); ``"flow_grpo"`` ->
                ``({column: [float, ...] for every column, "avg": [reward, ...]}, {})``, the return of
                flow_grpo's ``multi_score`` reward function.
            advantages: return per-prompt z-scores of the reward instead of the reward (``ddpo``: first
                element, the reward itself moves into ``info``; ``flow_grpo``: ``"avg"``, the reward under
                ``"reward"``); for trainers that take advantages from the reward service.

        Example:
            >>> reward_fn = RewardClient("http://gpu-box:8000").reward_fn("ict_hp")  # doctest: +SKIP
            >>> rewards, info = reward_fn(images, prompts, metadata)  # doctest: +SKIP
            >>> details, _ = RewardClient("http://gpu-box:8000").reward_fn(shape="flow_grpo")(images, prompts, {})  # doctest: +SKIP
            >>> details["avg"]  # doctest: +SKIP
        """
        _check_reward_fn_args(shape)

        def reward_fn(images, prompts, metadata=None, **kwargs):
            result = self.score(images, prompts, advantages=advantages and column is None)
            return _reward_fn_output(result, column, shape, advantages, prompts)

        return reward_fn

    # -- encoding (kept for callers of the former static method)
    _items = staticmethod(_as_items)


# ------------------------------------------------------------------------------------------------ async client


@dataclass
class _Server:
    url: str
    in_flight: int = 0  # requests of this client being answered by the server (holding one of its slots)
    requests: int = 0  # HTTP requests sent
    failures: int = 0  # consecutive connection failures
    down_until: float = 0.0  # monotonic time before which the server is only picked if every other one is too


class _LoopThread:
    """An event loop running forever in a daemon thread: what synchronous callers of an async client use."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="icthp-client-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()


class AsyncRewardClient:
    """asyncio client of one or several ``icthp serve`` instances, with back-pressure and fail-over.

    A ``score`` call is split into ``chunk_size``-image requests sent concurrently (``asyncio.gather``) to the
    servers; results come back in input order. Each server gets at most ``max_in_flight`` requests at a time
    from this client; the others wait for a slot (back-pressure: a big batch never floods a server).

    Args:
        urls: base URL of the service, or a list of them (servers of one model and one ``--reward``).
        token, timeout, retries, backoff_s, max_backoff_s, chunk_size: as :class:`RewardClient`. A request
            that fails with a connection error, timeout, 429, 502, 503 or 504 is retried on another server
            when there are several (at once, no back-off, until every server was tried; then back-off and a
            new round); ``retries`` bounds the extra attempts, but a request tries every server at least once.
            A server whose connection failed is avoided for a back-off delay (and one answering
            ``Retry-After`` for that long) while another is available.
        strategy: ``"least_busy"`` (default): a request waits for a free slot on any server and takes the
            server with the fewest of this client's requests in flight (ties in turn), so faster servers get
            more of the work; ``"round_robin"``: each request goes to the next server in turn (and waits for a
            slot there).
        max_in_flight: most concurrent requests per server from this client.
        transport: an ``httpx`` async transport to use instead of the network (tests, custom proxies).

    One client serves one event loop at a time (an ``httpx.AsyncClient`` belongs to the loop it connects
    in); successive ``asyncio.run`` calls are fine (connections are reopened). Synchronous code can call
    :meth:`score_sync`, which runs on the client's own background loop.

    Example:
        >>> async def main(images, prompts):  # doctest: +SKIP
        ...     async with AsyncRewardClient(["http://gpu0:8000", "http://gpu1:8000"], chunk_size=16) as client:
        ...         await client.wait_ready()
        ...         result = await client.score(images, prompts)  # 256 images: 16 requests over 2 servers
        ...         return result.reward
    """

    def __init__(self, urls: str | Sequence[str] = "http://127.0.0.1:8000", *, token: str | None = None,
                 timeout: float = 60.0, retries: int = 3, backoff_s: float = 0.5, max_backoff_s: float = 10.0,
                 chunk_size: int = 32, max_in_flight: int = 4, strategy: str = "least_busy", transport=None):
        if chunk_size < 1:
            raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight: expected >= 1, got {max_in_flight}")
        if strategy not in ("least_busy", "round_robin"):
            raise ValueError(f"strategy: expected 'least_busy' or 'round_robin', got {strategy!r}")
        url_list = [urls] if isinstance(urls, str) else list(urls)
        if not url_list:
            raise ValueError("urls: expected at least one service URL")
        self.urls = [u.rstrip("/") for u in url_list]
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.chunk_size, self.max_in_flight, self.strategy = chunk_size, max_in_flight, strategy
        self._servers = [_Server(u) for u in self.urls]
        self._next = 0
        self._timeout, self._headers, self._transport = timeout, _auth_headers(token), transport
        self._http = self._new_http()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: list[asyncio.Future] = []
        self._server_advantages: bool | None = None
        self._runner: _LoopThread | None = None
        self._runner_lock = threading.Lock()

    @property
    def url(self) -> str:
        """The first service URL."""
        return self.urls[0]

    def _new_http(self):
        import httpx

        limits = httpx.Limits(max_connections=max(100, 2 * self.max_in_flight * len(self.urls)))
        return httpx.AsyncClient(timeout=self._timeout, headers=self._headers, transport=self._transport,
                                 limits=limits)

    def _bind(self) -> None:
        """Tie the HTTP client and the slot accounting to the running event loop."""
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        if self._loop is not None:
            if self._loop.is_running():
                raise RuntimeError("AsyncRewardClient is in use on another event loop (another thread?); "
                                   "use one client per event loop")
            self._http = self._new_http()  # the old loop's connections cannot be used from this one
        self._loop = loop
        self._waiters = []
        for s in self._servers:
            s.in_flight = 0

    # -- slots: at most max_in_flight requests per server; a request waits for one (all in the loop's thread)
    def _free(self, i: int) -> bool:
        return self._servers[i].in_flight < self.max_in_flight

    def _candidates(self, exclude: set[int]) -> list[int]:
        """Servers not tried yet (all when every one was), those not marked down first, in turn from the last."""
        n = len(self._servers)
        candidates = [i for i in range(n) if i not in exclude] or list(range(n))
        now = time.monotonic()
        candidates = [i for i in candidates if self._servers[i].down_until <= now] or candidates
        return sorted(candidates, key=lambda i: (i - self._next) % n)

    async def _acquire(self, exclude: set[int]) -> int:
        """A slot on a server: ``least_busy``, the free server with the fewest requests in flight (waiting for
        any slot to free up); ``round_robin``, the next server in turn (waiting for a slot on that one)."""
        target = None
        if self.strategy == "round_robin":
            target = self._candidates(exclude)[0]
            self._next = (target + 1) % len(self._servers)
        while True:
            if target is not None:
                chosen = target if self._free(target) else None
            else:
                free = [i for i in self._candidates(exclude) if self._free(i)]
                chosen = min(free, key=lambda i: self._servers[i].in_flight) if free else None
                if chosen is not None:
                    self._next = (chosen + 1) % len(self._servers)
            if chosen is not None:
                self._servers[chosen].in_flight += 1
                return chosen
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter

    def _release(self, i: int) -> None:
        self._servers[i].in_flight -= 1
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- plumbing
    async def aclose(self) -> None:
        """Close the connections (of the current event loop)."""
        if self._loop is None or self._loop is asyncio.get_running_loop():
            await self._http.aclose()

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def close(self) -> None:
        """Close what :meth:`score_sync` opened (its background loop); from synchronous code."""
        with self._runner_lock:
            runner, self._runner = self._runner, None
        if runner is not None:
            runner.run(self.aclose())
            runner.stop()

    def stats(self) -> list[dict]:
        """Per server: ``url``, ``in_flight`` (this client's requests now), ``requests`` (sent), ``failures``."""
        return [{"url": s.url, "in_flight": s.in_flight, "requests": s.requests, "failures": s.failures}
                for s in self._servers]

    async def _request(self, method: str, path: str, *, retry_statuses=_RETRY_STATUS, **kwargs):
        import httpx

        self._bind()
        n = len(self._servers)
        tried: set[int] = set()
        attempt = 0
        while True:
            i = await self._acquire(tried)
            server = self._servers[i]
            delay = None
            try:
                server.requests += 1
                response = await self._http.request(method, server.url + path, **kwargs)
            except httpx.TransportError as exc:  # refused, reset, timed out: another server, or another try
                server.failures += 1
                server.down_until = time.monotonic() + _backoff(server.failures - 1, self.backoff_s,
                                                                self.max_backoff_s)
                failure: BaseException = ConnectionError(
                    f"{method} {server.url}{path} failed after {attempt + 1} attempt(s)"
                    f"{f' on {n} servers' if n > 1 else ''}: {type(exc).__name__}: {exc}")
                failure.__cause__ = exc
            else:
                if response.status_code < 400:
                    server.failures, server.down_until = 0, 0.0
                    return response
                failure = _error_of(response)
                if response.status_code not in retry_statuses:
                    raise failure
                after = _retry_after(response)
                if after is not None:
                    delay = min(after, self.max_backoff_s)
                    server.down_until = time.monotonic() + delay
                if failure.code == "load_failed":  # this server is broken for good; another may not be
                    server.down_until = time.monotonic() + 3600
            finally:
                self._release(i)
            tried.add(i)
            untried = len(tried) < n
            load_failed = isinstance(failure, ServiceError) and failure.code == "load_failed"
            if not untried and (attempt >= self.retries or load_failed):
                raise failure
            if not untried:  # every server failed this round: wait, then a new round
                await asyncio.sleep(delay if delay is not None else _backoff(attempt, self.backoff_s,
                                                                             self.max_backoff_s))
                tried.clear()
            attempt += 1

    # -- API
    async def health(self) -> dict[str, dict]:
        """``GET /health`` of every server (no retries): ``{url: body}``, ``{"status": "unreachable", ...}``
        for a server that does not answer."""
        import httpx

        self._bind()

        async def one(url: str) -> dict:
            try:
                return (await self._http.get(url + "/health")).json()
            except httpx.TransportError as exc:
                return {"status": "unreachable", "error": f"{type(exc).__name__}: {exc}"}

        bodies = await asyncio.gather(*(one(u) for u in self.urls))
        return dict(zip(self.urls, bodies, strict=True))

    async def wait_ready(self, timeout_s: float = 600.0, poll_s: float = 1.0, *, require_all: bool = True) -> dict:
        """Wait until every server (``require_all=False``: one) has loaded its models -> ``{url: health}`` of
        the ready ones. Raises ``TimeoutError``, or :class:`ServiceError` when a needed server failed to load."""
        deadline = time.monotonic() + timeout_s
        while True:
            bodies = await self.health()
            ready = {u: b for u, b in bodies.items() if b.get("status") == "ready"}
            failed = {u: b for u, b in bodies.items() if b.get("status") == "failed"}
            if failed and (require_all or len(failed) == len(bodies)):
                url, body = next(iter(failed.items()))
                raise ServiceError(503, "load_failed", f"{url}: {body.get('error')}")
            if len(ready) == len(bodies) or (ready and not require_all):
                return ready
            if time.monotonic() > deadline:
                waiting = [u for u in bodies if u not in ready]
                raise TimeoutError(f"{', '.join(waiting)} not ready after {timeout_s} s")
            await asyncio.sleep(poll_s)

    async def models(self) -> dict:
        """``GET /v1/models`` of one server (the servers are meant to serve the same model and reward)."""
        return (await self._request("GET", "/v1/models")).json()

    async def score(self, images: Any, prompts: str | Sequence[str] | None = None, *,
                    advantages: bool = False) -> ScoreResult:
        """Score images against one prompt or one prompt per image: ``chunk_size``-image requests spread over
        the servers concurrently, the results in input order (see :meth:`RewardClient.score`).

        Raises:
            ServiceError: a service rejected the input (the message says why, with the caller's image index).
            ConnectionError: no server answered after the retries.
        """
        self._bind()
        items, n, prompts = _check_call(images, prompts)
        spans = _spans(n, self.chunk_size)
        ask = advantages and len(spans) == 1 and self._server_advantages is not False

        async def one(start: int, stop: int) -> dict:
            chunk, chunk_prompts = items[start:stop], _chunk_prompts(prompts, start, stop)
            if isinstance(chunk, np.ndarray):
                parts = _request_parts(chunk, chunk_prompts, ask)
            else:  # PNG encoding and file reads: off the event loop
                parts = await asyncio.to_thread(_request_parts, chunk, chunk_prompts, ask)
            try:
                return await self._score_request(parts, ask)
            except ServiceError as exc:
                raise _callers_error(exc, start, stop) from None

        tasks = [asyncio.ensure_future(one(start, stop)) for start, stop in spans]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return _join(list(results), prompts, advantages)

    async def _score_request(self, parts: dict, ask_advantages: bool) -> dict:
        try:
            return (await self._request("POST", "/v1/score", **parts)).json()
        except ServiceError as exc:
            if not (ask_advantages and _rejects_advantages(exc)):
                raise
        self._server_advantages = False  # an older service: advantages are computed here
        return (await self._request("POST", "/v1/score", **_without_advantages(parts))).json()

    def reward_fn(self, column: str | None = None, shape: str = "ddpo", advantages: bool = False) -> Callable:
        """``async reward_fn(images, prompts, metadata=None, **kwargs)``: :meth:`RewardClient.reward_fn`'s
        shapes (``"ddpo"``, ``"flow_grpo"``), awaited.

        Example:
            >>> reward_fn = AsyncRewardClient(["http://gpu0:8000", "http://gpu1:8000"]).reward_fn(shape="flow_grpo")  # doctest: +SKIP
            >>> details, _ = await reward_fn(images, prompts, metadata)  # doctest: +SKIP
        """
        _check_reward_fn_args(shape)

        async def reward_fn(images, prompts, metadata=None, **kwargs):
            result = await self.score(images, prompts, advantages=advantages and column is None)
            return _reward_fn_output(result, column, shape, advantages, prompts)

        return reward_fn

    # -- from synchronous code
    def score_sync(self, images: Any, prompts: str | Sequence[str] | None = None, *,
                   advantages: bool = False) -> ScoreResult:
        """:meth:`score` from synchronous code (a training loop): runs on this client's own event loop, in a
        background thread, where the connections stay open between calls. Do not also await this client
        on another loop; :meth:`close` stops the background loop."""
        return self.run_sync(self.score(images, prompts, advantages=advantages))

    def run_sync(self, coro: Awaitable) -> Any:
        """Run a coroutine of this client (``client.models()``...) on its background loop and return its result."""
        with self._runner_lock:
            if self._runner is None:
                self._runner = _LoopThread()
            runner = self._runner
        return runner.run(coro)
