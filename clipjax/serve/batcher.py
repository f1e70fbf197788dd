"""Micro-batching: queries that arrive while the model is busy run together next.

One worker task takes the first waiting query, then every other one already
queued (up to `max_batch`), and runs them as one call on a single model
thread. An idle server answers a lone query at once (no waiting window); under
load, batches grow by themselves, so throughput rises with concurrency.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class MicroBatcher:
    """`await submit(item)` → `run(items)[i]`, with concurrent items batched together."""

    def __init__(self, run: Callable[[Sequence[Any]], Sequence[Any]], max_batch: int = 32,
                 executor: ThreadPoolExecutor | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._run = run
        self.max_batch = max_batch
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix="clipjax-model")
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self.items = 0  # statistics, for /api/info and the benchmark
        self.batches = 0
        self.largest = 0

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def submit(self, item: Any) -> Any:
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not awaited")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def call(self, fn: Callable, *args) -> Any:
        """Runs `fn(*args)` on the model thread (between batches, never beside one)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _loop(self) -> None:
        queue = self._queue
        while True:
            batch = [await queue.get()]
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            batch = [(item, f) for item, f in batch if not f.done()]  # clients gone
            if not batch:
                continue
            self.items += len(batch)
            self.batches += 1
            self.largest = max(self.largest, len(batch))
            try:
                results = await self.call(self._run, [item for item, _ in batch])
            except Exception as e:  # noqa: BLE001 - each waiting request gets the error
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            for (_, f), result in zip(batch, results):
                if not f.done():
                    f.set_result(result)

    def stats(self) -> dict:
        mean = self.items / self.batches if self.batches else 0.0
        return {"queries": self.items, "batches": self.batches, "largest_batch": self.largest,
                "mean_batch": round(mean, 2)}
