"""Frames -> image classification verdicts.

Per record: headers -> decode + preprocess (decode thread) -> micro-batch -> session -> top-k
-> verdict (or dead letter). The agent itself stays thin: it registers each event with the
OrderedAcker and moves on to the next record while earlier ones are decoded and inferred.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from operators.batcher import BatchFailed, MicroBatcher
from operators.classify import Classification, ImageClassifier
from operators.errors import BadInput
from operators.images import ImageLimits, decode_image
from streams.config import Settings
from streams.ordered import Output
from streams.schemas import (
    DEAD_LETTERS,
    VERDICT_SCHEMA,
    VERDICTS,
    FrameMeta,
    SourceRecord,
    dead_letter,
    decode_headers,
    dumps,
    finite,
    now_ms,
)

log = logging.getLogger(__name__)

# Which worker process wrote a result: for debugging rebalances and scale-out.
WORKER_ID = f"{socket.gethostname()}/{os.getpid()}"


def source_of(event: Any) -> SourceRecord:
    """The coordinates and payload of a Faust event (or anything with a compatible `.message`)."""
    m = event.message
    ts = m.timestamp
    return SourceRecord(m.topic, m.partition, m.offset, int(ts * 1000) if ts else None, m.key, decode_headers(m.headers), m.value)


class FramePipeline:
    def __init__(self, settings: Settings, classifier: ImageClassifier) -> None:
        self.settings = settings
        self.classifier = classifier
        cfg = classifier.model.config
        self.batcher: MicroBatcher[np.ndarray, Classification] = MicroBatcher(
            classifier.run_batch, cfg.max_batch_size, cfg.max_wait_ms / 1000, name=cfg.ref
        )
        self.limits = ImageLimits(settings.max_image_side, settings.max_image_pixels)
        self.decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        self.verdicts_topic = settings.topic(VERDICTS)
        self.dead_letters_topic = settings.topic(DEAD_LETTERS)
        self.model_info = {"name": cfg.name, "version": cfg.version, "provider": classifier.model.session.provider}

    def _decode(self, meta: FrameMeta, data: bytes) -> np.ndarray:
        rgb = decode_image(data, meta.encoding, meta.width or None, meta.height or None, self.limits)
        return self.classifier.preprocess(rgb)

    async def handle(self, source: SourceRecord) -> list[Output]:
        """Never raises: every failure becomes a dead letter naming its reason and the source record."""
        stage = "headers"
        try:
            meta = FrameMeta.from_headers(source.headers, source.key)
            stage = "decode"
            loop = asyncio.get_running_loop()
            tensor = await loop.run_in_executor(self.decode_pool, self._decode, meta, source.value or b"")
            stage = "inference"
            started = time.perf_counter()
            result = await self.batcher.submit(tensor)
            inference_ms = (time.perf_counter() - started) * 1000
        except BadInput as exc:
            return [self._dead_letter(source, exc.reason, exc.detail, stage)]
        except BatchFailed as exc:
            return [self._dead_letter(source, "inference_failed", str(exc), stage)]
        except Exception as exc:  # a bug, not bad input: still never lose the record
            log.exception("frame %s/%s@%s failed in %s", source.topic, source.partition, source.offset, stage)
            return [self._dead_letter(source, "internal_error", f"{type(exc).__name__}: {exc}", stage)]
        return [self._verdict(source, meta, result, inference_ms)]

    def _verdict(self, source: SourceRecord, meta: FrameMeta, result: Classification, inference_ms: float) -> Output:
        produced = now_ms()
        verdict = {
            "schema": VERDICT_SCHEMA,
            "id": meta.record_id,
            "kind": "frame",
            "stream_id": meta.stream_id,
            "frame_index": meta.frame_index,
            "pts": finite(meta.pts),
            "classifications": result.as_dict(),
            "models": {"classifier": self.model_info},
            "latency_ms": {
                "end_to_end": (produced - source.timestamp_ms) if source.timestamp_ms else None,
                "inference": round(inference_ms, 3),
            },
            "source": source.coordinates(),
            "worker": WORKER_ID,
            "produced_at_ms": produced,
        }
        return Output(self.verdicts_topic, meta.record_id.encode(), dumps(verdict))

    def _dead_letter(self, source: SourceRecord, reason: str, detail: str, stage: str) -> Output:
        return Output(self.dead_letters_topic, source.key, dumps(dead_letter(source, reason, detail, stage)))

    async def close(self) -> None:
        await self.batcher.close()
        self.decode_pool.shutdown(wait=False)
