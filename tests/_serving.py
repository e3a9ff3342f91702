"""A real uvicorn server on loopback, in a background thread, for the service tests."""

from __future__ import annotations

import io
import socket
import threading
import time

import numpy as np
from PIL import Image


class ServerThread:
    """Run ``app`` with uvicorn on 127.0.0.1 (a free port) until :meth:`stop`, under the settings
    ``icthp serve`` uses (connection limit, header / keep-alive timeouts) from the app's ServeConfig."""

    def __init__(self, app):
        import uvicorn

        from icthp.serve.app import uvicorn_config

        config = app.state.service.config
        self.server = uvicorn.Server(uvicorn_config(app, config, host="127.0.0.1", port=0, log_level="warning",
                                                    timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_array(seed: int, h: int = 96, w: int = 128) -> np.ndarray:
    """A smooth random RGB uint8 image ``[h, w, 3]`` (smooth so JPEG/PNG round trips stay meaningful)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((4, 5, 3))
    ys, xs = np.linspace(0, 3, h), np.linspace(0, 4, w)
    y0, x0 = np.floor(ys).astype(int).clip(0, 2), np.floor(xs).astype(int).clip(0, 3)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    img = ((1 - fy) * (1 - fx) * coarse[y0][:, x0] + fy * (1 - fx) * coarse[y0 + 1][:, x0]
           + (1 - fy) * fx * coarse[y0][:, x0 + 1] + fy * fx * coarse[y0 + 1][:, x0 + 1])
    return (img * 255).round().astype(np.uint8)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
