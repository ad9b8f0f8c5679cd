"""The soak's memory reading (bench/harness.py `resident_by_kind`): where a worker's resident memory
sits, so that growth can be put down to glibc's thread arenas, other anonymous maps or files.
The oracle is the kernel's own total (VmRSS) and memory this test places in thread arenas itself."""

from __future__ import annotations

import os
import threading

from bench.harness import resident_by_kind
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
