"""glibc malloc tuning (streams/memory.py): with it, large buffers freed by many threads go back to
the system instead of staying in per-thread arenas. Run in a fresh interpreter, so the settings and
the arenas are this test's alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from streams.config import Settings
from streams.memory import tune_malloc

PROBE = textwrap.dedent("""
    import json, sys, threading
    from streams.config import Settings
    from streams.memory import tune_malloc

    def rss_mb():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

    applied = tune_malloc(Settings(malloc_arenas=2, malloc_mmap_threshold_kb=256))
    before = rss_mb()
    held = []

    def work():  # a few 2 MB buffers freed at once (glibc's threshold rises past them), then 40 held
        for _ in range(5):
            bytearray(b"x" * (2 << 20))
        held.extend(bytearray(b"x" * (2 << 20)) for _ in range(40))  # freed later, by the main thread

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    peak = rss_mb()
    held.clear()
    print(json.dumps({"applied": applied, "before": before, "peak": peak, "after": rss_mb()}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt; other C libraries are left alone")
def test_large_buffers_freed_by_many_threads_go_back_to_the_system():
    out = json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout)
    assert out["applied"] == {"arena_max": 2, "mmap_threshold": 256 * 1024}
    assert out["peak"] - out["before"] > 500  # 640 MB were resident at once
    assert out["after"] - out["before"] < 50


def test_zero_leaves_glibc_alone():
    assert tune_malloc(Settings(malloc_arenas=0, malloc_mmap_threshold_kb=0)) == {}


TRIM_PROBE = textwrap.dedent("""
    import json, threading
    from streams.memory import trim_malloc

    def rss_mb():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

    before = rss_mb()
    pinned = []
    # all eight hold their buffers at once: a thread that starts after another has exited takes over
    # the dead one's arena and reuses its free pages, so fewer arenas (and less to trim) by chance
    all_allocated = threading.Barrier(8)

    def work():  # 40 MB in 64 KB buffers (under glibc's mmap threshold: in this thread's arena), then one
        buffers = [None] * 640  # small buffer above them, kept (over pymalloc's 512 B: from the arena too)
        for i in range(640):
            buffers[i] = bytearray(64 << 10)
            buffers[i][::4096] = b"x" * 16  # touch every page
        pinned.append(bytearray(4096))
        all_allocated.wait()
        buffers.clear()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    freed = rss_mb()
    released = trim_malloc()
    print(json.dumps({"before": before, "freed": freed, "released": released, "trimmed": rss_mb()}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim; other C libraries have none")
def test_trimming_hands_back_freed_arena_pages_that_glibc_keeps():
    out = json.loads(subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True,
                                    check=True).stdout)
    assert out["freed"] - out["before"] > 150  # freed, yet resident: pinned below a live chunk
    assert out["released"] is True
    assert out["trimmed"] - out["before"] < 50


ALLOCATOR_PROBE = textwrap.dedent("""
    import ctypes, json
    from streams.memory import allocator
    # the oracle: jemalloc's own control call is in the process's global symbols only when it is loaded
    print(json.dumps({"said": allocator(), "has_mallctl": hasattr(ctypes.CDLL(None), "mallctl")}))
""")


@pytest.mark.parametrize("preload, expected", [("", "glibc"), ("libjemalloc.so.2", "jemalloc")])
def test_allocator_names_the_malloc_a_process_runs_on(preload, expected):
    """The worker reports this (`inferstream_malloc_info`); the Docker images preload Debian's
    libjemalloc2, which `make test` installs when missing."""
    env = {**os.environ, "LD_PRELOAD": preload}
    run = subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE], capture_output=True, text=True, env=env, check=True)
    assert "cannot be preloaded" not in run.stderr, run.stderr  # ld.so only warns when the library is missing
    out = json.loads(run.stdout)
    assert out == {"said": expected, "has_mallctl": expected == "jemalloc"}


MALLOC_STATS_PROBE = textwrap.dedent("""
    import json
    from streams.memory import malloc_stats

    before = malloc_stats()
    held = bytearray(64 << 20)  # 64 MiB from malloc (far above pymalloc's 512 B)
    after = malloc_stats()
    del held
    print(json.dumps({"keys": sorted(after), "grown": after["allocated"] - before["allocated"],
                      "released": after["allocated"] - malloc_stats()["allocated"]}))
""")


@pytest.mark.parametrize("preload, keys", [("", ["allocated", "arenas", "free_in_arenas", "mmapped"]),
                                           ("libjemalloc.so.2", ["active", "allocated", "mapped", "resident", "retained"])])
def test_malloc_stats_count_what_the_program_holds_on_either_malloc(preload, keys):
    env = {**os.environ, "LD_PRELOAD": preload}
    out = json.loads(subprocess.run([sys.executable, "-c", MALLOC_STATS_PROBE], capture_output=True, text=True, env=env,
                                    check=True).stdout)
    assert out["keys"] == keys  # jemalloc's own counters when it is preloaded, glibc's mallinfo2 otherwise
    # jemalloc rounds a huge allocation up to its size class (64 MiB + 1 byte -> 80 MiB)
    assert 64 << 20 <= out["grown"] <= 1.25 * (64 << 20) + (1 << 20) and out["released"] >= 64 << 20
