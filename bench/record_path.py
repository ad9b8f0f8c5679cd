"""The record path's cost, in one run: for posts (toxicity alone in the policy) and frames
(EfficientNet-Lite0 alone), the same records through

1. raw: the model's operator `run_batch` and its session alone at the model's max batch size, on
   items prepared in advance (bench/models_throughput.raw_throughput);
2. pipeline: the worker (`inferstream worker` subprocess) reading the records already on the
   embedded broker, verdicts/s in its steady window (bench/models_throughput.run_pipeline);
3. hand-written: bench/handwritten_consumer.py, a batched aiokafka + ONNX Runtime consumer on the
   same topic (its own consumer group), same ONNX file and batch size, results/s in the same window.

Prints and writes bench/results/record_path.json with the ratios pipeline / raw and pipeline /
hand-written. Ratios measured in one run on one machine are the result; absolute numbers are not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.models_throughput import (  # noqa: E402
    ModelSpec,
    code_state,
    collect,
    raw_throughput,
    run_pipeline,
    window_stats,
)
from operators.model_repository import ModelRepository  # noqa: E402
from streams.broker import EmbeddedBroker, free_port  # noqa: E402
from streams.config import Settings  # noqa: E402
from streams.cores import decode_threads  # noqa: E402
from streams.kafka import ensure_topics  # noqa: E402
from streams.schemas import FRAMES, POSTS, VERDICTS  # noqa: E402

CASES = {
    "posts": (ModelSpec("toxicity", {"toxicity": {"model": "toxicity", "input": "text", "label": "toxic", "above": 0.7}}),
              "text-classify", POSTS, 40000),
    "frames": (ModelSpec("efficientnet-lite0", {"objects": {"model": "efficientnet-lite0", "input": "image",
                                                            "labels": ["missile"], "top_k": 3, "above": 0.3}}),
               "classify", FRAMES, 1500),
}


def run_handwritten(base: Settings, broker: EmbeddedBroker, spec: ModelSpec, topic: str, n: int, work: Path,
                    run_id: str, skip: int) -> dict[str, Any]:
    """The baseline on the records run_pipeline left on the pipeline's input topic."""
    source = base.replace(topic_prefix=f"bench-{run_id}-{spec.name}-")  # run_pipeline's topics
    settings = base.replace(broker=broker.bootstrap, topic_prefix=f"bench-{run_id}-{spec.name}-hw-")
    asyncio.run(ensure_topics(settings, (VERDICTS, "dead-letters")))
    model_dir = ModelRepository(ROOT / "models").config(spec.name).directory
    log_path = work / spec.name / "handwritten.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "handwritten_consumer.py"), "--broker", broker.bootstrap,
                                 "--input", source.topic(topic), "--output", settings.topic(VERDICTS), "--model", str(model_dir),
                                 "--group", f"hw-{run_id}-{spec.name}", "--decode-threads", str(decode_threads(base))],
                                cwd=ROOT, stdout=log, stderr=log)
        try:
            got = asyncio.run(collect(settings, n, proc, {"worker": proc.pid, "broker": broker.process.pid},
                                      timeout_s=900, stall_s=60))
        finally:
            proc.terminate()
            proc.wait(30)
    marks, count = got["marks"], len(got["produced_ms"])
    if count < n:
        raise RuntimeError(f"hand-written consumer: {count} of {n} results; see {log_path}")
    return {"results": count, "results_per_s": window_stats(marks, skip, count - skip)["verdicts_per_s"],
            "first_to_last": window_stats(marks, 1, count), "steady_window": window_stats(marks, skip, count - skip)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="posts,frames")
    parser.add_argument("--records-scale", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per raw measurement")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "record_path.json"))
    args = parser.parse_args()

    base = Settings.load()
    run_id = time.strftime("%H%M%S")
    work = ROOT / ".inferstream" / "bench-record-path"
    work.mkdir(parents=True, exist_ok=True)
    repo = ModelRepository(ROOT / "models")
    rows: dict[str, Any] = {}
    with EmbeddedBroker(free_port(), log_path=work / "broker.log") as broker:
        for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
            spec, task, topic, records = CASES[case]
            n = max(200, int(records * args.records_scale))
            model = repo.load(spec.name)
            b = model.config.max_batch_size
            print(f"{case}: {spec.name} raw ...", flush=True)
            raw = raw_throughput(model, args.seconds)
            del model
            print(f"{case}: pipeline on {n} records ...", flush=True)
            pipe = run_pipeline(base, broker, spec, task, n, work, run_id)
            skip = pipe["steady_window"]["from_verdict"]
            print(f"{case}: hand-written consumer on the same records ...", flush=True)
            hand = run_handwritten(base, broker, spec, topic, n, work, run_id, skip)
            row = {
                "model": spec.name, "max_batch_size": b, "records": n,
                "raw_run_batch_per_s": raw["items_per_s"][f"run_batch_b{b}"],
                "raw_session_per_s": raw["items_per_s"][f"session_b{b}"],
                "pipeline_per_s": pipe["verdicts_per_s"],
                "handwritten_per_s": hand["results_per_s"],
                "pipeline_mean_batch": pipe.get("pipeline_mean_batch"),
                "pipeline_cpu_cores_used": pipe.get("cpu_cores_used"),
                "handwritten_cpu_cores_used": hand["steady_window"].get("cpu_cores_used"),
            }
            row["pipeline_vs_raw_run_batch"] = row["pipeline_per_s"] / row["raw_run_batch_per_s"]
            row["pipeline_vs_raw_session"] = row["pipeline_per_s"] / row["raw_session_per_s"]
            row["pipeline_vs_handwritten"] = row["pipeline_per_s"] / row["handwritten_per_s"]
            row["details"] = {"raw": raw, "pipeline": pipe, "handwritten": hand}
            rows[case] = row
            print(f"{case}: raw run_batch {row['raw_run_batch_per_s']:,.0f}/s, session {row['raw_session_per_s']:,.0f}/s, "
                  f"pipeline {row['pipeline_per_s']:,.0f}/s, hand-written {row['handwritten_per_s']:,.0f}/s -> "
                  f"pipeline/raw {row['pipeline_vs_raw_run_batch']:.2f} (session {row['pipeline_vs_raw_session']:.2f}), "
                  f"pipeline/hand-written {row['pipeline_vs_handwritten']:.2f}", flush=True)
    result = {
        "benchmark": "record_path",
        "started": run_id,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "load_average_end": os.getloadavg()},
        "code": code_state(),
        "worker_settings": {k: getattr(base, k) for k in ("decode_threads", "max_in_flight", "max_batch_records",
                                                           "intra_op_threads", "fetch_max_wait_ms")},
        "cases": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
