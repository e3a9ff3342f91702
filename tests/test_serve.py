"""The reward service against a real uvicorn server on loopback (tiny-random ICT-HP, CPU).

Scores served over HTTP must equal in-process ``score_images_all`` on the same images; every limit, auth and
bad input must give a 4xx JSON error and leave the server running.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart, httpx) is not installed")
httpx = pytest.importorskip("httpx")

from _serving import ServerThread, free_port, image_array, png_bytes  # noqa: E402
from icthp.client import RewardClient, ServiceError  # noqa: E402
from icthp.serve import ServeConfig, create_app  # noqa: E402
from icthp.serve.app import ServedModels  # noqa: E402

TOKEN = "s3cret-token"
LIMITS = dict(max_images_per_request=8, max_image_pixels=1100 * 1100, max_request_bytes=6 * 1024 * 1024,
              max_prompt_chars=200, max_queue_images=64)


@pytest.fixture(scope="module")
def served(ict_hp):
    """One server for the module: token auth on, small limits, 20 ms batching window."""
    config = ServeConfig(token=TOKEN, max_batch_size=16, max_wait_ms=20, decode_workers=2, **LIMITS)
    with ServerThread(create_app(config, models=ServedModels("ict-hp", ict_hp))) as server:
        yield server


@pytest.fixture()
def client(served):
    with RewardClient(served.url, token=TOKEN, timeout=30, retries=0) as c:
        yield c


def _post(served, token=TOKEN, headers=None, **kwargs):
    headers = {**(headers or {}), **({"Authorization": f"Bearer {token}"} if token else {})}
    return httpx.post(f"{served.url}/v1/score", headers=headers, timeout=30, **kwargs)


def _assert_same(result, expected, atol=1e-6):
    for col in ("ict", "hp", "hp_logit", "ict_hp"):
        got = torch.tensor(result[col])
        assert torch.allclose(got, getattr(expected, col), atol=atol), (col, got, getattr(expected, col))


# ------------------------------------------------------------------------------------------- parity


def test_demo_triplets_score_as_in_process(client, ict_hp, demo_items):
    paths = [p for p, _ in demo_items]
    prompts = [q for _, q in demo_items]
    result = client.score(paths, prompts)
    _assert_same(result, ict_hp.score_images_all(paths, prompts))
    assert result.untrained and result.main == "ict_hp"
    assert result.ranking is None  # two prompts: no single group to rank
    # One triplet, one prompt: the ranking is the released group rule, same order as Scorer.rank.
    triplet = client.score(paths[:3], prompts[0])
    assert triplet.ranking["score"] == "ict_hp_group"
    assert triplet.ranking["order"] == ict_hp.rank(prompts[0], paths[:3]).order


def test_every_transport_gives_in_process_scores(served, client, ict_hp):
    arrays = [image_array(i) for i in range(5)]
    prompts = [f"prompt number {i}" for i in range(5)]
    expected = ict_hp.score_images_all([Image.fromarray(a) for a in arrays], prompts)
    # raw uint8 array (multipart), through the client
    _assert_same(client.score(np.stack(arrays), prompts), expected)
    # encoded PNG files (multipart)
    _assert_same(client.score([png_bytes(a) for a in arrays], prompts), expected)
    # JSON with base64 images, one as a browser data URL
    b64 = [base64.b64encode(png_bytes(a)).decode() for a in arrays]
    b64[0] = "data:image/png;base64," + b64[0]
    body = _post(served, json={"prompts": prompts, "images": b64}).json()
    _assert_same(body["scores"], expected)
    # JSON with a base64 raw array
    raw = base64.b64encode(np.stack(arrays).tobytes()).decode()
    body = _post(served, json={"prompts": prompts, "array": {"shape": [5, 96, 128, 3], "data": raw}}).json()
    _assert_same(body["scores"], expected)
    # float torch pixels [B, 3, H, W] in [0, 1], quantised by the client exactly as PNG would
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    _assert_same(client.score(pixels, prompts), expected)


def test_reward_fn_shape_and_chunking(served, ict_hp):
    arrays = np.stack([image_array(10 + i) for i in range(11)])
    prompts = [f"p{i % 3}" for i in range(11)]
    expected = ict_hp.score_images_all([Image.fromarray(a) for a in arrays], prompts)
    with RewardClient(served.url, token=TOKEN, chunk_size=4) as c:  # 3 requests of 4, 4, 3 images
        rewards, info = c.reward_fn()(arrays, prompts, [{}] * 11)
        hp_rewards, hp_info = c.reward_fn("hp")(arrays, prompts, None)
    assert isinstance(rewards, np.ndarray) and rewards.dtype == np.float32 and rewards.shape == (11,)
    assert np.allclose(rewards, expected.ict_hp.numpy(), atol=1e-6)
    assert set(info) == {"ict", "hp", "hp_logit"}
    assert np.allclose(hp_rewards, expected.hp.numpy(), atol=1e-6) and "ict_hp" in hp_info


# ------------------------------------------------------------------------------------------- auth


def test_auth(served):
    assert httpx.get(f"{served.url}/health").status_code == 200  # probes need no token
    for token in (None, "wrong", TOKEN + "x"):
        r = _post(served, token=token, json={"prompt": "a", "images": []})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{served.url}/v1/models").status_code == 401
    assert httpx.get(f"{served.url}/metrics").status_code == 401
    info = httpx.get(f"{served.url}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert info["columns"] == ["ict", "hp", "hp_logit", "ict_hp"] and info["untrained"] is True
    assert info["limits"]["max_images_per_request"] == 8
    assert "token" not in json.dumps(info).lower() or TOKEN not in json.dumps(info)


def test_non_loopback_bind_requires_a_token():
    with pytest.raises(ValueError, match="bearer token is required"):
        ServeConfig(host="0.0.0.0").validate()
    ServeConfig(host="0.0.0.0", token="t").validate()
    ServeConfig(host="::1").validate()
    from icthp.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--ict", "tiny-random", "--hp", "tiny-random"]) == 2


# ------------------------------------------------------------------------------------------- limits and bad input


def _error(r, status, code):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == code, r.json()
    return r.json()["error"]


def test_limits(served):
    small = png_bytes(image_array(0))
    files = [("images", ("x.png", small, "image/png"))] * 9
    _error(_post(served, files=files, data={"prompt": "a"}), 413, "too_many_images")
    _error(_post(served, json={"prompt": "a", "array": {"shape": [9, 8, 8, 3], "data": ""}}), 413, "too_many_images")
    # body size: announced by Content-Length, and streamed without one (chunked)
    big = os.urandom(6 * 1024 * 1024 + 10)
    _error(_post(served, files=[("images", ("big.png", big, "image/png"))], data={"prompt": "a"}), 413,
           "request_too_large")

    def chunks():
        for _ in range(7):
            yield os.urandom(1024 * 1024)

    r = httpx.post(f"{served.url}/v1/score", content=chunks(), timeout=30,
                   headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    _error(r, 413, "request_too_large")
    # pixels: a 1200x1200 PNG is small on the wire but over the 1100x1100 limit; refused before decoding
    wide = png_bytes(np.zeros((1200, 1200, 3), np.uint8))
    assert len(wide) < 100_000
    err = _error(_post(served, files=[("images", ("a.png", small, "image/png")), ("images", ("w.png", wide, "image/png"))],
                       data={"prompt": "a"}), 400, "image_too_large")
    assert err["index"] == 1
    _error(_post(served, json={"prompt": "a", "array": {"shape": [1, 1200, 1200, 3], "data": ""}}), 400,
           "image_too_large")
    # prompt length
    err = _error(_post(served, json={"prompts": ["ok", "x" * 201], "images": [base64.b64encode(small).decode()] * 2}),
                 400, "prompt_too_long")
    assert err["index"] == 1


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"prompt": "a", "images": []}, "no_images"),
        ({"images": ["AAAA"]}, "missing_prompt"),
        ({"prompt": "a", "prompts": ["a"], "images": ["AAAA"]}, "invalid_prompt"),
        ({"prompts": ["a", "b", "c"], "images": ["AAAA", "AAAA"]}, "invalid_prompt"),
        ({"prompt": 3, "images": ["AAAA"]}, "invalid_prompt"),
        ({"prompt": "a", "images": ["not base64!"]}, "invalid_base64"),
        ({"prompt": "a", "images": "AAAA"}, "invalid_json"),
        ({"prompt": "a", "image": ["AAAA"]}, "invalid_json"),
        ({"prompt": "a", "array": {"shape": [1, 2, 2], "data": ""}}, "invalid_array"),
        ({"prompt": "a", "array": {"shape": [1, 2, 2, 2], "data": ""}}, "invalid_array"),
        ({"prompt": "a", "array": {"shape": [1, 2, 2, 3], "data": "AAAA"}}, "invalid_array"),
        ({"prompt": "a", "array": {"shape": [1, 2, 2, 3], "dtype": "float32", "data": ""}}, "invalid_array"),
        ({"prompt": "a", "images": ["AAAA"], "array": {"shape": [1, 2, 2, 3], "data": ""}}, "no_images"),
    ],
)
def test_bad_json_bodies(served, body, code):
    _error(_post(served, json=body), 400, code)


def test_bad_images_and_media_types(served, demo_dir):
    good = png_bytes(image_array(1))
    corrupt = good[: len(good) // 2]  # truncated PNG
    err = _error(_post(served, files=[("images", ("a.png", good, "image/png")), ("images", ("b.png", corrupt, "image/png"))],
                       data={"prompt": "a"}), 400, "invalid_image")
    assert err["index"] == 1
    _error(_post(served, files=[("images", ("t.txt", b"hello", "text/plain"))], data={"prompt": "a"}), 400,
           "invalid_image")
    _error(_post(served, files=[("images", ("e.png", b"", "image/png"))], data={"prompt": "a"}), 400, "invalid_image")
    # An EPS file would run Ghostscript in PIL: the service does not even try that decoder.
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    _error(_post(served, files=[("images", ("x.eps", eps, "application/postscript"))], data={"prompt": "a"}), 400,
           "invalid_image")
    # The server never opens paths: a path sent as an image is just bytes that are not an image.
    path = str(demo_dir / "Ferrari_car_I1.jpg").encode()
    _error(_post(served, json={"prompt": "a", "images": [base64.b64encode(path).decode()]}), 400, "invalid_image")
    _error(_post(served, files=[("images", ("p", path, "text/plain"))], data={"prompt": "a"}), 400, "invalid_image")
    _error(_post(served, content=b"hello", headers={"Content-Type": "text/plain"}), 415, "unsupported_media_type")
    _error(_post(served, content=b"{not json", headers={"Content-Type": "application/json"}), 400, "invalid_json")
    _error(_post(served, data={"prompt": "a", "image": "x"}), 415, "unsupported_media_type")  # url-encoded
    _error(_post(served, files=[("image", ("a.png", good, "image/png"))], data={"prompt": "a"}), 400, "invalid_form")
    _error(_post(served, files=[("images", ("a.png", good, "image/png")), ("array", ("a", b"", "x/y"))],
                 data={"prompt": "a", "shape": "1,1,1,3"}), 400, "invalid_form")
    _error(_post(served, files=[("array", ("a", b"\0" * 11, "application/octet-stream"))],
                 data={"prompt": "a", "shape": "1,2,2,3"}), 400, "invalid_array")
    assert httpx.get(f"{served.url}/nope").json()["error"]["code"] == "not_found"
    # ... and the server still scores afterwards
    assert _post(served, files=[("images", ("a.png", good, "image/png"))], data={"prompt": "a"}).status_code == 200


def test_client_raises_service_errors_with_the_callers_index(served):
    good = png_bytes(image_array(1))
    with RewardClient(served.url, token=TOKEN, chunk_size=2, retries=0) as c, \
            pytest.raises(ServiceError, match="invalid_image") as info:
        c.score([good, good, good, b"garbage"], "a")
    assert info.value.index == 3 and info.value.status == 400
    with pytest.raises(ValueError, match="expected one prompt or 2"):
        RewardClient(served.url, token=TOKEN).score([good, good], ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"pixels in \[0, 1\]"):
        RewardClient(served.url, token=TOKEN).score(torch.full((1, 3, 8, 8), -1.0), "a")


# ------------------------------------------------------------------------------------------- concurrency, metrics


def test_concurrent_clients_are_batched_and_exact(served, ict_hp):
    arrays = [image_array(100 + i, 64, 64) for i in range(48)]
    prompts = [f"concurrent prompt {i % 5}" for i in range(48)]
    expected = ict_hp.score_images_all([Image.fromarray(a) for a in arrays], prompts)
    headers = {"Authorization": f"Bearer {TOKEN}"}

    def metric(text, name):
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))

    before = httpx.get(f"{served.url}/metrics", headers=headers).text

    def one(i):  # 24 requests of 2 images from 12 threads
        with RewardClient(served.url, token=TOKEN, retries=0) as c:
            return i, c.score(np.stack(arrays[i : i + 2]), prompts[i : i + 2])

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(0, 48, 2)))
    for i, r in results:
        for col in ("ict", "hp", "ict_hp"):
            assert np.allclose(r[col], getattr(expected, col)[i : i + 2].numpy(), atol=1e-6), (i, col)
    after = httpx.get(f"{served.url}/metrics", headers=headers).text
    images = metric(after, "icthp_batch_size_sum") - metric(before, "icthp_batch_size_sum")
    batches = metric(after, "icthp_batch_size_count") - metric(before, "icthp_batch_size_count")
    assert images == 48
    assert batches < 24, "concurrent requests were never packed into one batch"
    assert metric(after, "icthp_images_total") - metric(before, "icthp_images_total") == 48
    assert 'icthp_requests_total{endpoint="/v1/score",status="200"}' in after
    assert "icthp_request_duration_seconds_bucket" in after and "icthp_queue_images 0" in after


def test_openapi_documents_both_body_types(served):
    spec = httpx.get(f"{served.url}/openapi.json").json()
    body = spec["paths"]["/v1/score"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert {"/health", "/v1/models", "/metrics"} <= set(spec["paths"])


def test_model_failure_is_a_500_and_the_service_goes_on(ict_hp, monkeypatch):
    models = ServedModels("ict-hp", ict_hp)
    calls = []
    real = models.run_batch

    def flaky(inputs, prompts):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA error: simulated")
        return real(inputs, prompts)

    monkeypatch.setattr(models, "run_batch", flaky)
    with ServerThread(create_app(ServeConfig(), models=models)) as server:
        body = {"prompt": "a", "images": [base64.b64encode(png_bytes(image_array(3))).decode()]}
        r = httpx.post(f"{server.url}/v1/score", json=body, timeout=30)
        assert r.status_code == 500 and "simulated" in r.json()["error"]["message"]
        assert httpx.post(f"{server.url}/v1/score", json=body, timeout=30).status_code == 200


# ------------------------------------------------------------------------------------------- start-up and shutdown


def test_health_is_ready_only_once_models_are_loaded(ict_hp, monkeypatch):
    import icthp.serve.app as app_module

    release = threading.Event()

    def slow_load(config):
        release.wait(30)
        return ServedModels("ict-hp", ict_hp)

    monkeypatch.setattr(app_module, "load_models", slow_load)
    with ServerThread(create_app(ServeConfig())) as server:
        r = httpx.get(f"{server.url}/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        body = {"prompt": "a", "images": [base64.b64encode(png_bytes(image_array(3))).decode()]}
        r = httpx.post(f"{server.url}/v1/score", json=body)
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading" and r.headers["retry-after"]
        release.set()
        with RewardClient(server.url) as c:
            assert c.wait_ready(timeout_s=30, poll_s=0.05)["status"] == "ready"
            assert len(c.score([png_bytes(image_array(3))], "a")) == 1


def test_failed_load_is_reported(tmp_path):
    with ServerThread(create_app(ServeConfig(ict=str(tmp_path / "missing"), hp="tiny-random", device="cpu"))) as server:
        with RewardClient(server.url, retries=5, backoff_s=0.01) as c:
            with pytest.raises(ServiceError, match="load_failed"):
                c.wait_ready(timeout_s=60, poll_s=0.05)
            with pytest.raises(ServiceError, match="load_failed"):  # not retried: it will not get better
                c.score([png_bytes(image_array(3))], "a")
        assert httpx.get(f"{server.url}/health").json()["status"] == "failed"


def test_graceful_shutdown_finishes_in_flight_requests(tmp_path):
    """SIGTERM while a request waits in the batcher: the request still gets its scores, the process exits 0."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "icthp.cli", "serve", "--ict", "tiny-random", "--hp", "tiny-random", "--device", "cpu",
         "--port", str(port), "--max-wait-ms", "1500", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        with RewardClient(url) as c:
            c.wait_ready(timeout_s=120, poll_s=0.2)
        result = {}

        def request():
            with RewardClient(url, retries=0) as c:
                result["scores"] = c.score([png_bytes(image_array(5))], "a tiny dragon")

        t = threading.Thread(target=request)
        t.start()
        time.sleep(0.5)  # the request is now waiting for companions in the 1.5 s batching window
        proc.send_signal(signal.SIGTERM)
        t.join(30)
        code = proc.wait(30)
        log = proc.stdout.read()
        assert "scores" in result and len(result["scores"]) == 1, log
        # uvicorn re-raises the SIGTERM it caught once shutdown is done: exit by that signal is the normal end.
        assert code in (0, -signal.SIGTERM), log
        assert "Traceback" not in log and "ERROR" not in log, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------- client retries


class _Flaky(BaseHTTPRequestHandler):
    """Answers 503 (Retry-After 0) twice, then a valid score body; 400 for /bad."""

    calls: ClassVar[list[str]] = []

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        type(self).calls.append(self.path)
        if self.path == "/v1/bad":
            status, body = 400, {"error": {"code": "invalid_image", "message": "bad", "index": 0}}
        elif len([c for c in self.calls if c == self.path]) <= 2:
            status, body = 503, {"error": {"code": "busy", "message": "busy"}}
        else:
            status, body = 200, {"n": 1, "model": "ict-hp", "main": "ict_hp", "untrained": True,
                                 "scores": {"ict_hp": [0.5]}, "ranking": None, "timing_ms": {}}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 503:
            self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_client_retries_busy_and_unreachable_services():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with RewardClient(url, retries=3, backoff_s=0.01) as c:
            assert c.score([b"x"], "a")["ict_hp"].tolist() == [0.5]
        assert _Flaky.calls.count("/v1/score") == 3  # two 503s, then success
        with RewardClient(url, retries=1, backoff_s=0.01) as c, pytest.raises(ServiceError, match="busy"):
            _Flaky.calls.clear()
            c.score([b"x"], "a")  # 503 twice: one retry is not enough
        with RewardClient(url, retries=3, backoff_s=0.01) as c:
            _Flaky.calls.clear()
            with pytest.raises(ServiceError) as info:
                c._request("POST", "/v1/bad", content=b"")
            assert info.value.status == 400 and _Flaky.calls == ["/v1/bad"]  # 4xx: never retried
    finally:
        server.shutdown()
    # Nothing listening: connection refused, retried, then a ConnectionError naming the URL.
    port = free_port()
    t0 = time.monotonic()
    with RewardClient(f"http://127.0.0.1:{port}", retries=2, backoff_s=0.05) as c, \
            pytest.raises(ConnectionError, match=f"127.0.0.1:{port}/v1/score failed after 3 attempt"):
        c.score([b"x"], "a")
    assert time.monotonic() - t0 >= 0.05  # it did wait between attempts


def test_static_page_is_served(served):
    r = httpx.get(served.url + "/")
    assert r.status_code == 200 and "icthp reward service" in r.text and "v1/score" in r.text



def test_baselines_are_served_beside_the_model(ict_hp, tmp_path):
    import icthp
    from icthp.baselines.aesthetic import write_random_aesthetic
    from icthp.baselines.hpsv2 import write_random_hpsv2

    hps = icthp.load("hpsv2.1", weights=str(write_random_hpsv2(tmp_path / "hps", version="v2.1")))
    aes = icthp.load("aesthetic", weights=str(write_random_aesthetic(tmp_path / "aes")))
    models = ServedModels("ict-hp", ict_hp, {"hpsv2.1": hps, "aesthetic": aes})
    arrays = [image_array(40 + i, 90, 150) for i in range(3)]  # not square: HPS pads, CLIP crops
    pil = [Image.fromarray(a) for a in arrays]
    with ServerThread(create_app(ServeConfig(), models=models)) as server, RewardClient(server.url) as c:
        result = c.score(np.stack(arrays), "a red fox")
        info = c.models()
    assert result.columns == ["ict", "hp", "hp_logit", "ict_hp", "hpsv2_1", "aesthetic"]
    _assert_same(result, ict_hp.score_images_all(pil, "a red fox"))
    assert np.allclose(result["hpsv2_1"], hps.score_images(pil, "a red fox").numpy(), atol=1e-6)
    assert np.allclose(result["aesthetic"], aes.score_images(pil).numpy(), atol=1e-6)
    assert [b["name"] for b in info["baselines"]] == ["hpsv2.1", "aesthetic"]
    with pytest.raises(ValueError, match="unknown baseline 'pickscore-xl'"):
        ServeConfig(baselines=["pickscore-xl"]).validate()


def test_prompts_are_cleaned_as_the_released_evaluation(client, ict_hp):
    # The service tokenises as `icthp score` does: a prompt typed with curly quotes, an HTML entity and a
    # ligature scores as its plain spelling (the released evaluation's ftfy + html cleaning).
    arrays = np.stack([image_array(i) for i in range(2)])
    typed = client.score(arrays, ["it’s a “wooden” car &amp; a ﬁre"] * 2)
    plain = client.score(arrays, ["it's a \"wooden\" car & a fire"] * 2)
    assert typed["ict"] == pytest.approx(plain["ict"], abs=1e-6)
    raw = ict_hp.ict.tokenization
    try:
        ict_hp.ict.tokenization = "transformers"  # what icthp computed before: other ids, other scores
        uncleaned = ict_hp.score_images_all([Image.fromarray(a) for a in arrays], "it’s a “wooden” car &amp; a ﬁre")
    finally:
        ict_hp.ict.tokenization = raw
    assert (uncleaned.ict - torch.tensor(typed["ict"])).abs().max() > 1e-3
    assert client.models()["tokenization"] == "open_clip"
