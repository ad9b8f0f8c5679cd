"""glibc malloc settings for a long-running worker, off by default (`malloc_arenas`,
`malloc_mmap_threshold_kb`: 0 leaves glibc's own).

Why they exist: in the 60-minute soak (session 4) a worker's RSS grew from 1.45 to 2.43 GB in 22
minutes, and /proc/<pid>/smaps put it in 18 glibc per-thread arenas of 64 MB, each fully resident.
Every thread that allocates gets an arena; large short-lived buffers (decoded frames, batch tensors)
land in them once glibc's dynamic mmap threshold has risen past their size, and what is freed there
can stay. Few arenas and a fixed mmap threshold are the usual remedy.

Why they are off: measured, 2 arenas and a 256 KB threshold cost frames 17% of their speed
(bench/record_path.py: 138 vs 166 frames/s), and a soak with them on still grew (the growth was mostly
frames held in flight during takeovers: see `frames_max_in_flight`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

from streams.config import Settings

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
M_ARENA_MAX = -8


def tune_malloc(settings: Settings) -> dict[str, int]:
    """Apply the settings to this process (before its threads start allocating); what was set. A C
    library without `mallopt` (musl, macOS) is left alone."""
    wanted = {"arena_max": (M_ARENA_MAX, settings.malloc_arenas),
              "mmap_threshold": (M_MMAP_THRESHOLD, settings.malloc_mmap_threshold_kb * 1024)}
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
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
