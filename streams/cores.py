"""How a worker shares the machine's cores between its threads, sized together so they do not
oversubscribe it. Measured on 2 cores with bench/record_path.py (frames: EfficientNet-Lite0 at
batch 16 on 640x480 JPEGs; posts: the toxicity model at batch 64):

- the event loop: one core's worth of Python at most (Faust's consumer, parsing, verdicts, producing);
- each model: its batches run one after another in the model's own thread; ONNX Runtime's intra-op
  threads come from the model's config (`runtime.intra_op_threads`, 0 = one per core) or the
  `intra_op_threads` setting for all. Frames: 2 threads 183 frames/s, 1 thread 152;
- ONNX Runtime's threads do not spin between operators (`intra_op_spinning: false`): spinning held
  cores the decode threads and the event loop needed (frames 183 -> 191/s without it);
- decode threads: one per core (`decode_threads: 0`); JPEG decoding and resizing run outside the GIL
  (frames: 1 thread 156/s, 2 threads 183/s);
- the GIL: a 0.5 ms switch interval (`gil_switch_interval_ms`), so the model's and decode threads get it
  back promptly after each native call instead of waiting up to Python's default 5 ms behind the busy
  event loop (posts: the toxicity thread was busy 30% of the time while records queued for it).
"""

from __future__ import annotations

import os
import sys

from operators.session import set_intra_op_spinning
from streams.config import Settings


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decode_threads(settings: Settings) -> int:
    return settings.decode_threads if settings.decode_threads > 0 else usable_cores()


def share_cores(settings: Settings) -> None:
    """Apply the rule above to this process (before any model session is created)."""
    if settings.gil_switch_interval_ms > 0:
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
    set_intra_op_spinning(settings.intra_op_spinning)
