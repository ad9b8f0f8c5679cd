"""Posts and frames -> moderation verdicts.

Per record: validate (schema, headers) -> decode + per-model preprocessing (worker thread) ->
every model through its own micro-batcher (operators.moderation.Moderator) -> policy -> verdict,
or a dead letter naming the reason. Agents stay thin: they register each event with the
OrderedAcker and move on while earlier records are decoded and inferred.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from operators.errors import BadInput
from operators.images import ImageLimits, decode_image
from operators.moderation import ModelFailed, Moderator
from streams import metrics
from streams.config import Settings
from streams.logs import record_fields
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
    parse_post,
)

log = logging.getLogger(__name__)

# Which worker process wrote a result: for debugging rebalances and scale-out.
WORKER_ID = f"{socket.gethostname()}/{os.getpid()}"


def source_of(event: Any) -> SourceRecord:
    """The coordinates and payload of a Faust event (or anything with a compatible `.message`)."""
    m = event.message
    ts = m.timestamp
    return SourceRecord(m.topic, m.partition, m.offset, int(ts * 1000) if ts else None, m.key, decode_headers(m.headers), m.value)


class _Stage:
    """Tracks how far a record got, so a dead letter can say where it failed."""

    def __init__(self) -> None:
        self.name = "validate"


class ModerationPipeline:
    """`verdicts_topic`/`dead_letters_topic` default to the live topics; a replay passes its own output
    topic and `versioned_keys=True`, so its verdict keys name the model versions that produced them."""

    def __init__(self, settings: Settings, moderator: Moderator, verdicts_topic: str | None = None,
                 dead_letters_topic: str | None = None, versioned_keys: bool = False,
                 extra: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.moderator = moderator
        self.limits = ImageLimits(settings.max_image_side, settings.max_image_pixels)
        self.pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        self.verdicts_topic = verdicts_topic or settings.topic(VERDICTS)
        self.dead_letters_topic = dead_letters_topic or settings.topic(DEAD_LETTERS)
        refs = ",".join(sorted(f"{i['name']}@{i['version']}" for i in moderator.model_info.values()))
        self.key_suffix = f"|{refs}" if versioned_keys else ""
        self.extra = extra or {}

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def handle_frame(self, source: SourceRecord) -> list[Output]:
        """Never raises: every failure becomes a dead letter."""

        async def judge(stage: _Stage) -> Output:
            meta = FrameMeta.from_headers(source.headers, source.key)
            stage.name = "decode"

            def prepare():
                rgb = decode_image(source.value or b"", meta.encoding, meta.width or None, meta.height or None, self.limits)
                return self.moderator.prepare(image=rgb)

            items = await self._in_thread(prepare)
            stage.name = "inference"
            started = time.perf_counter()
            results = await self.moderator.judge(items)
            fields = {"kind": "frame", "stream_id": meta.stream_id, "frame_index": meta.frame_index, "pts": finite(meta.pts)}
            return self._verdict(source, meta.record_id, fields, results, started)

        return await self._guarded(source, judge)

    async def handle_post(self, source: SourceRecord) -> list[Output]:
        """Never raises: every failure becomes a dead letter."""

        async def judge(stage: _Stage) -> Output:
            post = parse_post(source.value)
            stage.name = "decode"

            def prepare():
                image = post.get("image")
                rgb = decode_image(image["data"], image["encoding"], limits=self.limits) if image else None
                return self.moderator.prepare(text=post["text"] or None, image=rgb)

            items = await self._in_thread(prepare)
            stage.name = "inference"
            started = time.perf_counter()
            results = await self.moderator.judge(items)
            fields = {"kind": "post", "user_id": post["user_id"], "created_at": post["created_at"]}
            return self._verdict(source, post["id"], fields, results, started)

        return await self._guarded(source, judge)

    async def _guarded(self, source: SourceRecord, judge: Callable[[_Stage], Awaitable[Output]]) -> list[Output]:
        stage = _Stage()
        try:
            return [await judge(stage)]
        except BadInput as exc:
            return [self._dead_letter(source, exc.reason, exc.detail, stage.name)]
        except ModelFailed as exc:
            return [self._dead_letter(source, "inference_failed", str(exc), stage.name)]
        except Exception as exc:  # a bug, not bad input: still never lose the record
            log.exception("record failed in %s: %s", stage.name, exc, extra=record_fields(source, stage=stage.name))
            return [self._dead_letter(source, "internal_error", f"{type(exc).__name__}: {exc}", stage.name)]

    def _verdict(self, source: SourceRecord, record_id: str, fields: dict[str, Any], results: dict[str, Any],
                 started: float) -> Output:
        inference_ms = (time.perf_counter() - started) * 1000
        produced = now_ms()
        judgement = self.moderator.judgement(results)
        verdict = {
            "schema": VERDICT_SCHEMA,
            "id": record_id,
            **fields,
            **judgement,
            "models": {name: info for name, info in self.moderator.model_info.items()
                       if self.moderator.policy_model(name) in results},
            "latency_ms": {
                "end_to_end": (produced - source.timestamp_ms) if source.timestamp_ms else None,
                "inference": round(inference_ms, 3),
            },
            "source": source.coordinates(),
            "worker": WORKER_ID,
            "produced_at_ms": produced,
            **self.extra,
        }
        metrics.VERDICTS.labels(fields["kind"], str(judgement["safe"]).lower()).inc()
        for violation in judgement["violations"]:
            metrics.VIOLATIONS.labels(violation["check"]).inc()
        if source.timestamp_ms:
            metrics.END_TO_END.labels(source.topic).observe(max(0, produced - source.timestamp_ms) / 1000)
        return Output(self.verdicts_topic, (record_id + self.key_suffix).encode(), dumps(verdict))

    def _dead_letter(self, source: SourceRecord, reason: str, detail: str, stage: str) -> Output:
        metrics.DEAD_LETTERS.labels(source.topic, reason).inc()
        log.warning("dead letter: %s: %s", reason, detail, extra=record_fields(source, reason=reason, stage=stage))
        return Output(self.dead_letters_topic, source.key, dumps(dead_letter(source, reason, detail, stage)))

    async def close(self) -> None:
        await self.moderator.close()
        self.pool.shutdown(wait=False)
