"""Micro-batching: many concurrent submissions become few `run_batch(items)` calls.

A submission is a list of items (`submit_many`, one per batch of records) or one item (`submit`).
Submissions queue in arrival order; a batch takes items from the front, splitting a submission
across batches when it does not fit. Each caller gets back exactly the results for the items it
submitted, matched by position inside the batch, never by arrival order. The batch function runs in
a dedicated worker thread, so the event loop keeps consuming while a model runs.

Cost per batch, not per item: one future per submission, one thread hop per batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

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


@dataclass(eq=False)
class _Submission:
    """One caller's items; `results[i]` is the result of `items[i]` (or a BatchFailed) once run."""

    items: Sequence[Any]
    future: asyncio.Future
    results: list[Any] = field(default_factory=list)
    taken: int = 0  # items[:taken] are in a batch already
    open: int = 0  # items without a result yet

    def __post_init__(self) -> None:
        self.results = [None] * len(self.items)
        self.open = len(self.items)

    def resolve(self, index: int, result: Any) -> None:
        self.results[index] = result
        self.open -= 1
        if self.open == 0 and not self.future.done():
            self.future.set_result(self.results)


class MicroBatcher(Generic[In, Out]):
    """Collects items until `max_batch_size` or `max_wait_s` after the first one, then runs them at once.

    `run_batch(items) -> results` must return one result per item, in the same order. If it raises on
    a batch of several items, each item is re-run alone so one poisoned record fails by itself and the
    others still get results (`isolate_failures`). An item that fails alone is a `BatchFailed`: raised
    by `submit`, returned in its place by `submit_many`.
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
        self._waiting: deque[_Submission] = deque()
        self._waiting_items = 0  # items queued and not yet taken into a batch
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        # One thread per batcher: a model's batches run one after another, off the event loop.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{name}")

    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch."""
        return self._waiting_items

    async def submit(self, item: In) -> Out:
        (result,) = await self.submit_many([item])
        if isinstance(result, BatchFailed):
            raise result
        return result

    async def submit_many(self, items: Sequence[In]) -> list[Out | BatchFailed]:
        """The results of `items`, in order; an item the model failed on even alone is a BatchFailed."""
        if not items:
            return []
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._arrived = self._arrived or asyncio.Event()
            self._task = loop.create_task(self._loop(), name=f"batcher-{self.name}")
        submission = _Submission(items, loop.create_future())
        self._waiting.append(submission)
        self._waiting_items += len(items)
        self._arrived.set()
        return await submission.future

    def _take(self, parts: list[tuple[_Submission, int, int]], room: int) -> int:
        """Move up to `room` queued items into `parts` as (submission, start, end); returns how many."""
        taken = 0
        while self._waiting and taken < room:
            sub = self._waiting[0]
            if sub.future.cancelled():  # its caller is gone: nobody wants these results
                self._waiting.popleft()
                self._waiting_items -= len(sub.items) - sub.taken
                continue
            n = min(room - taken, len(sub.items) - sub.taken)
            parts.append((sub, sub.taken, sub.taken + n))
            sub.taken += n
            taken += n
            if sub.taken == len(sub.items):
                self._waiting.popleft()
        self._waiting_items -= taken
        return taken

    async def _collect(self) -> list[tuple[_Submission, int, int]]:
        assert self._arrived is not None
        while not self._waiting:
            self._arrived.clear()
            await self._arrived.wait()
        parts: list[tuple[_Submission, int, int]] = []
        size = self._take(parts, self.max_batch_size)
        deadline = time.monotonic() + self.max_wait_s
        while size < self.max_batch_size:
            if self._waiting:
                size += self._take(parts, self.max_batch_size - size)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        return parts

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            parts = [p for p in await self._collect() if not p[0].future.cancelled()]
            if not parts:
                continue
            items = [item for sub, start, end in parts for item in sub.items[start:end]]
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._run_checked, items)
            except Exception as exc:  # the whole batch failed: find the culprit(s)
                await self._resolve_one_by_one(parts, exc)
                continue
            self._record(len(items), time.perf_counter() - started)
            position = 0
            for sub, start, end in parts:
                for index in range(start, end):
                    sub.resolve(index, results[position])
                    position += 1

    def _run_checked(self, items: list[In]) -> Sequence[Out]:
        results = self.run_batch(items)
        if len(results) != len(items):
            raise RuntimeError(f"{self.name}: batch function returned {len(results)} results for {len(items)} items")
        return results

    async def _resolve_one_by_one(self, parts: list[tuple[_Submission, int, int]], exc: Exception) -> None:
        loop = asyncio.get_running_loop()
        alone = sum(end - start for _, start, end in parts) == 1
        if alone or not self.isolate_failures:
            for sub, start, end in parts:
                for index in range(start, end):
                    sub.resolve(index, BatchFailed(f"{type(exc).__name__}: {exc}"))
            return
        log.warning("%s: batch of %d failed (%s); re-running items one by one", self.name,
                    sum(end - start for _, start, end in parts), exc)
        for sub, start, end in parts:
            for index in range(start, end):
                started = time.perf_counter()
                try:
                    (result,) = await loop.run_in_executor(self._executor, self._run_checked, [sub.items[index]])
                except Exception as single_exc:
                    sub.resolve(index, BatchFailed(f"{type(single_exc).__name__}: {single_exc}"))
                    continue
                self._record(1, time.perf_counter() - started)
                sub.resolve(index, result)

    def _record(self, size: int, seconds: float) -> None:
        self.stats.size, self.stats.seconds = size, seconds
        self.stats.batches += 1
        self.stats.items += size
        if self.on_batch is not None:
            self.on_batch(size, seconds)

    def discard(self) -> None:
        """Release the model's thread of a batcher that is no longer wanted, without waiting for it."""
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False)

    async def close(self, wait: bool = True) -> None:
        """Stop batching; `wait=False` does not wait for a batch still running in the model's thread."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        self._executor.shutdown(wait=wait)
