"""Batching that steers itself: how many items the next batch takes and how long it waits for them.

A `BatchController` serves one model version's `MicroBatcher`. It learns what a batch costs,
`seconds = a + b * n`, by least squares over the last `window` batches (refitted every
`refit_every` batches), and decides each batch against a latency target for the time a record
spends in the batcher (queued, waiting, run):

- warm-up (fewer than `warm_up` batches seen) or `adaptive=False`: the fixed rule, up to
  `max_batch_size` items, waiting up to `max_wait_s` after the first one;
- backlog (items queued >= `max_batch_size`, or a consumer-lag hint of as many records): the
  throughput-optimal size, measured rather than assumed (`ThroughputSizes`): the linear fit says
  bigger is always cheaper per item, but on a small CPU the cost per item rises again past some size
  (caches, memory bandwidth: frames on 2 cores were cheapest per item at 4-8 and 15% dearer at 32).
  Under a lag backlog (records late upstream already) each candidate size (powers of two up to
  `max_batch_size`) is tried a few times, the one with the lowest median seconds per item is used,
  and its neighbours are re-measured now and then; it waits for that batch when the arrival rate
  fills it in time. A queue backlog without lag uses the best size measured so far, exploring
  nothing (trying small sizes there would cost the latency target);
- otherwise the smallest batch that keeps the model busy at most `max_utilisation` of the time at
  the arrival rate seen (`rate * (a/n + b) <= max_utilisation`), never above the measured
  throughput-optimal size; at low load that is one item, dispatched at once;
- wait for the wanted size only while the arrival rate can fill it before the oldest item's latest
  dispatch time (`oldest arrival + target - cost(batch)`); dispatch at once otherwise;
- never take more items than keep the oldest item's expected completion within the target, when
  that is reachable (with a consumer-lag backlog, records are late upstream already: throughput first).

Pure: no threads, no Kafka, no asyncio; the clock is a parameter so tests simulate time. Not
thread-safe by itself: `MicroBatcher` calls it under its lock (`observe` from the model's thread only).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_TARGET_S = 0.1  # batching.target_p99_ms: 100 ms, frames-scale models (a detector's batch is tens of ms)


@dataclass(frozen=True)
class Plan:
    """Take up to `max_items` into the batch; dispatch it once full or at `deadline` (controller clock)."""

    max_items: int
    deadline: float


class BatchController:
    """Chooses each batch's size and wait for one model version (rules in the module docstring).

    >>> t = [0.0]
    >>> c = BatchController(max_batch_size=8, max_wait_s=0.005, target_s=0.05, clock=lambda: t[0], warm_up=2)
    >>> c.plan(in_hand=1, oldest_arrival=0.0, started=0.0)  # warm-up: the fixed rule
    Plan(max_items=8, deadline=0.005)
    >>> for _ in range(4):
    ...     c.observe(1, 0.002); c.observe(4, 0.005)
    >>> round(c.cost[0], 6), round(c.cost[1], 6)
    (0.001, 0.001)
    >>> c.plan(in_hand=1, oldest_arrival=0.0, started=0.0)  # nothing arrives: no waiting for nothing
    Plan(max_items=8, deadline=0.0)
    """

    def __init__(
        self,
        max_batch_size: int = 16,
        max_wait_s: float = 0.005,
        target_s: float = DEFAULT_TARGET_S,
        adaptive: bool = True,
        clock: Callable[[], float] = time.monotonic,
        window: int = 64,
        warm_up: int = 16,
        refit_every: int = 8,
        max_utilisation: float = 0.7,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if max_wait_s < 0:
            raise ValueError("max_wait_s must be >= 0")
        if target_s <= 0:
            raise ValueError("target_s must be > 0")
        if not 0 < max_utilisation <= 1:
            raise ValueError("max_utilisation must be in (0, 1]")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.target_s = target_s
        self.adaptive = adaptive
        self.clock = clock
        self.warm_up = max(warm_up, 1)
        self.refit_every = max(refit_every, 1)
        self.max_utilisation = max_utilisation
        self.cost: tuple[float, float] | None = None  # fitted (a, b): seconds = a + b * n; None during warm-up
        self.late = 0  # records whose time in the batcher passed the target
        self.last_plan: Plan | None = None
        self._batches: deque[tuple[int, float]] = deque(maxlen=max(window, 2))
        self._arrivals: deque[tuple[float, int]] = deque()
        self._arrivals_kept = max(window, 2)
        self._arrived_items = 0  # sum of the counts in _arrivals (plan() runs on every wake: no re-summing)
        self._seen = 0
        self._lag = 0
        # measured on backlog batches only: a low-load batch runs on a quieter machine, and it is
        # dispatched early rather than at the size asked for
        self.sizes = ThroughputSizes(max_batch_size)
        self._backlog_plan = False  # the last plan was made under backlog

    # ------------------------------------------------------------------------------ what it learns
    def observe(self, size: int, seconds: float) -> None:
        """One batch of `size` items ran in `seconds`."""
        self._batches.append((size, seconds))
        if self._backlog_plan and self.last_plan is not None and size == self.last_plan.max_items:
            self.sizes.observe(size, seconds)
        self._seen += 1
        if self._seen >= self.warm_up and (self.cost is None or self._seen % self.refit_every == 0):
            self.cost = fit_cost(self._batches)

    def arrived(self, count: int) -> None:
        """`count` items were submitted now (for the arrival rate)."""
        self._arrivals.append((self.clock(), count))
        self._arrived_items += count
        if len(self._arrivals) > self._arrivals_kept:
            self._arrived_items -= self._arrivals.popleft()[1]

    def backlog_hint(self, records: int) -> None:
        """Records known to be waiting upstream (consumer lag); >= `max_batch_size` counts as a backlog."""
        self._lag = max(int(records), 0)

    def completed(self, arrivals: list[tuple[float, int]], now: float | None = None) -> int:
        """A batch finished: `arrivals` are (arrival time, item count) of its parts. Counts and returns
        the items whose time in the batcher passed the target."""
        now = self.clock() if now is None else now
        late = sum(count for arrived, count in arrivals if now - arrived > self.target_s)
        self.late += late
        return late

    def arrival_rate(self, now: float | None = None) -> float:
        """Items per second over the recent submissions (falls as the queue goes quiet)."""
        if len(self._arrivals) < 2:
            return 0.0
        now = self.clock() if now is None else now
        first_time, first_count = self._arrivals[0]
        span = now - first_time
        items = self._arrived_items - first_count
        return items / span if span > 0 else math.inf

    # ------------------------------------------------------------------------------ what it decides
    def expected_seconds(self, n: int) -> float:
        """The fitted cost of a batch of n (0 before the fit)."""
        if self.cost is None:
            return 0.0
        a, b = self.cost
        return a + b * n

    def plan(self, in_hand: int, oldest_arrival: float, started: float) -> Plan:
        """The next batch's limits, given `in_hand` items available for it (taken or queued), the
        oldest one's arrival time and when collecting this batch began (all on the controller's clock)."""
        if not self.adaptive or self.cost is None:
            self._backlog_plan = False
            plan = Plan(self.max_batch_size, started + self.max_wait_s)
        else:
            plan = self._steer(in_hand, oldest_arrival, self.clock())
        self.last_plan = plan
        return plan

    def _steer(self, in_hand: int, oldest_arrival: float, now: float) -> Plan:
        a, b = self.cost  # type: ignore[misc]
        top = self.max_batch_size
        budget = oldest_arrival + self.target_s - now  # what the oldest item has left
        # largest batch the oldest item can still afford; none affordable: the target is out of reach
        affordable = math.floor((budget - a) / b) if b > 0 else (top if budget >= a else 0)
        self._backlog_plan = self._lag >= top or in_hand >= top
        if self._lag >= top:  # records are late upstream already: throughput first
            limit = want = self.sizes.next_under_backlog()
        elif in_hand >= top:  # the target still holds: the best size measured, no exploring
            best = self.sizes.best()
            limit = want = min(best, affordable) if affordable >= 1 else best
        else:
            limit = min(top, affordable) if affordable >= 1 else top
            want = min(limit, self._size_to_keep_up(a, b, now), self.sizes.best())
        if in_hand >= want:
            return Plan(limit, now)
        rate = self.arrival_rate(now)
        fill = (want - in_hand) / rate if rate > 0 else math.inf
        latest = oldest_arrival + self.target_s - (a + b * want)
        if now + fill > latest:  # waiting cannot fill the batch in time
            return Plan(limit, now)
        return Plan(limit, now + fill)

    def _size_to_keep_up(self, a: float, b: float, now: float) -> int:
        """Smallest n with rate * (a/n + b) <= max_utilisation (the model keeps headroom); at low load 1."""
        rate = self.arrival_rate(now)
        spare = self.max_utilisation - rate * b
        if spare <= 0:
            return self.sizes.best()
        return max(1, min(self.max_batch_size, math.ceil(rate * a / spare - 1e-9)))


class ThroughputSizes:
    """Which batch size serves the most items per second, measured: the median seconds per item of the
    last `samples` batches of each candidate size (the powers of two below `top`, and `top`).

    Under backlog (`next_under_backlog`) a candidate with fewer than `samples` measurements is tried
    first, largest first (what a linear cost model would pick); then the best one is used, and after
    every `revisit_every` batches at it, one neighbour is measured `samples` times again (up and down
    in turn), so the choice follows a cost curve that moves (another model loaded, a busier machine).
    A size that batches never reach is never measured, so exploring stays at it: batches take what is
    there up to that size, as without measuring. That is what happens to a model that is not the
    bottleneck of its pipeline (a consumer-lag backlog upstream, but its own queue never fills: in the
    soak the cheap toxicity model beside a PII model that holds the posts back). Dropping such a size
    after a few short batches shrank its limit to 1 for good; the limit must only fall on evidence.
    State advances as batches are observed, never as plans are asked for (a batch is planned on every
    wake of its collection).

    >>> s = ThroughputSizes(8, samples=1)
    >>> s.next_under_backlog()  # nothing measured yet: each size once, largest first
    8
    >>> for n, seconds in ((8, 0.040), (4, 0.012), (2, 0.008), (1, 0.005)):
    ...     s.observe(n, seconds)
    >>> s.best(), s.next_under_backlog()  # 3 ms per item at 4 beats 5 ms at 8, 4 ms at 2 and 5 ms at 1
    (4, 4)
    """

    def __init__(self, top: int, samples: int = 3, revisit_every: int = 32) -> None:
        self.candidates = sorted({*(2**k for k in range(top.bit_length()) if 2**k < top), top})
        self.samples = max(samples, 1)
        self.revisit_every = max(revisit_every, 1)
        self._per_item: dict[int, deque[float]] = {n: deque(maxlen=self.samples) for n in self.candidates}
        self._at_best = 0  # batches at the best size since the last revisit
        self._revisits = 0
        self._revisit: list[int] | None = None  # [size, measurements still wanted]

    def observe(self, size: int, seconds: float) -> None:
        """A batch of `size` ran in `seconds`."""
        if size in self._per_item:
            self._per_item[size].append(seconds / size)
        if self._revisit is not None and size == self._revisit[0]:
            self._revisit[1] -= 1
            if not self._revisit[1]:
                self._revisit = None
        elif size == self.best() and not self._unknown():
            self._at_best += 1
            if self._at_best >= self.revisit_every:
                self._at_best = 0
                self._start_revisit()

    def per_item(self, size: int) -> float | None:
        """Median seconds per item at `size` (None: not measured)."""
        seen = sorted(self._per_item[size])
        return seen[len(seen) // 2] if seen else None

    def best(self) -> int:
        """The measured size with the lowest cost per item; the largest candidate while none is measured."""
        measured = [(cost, n) for n in self.candidates if (cost := self.per_item(n)) is not None]
        return min(measured)[1] if measured else self.candidates[-1]

    def next_under_backlog(self) -> int:
        """The size of the next batch while a backlog lasts: exploring, revisiting, or the best."""
        unknown = self._unknown()
        if unknown:
            return unknown[-1]
        return self._revisit[0] if self._revisit is not None else self.best()

    def _unknown(self) -> list[int]:
        return [n for n in self.candidates if len(self._per_item[n]) < self.samples]

    def _start_revisit(self) -> None:
        i = self.candidates.index(self.best())
        self._revisits += 1
        order = (i + 1, i - 1) if self._revisits % 2 else (i - 1, i + 1)
        for j in order:
            if 0 <= j < len(self.candidates):
                self._revisit = [self.candidates[j], self.samples]
                return


def fit_cost(batches) -> tuple[float, float]:
    """Least-squares (a, b) of seconds = a + b * n over (n, seconds) pairs, both kept >= 0.
    With a single batch size the split is unknown: all of the cost goes to b (the cautious guess,
    bigger batches are not assumed cheap).

    >>> fit_cost([(1, 0.003), (2, 0.004), (4, 0.006)])
    (0.002, 0.001)
    """
    pairs = list(batches)
    count = len(pairs)
    mean_n = sum(n for n, _ in pairs) / count
    mean_s = sum(s for _, s in pairs) / count
    var_n = sum((n - mean_n) ** 2 for n, _ in pairs)
    if var_n == 0:
        return 0.0, mean_s / mean_n
    b = sum((n - mean_n) * (s - mean_s) for n, s in pairs) / var_n
    a = mean_s - b * mean_n
    if b < 0:  # noise: bigger batches looked cheaper; cost is flat
        return mean_s, 0.0
    if a < 0:  # through the origin
        return 0.0, sum(n * s for n, s in pairs) / sum(n * n for n, _ in pairs)
    return round(a, 12), round(b, 12)
