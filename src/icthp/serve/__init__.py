"""The reward service: ``icthp serve`` (FastAPI + uvicorn) with dynamic batching.

Install with ``pip install "icthp[serve]"``. The app factory is :func:`create_app`; :func:`run` starts uvicorn
with the safety checks of ``icthp serve`` (loopback by default, a bearer token required elsewhere).
The HTTP API is described in ``docs/serve.md`` and served as OpenAPI at ``/openapi.json``.

Example:
    >>> from icthp.serve import ServeConfig, create_app
    >>> app = create_app(ServeConfig(ict="tiny-random", hp="tiny-random"))  # doctest: +SKIP
"""

from __future__ import annotations

from .config import ServeConfig

__all__ = ["ServeConfig", "create_app", "run"]


def __getattr__(name: str):
    # FastAPI is imported only when the app is built, so `icthp.serve.ServeConfig` stays light.
    if name in ("create_app", "run"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
