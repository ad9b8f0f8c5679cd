"""The soak's memory reading (bench/harness.py `resident_by_kind`): where a worker's resident memory
sits, so that growth can be put down to glibc's thread arenas, other anonymous maps or files.
The oracle is the kernel's own total (VmRSS) and memory this test places in thread arenas itself."""

from __future__ import annotations

import os
import threading

from bench.harness import resident_by_kind
from bench.soak_report import MB, cpu_per_minute, growth
from streams.memory import rss_bytes


def test_the_kinds_add_up_to_the_resident_set_and_thread_allocations_land_in_thread_arenas():
    before = resident_by_kind(os.getpid())
    kept: list[list[bytearray]] = []

    def allocate() -> None:  # 20 KB buffers: below glibc's mmap threshold, so from this thread's arena
        kept.append([bytearray(20_000) for _ in range(2_500)])

    threads = [threading.Thread(target=allocate) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = resident_by_kind(os.getpid())
    assert before and after and set(after) == {"main_heap", "thread_arenas", "other_anonymous", "files"}
    assert abs(sum(after.values()) - rss_bytes()) < 0.05 * rss_bytes()
    assert after["thread_arenas"] - before["thread_arenas"] >= 0.8 * 2 * 2_500 * 20_000
    assert len(kept) == 2


def test_a_process_that_is_gone_reads_as_none():
    assert resident_by_kind(2**22 + 12345) is None


def _samples() -> list[dict]:
    """Every 5 s for 15 minutes: worker A (pid 1) steps from 1,000 to 1,100 MiB at minute 7.5, its
    thread arenas from 100 to 200 MiB (read every 30 s, as the sampler does); worker B (pid 2) is
    restarted as pid 3 at minute 13, too late to have a minute after warm-up and 3 minutes of load."""
    rows = []
    for t in range(0, 901, 5):
        step = t >= 450
        a = {"pid": 1, "rss": (1100 if step else 1000) * MB, "fds": 40 + step * 2}
        if t % 30 == 0:
            a["resident"] = {"main_heap": 50 * MB, "thread_arenas": (200 if step else 100) * MB}
        b = {"pid": 2 if t < 780 else 3, "rss": 900 * MB, "fds": 30}
        rows.append({"t_s": float(t), "A": a, "B": b, "unaccounted": 0})
    return rows


def test_growth_compares_the_minute_after_warm_up_with_the_last_and_says_where_memory_sits():
    by_pid = {g["pid"]: g for g in growth(_samples(), load_end_s=900)}
    assert set(by_pid) == {1, 2}  # pid 3 lived 2 minutes: no growth row
    a = by_pid[1]
    # warm-up ends at 120 s: the minute after is 120-175 s (1,000 MiB); the last 12 samples are 845-900 s
    # (1,100 MiB); half-way is the minute from (120 + 900) / 2 = 510 s, after the step
    assert (a["from_s"], a["to_s"]) == (120, 900)
    assert (a["rss_mb_after_warm_up"], a["rss_mb_half_way"], a["rss_mb_at_end"]) == (1000, 1100, 1100)
    assert a["rss_growth"] == 0.1 and a["rss_growth_second_half"] == 0
    assert (a["fds_after_warm_up"], a["fds_at_end"]) == (40, 42)
    assert a["resident_mb_after_warm_up"] == {"main_heap": 50, "thread_arenas": 100}
    assert a["resident_mb_half_way"] == a["resident_mb_at_end"] == {"main_heap": 50, "thread_arenas": 200}
    b = by_pid[2]  # never read for smaps: no split, the rest as usual
    assert b["rss_growth"] == 0 and b["resident_mb_after_warm_up"] is None and b["resident_mb_at_end"] is None


def test_cpu_per_minute_counts_each_process_and_a_restart_from_its_own_zero():
    """Every 5 s for 3 minutes: the broker uses half a core, then a whole one from minute 2; worker A
    a quarter of a core, killed and restarted (new pid, its CPU seconds from 0) at 90 s."""
    rows = []
    for t in range(0, 181, 5):
        broker = 0.5 * min(t, 120) + 1.0 * max(t - 120, 0)
        a = {"pid": 1, "cpu_s": 0.25 * t} if t < 90 else {"pid": 2, "cpu_s": 0.25 * (t - 90)}
        rows.append({"t_s": float(t), "broker_cpu_s": broker, "soak_cpu_s": 0.01 * t, "A": {**a, "rss": MB, "fds": 1}})
    cores = cpu_per_minute(rows)
    assert cores["broker"] == [0.5, 0.5, 1.0]  # an interval counts in the minute it starts
    assert cores["soak"] == [0.01, 0.01, 0.01]
    # the interval that spans the restart (85-90 s) counts the new process's seconds only (0 at 90 s)
    assert cores["worker A"] == [0.25, 0.229, 0.25]
