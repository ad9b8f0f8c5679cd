"""`/debug/memory`'s report (streams.diagnostics.memory_state), in this process: objects made here must
show up where the report says they are."""

from __future__ import annotations

import asyncio
import gc
import sys
import tracemalloc

from aiohttp.test_utils import TestClient, TestServer

from streams import diagnostics
from streams.app import create_app
from streams.config import Settings
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


def test_the_route_takes_only_0_1_false_true_for_objects(tmp_path):
    app = create_app(Settings(data_dir=str(tmp_path)))
    diagnostics.install(app)

    async def get_all() -> dict[str, tuple[int, dict]]:
        async with TestClient(TestServer(app.web.web_app)) as client:
            answers = {}
            for value in ("yes", "2", "1", "false"):
                response = await client.get(f"/debug/memory?objects={value}")
                answers[value] = (response.status, await response.json())
            return answers

    got = asyncio.run(get_all())
    for bad in ("yes", "2"):
        assert got[bad][0] == 400 and got[bad][1]["error"] == "bad_query" and repr(bad) in got[bad][1]["detail"]
    assert got["1"][0] == 200 and "gc_objects_by_type" in got["1"][1]
    assert got["false"][0] == 200 and "gc_objects_by_type" not in got["false"][1]
