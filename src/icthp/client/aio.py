"""The asyncio client of one or several ``icthp serve`` instances."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..advantages import ADVANTAGE_EPS, group_advantages  # noqa: F401 (part of the client's API)
from ._common import (
    _RETRY_STATUS,
    ScoreResult,
    ServiceError,
    _auth_headers,
    _backoff,
    _callers_error,
    _check_call,
    _check_reward_fn_args,
    _chunk_prompts,
    _error_of,
    _join,
    _rejects_advantages,
    _request_parts,
    _retry_after,
    _reward_fn_output,
    _spans,
    _without_advantages,
)


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
