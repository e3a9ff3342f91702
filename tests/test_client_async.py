"""AsyncRewardClient against real servers on loopback (two of them, tiny-random ICT-HP on CPU) and fake
transports: same scores as the sync client and in-process scoring, input order across servers, load spreading,
fail-over, back-pressure, Retry-After, the served reward and advantages, and the reward_fn shapes."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart, httpx) is not installed")
httpx = pytest.importorskip("httpx")

from _serving import ServerThread, free_port, image_array, png_bytes  # noqa: E402
from icthp.client import AsyncRewardClient, RewardClient, ServiceError, group_advantages  # noqa: E402
from icthp.serve import ServeConfig, create_app  # noqa: E402
from icthp.serve.app import ServedModels  # noqa: E402

TOKEN = "async-s3cret"
COLUMNS = ("ict", "hp", "hp_logit", "ict_hp")


@pytest.fixture(scope="module")
def servers(ict_hp):
    """Two servers of the same weights (each its own scorer instance: they batch in parallel threads)."""
    import icthp

    twin = icthp.load("ict-hp", ict="tiny-random", hp="tiny-random")
    config = dict(token=TOKEN, max_batch_size=16, max_wait_ms=5, decode_workers=1)
    with ServerThread(create_app(ServeConfig(**config), models=ServedModels("ict-hp", ict_hp))) as a, \
            ServerThread(create_app(ServeConfig(**config), models=ServedModels("ict-hp", twin))) as b:
        yield a, b


@pytest.fixture(scope="module")
def batch(ict_hp):
    """9 distinct images, 3 prompts (3 images each, interleaved) and their in-process scores."""
    arrays = np.stack([image_array(200 + i, 48, 64) for i in range(9)])
    prompts = [f"a prompt number {i % 3}" for i in range(9)]
    return arrays, prompts, ict_hp.score_images_all([Image.fromarray(a) for a in arrays], prompts)


def _close(got, want, atol=1e-6) -> bool:
    return np.allclose(np.asarray(got, dtype=np.float32), np.asarray(want, dtype=np.float32), atol=atol)


def _score_requests(url: str) -> float:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    line = next((x for x in text.splitlines()
                 if x.startswith('icthp_requests_total{endpoint="/v1/score",status="200"}')), None)
    return float(line.split()[-1]) if line else 0.0


# ------------------------------------------------------------------------------------------- real servers


def test_scores_equal_the_sync_client_and_in_process_in_input_order(servers, batch):
    a, b = servers
    arrays, prompts, expected = batch

    async def main():
        async with AsyncRewardClient([a.url, b.url], token=TOKEN, chunk_size=2, retries=0) as c:
            raw = await c.score(arrays, prompts)  # 5 requests of 2, 2, 2, 2, 1 images over 2 servers
            stats = c.stats()
            pngs = await c.score([png_bytes(x) for x in arrays], prompts)  # encoded off the loop
            pixels = await c.score(torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255, prompts)
            return raw, stats, pngs, pixels

    raw, stats, pngs, pixels = asyncio.run(main())
    with RewardClient(a.url, token=TOKEN) as c:
        sync = c.score(arrays, prompts)
    for result in (raw, pngs, pixels):
        assert result.columns == sync.columns == list(COLUMNS)
        for col in COLUMNS:
            assert _close(result[col], expected[col].numpy()), col  # in-process, image by image: input order
            assert _close(result[col], sync[col]), col
        assert result.reward_name == sync.reward_name == "ict_hp" and _close(result.reward, result["ict_hp"])
        assert result.reward.dtype == np.float32 and result.advantages is None and len(result.timing_ms) == 5
    # least_busy: the first wave alternates (ties in turn), so 5 requests split 3 / 2
    assert sorted(s["requests"] for s in stats) == [2, 3] and all(s["in_flight"] == 0 for s in stats)


def test_least_busy_spreads_the_requests_over_both_servers(servers):
    a, b = servers
    before = [_score_requests(a.url), _score_requests(b.url)]
    arrays = np.stack([image_array(i, 32, 32) for i in range(12)])

    async def main():
        async with AsyncRewardClient([a.url, b.url], token=TOKEN, chunk_size=1, max_in_flight=2) as c:
            return await c.score(arrays, "one prompt")

    assert len(asyncio.run(main())) == 12
    served = [_score_requests(a.url) - before[0], _score_requests(b.url) - before[1]]
    assert sum(served) == 12 and min(served) >= 3, served  # counted by the servers' own /metrics


def test_fail_over_when_a_server_is_down(servers, batch):
    a, _ = servers
    arrays, prompts, expected = batch
    dead = f"http://127.0.0.1:{free_port()}"

    async def main(urls, **kw):
        async with AsyncRewardClient(urls, token=TOKEN, chunk_size=2, backoff_s=0.01, **kw) as c:
            return await c.score(arrays, prompts), c.stats()

    result, stats = asyncio.run(main([dead, a.url], retries=0))  # no retries needed: another server is tried
    assert _close(result["ict_hp"], expected.ict_hp.numpy())
    assert stats[0]["failures"] >= 1 and stats[1]["requests"] == 5
    t0 = time.monotonic()
    dead2 = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionError, match=r"failed after 4 attempt\(s\) on 2 servers"):
        asyncio.run(main([dead, dead2], retries=3))
    assert time.monotonic() - t0 < 5


def test_service_errors_name_the_callers_index_and_are_not_retried(servers):
    a, b = servers
    good = png_bytes(image_array(1))

    async def main():
        async with AsyncRewardClient([a.url, b.url], token=TOKEN, chunk_size=2) as c:
            try:
                await c.score([good, good, good, b"garbage"], "a")
            finally:
                stats = c.stats()
            return stats

    with pytest.raises(ServiceError, match="invalid_image") as info:
        asyncio.run(main())
    assert info.value.index == 3 and info.value.status == 400 and "image 3 (request of images 2..3)" in str(info.value)
    with pytest.raises(ValueError, match="expected one prompt or 2"):
        asyncio.run(AsyncRewardClient(a.url).score([good, good], ["a", "b", "c"]))
    with pytest.raises(ServiceError) as info:  # wrong token: 401, raised at once
        asyncio.run(AsyncRewardClient([a.url, b.url], token="wrong").score([good], "a"))
    assert info.value.status == 401


def test_served_reward_and_advantages(servers, batch):
    a, b = servers
    arrays, prompts, expected = batch

    async def main():
        async with AsyncRewardClient([a.url, b.url], token=TOKEN) as c:
            one = await c.score(arrays, prompts, advantages=True)  # one request: the service's advantages
            info = await c.models()
        async with AsyncRewardClient([a.url, b.url], token=TOKEN, chunk_size=2) as c:
            split = await c.score(arrays, prompts, advantages=True)  # 5 requests: computed over the whole call
        return one, split, info

    one, split, info = asyncio.run(main())
    assert _close(one.reward, expected.ict_hp.numpy()) and _close(split.reward, one.reward)
    want = group_advantages(one.reward, prompts)  # (r - mean) / (std + 1e-4) per prompt
    assert one.advantages.dtype == np.float32 and _close(one.advantages, want, atol=1e-3)
    assert _close(split.advantages, want, atol=1e-3)
    for i in range(3):  # each prompt's advantages: mean 0, population std s / (s + 1e-4)
        g, s = split.advantages[i::3], one.reward[i::3].std()
        assert abs(g.mean()) < 1e-5 and abs(g.std() - s / (s + 1e-4)) < 1e-3
    if "reward" in info:  # a service with --reward describes it
        assert info["reward"]["name"] == one.reward_name


def test_reward_fn_shapes(servers, batch):
    a, b = servers
    arrays, prompts, expected = batch
    columns = set(COLUMNS)
    with RewardClient(a.url, token=TOKEN, chunk_size=4) as c:
        ddpo = c.reward_fn()(arrays, prompts, [{}] * 9)
        flow = c.reward_fn(shape="flow_grpo")(arrays, prompts, {}, only_strict=True)
        flow_hp = c.reward_fn("hp", shape="flow_grpo")(arrays, prompts, {})
        adv, adv_info = c.reward_fn(advantages=True)(arrays, prompts)
        flow_adv, _ = c.reward_fn(shape="flow_grpo", advantages=True)(arrays, prompts, {})

    async def main():
        async with AsyncRewardClient([a.url, b.url], token=TOKEN, chunk_size=4) as c:
            return (await c.reward_fn()(arrays, prompts, None),
                    await c.reward_fn(shape="flow_grpo")(arrays, prompts, {}))

    addpo, aflow = asyncio.run(main())
    for rewards, info in (ddpo, addpo):  # ddpo: (float32 array, {other column: array})
        assert isinstance(rewards, np.ndarray) and rewards.dtype == np.float32 and rewards.shape == (9,)
        assert _close(rewards, expected.ict_hp.numpy())
        assert set(info) == columns - {"ict_hp"} and all(isinstance(v, np.ndarray) for v in info.values())
        assert _close(info["hp"], expected.hp.numpy())
    for details, meta in (flow, aflow):  # flow_grpo: ({column: [float], "avg": [float]}, {})
        assert meta == {} and set(details) == columns | {"avg"}
        assert all(isinstance(v, list) and len(v) == 9 and all(type(x) is float for x in v) for v in details.values())
        assert _close(details["avg"], expected.ict_hp.numpy()) and _close(details["ict"], expected.ict.numpy())
    assert _close(flow_hp[0]["avg"], expected.hp.numpy())
    want = group_advantages(adv_info["ict_hp"], prompts)
    assert _close(adv, want, atol=1e-3) and _close(adv_info["ict_hp"], expected.ict_hp.numpy())
    assert _close(flow_adv["avg"], want, atol=1e-3) and _close(flow_adv["reward"], expected.ict_hp.numpy())
    with pytest.raises(ValueError, match="shape"):
        RewardClient(a.url).reward_fn(shape="alignprop")


def test_one_client_across_event_loops_and_from_sync_code(servers, batch):
    a, b = servers
    arrays, prompts, expected = batch
    client = AsyncRewardClient([a.url, b.url], token=TOKEN, chunk_size=3)
    first = asyncio.run(client.score(arrays, prompts))
    second = asyncio.run(client.score(arrays, prompts))  # a new loop: connections reopened
    third = client.score_sync(arrays, prompts)  # the client's own background loop
    assert all(_close(r["ict_hp"], expected.ict_hp.numpy()) for r in (first, second, third))
    with pytest.raises(RuntimeError, match="another event loop"):
        asyncio.run(client.score(arrays, prompts))  # while the background loop holds it
    client.close()


def test_health_and_wait_ready_of_several_servers(servers):
    a, b = servers
    dead = f"http://127.0.0.1:{free_port()}"

    async def main():
        async with AsyncRewardClient([a.url, b.url, dead], token=TOKEN) as c:
            health = await c.health()
            ready = await c.wait_ready(timeout_s=5, poll_s=0.05, require_all=False)
            with pytest.raises(TimeoutError, match=dead):
                await c.wait_ready(timeout_s=0.2, poll_s=0.05)
        return health, ready

    health, ready = asyncio.run(main())
    assert health[a.url]["status"] == health[b.url]["status"] == "ready"
    assert health[dead]["status"] == "unreachable" and set(ready) == {a.url, b.url}


# ------------------------------------------------------------------------------------------- fake transports


def _body(values: list[float], reward: dict | None = None) -> dict:
    body = {"n": len(values), "model": "ict-hp", "main": "ict_hp", "untrained": True,
            "scores": {"ict": [v / 10 for v in values], "ict_hp": values}, "ranking": None, "timing_ms": {}}
    if reward is not None:
        body["reward"] = reward
    return body


def _field(request, name: str) -> list[str]:
    return [m.decode() for m in re.findall(rb'name="' + name.encode() + rb'"\r\n\r\n([^\r]*)', request.content)]


def test_max_in_flight_and_strategies_with_a_fake_transport():
    active, peak, served = Counter(), Counter(), Counter()
    delay = {"a.test": 0.08, "b.test": 0.005}  # a slow server and a fast one

    async def handler(request):
        host = request.url.host
        active[host] += 1
        peak[host] = max(peak[host], active[host])
        served[host] += 1
        try:
            await asyncio.sleep(delay[host])
        finally:
            active[host] -= 1
        index = int(_field(request, "prompts")[0].split()[-1])
        return httpx.Response(200, json=_body([float(index)]))

    images = np.zeros((24, 8, 8, 3), np.uint8)
    prompts = [f"prompt {i}" for i in range(24)]

    def run(strategy, max_in_flight):
        active.clear(), peak.clear(), served.clear()

        async def main():
            async with AsyncRewardClient(["http://a.test", "http://b.test"], chunk_size=1, strategy=strategy,
                                         max_in_flight=max_in_flight, transport=httpx.MockTransport(handler)) as c:
                return await c.score(images, prompts)

        result = asyncio.run(main())
        assert result["ict_hp"].tolist() == list(range(24))  # input order, whichever server answered
        return dict(peak), dict(served)

    peak_seen, by_host = run("least_busy", 3)
    assert peak_seen == {"a.test": 3, "b.test": 3}  # never more than max_in_flight per server, and reached
    assert by_host["b.test"] >= 2 * by_host["a.test"], by_host  # the fast server takes most of the work
    peak_seen, by_host = run("round_robin", 2)
    assert peak_seen == {"a.test": 2, "b.test": 2} and by_host == {"a.test": 12, "b.test": 12}


def test_a_failed_request_moves_to_another_server_even_when_its_own_is_least_busy():
    served = Counter()

    async def handler(request):  # c.test fails at once (no Retry-After); d.test is slow but answers
        served[request.url.host] += 1
        if request.url.host == "c.test":
            return httpx.Response(502, json={"error": {"code": "bad_gateway", "message": "upstream down"}})
        await asyncio.sleep(0.03)
        return httpx.Response(200, json=_body([float(_field(request, "prompts")[0])]))

    async def main():
        async with AsyncRewardClient(["http://c.test", "http://d.test"], chunk_size=1, retries=0, max_in_flight=8,
                                     transport=httpx.MockTransport(handler)) as c:
            return await c.score(np.zeros((8, 4, 4, 3), np.uint8), [str(i) for i in range(8)])

    assert asyncio.run(asyncio.wait_for(main(), 20))["ict_hp"].tolist() == list(range(8))
    assert served["d.test"] == 8 and served["c.test"] >= 1


def test_weighted_reward_and_advantages_of_a_newer_service_and_fallbacks_for_an_older_one():
    calls = []

    def new_service(request):  # a service started with --reward "ict_hp:1,ict:0.5"
        prompts = _field(request, "prompts") or _field(request, "prompt")
        asked = _field(request, "advantages") == ["true"]
        calls.append(asked)
        n = len(_field(request, "prompts")) or 1
        values = [float(p.split()[-1]) for p in prompts][:n]
        reward = [v + 0.5 * v / 10 for v in values]
        return httpx.Response(200, json=_body(values, {"name": "ict_hp + 0.5*ict", "values": reward,
                                                       "advantages": [9.0] * n if asked else None}))

    def old_service(request):  # predates rewards: refuses the advantages field, answers no reward
        calls.append(bool(_field(request, "advantages")))
        if _field(request, "advantages"):
            return httpx.Response(400, json={"error": {"code": "invalid_form", "message": "unknown form field(s) "
                                                       "['advantages']; expected prompt, prompts, images, array, shape"}})
        return httpx.Response(200, json=_body([float(p.split()[-1]) for p in _field(request, "prompts")]))

    images = np.zeros((4, 8, 8, 3), np.uint8)
    prompts = ["x 1", "x 2", "y 3", "y 5"]
    reward = np.array([1.05, 2.1, 3.15, 5.25], np.float32)
    with RewardClient("http://new.test", transport=httpx.MockTransport(new_service)) as c:
        one = c.score(images, prompts, advantages=True)
        ddpo, info = c.reward_fn()(images, prompts)
        adv, adv_info = c.reward_fn(advantages=True)(images, prompts)
        flow, _ = c.reward_fn(shape="flow_grpo", advantages=True)(images, prompts, {})
        c.chunk_size = 2
        split = c.score(images, prompts, advantages=True)
    assert one.reward_name == "ict_hp + 0.5*ict" and _close(one.reward, reward) and one.advantages.tolist() == [9.0] * 4
    assert _close(ddpo, reward) and set(info) == {"ict", "ict_hp"}  # the reward is no column: all columns in info
    assert adv.tolist() == [9.0] * 4 and _close(adv_info["ict_hp + 0.5*ict"], reward)
    assert flow["avg"] == [9.0] * 4 and _close(flow["reward"], reward) and set(flow) == {"ict", "ict_hp", "reward", "avg"}
    assert _close(split.advantages, group_advantages(reward, prompts))  # over the call, not per request
    assert calls == [True, False, True, True, False, False]  # split requests never ask the service

    calls.clear()

    async def old_async():
        async with AsyncRewardClient("http://old.test", transport=httpx.MockTransport(old_service)) as c:
            first = await c.score(images, prompts, advantages=True)
            again = await c.score(images, prompts, advantages=True)
            return first, again

    for c_result in asyncio.run(old_async()):
        assert c_result.reward_name == "ict_hp" and _close(c_result.reward, [1, 2, 3, 5])
        assert _close(c_result.advantages, group_advantages([1, 2, 3, 5], prompts))
    assert calls == [True, False, False]  # refused once, then never asked again
    calls.clear()
    with RewardClient("http://old.test", transport=httpx.MockTransport(old_service)) as c:
        assert _close(c.score(images, prompts, advantages=True).advantages, group_advantages([1, 2, 3, 5], prompts))
    assert calls == [True, False]


class _Busy(BaseHTTPRequestHandler):
    """``/v1/score``: 503 with ``Retry-After`` for the first ``busy_for`` calls (all of them: -1), then scores."""

    calls: ClassVar[list[float]] = []
    busy_for: ClassVar[int] = 2
    retry_after: ClassVar[str] = "0.25"

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        type(self).calls.append(time.monotonic())
        busy = self.busy_for < 0 or len(self.calls) <= self.busy_for
        status, body = (503, {"error": {"code": "busy", "message": "busy"}}) if busy else (200, _body([0.5]))
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 503:
            self.send_header("Retry-After", self.retry_after)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def _serve(handler):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_busy_services_are_retried_after_their_retry_after():
    class Flaky(_Busy):
        calls: ClassVar[list[float]] = []

    class AlwaysBusy(_Busy):
        calls: ClassVar[list[float]] = []
        busy_for = -1

    flaky, flaky_url = _serve(Flaky)
    busy, busy_url = _serve(AlwaysBusy)
    try:
        # backoff_s=5: had Retry-After (0.25 s) been ignored, the two waits would take >= 2.5 + 5 s
        t0 = time.monotonic()
        result = asyncio.run(AsyncRewardClient(flaky_url, retries=3, backoff_s=5).score([b"x"], "a"))
        assert result["ict_hp"].tolist() == [0.5] and len(Flaky.calls) == 3
        waits = np.diff(Flaky.calls)
        assert (waits >= 0.24).all() and time.monotonic() - t0 < 2.5, waits
        with pytest.raises(ServiceError, match="busy"):
            asyncio.run(AsyncRewardClient(busy_url, retries=1, backoff_s=0.01).score([b"x"], "a"))
        assert len(AlwaysBusy.calls) == 2
        # Two servers, one busy: the request moves to the other at once (no retry, no wait needed)
        Flaky.calls.clear()
        Flaky.busy_for = 0
        AlwaysBusy.calls.clear()
        t0 = time.monotonic()
        client = AsyncRewardClient([busy_url, flaky_url], retries=0, strategy="round_robin")
        assert asyncio.run(client.score([b"x"], "a"))["ict_hp"].tolist() == [0.5]
        assert len(AlwaysBusy.calls) == 1 and len(Flaky.calls) == 1 and time.monotonic() - t0 < 1
    finally:
        flaky.shutdown()
        busy.shutdown()
