"""Settings of the reward service (a plain dataclass: no FastAPI import)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import asdict, dataclass, field

#: Environment variable read for the bearer token when none is given on the command line (keeps the
#: secret out of ``ps`` listings and shell history).
TOKEN_ENV = "ICTHP_SERVE_TOKEN"


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine.

    Example:
        >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0")
        (True, True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


@dataclass
class ServeConfig:
    """What ``icthp serve`` loads and the limits it enforces.

    Attributes:
        model: registered reward model: ``ict-hp``, ``ict`` or ``hp``.
        ict, hp: component weights (hub id, local directory or ``tiny-random``); ``None``: the released ones.
        baselines: baselines served beside it, ``name`` or ``name=weights`` (e.g. ``pickscore=/models/PS``).
        device, dtype: where and in which precision the towers run (``auto``: CUDA + bf16 when available).
        host, port: where to listen; the default binds to loopback only.
        token: bearer token required on ``/v1/*`` and ``/metrics``; mandatory when ``host`` is not loopback.
        max_batch_size: most images per model forward; concurrent requests are packed up to this.
        max_wait_ms: how long the first image of a batch waits for others to join it.
        max_queue_images: images admitted but not yet scored before new requests get 503 (back-pressure).
        max_request_bytes: largest request body accepted (413 beyond).
        max_images_per_request: most images in one request.
        max_image_pixels: largest width * height of one image, checked from the header before decoding.
        max_prompt_chars: longest prompt accepted (CLIP reads at most 77 tokens anyway).
        max_connections: open connections (and requests in flight) beyond which new requests get 503
            (uvicorn's ``limit_concurrency``).
        header_timeout_s: a connection must send a whole request head (line and headers) within this
            many seconds of opening, or of its first byte after a keep-alive pause; it is closed otherwise.
        body_timeout_s: a request must send its whole body within this many seconds of its head (408).
        keep_alive_s: an idle keep-alive connection is closed after this many seconds.
        decode_workers: threads decoding and resizing images.
        compile: ``torch.compile`` the image towers at start-up.
        reward: the reward returned to RL trainers (``reward`` of ``/v1/score``, ``scores`` of the pickle
            protocol): a score column or a weighted sum of columns, ``"ict_hp"`` or ``"ict_hp:1,pickscore:0.5"``;
            ``None``: the model's main column.
        advantages: return per-prompt normalised rewards by default (a request can ask either way).
        pickle_path: where the pickle protocol of ddpo / flow_grpo / reward-server clients is answered
            (``POST``; default ``/``, where they post); ``None`` turns it off.
    """

    model: str = "ict-hp"
    ict: str | None = None
    hp: str | None = None
    baselines: list[str] = field(default_factory=list)
    device: str = "auto"
    dtype: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = field(default=None, repr=False)
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue_images: int = 1024
    max_request_bytes: int = 64 * 1024 * 1024
    max_images_per_request: int = 64
    max_image_pixels: int = 4096 * 4096
    max_prompt_chars: int = 2000
    max_connections: int = 512
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_s: float = 5.0
    decode_workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))
    compile: bool = False
    reward: str | None = None
    advantages: bool = False
    pickle_path: str | None = "/"

    def validate(self) -> ServeConfig:
        """Check values and the loopback/token rule; returns self.

        Raises:
            ValueError: naming the setting and what was expected.
        """
        positive = ("max_batch_size", "max_queue_images", "max_request_bytes", "max_images_per_request",
                    "max_image_pixels", "max_prompt_chars", "decode_workers")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms: expected >= 0, got {self.max_wait_ms}")
        if int(self.max_connections) < 1:
            raise ValueError(f"max_connections: expected >= 1, got {self.max_connections}")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            value = float(getattr(self, name))
            if not 0 < value < float("inf"):
                raise ValueError(f"{name}: expected a positive number of seconds, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: expected 0..65535, got {self.port}")
        if self.max_queue_images < self.max_images_per_request:
            raise ValueError(f"max_queue_images ({self.max_queue_images}) must be >= max_images_per_request "
                             f"({self.max_images_per_request}), or a full request could never be admitted")
        if self.pickle_path is not None and (not self.pickle_path.startswith("/") or self.pickle_path.startswith(
                ("/v1/", "/health", "/metrics", "/docs", "/openapi.json"))):
            raise ValueError(f"pickle_path: expected a path starting with / and outside /v1/, /health, /metrics, "
                             f"/docs, got {self.pickle_path!r}")
        from ..registry import names, parse_model_arg, score_columns

        if self.model not in names("icthp"):
            raise ValueError(f"model: expected one of {', '.join(names('icthp'))}, got {self.model!r} "
                             "(baselines are served beside it: baselines=[...])")
        columns = list(score_columns(self.model))
        for spec in self.baselines:
            try:
                columns += score_columns(parse_model_arg(spec, "baseline")[0])
            except ValueError as exc:
                raise ValueError(f"baselines: {exc}") from None
        if self.reward is not None:
            from ..scores import reward_terms

            # before any weights load: a typo must not cost the minutes CLIP-H takes to load
            reward_terms(self.reward, columns, main=columns[0])  # main: unused when a reward is named
        if not is_loopback(self.host) and not self.token:
            raise ValueError(f"host {self.host!r} accepts connections from other machines: a bearer token is "
                             f"required (--token or ${TOKEN_ENV})")
        return self

    def public_dict(self) -> dict:
        """The settings without the token (served at ``/v1/models`` and logged)."""
        d = asdict(self)
        d["token"] = bool(self.token)
        return d
