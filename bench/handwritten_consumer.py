"""The baseline a user could write in an afternoon: a batched aiokafka + ONNX Runtime consumer.

It reads batches from one input topic (posts or frames), decodes frames in a thread pool, runs the
same ONNX file at the same batch size, writes one JSON result per record, awaits the broker's acks
and then commits: at-least-once, nothing more (no dead letters, no A/B, no metrics, no hot reload).
bench/record_path.py runs it beside the worker on the same records; the worker must beat it.

    python bench/handwritten_consumer.py --input posts --output hw-verdicts --model models/toxicity/1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from operators.classify import ImagePreprocess, preprocess_image  # noqa: E402  (the same pixels as the worker)


def frame_tensor(value: bytes, pre: ImagePreprocess) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(value, np.uint8), cv2.IMREAD_COLOR)  # full-size decode, as most users write it
    return preprocess_image(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), pre)


async def run(args: argparse.Namespace) -> None:
    cfg = yaml.safe_load((Path(args.model) / "config.yaml").read_text())
    labels = json.loads((Path(args.model) / cfg["labels"]).read_text())
    session = ort.InferenceSession(str(Path(args.model) / cfg["file"]), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    batch = int(cfg["batching"]["max_batch_size"])
    frames = cfg["task"] == "classify"
    pre = ImagePreprocess.from_config(cfg["preprocess"]) if frames else None
    lowercase = bool(cfg.get("preprocess", {}).get("lowercase"))
    pool = ThreadPoolExecutor(args.decode_threads)
    loop = asyncio.get_running_loop()

    consumer = AIOKafkaConsumer(args.input, bootstrap_servers=args.broker, group_id=args.group, enable_auto_commit=False,
                                auto_offset_reset="earliest", max_poll_records=batch, fetch_max_wait_ms=50,
                                max_partition_fetch_bytes=2 << 20)
    producer = AIOKafkaProducer(bootstrap_servers=args.broker, acks="all", linger_ms=5)
    await consumer.start()
    await producer.start()
    try:
        while True:
            fetched = await consumer.getmany(timeout_ms=1000, max_records=batch)
            records = [m for messages in fetched.values() for m in messages]
            if not records:
                continue
            if frames:
                x = np.stack(await asyncio.gather(*(loop.run_in_executor(pool, frame_tensor, m.value, pre) for m in records)))
                logits = session.run(None, {input_name: x})[0]
                e = np.exp(logits - logits.max(axis=1, keepdims=True))
                probs = e / e.sum(axis=1, keepdims=True)
                ids = [dict(m.headers).get("stream_id", b"").decode() + ":" + dict(m.headers).get("frame_index", b"").decode()
                       for m in records]
            else:
                posts = [json.loads(m.value) for m in records]
                texts = [p["text"].lower() if lowercase else p["text"] for p in posts]
                probs = session.run([cfg["postprocess"]["output"]], {input_name: np.array(texts, dtype=object).reshape(-1, 1)})[0]
                ids = [p["id"] for p in posts]
            best = probs.argmax(axis=1)
            now = int(time.time() * 1000)
            sent = [await producer.send(args.output, json.dumps({"id": i, "label": labels[b], "score": float(p[b]),
                                                                 "produced_at_ms": now}).encode(), key=i.encode())
                    for i, b, p in zip(ids, best, probs, strict=True)]
            await asyncio.gather(*sent)
            await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", default="127.0.0.1:9092")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--model", required=True, help="a model version directory: config.yaml + model file")
    parser.add_argument("--group", default="handwritten-baseline")
    parser.add_argument("--decode-threads", type=int, default=2)
    asyncio.run(run(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
