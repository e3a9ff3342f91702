"""Dynamic batching: images of concurrent requests are packed into one model forward.

One asyncio task collects queued work until ``max_batch_size`` images are gathered or the first of them has
waited ``max_wait`` seconds, then runs the model in a single dedicated thread (the event loop keeps
accepting and decoding requests meanwhile). A request larger than a batch is split; its parts come back in
order. Work already queued when :meth:`DynamicBatcher.close` is called is finished first (graceful shutdown).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

#: ``run_batch(inputs, prompts) -> {column: Tensor[b]}``; ``inputs`` maps a preprocessing key to ``[b, 3, S, S]``.
BatchFn = Callable[[dict, "list[str] | None"], dict[str, torch.Tensor]]


class QueueFull(RuntimeError):
    """More images are waiting than ``max_queue_images`` allows; the client should retry later."""


class BatcherClosed(RuntimeError):
    """The batcher is not running (not started yet, or shutting down)."""


@dataclass
class _Work:
    inputs: dict
    prompts: list[str] | None
    n: int
    future: asyncio.Future


class DynamicBatcher:
    """Pack concurrent scoring work into batches of at most ``max_batch_size`` images.

    Example:
        >>> batcher = DynamicBatcher(run_batch, max_batch_size=32, max_wait_s=0.005)  # doctest: +SKIP
        >>> await batcher.start()  # doctest: +SKIP
        >>> columns = await batcher.submit({"clip224": pixels}, ["a cat"] * len(pixels))  # doctest: +SKIP
    """

    def __init__(self, run_batch: BatchFn, *, max_batch_size: int = 32, max_wait_s: float = 0.005,
                 max_queue_images: int = 1024, on_batch: Callable[[int, float], None] | None = None):
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_images = max_queue_images
        self.on_batch = on_batch
        self.queued_images = 0
        self._closing = False
        self._queue: asyncio.Queue[_Work | None] | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="icthp-model")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop(), name="icthp-batcher")

    async def close(self) -> None:
        """Finish everything queued, then stop the batching task and the model thread."""
        self._closing = True
        if self._task is not None and self._queue is not None:
            await self._queue.put(None)
            await self._task
            self._task = None
        self._executor.shutdown(wait=True)

    async def submit(self, inputs: dict, prompts: list[str] | None) -> dict[str, torch.Tensor]:
        """Queue ``n`` preprocessed images (with their prompts) and wait for their score columns.

        Raises:
            QueueFull: too many images already waiting.
        """
        if self._closing or self._queue is None or self._task is None or self._task.done():
            raise BatcherClosed("the service is shutting down")
        n = next(iter(inputs.values())).shape[0]
        if self.queued_images + n > self.max_queue_images:
            raise QueueFull(f"{self.queued_images} images are queued (limit {self.max_queue_images})")
        loop = asyncio.get_running_loop()
        parts = []
        for start in range(0, n, self.max_batch_size):
            stop = min(n, start + self.max_batch_size)
            work = _Work({k: v[start:stop] for k, v in inputs.items()},
                         None if prompts is None else prompts[start:stop], stop - start, loop.create_future())
            parts.append(work)
            self.queued_images += work.n
            self._queue.put_nowait(work)
        # Shield: a client that disconnects cancels this coroutine, not the batch its images are in.
        results = await asyncio.gather(*(asyncio.shield(w.future) for w in parts))
        return {k: torch.cat([r[k] for r in results]) for k in results[0]}

    async def _next(self, timeout: float | None) -> _Work | bool | None:
        """The next queued work; ``False`` when none arrived within ``timeout`` (0: only what is queued)."""
        assert self._queue is not None
        if timeout is not None and timeout <= 0:
            try:
                return self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return False
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return False

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        carry: _Work | None = None
        stopping = False
        while True:
            first = carry if carry is not None else (None if stopping else await self._next(None))
            carry = None
            if first is None or first is False:
                return
            batch, size = [first], first.n
            deadline = loop.time() + self.max_wait_s
            while size < self.max_batch_size and not stopping:
                nxt = await self._next(deadline - loop.time())
                if nxt is False:
                    break
                if nxt is None:  # close(): finish what is gathered, then whatever was queued before it
                    stopping = True
                    break
                if size + nxt.n > self.max_batch_size:
                    carry = nxt
                    break
                batch.append(nxt)
                size += nxt.n
            await self._run(batch, size)
            if stopping and carry is None:
                # Drain work queued before the stop marker (put_nowait keeps the order).
                while True:
                    rest = await self._next(0)
                    if rest is False or rest is None:
                        return
                    await self._run([rest], rest.n)

    async def _run(self, batch: list[_Work], size: int) -> None:
        loop = asyncio.get_running_loop()
        inputs = {k: torch.cat([w.inputs[k] for w in batch]) for k in batch[0].inputs}
        prompts = None if batch[0].prompts is None else [p for w in batch for p in (w.prompts or [])]
        t0 = time.perf_counter()
        try:
            columns = await loop.run_in_executor(self._executor, self.run_batch, inputs, prompts)
        except Exception as exc:  # the requests in this batch fail; the service goes on
            logger.exception("model forward failed for a batch of %d images", size)
            for w in batch:
                self.queued_images -= w.n
                if not w.future.done():
                    w.future.set_exception(exc)
            return
        if self.on_batch is not None:
            self.on_batch(size, time.perf_counter() - t0)
        start = 0
        for w in batch:
            self.queued_images -= w.n
            if not w.future.done():
                w.future.set_result({k: v[start : start + w.n] for k, v in columns.items()})
            start += w.n
