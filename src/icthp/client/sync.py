"""The synchronous client of one ``icthp serve``."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from ..advantages import ADVANTAGE_EPS, group_advantages  # noqa: F401 (part of the client's API)
from ._common import (
    _RETRY_STATUS,
    ScoreResult,
    ServiceError,
    _as_items,
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
