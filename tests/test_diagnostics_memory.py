"""`/debug/memory`'s report (streams.diagnostics.memory_state), in this process: objects made here must
show up where the report says they are."""

from __future__ import annotations

import gc
import sys
import tracemalloc

from streams.diagnostics import memory_state
from streams.memory import rss_bytes


class Kept:
    __slots__ = ("payload",)

    def __init__(self, n: int) -> None:
        self.payload = [n]  # a tracked container per object: the collector sees it


def test_live_blocks_and_objects_by_type_count_what_this_process_keeps():
    gc.collect()  # earlier tests' garbage, which a collection during the allocation below would free
    gc.disable()
    try:
        before = memory_state(objects=True)
        kept = [Kept(n) for n in range(50_000)]
        after = memory_state(objects=True)
    finally:
        gc.enable()
    assert after["gc_objects_by_type"]["Kept"] - before["gc_objects_by_type"].get("Kept", 0) == 50_000
    # each Kept and its one-element list are small blocks of CPython's allocator
    assert after["python_blocks"] - before["python_blocks"] >= 2 * 50_000
    assert after["rss_bytes"] >= before["rss_bytes"] and abs(after["rss_bytes"] - rss_bytes()) < 64 * 2**20
    assert after["allocator"] in ("glibc", "jemalloc") and "traced" not in after
    del kept


def test_under_tracemalloc_it_names_the_line_holding_the_memory():
    tracemalloc.start()
    try:
        kept = [bytearray(1000) for _ in range(2_000)]  # ~2 MB, all from this line
        line = sys._getframe().f_lineno - 1
        report = memory_state()
    finally:
        tracemalloc.stop()
    top = report["traced"]["top"][0]
    assert top["where"] == f"{__file__}:{line}" and top["blocks"] >= 2_000 and top["bytes"] >= 2_000_000
    assert report["traced"]["current_bytes"] >= top["bytes"]
    del kept
