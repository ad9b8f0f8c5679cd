"""Batching that steers itself, under a step load through the real broker, in one run.

EfficientNet-Lite0 alone in the policy, 640x480 JPEG frames of 8 streams. The worker's capacity is
measured first (frames already on the topic, verdicts/s); then the same step load is played against
three configurations of the model, each with a fresh worker and topics:

- fixed: `batching.adaptive: false` with the best fixed batch size and wait (--sweep, the default: each of
  FIXED_CANDIDATES plays a short step load first; the best is the one that judges most frames/s in
  the overload among those whose p99 at 30% meets the target, as Triton's Model Analyzer picks a
  configuration offline; without --sweep, max_batch_size 16 and max_wait_ms 5, the shipped rule);
- controller: `batching.adaptive: true`, `target_p99_ms` 100, `max_batch_size` 32 as its bound;
- controller + ladder: the same plus `degrade` rungs of frame stride 2 and 4.

Load: 30% of capacity for --low-s, 200% for --high-s, 30% for --recover-s. Reported per phase:
end-to-end latency p50/p99 (record timestamp -> verdict produced), verdicts/s, consumer lag over
time (the worker's /metrics), the rung in force, and how long the backlog took to drain after the
overload. Writes bench/results/adaptive.json and docs/adaptive.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.frames_throughput import sample_frames  # noqa: E402
from bench.harness import Worker, collect, produced_per_s, reading  # noqa: E402
from operators.images import encode_image  # noqa: E402
from streams.broker import EmbeddedBroker, free_port  # noqa: E402
from streams.config import Settings  # noqa: E402
from streams.kafka import ensure_topics, producer  # noqa: E402
from streams.schemas import FRAMES, VERDICTS, FrameMeta  # noqa: E402

MODEL = ROOT / "models" / "efficientnet-lite0" / "1"
TARGET_P99_MS = 100
FIXED_CANDIDATES = [(size, wait) for size in (4, 8, 16, 32) for wait in (2, 10)]  # (max_batch_size, max_wait_ms)
CONFIGS = {
    "fixed": {"batching": {"max_batch_size": 16, "max_wait_ms": 5, "adaptive": False}},
    # the controller gets the sweep's largest size as its bound and chooses within it (no hand tuning)
    "controller": {"batching": {"max_batch_size": 32, "max_wait_ms": 5, "adaptive": True, "target_p99_ms": 100}},
    "controller+ladder": {"batching": {"max_batch_size": 32, "max_wait_ms": 5, "adaptive": True, "target_p99_ms": 100},
                          "degrade": None},  # filled from the measured capacity
}


def model_repo(root: Path, name: str, overrides: dict[str, Any]) -> Path:
    config = yaml.safe_load((MODEL / "config.yaml").read_text())
    config.update(overrides)
    directory = root / name / "efficientnet-lite0" / "1"
    directory.mkdir(parents=True, exist_ok=True)
    for f in ("model.onnx", "labels.json"):
        if not (directory / f).exists():
            (directory / f).symlink_to(MODEL / f)
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    return directory.parent.parent


async def play(settings: Settings, frames: list[bytes], size: tuple[int, int], schedule: list[tuple[float, float]],
               start_index: int = 0) -> int:
    """Publish frames at `rate` for `seconds`, phase after phase; returns how many were sent."""
    kafka = producer(settings)
    await kafka.start()
    sent, pending = start_index, []
    try:
        t0 = time.perf_counter()
        offset = 0.0
        for rate, seconds in schedule:
            count = int(rate * seconds)
            for k in range(count):
                due = t0 + offset + k / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                meta = FrameMeta(f"cam-{sent % 8}", sent, sent / 30, "jpeg", *size)
                pending.append(await kafka.send(settings.topic(FRAMES), frames[sent % len(frames)],
                                                key=meta.stream_id.encode(), headers=meta.headers()))
                sent += 1
                if len(pending) > 2000:
                    await asyncio.gather(*pending)
                    pending = []
            offset += seconds
        await asyncio.gather(*pending)
    finally:
        await kafka.stop()
    return sent - start_index


def run_config(name: str, base: Settings, broker: EmbeddedBroker, repo: Path, frames: list[bytes], size: tuple[int, int],
               schedule: list[tuple[float, float]], work: Path) -> dict[str, Any]:
    policy = work / "policy.yaml"
    policy.write_text(yaml.safe_dump({"checks": {"objects": {"model": "efficientnet-lite0", "input": "image", "labels": ["missile"]}}}))
    tag = name.replace("+", "-")
    settings = base.replace(broker=broker.bootstrap, topic_prefix=f"adaptive-{tag}-{time.strftime('%H%M%S')}-",
                            app_id=f"adaptive-{tag}-{time.strftime('%H%M%S')}", model_dir=str(repo), policy=str(policy),
                            web_port=free_port(), data_dir=str(work / tag), recommendations="off")
    asyncio.run(ensure_topics(settings))
    worker = Worker(settings, work / f"worker-{tag}.log")
    verdicts: list[tuple[int, dict]] = []
    stop = threading.Event()
    reader = threading.Thread(target=lambda: asyncio.run(collect(settings, VERDICTS, stop, verdicts)), daemon=True)
    reader.start()
    samples: list[tuple[float, float, float]] = []
    try:
        # warm-up: a few frames until the worker has joined and answers
        warm = asyncio.run(play(settings, frames, size, [(20, 1.0)]))
        deadline = time.monotonic() + 120
        while len(verdicts) < warm and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)
        start = time.time()
        sampler_stop = threading.Event()

        def sample() -> None:
            while not sampler_stop.is_set():
                m = worker.metrics()
                samples.append((time.time() - start, m.get("lag", 0.0), m.get("rung", 0.0)))
                sampler_stop.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        sent = asyncio.run(play(settings, frames, size, schedule, start_index=warm))
        # done when every frame has a verdict, or (frames skipped by a stride have none) no lag is left
        deadline, idle = time.monotonic() + 240, 0
        while len(verdicts) < warm + sent and time.monotonic() < deadline and idle < 3:
            time.sleep(0.5)
            idle = idle + 1 if samples and samples[-1][1] == 0 else 0
        time.sleep(2)
        sampler_stop.set()
        sampler.join()
    finally:
        stop.set()
        reader.join(10)
        worker.stop()
    bounds = np.cumsum([0.0] + [s for _, s in schedule])
    phases = ["low", "overload", "recover"]
    by_phase: dict[str, list[dict]] = {p: [] for p in phases}
    timeline = []
    for _, v in verdicts:
        ts = v["source"]["timestamp_ms"] / 1000 - start
        if ts < 0:
            continue
        phase = phases[min(int(np.searchsorted(bounds, ts, side="right")) - 1, 2)]
        by_phase[phase].append(v)
        timeline.append((v["produced_at_ms"] / 1000 - start, v["latency_ms"]["end_to_end"]))
    report: dict[str, Any] = {"config": name, "sent": sent, "verdicts": len(verdicts) - warm}
    for phase, vs in by_phase.items():
        lat = np.array([v["latency_ms"]["end_to_end"] for v in vs], float)
        produced = sorted(v["produced_at_ms"] for v in vs)
        span = (produced[-1] - produced[0]) / 1000 if len(produced) > 1 else 0
        indices = sorted(v["frame_index"] for v in vs)
        report[phase] = {"verdicts": len(vs), "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
                         # frames handled (judged, or skipped by a stride) between the first and last verdict
                         "frames_per_s": (indices[-1] - indices[0]) / span if span > 0 else None,
                         "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
                         "verdicts_per_s": (len(vs) - 1) / span if span > 0 else None,
                         "rungs": sorted({int(v.get("degradation", {}).get("level", 0)) for v in vs})}
    overload_end = bounds[2]
    drained = next((t for t, lag, _ in samples if t > overload_end and lag < 20), None)
    report["drain_s_after_overload"] = None if drained is None else drained - overload_end
    full_again = next((t for t, _, rung in samples if t > overload_end and rung == 0), None) if name.endswith("ladder") else None
    report["full_quality_s_after_overload"] = None if full_again is None else full_again - overload_end
    overload_lags = [lag for t, lag, _ in samples if bounds[1] + 20 <= t <= overload_end]
    report["lag_during_overload"] = {"after_20s": overload_lags[0] if overload_lags else None,
                                     "at_end": overload_lags[-1] if overload_lags else None}
    report["samples"] = samples
    report["timeline"] = timeline
    return report


def capacity(base: Settings, broker: EmbeddedBroker, repo: Path, frames: list[bytes], size, work: Path, n: int) -> float:
    """Verdicts/s of a fresh worker on `n` frames already on the topic (first to last verdict)."""
    policy = work / "policy.yaml"
    policy.write_text(yaml.safe_dump({"checks": {"objects": {"model": "efficientnet-lite0", "input": "image", "labels": ["missile"]}}}))
    settings = base.replace(broker=broker.bootstrap, topic_prefix=f"adaptive-cap-{time.strftime('%H%M%S')}-",
                            app_id=f"adaptive-cap-{time.strftime('%H%M%S')}", model_dir=str(repo), policy=str(policy),
                            web_port=free_port(), data_dir=str(work / "cap"), recommendations="off")
    asyncio.run(ensure_topics(settings))
    asyncio.run(play(settings, frames, size, [(100000, n / 100000)]))
    worker = Worker(settings, work / "worker-capacity.log")
    with reading(settings, VERDICTS) as verdicts:
        try:
            deadline = time.monotonic() + 300
            while len(verdicts) < n and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            worker.stop()
    rate = produced_per_s(verdicts)
    if rate is None:
        raise RuntimeError(f"capacity: {len(verdicts)} verdicts of {n} frames; see {work / 'worker-capacity.log'}")
    return rate


def best_fixed(base: Settings, broker: EmbeddedBroker, frames: list[bytes], size, work: Path, cap: float,
               phase_s: float, candidates: list[tuple[int, int]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The fixed batching that a user tuning offline would pick, from a short step load per candidate:
    most frames/s in the overload among those whose p99 at 30% of capacity meets TARGET_P99_MS (if none
    does, the lowest p99 at 30%)."""
    schedule = [(0.3 * cap, phase_s), (2.0 * cap, phase_s), (0.3 * cap, phase_s)]
    rows = []
    for max_size, wait in candidates:
        overrides = {"batching": {"max_batch_size": max_size, "max_wait_ms": wait, "adaptive": False}}
        name = f"fixed-b{max_size}-w{wait}"
        report = run_config(name, base, broker, model_repo(work / "repos", name, overrides), frames, size, schedule, work)
        row = {"max_batch_size": max_size, "max_wait_ms": wait, "low_p99_ms": report["low"]["p99_ms"],
               "overload_frames_per_s": report["overload"]["frames_per_s"], "overrides": overrides}
        rows.append(row)
        print(f"sweep: {json.dumps({k: v for k, v in row.items() if k != 'overrides'})}", flush=True)
    meeting = [r for r in rows if r["low_p99_ms"] is not None and r["low_p99_ms"] <= TARGET_P99_MS]
    best = (max(meeting, key=lambda r: r["overload_frames_per_s"] or 0) if meeting
            else min(rows, key=lambda r: r["low_p99_ms"] if r["low_p99_ms"] is not None else float("inf")))
    return best, rows


def criteria(by_name: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Issue 11's bars, read off this run: at 30% the controller's p99 at or below the fixed one's and
    within its target; in overload at least 0.95x the fixed configuration's frames/s; with the ladder,
    lag not growing through the overload and full quality back within 30 s of the load dropping."""
    out: dict[str, Any] = {}
    fixed, controller, ladder = (by_name.get(n) for n in ("fixed", "controller", "controller+ladder"))
    if fixed and controller:
        f_low, c_low = fixed["low"]["p99_ms"], controller["low"]["p99_ms"]
        out["low_p99_ms"] = {"fixed": f_low, "controller": c_low, "target": TARGET_P99_MS,
                             "met": bool(c_low is not None and f_low is not None and c_low <= f_low and c_low <= TARGET_P99_MS)}
        f_fps, c_fps = fixed["overload"]["frames_per_s"], controller["overload"]["frames_per_s"]
        ratio = c_fps / f_fps if c_fps and f_fps else None
        out["overload_throughput_vs_fixed"] = {"ratio": ratio, "met": bool(ratio is not None and ratio >= 0.95)}
    if ladder:
        lag = ladder["lag_during_overload"]
        out["ladder_lag_not_growing"] = {**lag, "met": bool(lag["at_end"] is not None and lag["after_20s"] is not None
                                         and lag["at_end"] <= max(lag["after_20s"], 1) * 1.1)}
        back = ladder["full_quality_s_after_overload"]
        out["ladder_full_quality_within_30s"] = {"seconds": back, "met": bool(back is not None and back <= 30)}
    return out


def plot(reports: list[dict], bounds: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    for r in reports:
        t = [x for x, _ in r["timeline"]]
        axes[0].plot(t, [y for _, y in r["timeline"]], ".", markersize=1.5, label=r["config"])
        axes[1].plot([s[0] for s in r["samples"]], [s[1] for s in r["samples"]], label=r["config"])
        axes[2].step([s[0] for s in r["samples"]], [s[2] for s in r["samples"]], where="post", label=r["config"])
    axes[0].set_ylabel("end-to-end latency (ms)")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("consumer lag (records)")
    axes[2].set_ylabel("rung")
    axes[2].set_yticks(range(3))
    axes[2].set_xlabel("seconds")
    for ax in axes:
        for b in bounds[1:-1]:
            ax.axvline(b, color="grey", linestyle=":")
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle("Step load 30% -> 200% -> 30% of capacity (EfficientNet-Lite0, 640x480 JPEG)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--low-s", type=float, default=20)
    parser.add_argument("--high-s", type=float, default=60)
    parser.add_argument("--recover-s", type=float, default=45)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                        help="find the best fixed configuration first (about 1 min per candidate)")
    parser.add_argument("--sweep-phase-s", type=float, default=15)
    parser.add_argument("--candidates", default=",".join(f"{b}x{w}" for b, w in FIXED_CANDIDATES),
                        help="fixed configurations to sweep, max_batch_size x max_wait_ms")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "adaptive.json"))
    parser.add_argument("--png", default=str(ROOT / "docs" / "adaptive.png"))
    args = parser.parse_args()

    work = ROOT / ".inferstream" / "bench-adaptive"
    work.mkdir(parents=True, exist_ok=True)
    size = (640, 480)
    frames = [encode_image(f, "jpeg") for f in sample_frames(8, size)]
    base = Settings.load()
    reports = []
    with EmbeddedBroker(free_port(), log_path=work / "broker.log") as broker:
        cap = capacity(base, broker, model_repo(work / "repos", "capacity", CONFIGS["fixed"]), frames, size, work, 1500)
        print(f"capacity: {cap:.1f} frames/s", flush=True)
        schedule = [(0.3 * cap, args.low_s), (2.0 * cap, args.high_s), (0.3 * cap, args.recover_s)]
        fixed = dict(CONFIGS["fixed"])
        sweep: list[dict[str, Any]] = []
        if args.sweep:
            candidates = [tuple(map(int, c.split("x"))) for c in args.candidates.split(",") if c.strip()]
            best, sweep = best_fixed(base, broker, frames, size, work, cap, args.sweep_phase_s, candidates)
            fixed = best["overrides"]
            print(f"best fixed: max_batch_size {best['max_batch_size']}, max_wait_ms {best['max_wait_ms']}", flush=True)
        for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
            overrides = dict(fixed if name == "fixed" else CONFIGS[name])
            if "degrade" in overrides:
                overrides["degrade"] = {"lag_records": int(2 * cap), "for_s": 3, "recover_below": int(0.2 * cap),
                                        "rungs": [{"frame_stride": 2}, {"frame_stride": 4}]}
            repo = model_repo(work / "repos", name.replace("+", "-"), overrides)
            report = run_config(name, base, broker, repo, frames, size, schedule, work)
            reports.append(report)
            print(json.dumps({k: v for k, v in report.items() if k not in ("samples", "timeline")}), flush=True)
    bounds = list(np.cumsum([0.0] + [s for _, s in schedule]))
    plot(reports, bounds, Path(args.png))
    verdict = criteria({r["config"]: r for r in reports})
    print(f"criteria: {json.dumps(verdict)}", flush=True)
    result = {"benchmark": "adaptive", "capacity_frames_per_s": cap, "schedule": schedule, "criteria": verdict,
              "fixed_sweep": sweep, "fixed_chosen": fixed,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "configs": reports}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"-> {args.out}, {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
