"""glibc malloc settings for a long-running worker: arenas and the mmap threshold, off by default
(`malloc_arenas`, `malloc_mmap_threshold_kb`: 0 leaves glibc's own), and a periodic `malloc_trim`
(`malloc_trim_every_s`).

Why they exist: in the 60-minute soak (session 4) a worker's RSS grew from 1.45 to 2.43 GB in 22
minutes, and /proc/<pid>/smaps put it in 18 glibc per-thread arenas of 64 MB, each fully resident.
Every thread that allocates gets an arena; large short-lived buffers (decoded frames, batch tensors)
land in them once glibc's dynamic mmap threshold has risen past their size, and what is freed there
can stay. Few arenas and a fixed mmap threshold are the usual remedy.

Why they are off: measured, 2 arenas and a 256 KB threshold cost frames 17% of their speed
(bench/record_path.py: 138 vs 166 frames/s), and a soak with them on still grew (the growth was mostly
frames held in flight during takeovers: see `frames_max_in_flight`).

Why the trim is off as well: in a 10-minute soak trial (session 8, two workers, the hour's rates) a
trim every 60 s handed 250-320 MB back after warm-up and 30-240 MB a minute under faults, in 17-228 ms
a call, yet RSS rose to the same peaks at every fault (the records a takeover or a frozen broker's
backlog puts in flight are a real working set), and the pair fell far behind: frames p50 ~50 s from
minute 4 on, against 1-3 s in the same trial without it. One trial each, so the cause is not
isolated: pages handed back are faulted in again, and the trim holds each arena's lock while it runs.

Another allocator, preloaded (`LD_PRELOAD=libjemalloc.so.2`, as the Docker images do), replaces
glibc's malloc for the whole process: then these settings touch only glibc's idle allocator, and
`allocator()` says which one runs (the worker exports it: `inferstream_malloc_info`). Measured with
jemalloc (session 11): the same frames/s catching up a backlog (51-54 vs 51-52) and 30-80 MB less
resident after it. In an hour's soak that kept up, worker A grew +13.9% after warm-up (+8.5% in the
second half): +10.7% by minute 40, after two freezes and the hot swap, where a 20-minute trial on
glibc at the same rates had grown +16.8% after one freeze and the swap.

What that growth was (session 12, `GET /debug/memory` and `malloc_stats` below): in an 8-minute
trial RSS grew 78 MiB while Python's live blocks grew 7 MB and malloc's live bytes 25: ONNX Runtime's
arenas, extended by batches of shapes not seen at the warm-up (its memory patterns, now off:
`runtime.memory_pattern`, operators/session.py) and by one ranking call for every due user's
candidates (now at most `batching.max_pairs` pairs a call, warmed up at load: operators/ranking.py).
The rest was users' states holding a string per event (interned since). Session 13's hour: +5.4%
after warm-up, +0.1% in the second half (README, Soak).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import time
from pathlib import Path

from streams.config import Settings

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
M_ARENA_MAX = -8
REPORT_RELEASED_BYTES = 32 * 2**20


def tune_malloc(settings: Settings) -> dict[str, int]:
    """Apply the settings to this process (before its threads start allocating); what was set. A C
    library without `mallopt` (musl, macOS) is left alone."""
    wanted = {"arena_max": (M_ARENA_MAX, settings.malloc_arenas),
              "mmap_threshold": (M_MMAP_THRESHOLD, settings.malloc_mmap_threshold_kb * 1024)}
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        log.info("malloc tuning skipped: this C library has no mallopt")
        return {}
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = {}
    for name, (option, value) in wanted.items():
        if value > 0:
            if mallopt(option, value) != 1:
                log.warning("mallopt %s=%d refused", name, value)
                continue
            applied[name] = value
    return applied


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, looked up once (`find_library` runs `ldconfig -p` in a subprocess)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


PRELOADED_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def allocator(pid: int | str = "self") -> str:
    """Which malloc serves a process: a preloaded allocator when one is mapped (its name), else
    "glibc" (or "unknown" where /proc cannot say)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return "unknown"
    for name in PRELOADED_ALLOCATORS:
        if f"/lib{name}" in maps:
            return name
    return "glibc"


JEMALLOC_STATS = ("allocated", "active", "resident", "mapped", "retained")
GLIBC_MALLINFO2 = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                   "keepcost")


def malloc_stats() -> dict[str, int]:
    """What this process's malloc holds, in bytes: `allocated` (live, asked for by the program) against
    what it keeps resident for them. RSS that grows while `allocated` does not is memory the allocator
    keeps; `allocated` that grows is memory the program (or a library: ONNX Runtime, numpy) keeps.

    jemalloc: its own counters (`stats.*` through `mallctl`, refreshed by writing `epoch`). glibc:
    `mallinfo2` (`allocated` = in use in arenas + mmapped chunks; `free_in_arenas` = freed but kept).
    Empty where neither answers."""
    mallctl = _mallctl()
    if mallctl is not None:
        epoch, size = ctypes.c_uint64(1), ctypes.c_size_t(8)
        mallctl(b"epoch", ctypes.byref(epoch), ctypes.byref(size), ctypes.byref(epoch), size)
        out = {}
        for name in JEMALLOC_STATS:
            value, size = ctypes.c_size_t(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_size_t))
            if mallctl(f"stats.{name}".encode(), ctypes.byref(value), ctypes.byref(size), None, 0) == 0:
                out[name] = value.value
        return out
    mallinfo2 = getattr(_libc(), "mallinfo2", None)  # glibc 2.33+
    if mallinfo2 is None:
        return {}

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in GLIBC_MALLINFO2]

    mallinfo2.restype = Mallinfo2
    info = mallinfo2()
    return {"allocated": info.uordblks + info.hblkhd, "free_in_arenas": info.fordblks,
            "arenas": info.arena, "mmapped": info.hblkhd}


@functools.cache
def _mallctl():
    """jemalloc's `mallctl` when it is preloaded (its symbols come first in the global scope), else None:
    looked up once, as a process's malloc never changes."""
    mallctl = getattr(ctypes.CDLL(None), "mallctl", None)
    if mallctl is not None:
        mallctl.argtypes = (ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p,
                            ctypes.c_size_t)
    return mallctl


def trim_malloc() -> bool:
    """Hand the free pages of every glibc arena back to the system (`malloc_trim(0)`); whether any were.

    Why: glibc gives a thread's arena back only from its top, so one live chunk above freed ones keeps
    them resident. In the soak a worker's RSS stepped up at every fault that handed it more work (a
    takeover, a broker pause's backlog) and never came down; /proc/<pid>/smaps put it in per-thread
    arenas, several fully resident at 63 MB. `malloc_trim` walks every arena and releases whole free
    pages wherever they are, the remedy glibc itself offers. False also where there is no such call."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
    return trim(0) == 1


def rss_bytes(pid: int | str = "self") -> int | None:
    """Resident set size (VmRSS) of a process, this one by default; None when it is gone (or not Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def trim_and_report() -> tuple[int, float]:
    """`trim_malloc`: (bytes of RSS it handed back, seconds it took), logged when worth a line (a
    fault's working set)."""
    before, started = rss_bytes() or 0, time.perf_counter()
    trim_malloc()
    released, seconds = max(before - (rss_bytes() or 0), 0), time.perf_counter() - started
    if released >= REPORT_RELEASED_BYTES:
        log.info("malloc_trim handed %.0f MB back to the system in %.0f ms", released / 2**20, seconds * 1000)
    return released, seconds
