"""Frames pipeline vs raw ONNX Runtime on the same model, measured in one run.

1. raw: the model's session alone on preprocessed tensors prepared in advance, at batch 1 and at the
   pipeline's max batch size (images/s).
2. pipeline, throughput: N JPEG frames already on the embedded broker, then a worker starts; frames/s
   from its first verdict to its last (group join excluded).
3. pipeline, latency: frames published at a steady rate below capacity; p50/p99 of the verdicts'
   end-to-end latency (record timestamp -> verdict produced).

Writes bench/results/frames_throughput.json. Ratios matter, not absolute numbers: machines are noisy.
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

import cv2
import numpy as np
from skimage import data

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from operators.classify import ImageClassifier  # noqa: E402
from operators.images import encode_image  # noqa: E402
from operators.model_repository import ModelRepository  # noqa: E402
from streams.broker import EmbeddedBroker, free_port  # noqa: E402
from streams.config import Settings  # noqa: E402
from streams.kafka import consumer, ensure_topics, producer  # noqa: E402
from streams.schemas import FRAMES, VERDICTS, FrameMeta  # noqa: E402


def sample_frames(n: int, size=(640, 480)) -> list[np.ndarray]:
    photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    return [np.ascontiguousarray(cv2.resize(photos[i % len(photos)], size)) for i in range(n)]


def raw_throughput(classifier: ImageClassifier, frames: list[np.ndarray], batch: int, seconds: float = 5.0) -> float:
    tensors = [classifier.preprocess(f) for f in frames[:batch]]
    x = np.stack(tensors)
    feeds = {classifier.input_name: x}
    session = classifier.model.session
    session.run(feeds)  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(feeds)
        done += batch
    return done / (time.perf_counter() - started)


async def publish(settings: Settings, frames: list[np.ndarray], rate: float | None, offset: int = 0) -> None:
    kafka = producer(settings)
    await kafka.start()
    try:
        encoded = [encode_image(f, "jpeg") for f in frames]
        pending, started = [], time.perf_counter()
        for i, value in enumerate(encoded):
            if rate:
                await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
            h, w = frames[i].shape[:2]
            meta = FrameMeta(f"bench-{i % 4}", offset + i, i / 30, "jpeg", w, h)
            pending.append(await kafka.send(settings.topic(FRAMES), value, key=meta.stream_id.encode(), headers=meta.headers()))
        await asyncio.gather(*pending)
    finally:
        await kafka.stop()


async def collect_verdicts(settings: Settings, n: int, timeout_s: float) -> list[tuple[float, dict]]:
    from aiokafka import TopicPartition

    kafka = consumer(settings, group_id=None, auto_offset_reset="earliest", enable_auto_commit=False)
    await kafka.start()
    got: list[tuple[float, dict]] = []
    try:
        name = settings.topic(VERDICTS)
        while not kafka.partitions_for_topic(name):
            await kafka._client.force_metadata_update()
            await asyncio.sleep(0.2)
        kafka.assign([TopicPartition(name, p) for p in kafka.partitions_for_topic(name)])
        deadline = time.monotonic() + timeout_s
        while len(got) < n and time.monotonic() < deadline:
            for msgs in (await kafka.getmany(timeout_ms=200)).values():
                now = time.monotonic()
                got.extend((now, json.loads(m.value)) for m in msgs)
    finally:
        await kafka.stop()
    return got


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=1500, help="frames for the throughput run")
    parser.add_argument("--latency-frames", type=int, default=300)
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "frames_throughput.json"))
    args = parser.parse_args()

    repo = ModelRepository(ROOT / "models")
    classifier = ImageClassifier(repo.load(args.model))
    max_batch = classifier.model.config.max_batch_size
    frames = sample_frames(max(args.frames, max_batch))
    raw = {f"batch_{b}": raw_throughput(classifier, frames, b) for b in sorted({1, max_batch})}
    print(f"raw ONNX Runtime ({classifier.model.session.provider}): " + ", ".join(f"{k} {v:.1f} img/s" for k, v in raw.items()))

    port = free_port()
    work = ROOT / ".inferstream" / "bench"
    work.mkdir(parents=True, exist_ok=True)
    with EmbeddedBroker(port, log_path=work / "broker.log"):
        # the same model alone in the policy, so pipeline and raw numbers are for one model
        policy = work / "policy.yaml"
        policy.write_text(json.dumps({"checks": {"objects": {"model": args.model, "input": "image", "labels": ["missile"]}}}))
        settings = Settings.load().replace(broker=f"127.0.0.1:{port}", topic_prefix="bench-", app_id="inferstream-bench",
                                           policy=str(policy), web_port=free_port(), data_dir=str(work / "data"))
        asyncio.run(ensure_topics(settings))
        asyncio.run(publish(settings, frames[: args.frames], rate=None))
        log = open(work / "worker.log", "wb")  # noqa: SIM115
        worker = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker"], cwd=ROOT,
                                  env={**os.environ, **settings.to_env()}, stdout=log, stderr=log)
        try:
            got = asyncio.run(collect_verdicts(settings, args.frames, timeout_s=600))
            times = [t for t, _ in got]
            span = times[-1] - times[0]
            pipeline_fps = (len(got) - 1) / span if span > 0 else float("nan")
            batch_note = f"max_batch_size {max_batch}"
            print(f"pipeline throughput: {len(got)} verdicts, {pipeline_fps:.1f} frames/s ({batch_note})")

            rate = 0.5 * pipeline_fps
            asyncio.run(publish(settings, frames[: args.latency_frames], rate=rate, offset=args.frames))
            live = asyncio.run(collect_verdicts(settings, args.frames + args.latency_frames, timeout_s=300))
            lat = np.array([v["latency_ms"]["end_to_end"] for _, v in live if v["frame_index"] >= args.frames], float)
            p50, p99 = (float(np.percentile(lat, q)) for q in (50, 99))
            print(f"pipeline latency at {rate:.1f} frames/s: p50 {p50:.1f} ms, p99 {p99:.1f} ms over {lat.size} frames")
        finally:
            worker.terminate()
            worker.wait(30)

    result = {
        "benchmark": "frames_throughput",
        "model": classifier.model.ref,
        "provider": classifier.model.session.provider,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "frame": "640x480 JPEG (decoded, resized, normalised inside the pipeline)",
        "raw_onnxruntime_img_per_s": raw,
        "pipeline_frames_per_s": pipeline_fps,
        "pipeline_vs_raw_same_batch": pipeline_fps / raw[f"batch_{max_batch}"],
        "latency_ms": {"rate_frames_per_s": rate, "p50": p50, "p99": p99, "frames": int(lat.size)},
        "max_batch_size": max_batch,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"ratio pipeline / raw (batch {max_batch}): {result['pipeline_vs_raw_same_batch']:.2f}  -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
