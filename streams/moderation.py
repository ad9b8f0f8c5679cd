"""Posts and frames -> moderation verdicts.

Per record: validate (schema, headers) -> assign model versions by record id (serving version,
A/B arm, shadow sample) -> decode + per-model preprocessing (worker thread) -> every model through
its own micro-batcher (operators.moderation.Moderator) -> policy -> verdict (+ a shadow verdict on
`shadow-verdicts` for sampled ids), or a dead letter naming the reason. Agents stay thin: they
register each event with the OrderedAcker and move on while earlier records are decoded and inferred.
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
from operators.moderation import Assignment, ModelFailed, Moderator
from streams import metrics
from streams.config import Settings
from streams.logs import record_fields
from streams.ordered import Output
from streams.schemas import (
    DEAD_LETTERS,
    SHADOW_VERDICTS,
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

# Shadow verdicts (a shadow model version's verdict, never acted on). Created by the worker at start.

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
    topic and `versioned_keys=True`, so its verdict keys name the model versions that produced them.

    Each record is assigned its model versions by its id (`Moderator.assign`): the serving version, or
    its A/B arm, deterministic per id. Sampled ids also run the shadow version; its verdict goes to
    `shadow_topic` (default: the live `shadow-verdicts` when writing the live verdicts, none for a
    replay into its own topic), never to the verdicts topic."""

    def __init__(self, settings: Settings, moderator: Moderator, verdicts_topic: str | None = None,
                 dead_letters_topic: str | None = None, versioned_keys: bool = False,
                 extra: dict[str, Any] | None = None, shadow_topic: str | None = None) -> None:
        self.settings = settings
        self.moderator = moderator
        self.limits = ImageLimits(settings.max_image_side, settings.max_image_pixels)
        self.pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        self.shadow_topic = shadow_topic or (settings.topic(SHADOW_VERDICTS) if verdicts_topic is None else None)
        self.verdicts_topic = verdicts_topic or settings.topic(VERDICTS)
        self.dead_letters_topic = dead_letters_topic or settings.topic(DEAD_LETTERS)
        self.versioned_keys = versioned_keys
        self.extra = extra or {}

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def handle_frame(self, source: SourceRecord) -> list[Output]:
        """Never raises: every failure becomes a dead letter."""

        async def judge(stage: _Stage) -> list[Output]:
            meta = FrameMeta.from_headers(source.headers, source.key)
            stage.name = "decode"
            with self.moderator.assign(meta.record_id, shadows=self.shadow_topic is not None) as assignment:

                def prepare():
                    rgb = decode_image(source.value or b"", meta.encoding, meta.width or None, meta.height or None, self.limits)
                    return self.moderator.prepare(image=rgb, assignment=assignment)

                items = await self._in_thread(prepare)
                stage.name = "inference"
                started = time.perf_counter()
                results = await self.moderator.judge(items, assignment)
                fields = {"kind": "frame", "stream_id": meta.stream_id, "frame_index": meta.frame_index, "pts": finite(meta.pts)}
                return self._outputs(source, meta.record_id, fields, results, started, assignment)

        return await self._guarded(source, judge)

    async def handle_post(self, source: SourceRecord) -> list[Output]:
        """Never raises: every failure becomes a dead letter."""

        async def judge(stage: _Stage) -> list[Output]:
            post = parse_post(source.value)
            stage.name = "decode"
            with self.moderator.assign(post["id"], shadows=self.shadow_topic is not None) as assignment:
                results, started = await self._judge_post(post, stage, assignment)
                fields = {"kind": "post", "user_id": post["user_id"], "created_at": post["created_at"]}
                return self._outputs(source, post["id"], fields, results, started, assignment)

        return await self._guarded(source, judge)

    async def _judge_post(self, post: dict[str, Any], stage: _Stage, assignment: Assignment) -> tuple[dict[str, Any], float]:
        def prepare():
            image = post.get("image")
            rgb = decode_image(image["data"], image["encoding"], limits=self.limits) if image else None
            return self.moderator.prepare(text=post["text"] or None, image=rgb, assignment=assignment)

        items = await self._in_thread(prepare)
        stage.name = "inference"
        started = time.perf_counter()
        return await self.moderator.judge(items, assignment), started

    async def moderate_post(self, value: bytes) -> dict[str, Any]:
        """A post judged synchronously (REST `POST /moderate`): the verdict's fields, produced nowhere.
        Raises BadInput (invalid post) or ModelFailed, like the live path would dead-letter them."""
        post = parse_post(value)
        with self.moderator.assign(post["id"], shadows=False) as assignment:
            results, started = await self._judge_post(post, _Stage(), assignment)
            judgement = self.moderator.judgement(results, assignment)
            return {"schema": VERDICT_SCHEMA, "id": post["id"], "kind": "post", "user_id": post["user_id"],
                    "created_at": post["created_at"], **judgement, "models": self._models(results, assignment),
                    "latency_ms": {"inference": round((time.perf_counter() - started) * 1000, 3)}}

    async def _guarded(self, source: SourceRecord, judge: Callable[[_Stage], Awaitable[list[Output]]]) -> list[Output]:
        stage = _Stage()
        try:
            return await judge(stage)
        except BadInput as exc:
            return [self._dead_letter(source, exc.reason, exc.detail, stage.name)]
        except ModelFailed as exc:
            return [self._dead_letter(source, "inference_failed", str(exc), stage.name)]
        except Exception as exc:  # a bug, not bad input: still never lose the record
            log.exception("record failed in %s: %s", stage.name, exc, extra=record_fields(source, stage=stage.name))
            return [self._dead_letter(source, "internal_error", f"{type(exc).__name__}: {exc}", stage.name)]

    @staticmethod
    def _models(results: dict[str, Any], assignment: Assignment) -> dict[str, dict[str, str]]:
        """check -> {name, version, provider, arm} for the checks that ran on this record."""
        return {check: info for check, info in assignment.models().items() if assignment.stages[check].ref in results}

    def _outputs(self, source: SourceRecord, record_id: str, fields: dict[str, Any], results: dict[str, Any],
                 started: float, assignment: Assignment) -> list[Output]:
        """The verdict, and the shadow verdict when this record ran a shadow version that succeeded."""
        outputs = [self._verdict(source, record_id, fields, results, started, assignment)]
        if assignment.shadows and self.shadow_topic:
            shadowed = assignment.shadowed()
            if all(s.ref in results for s in assignment.shadows.values()):
                outputs.append(self._verdict(source, record_id, fields, results, started, shadowed,
                                             shadow_of=assignment))
        return outputs

    def _verdict(self, source: SourceRecord, record_id: str, fields: dict[str, Any], results: dict[str, Any],
                 started: float, assignment: Assignment, shadow_of: Assignment | None = None) -> Output:
        inference_ms = (time.perf_counter() - started) * 1000
        produced = now_ms()
        judgement = self.moderator.judgement(results, assignment)
        verdict = {
            "schema": VERDICT_SCHEMA,
            "id": record_id,
            **fields,
            **judgement,
            "models": self._models(results, assignment),
            "latency_ms": {
                "end_to_end": (produced - source.timestamp_ms) if source.timestamp_ms else None,
                "inference": round(inference_ms, 3),
            },
            "source": source.coordinates(),
            "worker": WORKER_ID,
            "produced_at_ms": produced,
            **self.extra,
        }
        if shadow_of is not None:  # a shadow verdict: recorded, never acted on, never on the verdicts topic
            live = self.moderator.judgement(results, shadow_of)
            verdict["shadow"] = {"checks": sorted(shadow_of.shadows), "live_safe": live["safe"],
                                 "live_models": self._models(results, shadow_of)}
            return Output(self.shadow_topic, record_id.encode(), dumps(verdict))
        metrics.VERDICTS.labels(fields["kind"], str(judgement["safe"]).lower()).inc()
        for violation in judgement["violations"]:
            metrics.VIOLATIONS.labels(violation["check"]).inc()
        if source.timestamp_ms:
            metrics.END_TO_END.labels(source.topic).observe(max(0, produced - source.timestamp_ms) / 1000)
        return Output(self.verdicts_topic, (record_id + self._key_suffix(assignment)).encode(), dumps(verdict))

    def _key_suffix(self, assignment: Assignment) -> str:
        """`|name@version,...` of every check's model for this record (replays: keys name the versions)."""
        if not self.versioned_keys:
            return ""
        return "|" + ",".join(sorted(f"{s.model.config.name}@{s.model.config.version}" for s in assignment.stages.values()))

    def _dead_letter(self, source: SourceRecord, reason: str, detail: str, stage: str) -> Output:
        metrics.DEAD_LETTERS.labels(source.topic, reason).inc()
        log.warning("dead letter: %s: %s", reason, detail, extra=record_fields(source, reason=reason, stage=stage))
        return Output(self.dead_letters_topic, source.key, dumps(dead_letter(source, reason, detail, stage)))

    async def close(self) -> None:
        await self.moderator.close()
        self.pool.shutdown(wait=False)
