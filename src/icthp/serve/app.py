"""The FastAPI application of ``icthp serve``: app factory, routes, limits, auth and start-up.

Routes: ``POST /v1/score``, ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text), ``GET /``
(a small web page), ``POST`` on ``pickle_path`` (default ``/``: the pickle protocol of RL trainers,
:mod:`icthp.serve.pickled`), plus FastAPI's ``/openapi.json`` and ``/docs``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..scores import ADVANTAGE_EPS, group_advantages, group_scores, reward_name, reward_terms, weighted_reward
from ..scoring import Scorer, to_device
from .batching import BatcherClosed, DynamicBatcher, QueueFull
from .config import ServeConfig
from .inputs import RequestError, ScoreRequest, decode_one, parse_form, parse_json
from .metrics import ServiceMetrics
from .pickled import answer as pickle_answer
from .pickled import error as pickle_error
from .pickled import parse_pickle
from .schema import SCORE_REQUEST_BODY, HealthResponse, ModelsResponse, ScoreResponse

logger = logging.getLogger("icthp.serve")

_ENDPOINTS = {"/", "/health", "/v1/score", "/v1/models", "/metrics", "/docs", "/openapi.json"}


# ------------------------------------------------------------------------------------------------ models


class ServedModels:
    """What the service runs: one reward model (ICT, HP or ICT-HP) and optional baselines.

    Columns are named by component (``ict``, ``hp``, ``hp_logit``, ``ict_hp``; a baseline's own, e.g.
    ``pickscore``). Each network gets the images preprocessed its own way.
    """

    def __init__(self, name: str, scorer: Scorer, baselines: dict[str, Scorer] | None = None, *,
                 reward: str | None = None, advantages: bool = False):
        self.name = name
        self.scorer = scorer
        self.baselines = dict(baselines or {})
        self.main = scorer.main_component
        self.preprocess = scorer.preprocess
        self.columns = list(scorer.component_names)
        for bname, b in self.baselines.items():
            clash = [c for c in b.component_names if c in self.columns]
            if clash:
                raise ValueError(f"baseline {bname!r}: score column(s) {clash} already served")
            self.columns += list(b.component_names)
        self.needs_prompt = scorer.needs_prompt or any(b.needs_prompt for b in self.baselines.values())
        self.preprocess_configs = list(dict.fromkeys([scorer.preprocess] + [b.preprocess for b in self.baselines.values()]))
        #: what RL trainers receive: (column, weight) terms summed (the main column by default)
        self.reward_terms = reward_terms(reward, self.columns, self.main)
        self.reward_name = reward_name(self.reward_terms)
        self.advantages = advantages

    def reward(self, columns: dict[str, torch.Tensor], prompts: list[str] | None,
               advantages: bool | None) -> tuple[list[float], list[float] | None]:
        """The served reward of each image, and (asked for, or the service's default) its per-prompt advantage."""
        values = weighted_reward(columns, self.reward_terms)
        wanted = self.advantages if advantages is None else advantages
        return values.tolist(), (group_advantages(values.numpy(), prompts).tolist() if wanted else None)

    @property
    def untrained(self) -> bool:
        return any(s.untrained for s in (self.scorer, *self.baselines.values()))

    def run_batch(self, inputs: dict, prompts: list[str] | None) -> dict[str, torch.Tensor]:
        """Model forwards for one packed batch (called in the model thread)."""
        columns: dict[str, torch.Tensor] = {}
        with torch.inference_mode():
            for scorer in (self.scorer, *self.baselines.values()):
                x = to_device(inputs[scorer.preprocess], scorer.device)
                out = scorer.components(x, prompts if scorer.needs_prompt else None)
                columns.update({k: v.float().cpu() for k, v in out.items()})
        return columns

    def describe(self) -> dict:
        """What ``/v1/models`` says of the models: :meth:`Scorer.describe` of each, without local paths (the
        service does not tell clients where its files are)."""

        def public(described: dict) -> list[dict]:
            return [{k: v for k, v in c.items() if k != "path"} for c in described["checkpoints"]]

        main = self.scorer.describe()
        return {
            "model": self.name,
            "columns": self.columns,
            "main": self.main,
            "needs_prompt": self.needs_prompt,
            "untrained": self.untrained,
            "device": main["device"],
            "dtype": main["dtype"],
            "image_size": self.preprocess.size,
            "tokenization": main["tokenization"],
            "reward": {"name": self.reward_name, "terms": [[c, w] for c, w in self.reward_terms],
                       "advantages": self.advantages, "advantages_eps": ADVANTAGE_EPS,
                       "advantages_rule": "per prompt within a request: (r - mean) / (std + eps), population std"},
            "components": public(main),
            "baselines": [{"name": bname, "columns": d["columns"], "main": d["main"], "tokenization": d["tokenization"],
                           "components": public(d)} for bname, d in ((n, b.describe()) for n, b in self.baselines.items())],
        }


def load_models(config: ServeConfig) -> ServedModels:
    """Load the configured reward model and baselines (``device``/``dtype`` ``auto``: CUDA and bf16 when
    available)."""
    from ..registry import parse_model_arg
    from ..scoring import load

    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = config.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    scorer = load(config.model, ict=config.ict, hp=config.hp, device=device, dtype=dtype)
    baselines = {}
    for spec in config.baselines:
        bname, weights = parse_model_arg(spec, "baseline")
        baselines[bname] = load(bname, weights=weights, device=device, dtype=dtype)
    if config.compile:
        for s in (scorer, *baselines.values()):
            s.compile()
    return ServedModels(config.model, scorer, baselines, reward=config.reward, advantages=config.advantages)


# ------------------------------------------------------------------------------------------------ state


class _Service:
    def __init__(self, config: ServeConfig, models: ServedModels | None):
        self.config = config
        self.models = models
        self.load_error: str | None = None
        self.started = time.time()
        self.batcher: DynamicBatcher | None = None
        self.decode_pool: ThreadPoolExecutor | None = None
        self.metrics = ServiceMetrics(queue_images=lambda: self.batcher.queued_images if self.batcher else 0,
                                      ready=lambda: self.ready)

    @property
    def ready(self) -> bool:
        return self.models is not None

    def run_batch(self, inputs, prompts):
        assert self.models is not None
        return self.models.run_batch(inputs, prompts)

    def on_batch(self, size: int, seconds: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.batch_seconds.observe(seconds)

    async def load(self) -> None:
        try:
            self.models = await asyncio.to_thread(load_models, self.config)
            d = self.models.describe()
            logger.info("models loaded: %s on %s (%s)%s", d["model"], d["device"], d["dtype"],
                        "  [UNTRAINED random weights]" if d["untrained"] else "")
        except Exception as exc:  # reported by /health; the process stays up so the error can be read
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.exception("loading the models failed")

    async def prepare(self, request: ScoreRequest) -> dict:
        """Decode and preprocess every image in the decode threads -> ``{preprocess: Tensor[n, 3, S, S]}``."""
        from ..preprocess import pil_to_model_input

        assert self.models is not None and self.decode_pool is not None
        configs = self.models.preprocess_configs

        def one(i: int) -> list[torch.Tensor]:
            image = decode_one(request, i, self.config)  # decoded once, preprocessed for every network
            return [pil_to_model_input(image, cfg) for cfg in configs]

        loop = asyncio.get_running_loop()
        per_image = await asyncio.gather(*(loop.run_in_executor(self.decode_pool, one, i) for i in range(request.n)))
        return {cfg: torch.stack([t[j] for t in per_image]) for j, cfg in enumerate(configs)}


# ------------------------------------------------------------------------------------------------ ASGI guard


class _Guard:
    """Outermost layer: request-size limit (Content-Length and streamed bytes), the body deadline
    (``body_timeout_s`` from the request head to the body's last byte: 408 after it) and request counting."""

    def __init__(self, app, service: _Service):
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.service.config.max_request_bytes
        path = scope["path"]
        endpoint = path if path in _ENDPOINTS or path == self.service.config.pickle_path else "other"
        status = [500]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        received = 0
        timeout = self.service.config.body_timeout_s
        deadline = time.monotonic() + timeout
        body_done = False

        async def receive_limited():
            nonlocal received, body_done
            if body_done:  # after the body, receive() only waits for a disconnect: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise RequestError(408, "request_timeout", f"the request body was not received within {timeout:g} s",
                                   headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise RequestError(413, "request_too_large", f"request body exceeds {limit} bytes")
                body_done = not message.get("more_body", False)
            return message

        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                err = RequestError(413, "request_too_large",
                                   f"request body of {int(length)} bytes exceeds the limit of {limit} bytes")
                response = JSONResponse(err.body(), status_code=413, headers={"Connection": "close"})
                return await response(scope, receive, send_counted)
            await self.app(scope, receive_limited, send_counted)
        finally:
            self.service.metrics.requests.inc(endpoint=endpoint, status=str(status[0]))


# ------------------------------------------------------------------------------------------------ app


def create_app(config: ServeConfig | None = None, *, models: ServedModels | None = None) -> FastAPI:
    """Build the service. Models load in the background at start-up unless ``models`` is given.

    ``/health`` answers 503 until they are loaded (and says why if loading failed), 200 afterwards.

    Example:
        >>> import uvicorn
        >>> app = create_app(ServeConfig(ict="tiny-random", hp="tiny-random"))  # doctest: +SKIP
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
    """
    config = (config or ServeConfig()).validate()
    service = _Service(config, models)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.decode_pool = ThreadPoolExecutor(config.decode_workers, thread_name_prefix="icthp-decode")
        service.batcher = DynamicBatcher(
            service.run_batch, max_batch_size=config.max_batch_size, max_wait_s=config.max_wait_ms / 1000,
            max_queue_images=config.max_queue_images, on_batch=service.on_batch)
        await service.batcher.start()
        loading = None if service.ready else asyncio.create_task(service.load())
        try:
            yield
        finally:
            # uvicorn has already let in-flight requests finish; finish whatever they queued, then stop.
            await service.batcher.close()
            service.decode_pool.shutdown(wait=True)
            if loading is not None and not loading.done():
                loading.cancel()

    app = FastAPI(title="icthp reward service", version=__version__, lifespan=lifespan,
                  description="ICT / HP / ICT-HP rewards for text-to-image generation (arXiv 2507.19002). "
                              "See docs/serve.md.")
    app.state.service = service
    app.add_middleware(_Guard, service=service)

    async def require_token(request: Request) -> None:
        if not config.token:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), config.token.encode()):
            raise RequestError(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)",
                               headers={"WWW-Authenticate": "Bearer"})

    def require_ready() -> ServedModels:
        if service.models is None:
            if service.load_error:
                raise RequestError(503, "load_failed", f"the models failed to load: {service.load_error}")
            raise RequestError(503, "loading", "the models are still loading; retry shortly",
                               headers={"Retry-After": "5"})
        return service.models

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return JSONResponse({"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse({"error": {"code": "invalid_request", "message": str(exc.errors())}}, status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"error": {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}},
                            status_code=500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("icthp.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})

    @app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def health():
        """Readiness: 200 once the models are loaded, 503 while loading or after a failed load."""
        if service.models is not None:
            status, code = "ready", 200
        else:
            status, code = ("failed", 503) if service.load_error else ("loading", 503)
        body = {"status": status, "version": __version__, "uptime_s": round(time.time() - service.started, 3),
                "error": service.load_error}
        return JSONResponse(body, status_code=code)

    @app.get("/v1/models", response_model=ModelsResponse, dependencies=[Depends(require_token)])
    async def models_info():
        """The loaded model, its score columns, device, and the service's limits."""
        loaded = require_ready()
        limits = {k: v for k, v in config.public_dict().items()
                  if k.startswith("max_") or k in ("header_timeout_s", "body_timeout_s", "keep_alive_s")}
        return {**loaded.describe(), "limits": limits, "version": __version__}

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(require_token)])
    async def metrics():
        """Prometheus text format: requests, images, latency and batch-size histograms, queue depth."""
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/score", response_model=ScoreResponse, dependencies=[Depends(require_token)],
              openapi_extra={"requestBody": SCORE_REQUEST_BODY})
    async def score(request: Request):
        """Score images against prompt(s); every loaded score column per image, plus a ranking when the
        images share one prompt (ICT-HP: the released group rule ``ict * softmax(hp_logit)``)."""
        t0 = time.perf_counter()
        loaded = require_ready()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "application/json":
            body = await request.body()
            # Parsing is CPU-bound (up to max_request_bytes): in a worker thread, so /health and other
            # requests are not held up behind it.
            parsed = await asyncio.get_running_loop().run_in_executor(
                service.decode_pool, parse_json, body, config, loaded.needs_prompt)
            del body
        elif content_type == "multipart/form-data":
            form = await request.form(max_files=config.max_images_per_request + 1,
                                      max_fields=config.max_images_per_request + 8,
                                      max_part_size=max(1024 * 1024, 4 * config.max_prompt_chars))
            try:
                parsed = await parse_form(form, config, loaded.needs_prompt)
            finally:
                await form.close()
        else:
            raise RequestError(415, "unsupported_media_type",
                               f"Content-Type {content_type or '(none)'}: expected application/json or "
                               "multipart/form-data")
        columns, t1, t2 = await score_parsed(parsed)
        values, advantages = loaded.reward(columns, parsed.prompts, parsed.advantages)
        body = {"n": parsed.n, "model": loaded.name, "main": loaded.main, "untrained": loaded.untrained,
                "scores": {k: v.tolist() for k, v in columns.items()}, "ranking": _ranking(parsed, columns, loaded),
                "reward": {"name": loaded.reward_name, "values": values, "advantages": advantages},
                "timing_ms": {"decode": round(1000 * (t1 - t0), 3), "model": round(1000 * (t2 - t1), 3),
                              "total": round(1000 * (t2 - t0), 3)}}
        service.metrics.images.inc(parsed.n)
        service.metrics.latency.observe(time.perf_counter() - t0)
        return JSONResponse(body)

    async def score_parsed(parsed: ScoreRequest) -> tuple[dict[str, torch.Tensor], float, float]:
        """Decode, then queue for the model -> (score columns, time decoded, time scored)."""
        inputs = await service.prepare(parsed)
        t1 = time.perf_counter()
        assert service.batcher is not None
        try:
            columns = await service.batcher.submit(inputs, parsed.prompts)
        except QueueFull as exc:
            raise RequestError(503, "busy", f"the service is at capacity ({exc}); retry shortly",
                               headers={"Retry-After": "1"}) from None
        except BatcherClosed as exc:
            raise RequestError(503, "shutting_down", str(exc)) from None
        return columns, t1, time.perf_counter()

    if config.pickle_path is not None:
        @app.post(config.pickle_path, include_in_schema=False)
        async def pickled(request: Request):
            """The pickle protocol of ddpo / flow_grpo / reward-server / verl-omni clients
            (:mod:`icthp.serve.pickled`). Errors answer a pickled ``{"error": ..., "code": ...}`` with the 4xx/5xx
            status: those clients ``pickle.loads`` whatever comes back."""
            t0 = time.perf_counter()
            try:
                _pickle_auth(request)
                loaded = require_ready()
                body = await request.body()
                parsed = await asyncio.get_running_loop().run_in_executor(
                    service.decode_pool, parse_pickle, body, config, loaded.needs_prompt)
                del body
                columns, _, _ = await score_parsed(parsed)
            except RequestError as exc:
                if exc.status < 500:  # those clients rarely show the answer: the reason goes to the log too
                    logger.warning("refused a pickled request from %s: %s %s: %s",
                                   request.client.host if request.client else "?", exc.status, exc.code, exc.message)
                return Response(pickle_error(exc.status, exc.code, exc.message, exc.index), status_code=exc.status,
                                headers=exc.headers, media_type="application/octet-stream")
            values, advantages = loaded.reward(columns, parsed.prompts, parsed.advantages)
            answer = pickle_answer(values, {k: v.tolist() for k, v in columns.items()}, reward=loaded.reward_name,
                                   model=loaded.name, untrained=loaded.untrained, advantages=advantages)
            service.metrics.images.inc(parsed.n)
            service.metrics.latency.observe(time.perf_counter() - t0)
            return Response(answer, media_type="application/octet-stream")

    def _pickle_auth(request: Request) -> None:
        """The bearer token, or ``?token=`` in the URL for trainers whose client cannot add a header (the URL
        is all their config holds)."""
        if not config.token:
            return
        query = request.query_params.get("token")
        if query is not None:
            if not hmac.compare_digest(query.encode(), config.token.encode()):
                raise RequestError(401, "unauthorized", "wrong token in the URL (?token=...)")
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), config.token.encode()):
            raise RequestError(401, "unauthorized", "missing or wrong token (Authorization: Bearer <token>, or "
                                                    "?token=<token> in the URL)", headers={"WWW-Authenticate": "Bearer"})

    return app


def _ranking(parsed: ScoreRequest, columns: dict[str, torch.Tensor], models: ServedModels) -> dict | None:
    """Best-first order of images that share one prompt (or of all images for a prompt-free model)."""
    prompts = parsed.prompts
    if prompts is not None and len(set(prompts)) != 1:
        return None
    name, values = group_scores(columns, models.main)
    order = sorted(range(len(values)), key=lambda i: -float(values[i]))
    return {"score": name, "values": values.tolist(), "order": order}


def _protocol_with_header_timeout(header_timeout_s: float):
    """uvicorn's h11 protocol, closing connections that do not complete a request head in time.

    uvicorn bounds idle keep-alive connections but not one that opens and sends half a request line or
    header block, then nothing: a few hundred of those hold the server's connection slots forever. The
    timer starts when the connection opens, and again when bytes arrive while no request is in progress
    (the next request of a keep-alive connection); it stops once a request head has been parsed.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def _waiting_for_head(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm_head_timer(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(header_timeout_s, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self._waiting_for_head() and not self.transport.is_closing():
                logger.info("closing a connection from %s: no complete request head within %g s", self.client,
                            header_timeout_s)
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def data_received(self, data: bytes) -> None:
            if self._waiting_for_head():
                self._arm_head_timer()
            super().data_received(data)
            if not self._waiting_for_head():
                self._disarm_head_timer()

        def connection_lost(self, exc) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

    return HeaderTimeoutH11Protocol


def uvicorn_config(app, config: ServeConfig, **overrides):
    """The ``uvicorn.Config`` the service runs under: its connection limit and timeouts from ``config``.

    Example:
        >>> import uvicorn
        >>> cfg = ServeConfig(ict="tiny-random", hp="tiny-random")
        >>> uvicorn.Server(uvicorn_config(create_app(cfg), cfg)).run()  # doctest: +SKIP
    """
    import uvicorn

    settings = dict(host=config.host, port=config.port, http=_protocol_with_header_timeout(config.header_timeout_s),
                    limit_concurrency=config.max_connections, timeout_keep_alive=config.keep_alive_s,
                    timeout_graceful_shutdown=30)
    settings.update(overrides)
    return uvicorn.Config(app, **settings)


def run(config: ServeConfig, *, log_level: str = "info", graceful_timeout_s: float = 30.0) -> None:
    """Start uvicorn with :func:`create_app` (blocks until stopped; SIGINT/SIGTERM finish in-flight requests)."""
    import uvicorn

    config.validate()
    # log_config=None: uvicorn's loggers go through the handler the CLI set up, so its lines and icthp's
    # share one format (uvicorn would otherwise install its own "INFO:     ..." formatter beside ours).
    uvicorn.Server(uvicorn_config(create_app(config), config, log_level=log_level, log_config=None,
                                  timeout_graceful_shutdown=graceful_timeout_s)).run()
