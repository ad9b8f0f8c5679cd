"""Micro-batching: many concurrent `submit(item)` calls become few `run_batch(items)` calls.

Each caller gets back exactly the result for the item it submitted: results are matched by position
inside the batch, never by arrival order across batches. The batch function runs in a dedicated
worker thread, so the event loop keeps consuming (and decoding the next records) while a model runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


class BatchFailed(Exception):
    """The model failed on this item even when run alone."""


@dataclass
class BatchStats:
    """What the last batch looked like, for metrics and adaptive batching."""

    size: int = 0
    seconds: float = 0.0
    batches: int = 0
    items: int = 0


class MicroBatcher(Generic[In, Out]):
    """Collects items until `max_batch_size` or `max_wait_s` after the first one, then runs them at once.

    `run_batch(items) -> results` must return one result per item, in the same order. If it raises on
    a batch of several items, each item is re-run alone so one poisoned record fails by itself and the
    others still get results (`isolate_failures`). An item that fails alone raises `BatchFailed` in its
    caller.
    """

    def __init__(
        self,
        run_batch: Callable[[list[In]], Sequence[Out]],
        max_batch_size: int = 16,
        max_wait_s: float = 0.005,
        name: str = "batcher",
        isolate_failures: bool = True,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if max_wait_s < 0:
            raise ValueError("max_wait_s must be >= 0")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.name = name
        self.isolate_failures = isolate_failures
        self.on_batch = on_batch
        self.stats = BatchStats()
        self._queue: asyncio.Queue[tuple[In, asyncio.Future[Out]]] | None = None
        self._task: asyncio.Task | None = None
        # One thread per batcher: a model's batches run one after another, off the event loop.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{name}")

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, item: In) -> Out:
        if self._task is None or self._task.done():
            self._queue = self._queue or asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _collect(self) -> list[tuple[In, asyncio.Future[Out]]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            live = [(item, fut) for item, fut in batch if not fut.cancelled()]
            if not live:
                continue
            items = [item for item, _ in live]
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._run_checked, items)
            except Exception as exc:  # the whole batch failed: find the culprit(s)
                await self._resolve_one_by_one(live, exc)
                continue
            self._record(len(items), time.perf_counter() - started)
            for (_, fut), result in zip(live, results, strict=True):
                if not fut.done():
                    fut.set_result(result)

    def _run_checked(self, items: list[In]) -> Sequence[Out]:
        results = self.run_batch(items)
        if len(results) != len(items):
            raise RuntimeError(f"{self.name}: batch function returned {len(results)} results for {len(items)} items")
        return results

    async def _resolve_one_by_one(self, live: list[tuple[In, asyncio.Future[Out]]], exc: Exception) -> None:
        loop = asyncio.get_running_loop()
        if len(live) == 1 or not self.isolate_failures:
            for _, fut in live:
                if not fut.done():
                    fut.set_exception(BatchFailed(f"{type(exc).__name__}: {exc}"))
            return
        log.warning("%s: batch of %d failed (%s); re-running items one by one", self.name, len(live), exc)
        for item, fut in live:
            started = time.perf_counter()
            try:
                (result,) = await loop.run_in_executor(self._executor, self._run_checked, [item])
            except Exception as single_exc:
                if not fut.done():
                    fut.set_exception(BatchFailed(f"{type(single_exc).__name__}: {single_exc}"))
                continue
            self._record(1, time.perf_counter() - started)
            if not fut.done():
                fut.set_result(result)

    def _record(self, size: int, seconds: float) -> None:
        self.stats.size, self.stats.seconds = size, seconds
        self.stats.batches += 1
        self.stats.items += size
        if self.on_batch is not None:
            self.on_batch(size, seconds)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        self._executor.shutdown(wait=True)
