"""A worker catching up a backlog of frames: its peak memory and speed per `frames_max_in_flight`.

The embedded broker holds --frames 640x480 JPEG frames (8 streams) before the worker starts, as after
a restart or a takeover; the worker runs the default policy (both image checks: nudenet-320n and
EfficientNet-Lite0). For each limit, a fresh worker and topics: peak and final RSS of the worker
(sampled every 0.2 s from /proc) and frames/s from the first to the last verdict. Writes
bench/results/backlog_memory.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.frames_throughput import publish, sample_frames  # noqa: E402
from bench.harness import Worker, produced_per_s, reading  # noqa: E402
from streams.broker import EmbeddedBroker, free_port  # noqa: E402
from streams.config import Settings  # noqa: E402
from streams.kafka import ensure_topics  # noqa: E402
from streams.memory import rss_bytes  # noqa: E402
from streams.schemas import VERDICTS  # noqa: E402

MB = 2**20


def run(base: Settings, limit: int, frames, work: Path) -> dict:
    tag = f"backlog-{limit}-{time.strftime('%H%M%S')}"
    settings = base.replace(topic_prefix=f"{tag}-", app_id=tag, frames_max_in_flight=limit, web_port=free_port())
    asyncio.run(ensure_topics(settings))
    asyncio.run(publish(settings, frames, rate=None))
    rss: list[float] = []
    with reading(settings, VERDICTS) as verdicts:
        worker = Worker(settings, work / f"worker-{limit}.log")
        try:
            deadline = time.monotonic() + 600
            while len(verdicts) < len(frames) and time.monotonic() < deadline and worker.alive():
                if (b := rss_bytes(worker.pid)) is not None:
                    rss.append(b / MB)
                time.sleep(0.2)
        finally:
            worker.stop()
    rate = produced_per_s(verdicts)
    return {"frames_max_in_flight": limit, "verdicts": len(verdicts), "peak_rss_mb": round(max(rss, default=0), 1),
            "rss_at_end_mb": round(rss[-1], 1) if rss else None,
            "frames_per_s": round(rate, 1) if rate else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=1500)
    parser.add_argument("--limits", default="1024,128")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "backlog_memory.json"))
    args = parser.parse_args()
    work = ROOT / ".inferstream" / "bench-backlog"
    work.mkdir(parents=True, exist_ok=True)
    photos = sample_frames(8)  # shared arrays: the bench process stays small
    frames = [photos[i % 8] for i in range(args.frames)]
    rows = []
    with EmbeddedBroker(free_port(), log_path=work / "broker.log") as broker:
        base = Settings.load().replace(broker=broker.bootstrap, recommendations="off", data_dir=str(work / "data"))
        for limit in map(int, args.limits.split(",")):
            rows.append(run(base, limit, frames, work))
            print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "backlog_memory", "frames": args.frames, "frame_size": [640, 480], "runs": rows,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_end": os.getloadavg()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
