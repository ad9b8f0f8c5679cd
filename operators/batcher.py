"""Micro-batching: many concurrent submissions become few `run_batch(items)` calls.

A submission is a list of items (`submit_many`, one per batch of records) or one item (`submit`).
Submissions queue in arrival order; a batch takes items from the front, splitting a submission
across batches when it does not fit. Each caller gets back exactly the results for the items it
submitted, matched by position inside the batch, never by arrival order.

The model's own thread pulls the batches: it waits for items, forms a batch, runs it and hands the
results back to the event loop, then takes the next batch at once. How many items a batch takes and
how long it waits for them is the `BatchController`'s call (operators/batch_control.py): fixed limits,
or steered to a latency target from the batch costs it has seen. The model never waits for the
event loop (measured: when the loop dispatched each batch, a busy loop kept the toxicity model idle
two thirds of the time), and the loop never blocks on the model. Cost per batch, not per item: one
future per submission, one hand-back per submission and batch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from operators.batch_control import BatchController

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


STREAM, SYNC = 0, 1  # submission lanes: stream records first, synchronous API calls after them


class BatchFailed(Exception):
    """The model failed on this item even when run alone."""


@dataclass
class BatchStats:
    """What the last batch looked like, for metrics and adaptive batching."""

    size: int = 0
    seconds: float = 0.0
    batches: int = 0
    items: int = 0
    waited: float = 0.0  # seconds the batch was held for more items after its first one
    late: int = 0  # items whose time in the batcher passed the controller's target


@dataclass(eq=False)
class _Submission:
    """One caller's items; `results[i]` is the result of `items[i]` (or a BatchFailed) once run.
    `taken` is touched only by the model's thread (under the batcher's lock), `results` and `open`
    only by the caller's event loop."""

    items: Sequence[Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float = 0.0  # on the controller's clock
    results: list[Any] = field(default_factory=list)
    taken: int = 0  # items[:taken] are in a batch already
    open: int = 0  # items without a result yet

    def __post_init__(self) -> None:
        self.results = [None] * len(self.items)
        self.open = len(self.items)

    def hand_back(self, start: int, results: Sequence[Any]) -> None:
        """From the model's thread: results of items[start:start + len(results)]."""
        self.loop.call_soon_threadsafe(self._fill, start, results)

    def _fill(self, start: int, results: Sequence[Any]) -> None:
        self.results[start : start + len(results)] = results
        self.open -= len(results)
        if self.open == 0 and not self.future.done():
            self.future.set_result(self.results)


class MicroBatcher(Generic[In, Out]):
    """Collects items until `max_batch_size` or `max_wait_s` after the first one, then runs them at once.

    `run_batch(items) -> results` must return one result per item, in the same order. If it raises on
    a batch of several items, each item is re-run alone so one poisoned record fails by itself and the
    others still get results (`isolate_failures`). An item that fails alone is a `BatchFailed`: raised
    by `submit`, returned in its place by `submit_many`. `on_batch(size, seconds)` is called from the
    model's thread after each batch. Without a `controller` the limits are fixed (`max_batch_size`,
    `max_wait_s`); with one, they are the controller's (and these two arguments are ignored).
    """

    def __init__(
        self,
        run_batch: Callable[[list[In]], Sequence[Out]],
        max_batch_size: int = 16,
        max_wait_s: float = 0.005,
        name: str = "batcher",
        isolate_failures: bool = True,
        on_batch: Callable[[int, float], None] | None = None,
        controller: BatchController | None = None,
    ) -> None:
        self.controller = controller or BatchController(max_batch_size, max_wait_s, adaptive=False)
        self.run_batch = run_batch
        self.name = name
        self.isolate_failures = isolate_failures
        self.on_batch = on_batch
        self.stats = BatchStats()
        self._lock = threading.Condition()
        self._lanes: tuple[deque[_Submission], ...] = (deque(), deque())  # STREAM, SYNC: served in that order
        self._waiting_items = 0  # items queued and not yet taken into a batch
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def max_batch_size(self) -> int:
        return self.controller.max_batch_size

    @max_batch_size.setter
    def max_batch_size(self, value: int) -> None:
        self.controller.max_batch_size = value

    @property
    def max_wait_s(self) -> float:
        return self.controller.max_wait_s

    @max_wait_s.setter
    def max_wait_s(self, value: float) -> None:
        self.controller.max_wait_s = value

    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch."""
        return self._waiting_items

    async def submit(self, item: In, lane: int = STREAM) -> Out:
        (result,) = await self.submit_many([item], lane)
        if isinstance(result, BatchFailed):
            raise result
        return result

    async def submit_many(self, items: Sequence[In], lane: int = STREAM) -> list[Out | BatchFailed]:
        """The results of `items`, in order; an item the model failed on even alone is a BatchFailed.
        Batches take items of the STREAM lane before those of the SYNC lane (synchronous API calls),
        so a burst of API calls cannot hold stream records back."""
        if not items:
            return []
        loop = asyncio.get_running_loop()
        submission = _Submission(items, loop.create_future(), loop)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name}: the batcher is closed")
            submission.arrived = self.controller.clock()
            self.controller.arrived(len(items))
            self._lanes[lane].append(submission)
            self._waiting_items += len(items)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=f"infer-{self.name}", daemon=True)
                self._thread.start()
            self._lock.notify()
        return await submission.future

    # ------------------------------------------------------------------------ the model's thread
    def _serve(self) -> None:
        while (parts := self._collect()) is not None:
            items = [item for sub, start, end in parts for item in sub.items[start:end]]
            started = time.perf_counter()
            try:
                results = self._run_checked(items)
                seconds: float | None = time.perf_counter() - started
            except Exception as exc:  # the whole batch failed: find the culprit(s)
                results, seconds = self._one_by_one(items, exc), None
            self.stats.late = self.controller.completed([(sub.arrived, end - start) for sub, start, end in parts])
            if seconds is not None:
                self._record(len(items), seconds)
            position = 0
            for sub, start, end in parts:
                sub.hand_back(start, results[position : position + end - start])
                position += end - start

    def _collect(self) -> list[tuple[_Submission, int, int]] | None:
        """The next batch as (submission, start, end) parts: waits for a first item, then takes items
        until the controller's `max_items` or its deadline (fixed: `max_wait_s` after the first item,
        up to `max_batch_size`). None once closed."""
        clock = self.controller.clock
        with self._lock:
            while not self._waiting_items and not self._closed:
                self._lock.wait()
            if self._closed:
                return None
            parts: list[tuple[_Submission, int, int]] = []
            started = clock()
            size = 0
            while not self._closed:
                plan = self.controller.plan(size + self._waiting_items, self._oldest_arrival(parts, started), started)
                if size < plan.max_items and self._waiting_items:
                    size += self._take(parts, plan.max_items - size)
                    continue
                if size >= plan.max_items:
                    break
                remaining = plan.deadline - clock()
                if remaining <= 0:
                    break
                self._lock.wait(remaining)
            self.stats.waited = clock() - started
            return parts

    def _oldest_arrival(self, parts: list[tuple[_Submission, int, int]], default: float) -> float:
        """When the oldest item of this batch or of the queue arrived (lock held); lanes are FIFO."""
        fronts = [sub.arrived for sub, _, _ in parts] + [lane[0].arrived for lane in self._lanes if lane]
        return min(fronts, default=default)

    def _take(self, parts: list[tuple[_Submission, int, int]], room: int) -> int:
        """Move up to `room` queued items into `parts`, lane by lane; returns how many (lock held)."""
        taken = 0
        for waiting in self._lanes:
            while waiting and taken < room:
                sub = waiting[0]
                if sub.future.cancelled():  # its caller is gone: nobody wants these results
                    waiting.popleft()
                    self._waiting_items -= len(sub.items) - sub.taken
                    continue
                n = min(room - taken, len(sub.items) - sub.taken)
                parts.append((sub, sub.taken, sub.taken + n))
                sub.taken += n
                taken += n
                self._waiting_items -= n
                if sub.taken == len(sub.items):
                    waiting.popleft()
        return taken

    def _run_checked(self, items: list[In]) -> Sequence[Out]:
        results = self.run_batch(items)
        if len(results) != len(items):
            raise RuntimeError(f"{self.name}: batch function returned {len(results)} results for {len(items)} items")
        return results

    def _one_by_one(self, items: list[In], exc: Exception) -> list[Out | BatchFailed]:
        if len(items) == 1 or not self.isolate_failures:
            return [BatchFailed(f"{type(exc).__name__}: {exc}") for _ in items]
        log.warning("%s: batch of %d failed (%s); re-running items one by one", self.name, len(items), exc)
        results: list[Out | BatchFailed] = []
        for item in items:
            started = time.perf_counter()
            try:
                (result,) = self._run_checked([item])
            except Exception as single_exc:
                results.append(BatchFailed(f"{type(single_exc).__name__}: {single_exc}"))
                continue
            self._record(1, time.perf_counter() - started)
            results.append(result)
        return results

    def _record(self, size: int, seconds: float) -> None:
        self.stats.size, self.stats.seconds = size, seconds
        self.stats.batches += 1
        self.stats.items += size
        self.controller.observe(size, seconds)
        if self.on_batch is not None:
            self.on_batch(size, seconds)

    # --------------------------------------------------------------------------------- closing
    def discard(self) -> None:
        """Stop the model's thread after its current batch, without waiting for it."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    async def close(self, wait: bool = True) -> None:
        """Stop batching; `wait` waits (off the event loop) for a batch still running."""
        self.discard()
        if wait and self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
