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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from operators.batcher import SYNC
from operators.errors import BadInput
from operators.images import ImageLimits, decode_source
from operators.moderation import Assignment, ModelFailed, Moderator
from streams import metrics
from streams.config import Settings
from streams.cores import decode_threads
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


def source_of(m: Any) -> SourceRecord:
    """The coordinates and payload of a Faust message (streams/batches.py hands messages over)."""
    ts = m.timestamp
    return SourceRecord(m.topic, m.partition, m.offset, int(ts * 1000) if ts else None, m.key, decode_headers(m.headers), m.value)


@dataclass(eq=False)
class _Record:
    """One input record on its way through a batch: what it is, which versions judge it, and how far
    it got. `failure` (reason, detail, stage) ends its way with a dead letter."""

    source: SourceRecord
    stage: str = "validate"
    record_id: str = ""
    fields: dict[str, Any] | None = None
    assignment: Assignment | None = None
    text: str | None = None
    image: tuple[bytes, str, int | None, int | None] | None = None  # (data, encoding, declared width, height)
    items: dict[str, Any] | None = None
    results: dict[str, Any] | None = None
    failure: tuple[str, str, str] | None = None

    def fail(self, exc: Exception) -> None:
        if isinstance(exc, BadInput):
            self.failure = (exc.reason, exc.detail, self.stage)
        elif isinstance(exc, ModelFailed):
            self.failure = ("inference_failed", str(exc), self.stage)
        else:  # a bug, not bad input: still never lose the record
            log.error("record failed in %s: %s", self.stage, exc, exc_info=exc, extra=record_fields(self.source, stage=self.stage))
            self.failure = ("internal_error", f"{type(exc).__name__}: {exc}", self.stage)


class ModerationPipeline:
    """`verdicts_topic`/`dead_letters_topic` default to the live topics; a replay passes its own output
    topic and `versioned_keys=True`, so its verdict keys name the model versions that produced them.

    Each record is assigned its model versions by its id (`Moderator.assign`): the serving version, or
    its A/B arm, deterministic per id. Sampled ids also run the shadow version; its verdict goes to
    `shadow_topic` (default: the live `shadow-verdicts` when writing the live verdicts, none for a
    replay into its own topic), never to the verdicts topic.

    Records are handled in batches (`handle_frames`, `handle_posts`): parsed and assigned on the event
    loop, decoded and preprocessed in the decode threads (one hand-off per chunk of the batch, each
    model preprocessing its records in one call), judged with one submission per model, and turned into
    verdicts; every record of the batch gets its outputs or a dead letter, never an exception."""

    def __init__(self, settings: Settings, moderator: Moderator, verdicts_topic: str | None = None,
                 dead_letters_topic: str | None = None, versioned_keys: bool = False,
                 extra: dict[str, Any] | None = None, shadow_topic: str | None = None) -> None:
        self.settings = settings
        self.moderator = moderator
        self.limits = ImageLimits(settings.max_image_side, settings.max_image_pixels)
        self.decode_threads = decode_threads(settings)
        self.pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode")
        self.shadow_topic = shadow_topic or (settings.topic(SHADOW_VERDICTS) if verdicts_topic is None else None)
        self.verdicts_topic = verdicts_topic or settings.topic(VERDICTS)
        self.dead_letters_topic = dead_letters_topic or settings.topic(DEAD_LETTERS)
        self.versioned_keys = versioned_keys
        self.extra = extra or {}
        self._metric_children: dict[tuple[str, bool, str], tuple[Any, Any]] = {}

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # ----------------------------------------------------------------------------- the record path
    async def handle_frames(self, sources: list[SourceRecord]) -> list[list[Output]]:
        """The outputs of each frame, in order. Never raises: every failure becomes a dead letter. While a
        degraded rung's frame stride N is in force, only every Nth frame of a stream is judged; the
        others get no verdict (counted in inferstream_frames_skipped_total)."""
        records = [self._open(_Record(s), self._read_frame) for s in sources]
        stride = self.moderator.frame_stride
        if stride == 1:
            return await self._handle(records)
        skipped = {id(r) for r in records if r.failure is None and r.fields["frame_index"] % stride}
        if skipped:
            metrics.FRAMES_SKIPPED.labels(sources[0].topic).inc(len(skipped))
        judged = iter(await self._handle([r for r in records if id(r) not in skipped]))
        return [[] if id(r) in skipped else next(judged) for r in records]

    async def handle_posts(self, sources: list[SourceRecord]) -> list[list[Output]]:
        """The outputs of each post, in order. Never raises: every failure becomes a dead letter."""
        return await self._handle([self._open(_Record(s), self._read_post) for s in sources])

    def _read_frame(self, record: _Record) -> str:
        meta = FrameMeta.from_headers(record.source.headers, record.source.key)
        record.fields = {"kind": "frame", "stream_id": meta.stream_id, "frame_index": meta.frame_index, "pts": finite(meta.pts)}
        record.image = (record.source.value or b"", meta.encoding, meta.width or None, meta.height or None)
        return meta.record_id

    @staticmethod
    def _read_post(record: _Record) -> str:
        post = parse_post(record.source.value)
        record.fields = {"kind": "post", "user_id": post["user_id"], "created_at": post["created_at"]}
        record.text = post["text"] or None
        image = post.get("image")
        record.image = (image["data"], image["encoding"], None, None) if image else None
        return post["id"]

    @staticmethod
    def _open(record: _Record, read: Callable[[_Record], str]) -> _Record:
        """Validate: the record's id and parts, or its failure."""
        try:
            record.record_id = read(record)
        except Exception as exc:
            record.fail(exc)
        return record

    def _assign(self, records: list[_Record]) -> None:
        """Each valid record's model versions, by its id (on the event loop, where versions switch)."""
        live = [r for r in records if r.failure is None]
        for r, assignment in zip(live, self.moderator.assign_many([r.record_id for r in live],
                                                                  shadows=self.shadow_topic is not None), strict=True):
            r.assignment = assignment
            r.stage = "decode"

    async def _handle(self, records: list[_Record]) -> list[list[Output]]:
        lease = None
        degradation = self.moderator.degradation()  # the rungs in force when the versions are assigned
        batch_fields = {"degradation": degradation} if degradation is not None else {}
        try:
            self._assign(records)
            # one lease for the batch on every version its records were assigned: none retires under them
            lease = self.moderator.lease(r.assignment for r in records if r.assignment is not None)
            await self._prepare(records)
            started = time.perf_counter()
            await self._judge(records)
            return self._finish(records, started, batch_fields)
        except Exception as exc:  # a bug in the batch machinery: dead-letter what is unfinished, lose nothing
            log.exception("batch of %d records failed: %s", len(records), exc)
            for r in records:
                if r.failure is None:
                    r.fail(exc)
            return self._finish(records, time.perf_counter(), batch_fields)
        finally:
            if lease is not None:
                lease.release()

    async def _prepare(self, records: list[_Record]) -> None:
        """Decode images and preprocess for every model, in the decode threads: one hand-off per chunk
        (as many chunks as decode threads when there are images to decode, else one)."""
        live = [r for r in records if r.failure is None]
        if not live:
            return
        with_images = sum(1 for r in live if r.image is not None)
        chunks = max(1, min(self.decode_threads, with_images))
        size = -(-len(live) // chunks)
        await asyncio.gather(*(self._in_thread(self._prepare_chunk, live[i : i + size]) for i in range(0, len(live), size)))

    def _prepare_chunk(self, records: list[_Record]) -> None:
        parts, ready = [], []
        reductions: dict[int, Any] = {}  # per assignment, not per record (records usually share one)
        for r in records:
            try:
                if r.image is None:
                    rgb = None
                else:
                    key = id(r.assignment)
                    if key not in reductions:
                        reductions[key] = self._reduction(r.assignment)
                    rgb = decode_source(*r.image, self.limits, reductions[key])
            except Exception as exc:
                r.fail(exc)
                continue
            parts.append((r.text, rgb))
            ready.append(r)
        for r, items in zip(ready, self.moderator.prepare_many(parts, [r.assignment for r in ready]), strict=True):
            if isinstance(items, Exception):
                r.fail(items)
            else:
                r.items = items
                r.stage = "inference"

    def _reduction(self, assignment: Assignment):
        """What decoding at a reduced scale must respect for this record (None: full size always)."""
        if not self.settings.decode_reduced:
            return None
        return lambda width, height: self.moderator.reduction_limit(assignment, width, height)

    async def _judge(self, records: list[_Record]) -> None:
        live = [r for r in records if r.failure is None]
        if not live:
            return
        outcomes = await self.moderator.judge_many([r.items for r in live], [r.assignment for r in live])
        for r, results in zip(live, outcomes, strict=True):
            if isinstance(results, Exception):
                r.fail(results)
            else:
                r.results = results
            r.items = None  # tensors are not needed any more: free them before the verdicts are built

    def _finish(self, records: list[_Record], started: float, batch_fields: dict[str, Any]) -> list[list[Output]]:
        """Each record's verdict (and shadow verdict), or its dead letter."""
        produced = now_ms()
        out = []
        for r in records:
            if r.failure is None:
                try:
                    out.append(self._outputs(r, started, produced, batch_fields))
                    continue
                except Exception as exc:
                    r.stage = "verdict"
                    r.fail(exc)
            out.append([self._dead_letter(r.source, *r.failure)])
        return out

    async def moderate_post(self, value: bytes) -> dict[str, Any]:
        """A post judged synchronously (REST `POST /moderate`): the verdict's fields, produced nowhere.
        Raises BadInput (invalid post) or ModelFailed, like the live path would dead-letter them."""
        post = parse_post(value)
        with self.moderator.assign(post["id"], shadows=False) as assignment:
            def prepare():
                image = post.get("image")
                rgb = decode_source(image["data"], image["encoding"], None, None, self.limits,
                                    self._reduction(assignment)) if image else None
                return self.moderator.prepare(text=post["text"] or None, image=rgb, assignment=assignment)

            items = await self._in_thread(prepare)
            started = time.perf_counter()
            results = await self.moderator.judge(items, assignment, SYNC)  # behind stream records
            judgement = self.moderator.judgement(results, assignment)
            verdict = {"schema": VERDICT_SCHEMA, "id": post["id"], "kind": "post", "user_id": post["user_id"],
                       "created_at": post["created_at"], **judgement, "models": self._models(results, assignment),
                       "latency_ms": {"inference": round((time.perf_counter() - started) * 1000, 3)}}
            redacted = self.moderator.policy.redacted(post["text"] or None, judgement["entities"])
            if redacted is not None:
                verdict["redacted_text"] = redacted
            return verdict

    @staticmethod
    def _models(results: dict[str, Any], assignment: Assignment) -> dict[str, dict[str, str]]:
        """check -> {name, version, provider, arm} for the checks that ran on this record."""
        return {check: info for check, info in assignment.models().items() if assignment.stages[check].ref in results}

    def _outputs(self, record: _Record, started: float, produced: int, batch_fields: dict[str, Any]) -> list[Output]:
        """The verdict, and the shadow verdict when this record ran a shadow version that succeeded."""
        assignment, results = record.assignment, record.results
        outputs = [self._verdict(record, started, produced, batch_fields, assignment)]
        if assignment.shadows and self.shadow_topic:
            if all(s.ref in results for s in assignment.shadows.values()):
                outputs.append(self._verdict(record, started, produced, batch_fields, assignment.shadowed(),
                                             shadow_of=assignment))
        return outputs

    def _verdict(self, record: _Record, started: float, produced: int, batch_fields: dict[str, Any],
                 assignment: Assignment, shadow_of: Assignment | None = None) -> Output:
        source, results, record_id = record.source, record.results, record.record_id
        judgement = self.moderator.judgement(results, assignment)
        verdict = {
            "schema": VERDICT_SCHEMA,
            "id": record_id,
            **record.fields,
            **judgement,
            "models": self._models(results, assignment),
            "latency_ms": {
                "end_to_end": (produced - source.timestamp_ms) if source.timestamp_ms else None,
                "inference": round((time.perf_counter() - started) * 1000, 3),
            },
            "source": source.coordinates(),
            "worker": WORKER_ID,
            "produced_at_ms": produced,
            **batch_fields,
            **self.extra,
        }
        redacted = self.moderator.policy.redacted(record.text, judgement["entities"])
        if redacted is not None:
            verdict["redacted_text"] = redacted
        if shadow_of is not None:  # a shadow verdict: recorded, never acted on, never on the verdicts topic
            live = self.moderator.judgement(results, shadow_of)
            verdict["shadow"] = {"checks": sorted(shadow_of.shadows), "live_safe": live["safe"],
                                 "live_models": self._models(results, shadow_of)}
            return Output(self.shadow_topic, record_id.encode(), dumps(verdict))
        self._count(record.fields["kind"], judgement, source, produced)
        return Output(self.verdicts_topic, (record_id + self._key_suffix(assignment)).encode(), dumps(verdict),
                      partition_key=self._stream_of(record))

    @staticmethod
    def _stream_of(record: _Record) -> bytes | None:
        """A frame's verdicts go to its stream's partition, in frame order; posts by their own id."""
        stream_id = record.fields.get("stream_id") if record.fields else None
        return stream_id.encode() if stream_id is not None else None

    def _count(self, kind: str, judgement: dict[str, Any], source: SourceRecord, produced: int) -> None:
        key = (kind, judgement["safe"], source.topic)
        children = self._metric_children.get(key)
        if children is None:  # bound once per (kind, safe, topic): labels() costs more than inc()
            children = self._metric_children[key] = (metrics.VERDICTS.labels(kind, str(judgement["safe"]).lower()),
                                                      metrics.END_TO_END.labels(source.topic))
        children[0].inc()
        for violation in judgement["violations"]:
            metrics.VIOLATIONS.labels(violation["check"]).inc()
        if source.timestamp_ms:
            children[1].observe(max(0, produced - source.timestamp_ms) / 1000)

    def _key_suffix(self, assignment: Assignment) -> str:
        """`|name@version,...` of every check's model for this record (replays: keys name the versions)."""
        if not self.versioned_keys:
            return ""
        return "|" + ",".join(sorted(s.ref for s in assignment.stages.values()))

    def _dead_letter(self, source: SourceRecord, reason: str, detail: str, stage: str) -> Output:
        metrics.DEAD_LETTERS.labels(source.topic, reason).inc()
        log.warning("dead letter: %s: %s", reason, detail, extra=record_fields(source, reason=reason, stage=stage))
        return Output(self.dead_letters_topic, source.key, dumps(dead_letter(source, reason, detail, stage)))

    async def close(self) -> None:
        await self.moderator.close()
        self.pool.shutdown(wait=False)
