"""The reward service under hostile input: aspect-ratio bombs, bodies that cost more to parse than to send,
malformed prompts and slow clients. Each test reproduces an attack (bounded, loopback only) that held the
server or answered 500 before the fix.
"""

from __future__ import annotations

import base64
import io
import socket
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart, httpx) is not installed")
httpx = pytest.importorskip("httpx")

from _serving import ServerThread, image_array, png_bytes  # noqa: E402
from icthp.serve import ServeConfig, create_app  # noqa: E402
from icthp.serve.app import ServedModels  # noqa: E402

# Short timeouts so the slow-client tests finish in seconds; the defaults are documented in docs/serve.md.
TIMEOUTS = dict(header_timeout_s=1.0, body_timeout_s=1.5, keep_alive_s=1.0)


@pytest.fixture(scope="module")
def served(ict_hp):
    config = ServeConfig(max_batch_size=8, max_wait_ms=5, decode_workers=2, max_connections=64, **TIMEOUTS)
    with ServerThread(create_app(config, models=ServedModels("ict-hp", ict_hp))) as server:
        yield server


def _post(served, **kwargs):
    return httpx.post(f"{served.url}/v1/score", timeout=60, **kwargs)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _error(response, status: int, code: str) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:500])
    body = response.json()
    assert body["error"]["code"] == code, body
    return body["error"]


# ------------------------------------------------------------------------------------------- images


@pytest.fixture()
def bounded_resizes(monkeypatch):
    """Fail any PIL resize to more than 8 Mpx at once (it would take gigabytes on the unfixed server)."""
    original = Image.Image.resize
    asked = []

    def bounded(self, size, *args, **kwargs):
        asked.append(tuple(size))
        if size[0] * size[1] > 8_000_000:
            raise MemoryError(f"resize to {size}")
        return original(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", bounded)
    return asked


def test_aspect_ratio_bombs_are_scored_within_bounded_memory(served, ict_hp, bounded_resizes):
    line = Image.fromarray(np.tile(image_array(3, 1, 64), (1, 313, 1))[:, :20_000])  # 20000 x 1
    data = _png(line)
    assert len(data) < 2000  # tiny on the wire
    r = _post(served, files=[("images", ("line.png", data, "image/png"))], data={"prompt": "a line"})
    assert r.status_code == 200, r.text
    want = ict_hp.score_images_all([line], "a line")
    assert r.json()["scores"]["ict"] == pytest.approx(want.ict.tolist(), abs=1e-6)
    # The same as a raw array [1, 1, 20000, 3] and, transposed, [1, 20000, 1, 3].
    for arr in (np.asarray(line)[None], np.asarray(line).transpose(1, 0, 2)[None]):
        raw = base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode()
        r = _post(served, json={"prompt": "a line", "array": {"shape": list(arr.shape), "data": raw}})
        assert r.status_code == 200, r.text
    assert all(w * h <= 8_000_000 for w, h in bounded_resizes)


def test_a_16777216_by_1_png_is_scored_not_a_500(served):
    # 49 kB on the wire, exactly at the default pixel limit: PIL's resize overflowed (OverflowError, 500).
    data = _png(Image.new("RGB", (16_777_216, 1), (9, 99, 199)))
    r = _post(served, files=[("images", ("x.png", data, "image/png"))], data={"prompt": "a"})
    assert r.status_code == 200, r.text
    assert all(np.isfinite(r.json()["scores"]["ict_hp"]))


# ------------------------------------------------------------------------------------------- bodies


def test_deeply_nested_json_is_a_400(served):
    body = b'{"prompt": "a", "images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    _error(_post(served, content=body, headers={"Content-Type": "application/json"}), 400, "invalid_json")
    depth = sys.getrecursionlimit() + 1_000  # deeper than the parser recurses, under the value bound
    body = b'{"prompt": "a", "images": ' + b"[" * depth + b"]" * depth + b"}"
    err = _error(_post(served, content=body, headers={"Content-Type": "application/json"}), 400, "invalid_json")
    assert "nested too deeply" in err["message"]


def test_a_prompt_that_is_not_unicode_is_a_400(served):
    body = ('{"prompts": ["ok", "lone \\ud800 surrogate"], "images": ["%s", "%s"]}'
            % ((base64.b64encode(png_bytes(image_array(0))).decode(),) * 2)).encode()
    err = _error(_post(served, content=body, headers={"Content-Type": "application/json"}), 400, "invalid_prompt")
    assert err["index"] == 1 and "not valid Unicode" in err["message"]


def test_a_body_of_millions_of_values_is_refused_before_parsing(served, monkeypatch):
    # 30 MB of {"images": [{}, {}, ...]}: json.loads would build ten million dicts (gigabytes).
    import icthp.serve.inputs as inputs

    calls = []
    original = inputs.json.loads

    def counting(data, *args, **kwargs):
        calls.append(len(data))
        return original(data, *args, **kwargs)

    monkeypatch.setattr(inputs.json, "loads", counting)
    body = b'{"prompt": "a", "images": [' + b"{}," * 10_000_000 + b"{}]}"
    err = _error(_post(served, content=body, headers={"Content-Type": "application/json"}), 400, "invalid_json")
    assert "JSON objects, lists or items" in err["message"]
    assert not [n for n in calls if n > 1_000_000], "the body was handed to json.loads"


def test_json_is_parsed_off_the_event_loop(served, monkeypatch):
    # A parse that takes 3 s (a large body on a slow machine) must not stall /health or other requests.
    import icthp.serve.app as app_module

    original = app_module.parse_json

    def slow(*args, **kwargs):
        time.sleep(3)
        return original(*args, **kwargs)

    monkeypatch.setattr(app_module, "parse_json", slow)
    body = {"prompt": "a", "images": [base64.b64encode(png_bytes(image_array(1))).decode()]}
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("r", _post(served, json=body)))
    thread.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    assert httpx.get(f"{served.url}/health", timeout=10).status_code == 200
    health_s = time.monotonic() - t0
    thread.join(30)
    assert result["r"].status_code == 200
    assert health_s < 1.5, f"/health took {health_s:.2f} s while a body was being parsed"


# ------------------------------------------------------------------------------------------- slow clients


def _connect(served) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", served.port), timeout=10)
    return s


def _closed_within(s: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closes ``s`` within ``seconds``, and what it sent before closing."""
    s.settimeout(seconds)
    got = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return True, got
            got += chunk
    except TimeoutError:
        return False, got
    except ConnectionResetError:
        return True, got


def test_unfinished_headers_are_dropped(served):
    socks = [_connect(served) for _ in range(40)]
    for i, s in enumerate(socks):
        s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\n" if i % 2 else b"GET /hea")
    t0 = time.monotonic()
    closed = [_closed_within(s, 6)[0] for s in socks]
    assert all(closed), f"{closed.count(False)} of 40 connections with unfinished headers were kept open"
    assert time.monotonic() - t0 < 6
    for s in socks:
        s.close()
    # A connection that sends nothing at all is dropped too, and the server still answers.
    idle = _connect(served)
    assert _closed_within(idle, 6)[0]
    idle.close()
    assert httpx.get(f"{served.url}/health", timeout=10).status_code == 200


def test_a_keep_alive_connection_that_stalls_mid_head_is_dropped(served):
    s = _connect(served)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.3)
    first = s.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    s.sendall(b"GET /health HTTP/1.1\r\nHo")  # the next request, never finished
    assert _closed_within(s, 6)[0]
    s.close()


@pytest.mark.parametrize("mode", ["short", "trickle"])
def test_slow_bodies_get_a_408(served, mode):
    s = _connect(served)
    s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
    s.sendall(b"{" + b" " * 99)  # 100 of the 1000 bytes announced
    if mode == "trickle":  # then 2 bytes every half second, forever
        def trickle():
            try:
                for _ in range(40):
                    time.sleep(0.5)
                    s.sendall(b"  ")
            except OSError:
                pass

        threading.Thread(target=trickle, daemon=True).start()
    closed, got = _closed_within(s, 8)
    s.close()
    assert got.startswith(b"HTTP/1.1 408"), got[:200]
    assert b"request_timeout" in got and closed


def test_connections_beyond_the_limit_get_503_then_recover(ict_hp):
    config = ServeConfig(max_connections=4, header_timeout_s=1.0, body_timeout_s=2.0, keep_alive_s=1.0)
    with ServerThread(create_app(config, models=ServedModels("ict-hp", ict_hp))) as server:
        hogs = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(4)]
        time.sleep(0.2)
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 503  # every slot taken
        for h in hogs:
            assert _closed_within(h, 6)[0]  # dropped by the header timeout...
            h.close()
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200  # ... and service resumes


def test_timeouts_and_limits_are_validated_settings():
    for bad in (dict(header_timeout_s=0), dict(body_timeout_s=-1), dict(keep_alive_s=float("inf")),
                dict(max_connections=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServeConfig(**bad).validate()
    d = ServeConfig().public_dict()
    assert (d["header_timeout_s"], d["body_timeout_s"], d["keep_alive_s"], d["max_connections"]) == (10.0, 60.0, 5.0, 512)
