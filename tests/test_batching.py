"""Dynamic batching: packing, splitting, order, errors, back-pressure and draining on close."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from icthp.serve.batching import BatcherClosed, DynamicBatcher, QueueFull


class Recorder:
    """A fake model: score = first pixel value; records each batch's size (and can block or fail)."""

    def __init__(self, fail_on: set[int] | None = None):
        self.sizes: list[int] = []
        self.fail_on = fail_on or set()
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, inputs, prompts):
        self.gate.wait(10)
        x = inputs["k"]
        self.sizes.append(x.shape[0])
        if len(self.sizes) in self.fail_on:
            raise RuntimeError("boom")
        n = torch.tensor([len(p) for p in prompts], dtype=torch.float32) if prompts else torch.zeros(x.shape[0])
        return {"value": x[:, 0].clone(), "prompt_len": n}


def _work(start: int, n: int):
    return {"k": torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, 2)}, ["p" * (start + i) for i in range(n)]


def _run(coro):
    return asyncio.run(coro)


def test_queued_requests_are_packed_up_to_the_batch_size():
    model = Recorder()

    async def main():
        b = DynamicBatcher(model, max_batch_size=8, max_wait_s=0.05)
        await b.start()
        # Five requests of 3 images, queued before the batcher runs: 3+3 | 3+3 | 3 (a 3rd would exceed 8).
        results = await asyncio.gather(*(b.submit(*_work(10 * i, 3)) for i in range(5)))
        await b.close()
        return results

    results = _run(main())
    assert model.sizes == [6, 6, 3]
    for i, r in enumerate(results):  # every request gets its own rows back, in order
        assert r["value"].tolist() == [10 * i, 10 * i + 1, 10 * i + 2]
        assert r["prompt_len"].tolist() == [10 * i, 10 * i + 1, 10 * i + 2]


def test_large_request_is_split_and_reassembled_in_order():
    model = Recorder()

    async def main():
        b = DynamicBatcher(model, max_batch_size=8, max_wait_s=0.0)
        await b.start()
        r = await b.submit(*_work(0, 20))
        await b.close()
        return r

    r = _run(main())
    assert model.sizes == [8, 8, 4]
    assert r["value"].tolist() == list(range(20))


def test_waits_for_companions_only_up_to_max_wait():
    model = Recorder()

    async def main():
        b = DynamicBatcher(model, max_batch_size=8, max_wait_s=0.2)
        await b.start()
        first = asyncio.create_task(b.submit(*_work(0, 1)))
        await asyncio.sleep(0.05)  # within the window: joins the first request's batch
        second = asyncio.create_task(b.submit(*_work(1, 1)))
        await asyncio.gather(first, second)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await b.submit(*_work(2, 1))  # alone: leaves after max_wait
        waited = loop.time() - t0
        await b.close()
        return waited

    waited = _run(main())
    assert model.sizes == [2, 1]
    assert 0.15 <= waited < 2.0


def test_a_failing_batch_fails_its_requests_only():
    model = Recorder(fail_on={1})

    async def main():
        b = DynamicBatcher(model, max_batch_size=4, max_wait_s=0.0)
        await b.start()
        with pytest.raises(RuntimeError, match="boom"):
            await b.submit(*_work(0, 2))
        ok = await b.submit(*_work(5, 2))
        queued = b.queued_images
        await b.close()
        return ok, queued

    ok, queued = _run(main())
    assert ok["value"].tolist() == [5, 6] and queued == 0


def test_back_pressure_and_close():
    model = Recorder()
    model.gate.clear()  # the model thread blocks until released

    async def main():
        b = DynamicBatcher(model, max_batch_size=4, max_wait_s=0.0, max_queue_images=6)
        await b.start()
        a = asyncio.create_task(b.submit(*_work(0, 4)))
        c = asyncio.create_task(b.submit(*_work(4, 2)))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            await b.submit(*_work(6, 1))  # 6 images already admitted
        closing = asyncio.create_task(b.close())
        await asyncio.sleep(0.05)
        with pytest.raises(BatcherClosed):
            await b.submit(*_work(7, 1))
        model.gate.set()
        await closing  # close() finishes the admitted work first
        return (await a)["value"].tolist(), (await c)["value"].tolist()

    a, c = _run(main())
    assert a == [0, 1, 2, 3] and c == [4, 5]
