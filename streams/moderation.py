"""Posts and frames -> moderation verdicts.

Per batch: validate each record (schema, headers) -> one `Moderator.moderate` call (model versions
assigned by record id, decode + per-model preprocessing in the decode threads, every model through its
own micro-batcher, policy: operators/moderation.py) -> per record a verdict (+ a shadow verdict on
`shadow-verdicts` for sampled ids), or a dead letter naming the reason. Agents stay thin: they
register each batch with the OrderedAcker and move on while earlier records are decoded and inferred.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from operators.batcher import SYNC
from operators.errors import BadInput
from operators.images import ImageLimits
from operators.moderation import Assignment, Judgement, ModelFailed, Moderated, Moderator, RecordInput
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
    text: str | None = None
    image: tuple[bytes, str, int | None, int | None] | None = None  # (data, encoding, declared width, height)
    outcome: Moderated | None = None
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

    Each record is assigned its model versions by its id: the serving version, or its A/B arm,
    deterministic per id. Sampled ids also run the shadow version; its verdict goes to `shadow_topic`
    (default: the live `shadow-verdicts` when writing the live verdicts, none for a replay into its own
    topic), never to the verdicts topic.

    Records are handled in batches (`handle_frames`, `handle_posts`): parsed on the event loop, then
    moderated with one call per batch (operators/moderation.py `Moderator.moderate`), and turned into
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

    async def _handle(self, records: list[_Record]) -> list[list[Output]]:
        degradation = self.moderator.degradation()  # the rungs in force when the versions are assigned
        batch_fields = {"degradation": degradation} if degradation is not None else {}
        live = [r for r in records if r.failure is None]
        for r in live:
            r.stage = "decode"
        try:
            outcomes = await self.moderator.moderate(
                [RecordInput(r.record_id, r.text, r.image) for r in live], self.pool, self.decode_threads, self.limits,
                self._reduction, shadows=self.shadow_topic is not None)
            for r, outcome in zip(live, outcomes, strict=True):
                r.outcome = outcome
                if outcome.failure is not None:
                    r.stage = outcome.stage
                    r.fail(outcome.failure)
        except Exception as exc:  # a bug in the batch machinery: dead-letter what is unfinished, lose nothing
            log.exception("batch of %d records failed: %s", len(records), exc)
            for r in records:
                if r.failure is None:
                    r.fail(exc)
        return self._finish(records, batch_fields)

    def _reduction(self, assignment: Assignment):
        """What decoding at a reduced scale must respect for this record (None: full size always)."""
        if not self.settings.decode_reduced:
            return None
        return lambda width, height: self.moderator.reduction_limit(assignment, width, height)

    def _finish(self, records: list[_Record], batch_fields: dict[str, Any]) -> list[list[Output]]:
        """Each record's verdict (and shadow verdict), or its dead letter."""
        produced = now_ms()
        out = []
        for r in records:
            if r.failure is None:
                try:
                    out.append(self._outputs(r, produced, batch_fields))
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
        image = post.get("image")
        record = RecordInput(post["id"], post["text"] or None, (image["data"], image["encoding"], None, None) if image else None)
        (outcome,) = await self.moderator.moderate([record], self.pool, self.decode_threads, self.limits, self._reduction,
                                                   shadows=False, lane=SYNC)  # behind stream records
        if outcome.failure is not None:
            raise outcome.failure
        return {"schema": VERDICT_SCHEMA, "id": post["id"], "kind": "post", "user_id": post["user_id"],
                "created_at": post["created_at"], **self._judgement_fields(outcome.live),
                "latency_ms": {"inference": round(outcome.inference_s * 1000, 3)}}

    @staticmethod
    def _judgement_fields(judgement: Judgement) -> dict[str, Any]:
        """What a verdict says of a judgement: its fields, its models, and the redacted text if any."""
        fields = {**judgement.fields, "models": judgement.models}
        if judgement.redacted_text is not None:
            fields["redacted_text"] = judgement.redacted_text
        return fields

    def _outputs(self, record: _Record, produced: int, batch_fields: dict[str, Any]) -> list[Output]:
        """The verdict, and the shadow verdict when this record ran a shadow version that succeeded."""
        outcome = record.outcome
        outputs = [self._verdict(record, outcome.live, produced, batch_fields)]
        if outcome.shadow is not None and self.shadow_topic:
            outputs.append(self._verdict(record, outcome.shadow, produced, batch_fields, shadow=True))
        return outputs

    def _verdict(self, record: _Record, judgement: Judgement, produced: int, batch_fields: dict[str, Any],
                 shadow: bool = False) -> Output:
        source, outcome, record_id = record.source, record.outcome, record.record_id
        verdict = {
            "schema": VERDICT_SCHEMA,
            "id": record_id,
            **record.fields,
            **judgement.fields,
            "models": judgement.models,
            "latency_ms": {
                "end_to_end": (produced - source.timestamp_ms) if source.timestamp_ms else None,
                "inference": round(outcome.inference_s * 1000, 3),
            },
            "source": source.coordinates(),
            "worker": WORKER_ID,
            "produced_at_ms": produced,
            **batch_fields,
            **self.extra,
        }
        if judgement.redacted_text is not None:
            verdict["redacted_text"] = judgement.redacted_text
        if shadow:  # a shadow verdict: recorded, never acted on, never on the verdicts topic
            verdict["shadow"] = {"checks": list(outcome.shadow_checks), "live_safe": outcome.live.safe,
                                 "live_models": outcome.live.models}
            return Output(self.shadow_topic, record_id.encode(), dumps(verdict))
        self._count(record.fields["kind"], judgement.fields, source, produced)
        return Output(self.verdicts_topic, (record_id + self._key_suffix(outcome)).encode(), dumps(verdict),
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

    def _key_suffix(self, outcome: Moderated) -> str:
        """`|name@version,...` of every check's model for this record (replays: keys name the versions)."""
        if not self.versioned_keys:
            return ""
        return "|" + ",".join(sorted(outcome.refs))

    def _dead_letter(self, source: SourceRecord, reason: str, detail: str, stage: str) -> Output:
        metrics.DEAD_LETTERS.labels(source.topic, reason).inc()
        log.warning("dead letter: %s: %s", reason, detail, extra=record_fields(source, reason=reason, stage=stage))
        return Output(self.dead_letters_topic, source.key, dumps(dead_letter(source, reason, detail, stage)))

    async def close(self) -> None:
        await self.moderator.close()
        self.pool.shutdown(wait=False)
