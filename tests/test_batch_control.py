"""BatchController: cost fit, per-batch size and wait against a latency target, fixed mode.

Deterministic: a simulated clock and a simulated cost function drive the controller through the same
collect loop as MicroBatcher (take what is queued up to max_items, wait until the deadline or the next
arrival, run); one test goes through the real MicroBatcher with a run_batch that costs a + b*n.
"""

from __future__ import annotations

import asyncio
import doctest
import math
import time
from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from tiny_models import write_tiny_repository

from operators import batch_control
from operators.batch_control import BatchController, Plan, fit_cost
from operators.batcher import MicroBatcher
from operators.model_repository import ModelConfig, ModelConfigError, ModelRepository
from operators.registry import ModelRegistry
from streams import metrics
from streams.app import model_metrics

A, B = 0.004, 0.001  # simulated model: a batch of n costs 4 ms + 1 ms per item
MAX = 16
TARGET = 0.05


def cost(n: int) -> float:
    return A + B * n


class SimClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Batch:
    dispatched: float
    size: int
    oldest: float  # arrival of its oldest item
    plan: Plan


@dataclass
class Run:
    batches: list[Batch] = field(default_factory=list)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (arrival, seconds arrival -> result)


def simulate(controller: BatchController, clock: SimClock, arrivals: list[float], cost=cost) -> Run:
    """One model thread serving `arrivals` (sorted times) the way MicroBatcher._collect does."""
    run, queue, pending = Run(), deque(), deque(arrivals)

    def admit_until(t: float) -> None:
        while pending and pending[0] <= t:
            clock.now = pending.popleft()
            queue.append(clock.now)
            controller.arrived(1)
        clock.now = max(clock.now, t)

    while pending or queue:
        if not queue:
            admit_until(pending[0])
        started, taken, plan = clock.now, [], None
        while True:
            oldest = min(taken[:1] + list(queue)[:1], default=started)
            plan = controller.plan(len(taken) + len(queue), oldest, started)
            if len(taken) < plan.max_items and queue:
                while queue and len(taken) < plan.max_items:
                    taken.append(queue.popleft())
                continue
            if len(taken) >= plan.max_items or clock.now >= plan.deadline:
                break
            admit_until(min(plan.deadline, pending[0]) if pending else plan.deadline)
        run.batches.append(Batch(clock.now, len(taken), taken[0], plan))
        seconds = cost(len(taken))
        admit_until(clock.now + seconds)
        controller.observe(len(taken), seconds)
        controller.completed([(t, 1) for t in taken])
        run.latencies += [(t, clock.now - t) for t in taken]
    return run


def poisson(rate: float, seconds: float, seed: int, start: float = 0.0) -> list[float]:
    gaps = np.random.default_rng(seed).exponential(1 / rate, int(rate * seconds * 2))
    times = start + np.cumsum(gaps)
    return [float(t) for t in times[times < start + seconds]]


def warmed(clock: SimClock, warm_up: int = 8, **kwargs) -> BatchController:
    """A controller that has seen `warm_up` batches of sizes 1..8 at the simulated cost."""
    controller = BatchController(MAX, 0.005, target_s=TARGET, clock=clock, warm_up=warm_up, **kwargs)
    for n in range(1, warm_up + 1):
        controller.observe(n, cost(n))
    return controller


# ------------------------------------------------------------------------------------------ the fit
def test_fit_recovers_a_and_b_of_noisy_batch_costs():
    rng = np.random.default_rng(7)
    sizes = rng.integers(1, 33, 64)
    seconds = 0.012 + 0.0025 * sizes + rng.normal(0, 0.0003, sizes.size)
    a, b = fit_cost(zip(sizes.tolist(), seconds.tolist(), strict=True))
    b_np, a_np = np.polyfit(sizes, seconds, 1)  # outside oracle: numpy's least squares
    assert (a, b) == pytest.approx((a_np, b_np), rel=1e-6)
    assert a == pytest.approx(0.012, abs=0.0005) and b == pytest.approx(0.0025, abs=0.00005)


def test_docstring_examples_hold():
    assert doctest.testmod(batch_control).failed == 0


def test_arrival_rate_is_items_per_second_over_recent_submissions_and_falls_when_quiet():
    clock = SimClock()
    controller = BatchController(clock=clock, window=8)
    for i in range(20):
        clock.now = i * 0.01
        controller.arrived(3)  # 300 items/s
    assert controller.arrival_rate() == pytest.approx(300)
    clock.now += 0.93  # a second after the 8 kept submissions began, none since
    assert controller.arrival_rate() == pytest.approx(21)


def test_controller_refits_over_a_window_of_recent_batches():
    clock = SimClock()
    controller = BatchController(MAX, 0.005, clock=clock, window=32, warm_up=16, refit_every=8)
    for i in range(15):
        controller.observe(i % 8 + 1, 0.010 + 0.002 * (i % 8 + 1))
    assert controller.cost is None  # still warming up
    controller.observe(8, 0.026)
    assert controller.cost == pytest.approx((0.010, 0.002))
    for i in range(64):  # the model got faster (e.g. another model left the cores): the old batches age out
        controller.observe(i % 8 + 1, 0.003 + 0.001 * (i % 8 + 1))
    assert controller.cost == pytest.approx((0.003, 0.001))


def test_a_single_batch_size_charges_all_cost_per_item():
    assert fit_cost([(1, 0.005)] * 10) == pytest.approx((0.0, 0.005))


def test_noise_never_makes_a_cost_term_negative():
    a, b = fit_cost([(1, 0.010), (2, 0.009), (3, 0.008)])
    assert a >= 0 and b >= 0
    a, b = fit_cost([(1, 0.001), (2, 0.004), (3, 0.007)])
    assert a >= 0 and b >= 0


# ------------------------------------------------------------------------------------------ steering
def test_during_warm_up_the_controller_uses_the_fixed_limits():
    clock = SimClock()
    controller = BatchController(MAX, 0.005, target_s=TARGET, clock=clock, warm_up=4)
    for n in range(3):
        clock.now = 1.0 + n
        assert controller.plan(1, clock.now, clock.now) == Plan(MAX, clock.now + 0.005)
        controller.observe(n + 1, cost(n + 1))


def test_at_low_load_a_lone_item_is_dispatched_at_once():
    clock = SimClock()
    controller = warmed(clock)
    run = simulate(controller, clock, poisson(rate=5, seconds=20, seed=1))
    assert len(run.batches) > 50
    assert all(b.plan.deadline == b.dispatched for b in run.batches)  # never held for company
    assert np.median([b.size for b in run.batches]) == 1
    assert np.median([seconds for _, seconds in run.latencies]) == pytest.approx(cost(1))


def test_with_a_backlog_and_a_cost_per_item_that_falls_batches_grow_to_the_maximum():
    clock = SimClock()
    controller = warmed(clock)
    controller.backlog_hint(10_000)
    capacity = MAX / cost(MAX)  # items/s at full batches: 800
    run = simulate(controller, clock, poisson(rate=1.5 * capacity, seconds=2, seed=2))
    later = [b.size for b in run.batches[len(run.batches) // 4 : -1]]  # the last one takes what is left
    assert set(later) <= {MAX // 2, MAX}  # the neighbour is measured again now and then
    assert later.count(MAX) >= 0.85 * len(later)
    assert controller.sizes.best() == MAX


def convex(n: int) -> float:
    """A model whose cost per item rises again past 4 (caches on a small CPU): 5.2, 3.4, 2.8, 3.1, 4.45 ms
    per item at 1, 2, 4, 8, 16."""
    return 0.004 + 0.001 * n + 0.0002 * n * n


def served_per_s(run: Run, until: float) -> float:
    return sum(1 for arrived, seconds in run.latencies if arrived + seconds <= until) / until


def test_under_overload_the_controller_serves_at_least_95_percent_of_the_best_fixed_batch_size():
    seconds = 20.0
    arrivals = poisson(rate=1.5 * 4 / convex(4), seconds=seconds, seed=5)  # 1.5x the best capacity
    fixed = {}
    for size in (1, 2, 4, 8, 16):
        clock = SimClock()
        fixed[size] = served_per_s(simulate(BatchController(size, 0.005, adaptive=False, clock=clock), clock,
                                            arrivals, convex), seconds)
    assert max(fixed, key=fixed.get) == 4
    clock = SimClock()
    controller = BatchController(MAX, 0.005, target_s=TARGET, clock=clock, warm_up=8)
    controller.backlog_hint(10_000)  # overload shows upstream as consumer lag (the worker's hint every second)
    run = simulate(controller, clock, arrivals, convex)
    assert served_per_s(run, seconds) >= 0.95 * fixed[4]
    assert controller.sizes.best() == 4
    later = [b.size for b in run.batches[len(run.batches) // 2 : -1]]
    assert later.count(4) >= 0.85 * len(later)


def test_the_size_chosen_under_backlog_follows_a_cost_curve_that_moves():
    clock = SimClock()
    switch = 10.0

    def moving(n: int) -> float:  # cheapest per item at 4, then (another model unloaded) at the maximum
        return convex(n) if clock.now < switch else cost(n)

    controller = BatchController(MAX, 0.005, target_s=TARGET, clock=clock, warm_up=8)
    controller.backlog_hint(10_000)
    arrivals = poisson(rate=1.5 * MAX / cost(MAX), seconds=30, seed=6)
    run = simulate(controller, clock, arrivals, moving)
    before = [b.size for b in run.batches if 5 < b.dispatched < switch]
    after = [b.size for b in run.batches if b.dispatched > 25]
    assert max(set(before), key=before.count) == 4
    assert max(set(after), key=after.count) == MAX


def test_a_model_whose_queue_never_fills_keeps_its_limit_under_a_lag_backlog():
    """Lag upstream, but this model is not the bottleneck (its queue holds a few items at a time): it
    must keep taking what is there up to the maximum, not learn a smaller limit from short batches."""
    clock = SimClock()
    controller = warmed(clock)
    controller.backlog_hint(5000)
    run = simulate(controller, clock, poisson(rate=300, seconds=5, seed=7))
    assert {b.plan.max_items for b in run.batches} == {MAX}
    assert max(b.size for b in run.batches) < MAX and controller.sizes.next_under_backlog() == MAX


def test_a_queue_backlog_without_lag_explores_nothing_and_keeps_the_target():
    clock = SimClock()
    controller = warmed(clock)
    run = simulate(controller, clock, poisson(rate=1.5 * MAX / cost(MAX), seconds=2, seed=2))
    later = [b.size for b in run.batches[len(run.batches) // 4 : -1]]
    assert set(later) == {MAX}  # the best measured size: the maximum, for a cost per item that falls


def test_only_batches_planned_under_backlog_measure_the_throughput_sizes():
    clock = SimClock()
    controller = warmed(clock)  # warm-up batches of 1..8: not backlog batches
    run = simulate(controller, clock, poisson(rate=100, seconds=5, seed=8))  # low load: batches of 1
    assert run.batches and all(controller.sizes.per_item(n) is None for n in controller.sizes.candidates)
    assert controller.sizes.best() == MAX  # nothing measured: no cap on batches below a backlog


def test_exploring_sizes_advances_per_batch_not_per_plan():
    clock = SimClock()
    controller = warmed(clock)
    controller.backlog_hint(5000)
    first = controller.plan(MAX, 0.0, 0.0).max_items
    assert all(controller.plan(MAX, 0.0, 0.0).max_items == first for _ in range(10))  # woken ten times
    for _ in range(3):
        controller.observe(first, cost(first))
    assert controller.plan(MAX, 0.0, 0.0).max_items == first // 2


def test_a_consumer_lag_hint_makes_the_batcher_wait_to_fill_a_full_batch():
    clock = SimClock()
    controller = warmed(clock)
    for i in range(40):  # 400 items/s: batches of 6 keep the model busy at most 70% of the time
        clock.now = i * 0.0025
        controller.arrived(1)
    oldest = clock.now - 0.001
    assert controller.plan(8, oldest, clock.now) == Plan(MAX, clock.now)
    controller.backlog_hint(5000)
    plan = controller.plan(8, oldest, clock.now)  # 8 more items take 20 ms; the oldest can wait 29 ms
    assert plan.max_items == MAX
    assert plan.deadline == pytest.approx(clock.now + (MAX - 8) / controller.arrival_rate())
    controller.backlog_hint(0)
    assert controller.plan(8, oldest, clock.now).deadline == clock.now


def test_waiting_that_cannot_fill_the_batch_in_time_dispatches_at_once():
    clock = SimClock()
    controller = warmed(clock)
    controller.backlog_hint(5000)
    for i in range(40):  # 100 items/s: 14 more items would take 140 ms, the target is 50 ms
        clock.now = i * 0.01
        controller.arrived(1)
    assert controller.plan(2, clock.now, clock.now).deadline == clock.now


@pytest.mark.parametrize("rate", [50, 200, 400, 600])
def test_no_item_passes_the_target_when_it_is_reachable(rate):
    clock = SimClock()
    controller = warmed(clock)
    run = simulate(controller, clock, poisson(rate=rate, seconds=5, seed=rate))
    worst = max(seconds for _, seconds in run.latencies)
    assert worst <= TARGET + 1e-9
    assert controller.late == 0
    for b in run.batches:  # each dispatch keeps its oldest item's expected completion within the target
        assert b.dispatched + controller.expected_seconds(b.size) - b.oldest <= TARGET + 1e-9


def test_busier_load_gets_bigger_batches_below_the_maximum():
    sizes = {}
    for rate in (100, 600):
        clock = SimClock()
        run = simulate(warmed(clock), clock, poisson(rate=rate, seconds=5, seed=3))
        sizes[rate] = float(np.mean([b.size for b in run.batches[20:]]))
    assert sizes[100] < sizes[600] < MAX
    assert sizes[100] < 1.5


def test_an_oldest_item_close_to_the_target_limits_the_batch_to_what_it_can_afford():
    clock = SimClock()
    controller = warmed(clock)
    clock.now = 1.0
    # the oldest arrived 40 ms ago: 10 ms left, a batch of n costs 4 + n ms, so at most 6 items
    plan = controller.plan(10, oldest_arrival=0.96, started=1.0)
    assert plan.max_items == 6
    assert plan.deadline == clock.now


def test_a_target_out_of_reach_serves_full_batches():
    clock = SimClock()
    controller = warmed(clock)
    clock.now = 1.0
    assert controller.plan(10, oldest_arrival=0.9, started=1.0).max_items == MAX


def test_late_records_are_counted():
    clock = SimClock()
    controller = warmed(clock)
    clock.now = 1.0
    assert controller.completed([(0.99, 3), (0.9, 2), (0.5, 4)]) == 6
    assert controller.late == 6


# ------------------------------------------------------------------------------------------ fixed mode
def _old_rule(started: float, max_wait_s: float) -> Plan:
    """MicroBatcher before the controller: up to max_batch_size, max_wait_s after the first item."""
    return Plan(MAX, started + max_wait_s)


def _old_rule_batches(arrivals: list[float], max_wait_s: float) -> list[tuple[float, int]]:
    """(dispatch time, size) of each batch under the old rule, computed on its own."""
    batches, i, free = [], 0, 0.0
    while i < len(arrivals):
        started = max(free, arrivals[i])
        deadline = started + max_wait_s
        in_time = [t for t in arrivals[i : i + MAX] if t <= deadline]
        size = len(in_time)
        dispatched = max(started, in_time[-1]) if size == MAX else deadline
        batches.append((dispatched, size))
        free, i = dispatched + cost(size), i + size
    return batches


def test_fixed_mode_equals_the_old_rule_whatever_it_has_seen():
    clock = SimClock()
    controller = BatchController(MAX, 0.005, target_s=TARGET, adaptive=False, clock=clock, warm_up=2)
    for n in range(1, 40):
        controller.observe(n % MAX + 1, cost(n % MAX + 1))
        controller.arrived(n)
    controller.backlog_hint(10_000)
    for in_hand, age, started in [(1, 0.0, 5.0), (3, 0.2, 7.0), (40, 1.0, 9.0), (0, 0.0, 2.0)]:
        clock.now = started + 0.001
        assert controller.plan(in_hand, started - age, started) == _old_rule(started, 0.005)


def test_fixed_mode_batches_match_the_old_rule_in_simulation():
    clock = SimClock()
    controller = BatchController(MAX, 0.005, adaptive=False, clock=clock)
    arrivals = poisson(rate=600, seconds=3, seed=4)
    run = simulate(controller, clock, arrivals)
    expected = _old_rule_batches(arrivals, 0.005)
    assert [b.size for b in run.batches] == [size for _, size in expected]
    assert [b.dispatched for b in run.batches] == pytest.approx([t for t, _ in expected])
    sizes = {size for _, size in expected}
    assert MAX in sizes and min(sizes) < MAX  # both ways of closing a batch happened: full, and the wait over


# ------------------------------------------------------------------------------------------ the real batcher
def _latencies(batcher: MicroBatcher, gaps: list[float]) -> list[float]:
    async def main():
        async def one(i: int) -> float:
            t0 = time.perf_counter()
            assert await batcher.submit(i) == i
            return time.perf_counter() - t0

        tasks = []
        try:
            for gap in gaps:
                tasks.append(asyncio.create_task(one(len(tasks))))
                await asyncio.sleep(gap)  # the load generator's arrival process, not synchronisation
            return await asyncio.gather(*tasks)
        finally:
            await batcher.close()

    return asyncio.run(main())


def test_micro_batcher_wired_to_the_controller_does_not_hold_a_lone_item_at_low_load():
    # Real threads and sleeps: only the shape is asserted, never a time (the p99 target itself is
    # checked on the simulated clock above, where the machine's load cannot move it).
    def run_batch(items):
        time.sleep(cost(len(items)))  # the simulated model's cost
        return list(items)

    gaps = np.random.default_rng(5).exponential(1 / 40, 80).tolist()  # 40 items/s, a 5th of a lone item's capacity
    controller = BatchController(MAX, 0.02, target_s=TARGET, warm_up=4)
    adaptive = _latencies(MicroBatcher(run_batch, controller=controller), gaps)
    fixed = _latencies(MicroBatcher(run_batch, MAX, 0.02), gaps)
    assert controller.cost is not None  # it learned the cost curve from the batches it saw
    # a lone item is not held for company that does not come: the fixed batcher holds each for 20 ms
    assert 0.02 <= np.median(fixed)
    assert np.median(adaptive) < np.median(fixed)


def test_metrics_hook_reports_wait_limit_cost_and_late_records():
    clock = SimClock()
    controller = warmed(clock)
    batcher = MicroBatcher(lambda items: items, controller=controller)
    stage = SimpleNamespace(batcher=batcher, model=SimpleNamespace(
        config=SimpleNamespace(name="sim", version="7", task="classify"), session=SimpleNamespace(provider="cpu")))
    model_metrics().on_loaded(stage)
    controller.plan(1, 0.0, 0.0)
    controller.completed([(-1.0, 3)])  # 3 records waited a second
    batcher.stats.waited = 0.002
    batcher._record(4, 0.008)
    value = metrics.REGISTRY.get_sample_value
    labels = {"model": "sim", "version": "7"}
    assert value("inferstream_batch_late_records_total", labels) == 3
    assert value("inferstream_batch_wait_seconds_sum", labels) == pytest.approx(0.002)
    assert value("inferstream_batch_limit_records", labels) == MAX
    assert value("inferstream_batch_cost_seconds", {**labels, "term": "fixed"}) == pytest.approx(A)
    assert value("inferstream_batch_cost_seconds", {**labels, "term": "per_record"}) == pytest.approx(B)
    assert not math.isnan(value("inferstream_batch_cost_seconds", {**labels, "term": "fixed"}))


# ------------------------------------------------------------------------------------------ config
def _tiny_model(root, batching: dict):
    directory = write_tiny_repository(root)
    config = yaml.safe_load((directory / "config.yaml").read_text())
    config["batching"].update(batching)
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    return directory


def test_config_defaults_to_the_adaptive_controller_with_a_100_ms_target(tmp_path):
    cfg = ModelConfig.load(write_tiny_repository(tmp_path))
    assert cfg.adaptive_batching is True and cfg.target_p99_ms == 100.0


@pytest.mark.parametrize("batching", [{"target_p99_ms": 0}, {"target_p99_ms": -5}])
def test_a_target_that_is_not_positive_is_refused(tmp_path, batching):
    with pytest.raises(ModelConfigError, match="target_p99_ms"):
        ModelConfig.load(_tiny_model(tmp_path, batching))


@pytest.mark.parametrize("adaptive", [True, False])
def test_the_registry_gives_each_version_a_controller_from_its_config(tmp_path, adaptive):
    _tiny_model(tmp_path, {"adaptive": adaptive, "target_p99_ms": 40, "max_batch_size": 8, "max_wait_ms": 3})
    stage = ModelRegistry(ModelRepository(tmp_path), warm_up=False)._load_stage("tiny@1")
    controller = stage.batcher.controller
    assert (controller.adaptive, controller.target_s, controller.max_batch_size, controller.max_wait_s) == (
        adaptive, 0.04, 8, 0.003)
    stage.batcher.discard()
