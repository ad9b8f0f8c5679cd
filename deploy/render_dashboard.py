"""Render the Grafana dashboard's main panels from a real local run, with matplotlib.

Grafana cannot be installed here, so this script runs the embedded broker and a worker, feeds it
posts and a live video (plus some bad records) for a while, scrapes the worker's /metrics every
second, and draws the same queries the dashboard uses (rates, histogram quantiles, gauges) into
docs/dashboard.png.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streams.broker import EmbeddedBroker, free_port  # noqa: E402
from streams.config import Settings  # noqa: E402
from streams.demo import sample_posts, sample_video, wait_ready  # noqa: E402
from streams.kafka import ensure_topics, producer  # noqa: E402
from streams.produce import produce_jsonl, produce_video  # noqa: E402


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def series(snaps, name, **match):
    """Sum of the samples of `name` whose labels include `match`, per snapshot."""
    return np.array([sum(v for (n, labels), v in snap.items() if n == name and set(match.items()) <= set(labels))
                     for _, snap in snaps])


def rate(times, values):
    return np.diff(values) / np.maximum(np.diff(times), 1e-9)


def quantile_over_window(snaps, name, q, window=5, **match):
    """histogram_quantile(q, rate(name_bucket[window])) like Grafana, per snapshot."""
    out = []
    for i in range(len(snaps)):
        j = max(0, i - window)
        buckets = {}
        for (n, labels), v in snaps[i][1].items():
            if n == f"{name}_bucket" and set(match.items()) <= set(labels):
                le = dict(labels)["le"]
                buckets[le] = buckets.get(le, 0) + v - snaps[j][1].get((n, labels), 0)
        edges = sorted((float("inf") if k == "+Inf" else float(k), c) for k, c in buckets.items())
        total = edges[-1][1] if edges else 0
        if total <= 0:
            out.append(np.nan)
            continue
        target, prev_le, prev_c = q * total, 0.0, 0.0
        for le, c in edges:
            if c >= target:
                out.append(prev_le if le == float("inf") else prev_le + (le - prev_le) * (target - prev_c) / max(c - prev_c, 1e-9))
                break
            prev_le, prev_c = le, c
    return np.array(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--out", default=str(ROOT / "docs" / "dashboard.png"))
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    work = ROOT / ".inferstream" / "dashboard"
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with EmbeddedBroker(port, log_path=work / "broker.log"):
        settings = Settings.load().replace(broker=f"127.0.0.1:{port}", topic_prefix="dash-", app_id="inferstream-dash",
                                           web_port=free_port(), data_dir=str(work / "data"))
        asyncio.run(ensure_topics(settings))
        log = open(work / "worker.log", "wb")  # noqa: SIM115
        worker = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker"], cwd=ROOT,
                                  env={**os.environ, **settings.to_env()}, stdout=log, stderr=log)
        try:
            video = sample_video(work / "sample.mp4", seconds=8)
            posts = sample_posts(work / "posts.jsonl")
            if not wait_ready(settings.web_port, worker, 120):
                raise SystemExit("worker not ready; see " + str(work / "worker.log"))
            stop = time.monotonic() + args.seconds

            def feed():
                n = 0
                while time.monotonic() < stop:
                    produce_video(settings, video, f"cam-{n % 3}", realtime=1.0)
                    produce_jsonl(settings, "posts", posts)
                    asyncio.run(_bad_records(settings))
                    n += 1

            threading.Thread(target=feed, daemon=True).start()
            snaps = []
            while time.monotonic() < stop + 3:
                snaps.append((time.monotonic(), scrape(settings.web_port)))
                time.sleep(1.0)
        finally:
            worker.terminate()
            worker.wait(30)

    t = np.array([s[0] for s in snaps]) - snaps[0][0]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    fig.suptitle("inferstream — rendered from a local worker's /metrics (same queries as the Grafana dashboard)")
    ax = axes[0, 0]
    for topic in ("dash-frames", "dash-posts"):
        ax.plot(t[1:], rate(t, series(snaps, "inferstream_records_consumed_total", topic=topic)), label=f"consumed {topic}")
    ax.plot(t[1:], rate(t, series(snaps, "inferstream_records_produced_total", topic="dash-verdicts")), label="produced verdicts")
    ax.set_title("Throughput (records/s)")
    ax = axes[0, 1]
    for q in (0.5, 0.95, 0.99):
        ax.plot(t, 1000 * quantile_over_window(snaps, "inferstream_end_to_end_latency_seconds", q), label=f"p{int(q * 100)}")
    ax.set_title("End-to-end latency (ms)")
    ax = axes[0, 2]
    models = sorted({dict(lb)["model"] for (n, lb) in snaps[-1][1] if n == "inferstream_inference_latency_seconds_count"})
    for m in models:
        ax.plot(t, 1000 * quantile_over_window(snaps, "inferstream_inference_latency_seconds", 0.95, model=m), label=m)
    ax.set_title("Inference latency p95 per model (ms)")
    ax = axes[1, 0]
    for m in models:
        sums = series(snaps, "inferstream_batch_size_records_sum", model=m)
        counts = series(snaps, "inferstream_batch_size_records_count", model=m)
        ax.plot(t[1:], np.diff(sums) / np.maximum(np.diff(counts), 1), label=m)
    ax.set_title("Average batch size per model")
    ax = axes[1, 1]
    lag = [series(snaps, "inferstream_consumer_lag_records", topic=tp) for tp in ("dash-frames", "dash-posts")]
    ax.plot(t, lag[0], label="lag frames")
    ax.plot(t, lag[1], label="lag posts")
    ax.plot(t, series(snaps, "inferstream_in_flight_records"), label="in flight")
    ax.set_title("Consumer lag and in-flight records")
    ax = axes[1, 2]
    reasons = sorted({dict(lb)["reason"] for (n, lb) in snaps[-1][1] if n == "inferstream_dead_letters_total"})
    for reason in reasons:
        ax.plot(t, series(snaps, "inferstream_dead_letters_total", reason=reason), label=f"dead letters: {reason}")
    ax.plot(t, series(snaps, "inferstream_verdicts_total", safe="false"), label="unsafe verdicts")
    ax.set_title("Dead letters by reason, unsafe verdicts (cumulative)")
    for ax in axes.flat:
        ax.set_xlabel("seconds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    info = [dict(lb) for (n, lb), v in snaps[-1][1].items() if n == "inferstream_model_info" and v == 1]
    fig.text(0.01, 0.005, "models: " + ", ".join(f"{i['model']}@{i['version']} ({i['task']}, {i['provider']})" for i in info),
             fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 0.97))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out} from {len(snaps)} scrapes")
    return 0


async def _bad_records(settings: Settings) -> None:
    kafka = producer(settings)
    await kafka.start()
    try:
        await kafka.send_and_wait(settings.topic("posts"), b"{not json", key=b"bad")
        await kafka.send_and_wait(settings.topic("frames"), b"not a jpeg", key=b"cam-x",
                                  headers=[("stream_id", b"cam-x"), ("frame_index", b"1"), ("encoding", b"jpeg")])
    finally:
        await kafka.stop()


if __name__ == "__main__":
    sys.exit(main())
