"""Replay / backfill: re-process a range of a topic with pinned model versions into a chosen topic.

- Reads with manual partition assignment and no consumer group: live workers' offsets are never
  touched. It runs the live pipeline's own code (ModerationPipeline, the same operators and policy),
  so a replay and the live path cannot drift apart.
- Stops by itself at the end of the range. The end of a partition is its high watermark when the
  replay starts, taken from fetch responses (the embedded broker's ListOffsets "latest" is wrong,
  its fetch high watermark is right; measured).
- Time ranges select records by their own timestamps. The start offset comes from `offsets_for_times`
  only when the broker's answer checks out (the record before it is older than the range start);
  otherwise (the embedded broker indexes arrival time and answers historic times with 0) it scans
  from the earliest offset. Either way every record is filtered by timestamp, and the summary says
  which method ran.
- Outputs are keyed `id|model@version,...`: idempotent when run twice, and distinct per version set.
- A checkpoint file records, per partition, the next offset whose output (or dead letter) is on the
  broker; it is written only after delivery, so a resumed replay neither skips nor loses records.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition
from tqdm import tqdm

from operators.model_repository import ModelRepository
from operators.moderation import Moderator
from operators.policy import Check, Policy, PolicyError
from streams.config import Settings
from streams.cores import share_cores
from streams.kafka import PartitionsByKey, consumer, ensure_topics, fetch_high_watermarks, producer
from streams.moderation import ModerationPipeline
from streams.ordered import OrderedAcker, Output
from streams.schemas import DEAD_LETTERS, EVENTS, FRAMES, POSTS, SourceRecord, decode_headers

log = logging.getLogger(__name__)

SOURCES = (POSTS, FRAMES, EVENTS)


class ReplayError(ValueError):
    """A user-facing reason why the replay cannot run."""


# ------------------------------------------------------------------------------------ range bounds
@dataclass(frozen=True)
class Bound:
    """One end of a range: an ISO timestamp, an offset for every partition, per-partition offsets,
    or the topic's edge (None)."""

    timestamp_ms: int | None = None
    offsets: dict[int, int] | None = None
    every_partition: int | None = None

    def offset_for(self, partition: int) -> int | None:
        if self.every_partition is not None:
            return self.every_partition
        return (self.offsets or {}).get(partition)

    def describe(self) -> str:
        if self.timestamp_ms is not None:
            return datetime.fromtimestamp(self.timestamp_ms / 1000).astimezone().isoformat()
        if self.every_partition is not None:
            return f"offset {self.every_partition}"
        return ",".join(f"{p}:{o}" for p, o in sorted(self.offsets.items())) if self.offsets else "edge"


def parse_bound(text: str | None) -> Bound:
    """`None`/'earliest'/'latest' -> the edge; '1200' -> offset 1200 in every partition;
    '0:100,1:250' -> per partition; anything else must be an ISO-8601 timestamp with a timezone."""
    if text is None or text.strip().lower() in ("", "earliest", "latest"):
        return Bound()
    text = text.strip()
    if re.fullmatch(r"[0-9]+", text):  # not str.isdigit(): it takes '²', which int() refuses
        return Bound(every_partition=int(text))
    if re.fullmatch(r"[0-9]+:[0-9]+(,[0-9]+:[0-9]+)*", text):
        return Bound(offsets={int(p): int(o) for p, o in (pair.split(":") for pair in text.split(","))})
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ReplayError(f"{text!r} is neither an offset, PARTITION:OFFSET pairs, nor an ISO-8601 time") from exc
    if moment.tzinfo is None:
        raise ReplayError(f"{text!r} needs a timezone (e.g. 2026-11-25T10:00:00Z)")
    if not datetime(1970, 1, 1, tzinfo=UTC) <= moment < datetime(9999, 1, 1, tzinfo=UTC):
        raise ReplayError(f"{text!r} is outside Kafka's record timestamps (1970 to 9998)")  # describe() would fail
    return Bound(timestamp_ms=int(moment.timestamp() * 1000))


@dataclass
class PartitionRange:
    partition: int
    start: int  # first offset to read
    end: int  # high watermark at start: read offsets < end
    next: int  # resume point: every offset below it is done (checkpointed)

    @property
    def total(self) -> int:
        return max(0, self.end - self.start)


# ------------------------------------------------------------------------------------- checkpoint
@dataclass
class Checkpoint:
    path: Path
    run: dict[str, Any]
    next: dict[int, int] = field(default_factory=dict)
    done: bool = False

    @classmethod
    def load(cls, path: Path, run: dict[str, Any]) -> Checkpoint:
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("run") != run:
                raise ReplayError(f"checkpoint {path} belongs to a different replay; pass --restart or another --checkpoint")
            return cls(path, run, {int(p): o for p, o in data["next"].items()}, bool(data.get("done")))
        return cls(path, run)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"run": self.run, "next": self.next, "done": self.done}, indent=1))
        os.replace(tmp, self.path)  # atomic: a kill leaves the old or the new file, never half of one


class _Done:
    """What OrderedAcker acks for a replayed record: moves the partition's checkpoint past it."""

    __slots__ = ("checkpoint", "partition", "offset", "bar")

    def __init__(self, checkpoint: Checkpoint, partition: int, offset: int, bar: tqdm | None) -> None:
        self.checkpoint, self.partition, self.offset, self.bar = checkpoint, partition, offset, bar

    def ack(self) -> None:
        self.checkpoint.next[self.partition] = self.offset + 1
        if self.bar is not None:
            self.bar.update(1)


async def _outputs_of(handle_batch, sources: list[SourceRecord | None]) -> list[list[Output]]:
    """The outputs of each source, in order (none for a None), from one `handle_batch` call."""
    results = iter(await handle_batch([s for s in sources if s is not None]))
    return [[] if source is None else next(results) for source in sources]


# ----------------------------------------------------------------------------------------- replay
@dataclass
class ReplayOptions:
    source: str
    output: str
    start: Bound = field(default_factory=Bound)
    end: Bound = field(default_factory=Bound)
    policy: str | None = None
    models: tuple[str, ...] = ()  # NAME@VERSION pins replacing the policy's choice for NAME
    checkpoint: Path | None = None
    restart: bool = False
    batch_size: int = 64  # replays are throughput-bound: large batches
    progress: bool = True
    dead_letters: str | None = None
    checkpoint_interval_s: float = 1.0


def pinned_policy(policy: Policy, pins: tuple[str, ...]) -> Policy:
    """The policy with each check's model replaced by the pinned NAME@VERSION of the same name."""
    by_name = {}
    for pin in pins:
        name, sep, version = pin.partition("@")
        if not sep or not version:
            raise ReplayError(f"--model {pin!r}: expected NAME@VERSION")
        by_name[name] = pin
    used = {c.model.partition("@")[0] for c in policy.checks}
    unknown = set(by_name) - used
    if unknown:
        raise ReplayError(f"--model {', '.join(sorted(unknown))}: no check of the policy uses that model")
    checks = tuple(Check(**{**c.__dict__, "model": by_name.get(c.model.partition("@")[0], c.model)}) for c in policy.checks)
    return Policy(checks, policy.source, policy.raw)


async def _first_record_timestamp(kafka, tp: TopicPartition, offset: int) -> int | None:
    kafka.seek(tp, offset)
    batch = await kafka.getmany(tp, timeout_ms=2000, max_records=1)
    records = batch.get(tp, [])
    return records[0].timestamp if records and records[0].offset == offset else None


async def _start_offsets(kafka, tps: list[TopicPartition], bound: Bound, beginnings: dict[int, int],
                         ends: dict[int, int]) -> tuple[dict[int, int], str]:
    if bound.timestamp_ms is None:
        return {tp.partition: max(beginnings[tp.partition], bound.offset_for(tp.partition) or 0) for tp in tps}, "offsets"
    found = await kafka.offsets_for_times({tp: bound.timestamp_ms for tp in tps})
    starts, trusted = {}, True
    for tp in tps:
        hit = found.get(tp)
        offset = hit.offset if hit is not None else ends[tp.partition]
        if offset > beginnings[tp.partition]:  # the record just before must be older than the start
            before = await _first_record_timestamp(kafka, tp, offset - 1)
            trusted = trusted and before is not None and before < bound.timestamp_ms
        starts[tp.partition] = offset
    if trusted:
        return starts, "offsets_for_times (verified), then filtered by record timestamp"
    return dict(beginnings), "scan from the earliest offset, filtered by record timestamp (the broker's time index did not check out)"


async def plan_range(kafka, topic: str, options: ReplayOptions):
    """Assign every partition of `topic` and work out the range: (partitions, beginnings, starts,
    ends, method). Ends are the fetch high watermarks now, capped by an offset `--to`."""
    partitions = sorted(kafka.partitions_for_topic(topic) or [])
    if not partitions:
        raise ReplayError(f"topic {topic} does not exist or has no partitions")
    tps = [TopicPartition(topic, p) for p in partitions]
    kafka.assign(tps)
    beginnings = {tp.partition: o for tp, o in (await kafka.beginning_offsets(tps)).items()}
    ends = await fetch_high_watermarks(kafka, tps)
    ends = {p: min(e, options.end.offset_for(p)) if options.end.offset_for(p) is not None else e for p, e in ends.items()}
    starts, method = await _start_offsets(kafka, tps, options.start, beginnings, ends)
    return tps, beginnings, starts, ends, method


def run_id(options: ReplayOptions, settings: Settings) -> dict[str, Any]:
    return {"source": settings.topic(options.source), "output": options.output, "from": options.start.__dict__,
            "to": options.end.__dict__, "models": sorted(options.models), "policy": str(Path(options.policy or settings.policy).resolve())}


async def replay(settings: Settings, options: ReplayOptions) -> dict[str, Any]:
    if options.source not in SOURCES:
        raise ReplayError(f"--source must be one of {', '.join(SOURCES)}")
    if options.source == EVENTS:
        from streams.replay_events import replay_events

        return await replay_events(settings, options)
    policy = pinned_policy(Policy.load(options.policy or settings.policy), options.models)
    run = run_id(options, settings)
    digest = hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:12]
    ckpt_path = options.checkpoint or Path(settings.data_dir) / "replay" / f"{digest}.json"
    if options.restart and ckpt_path.exists():
        ckpt_path.unlink()
    checkpoint = Checkpoint.load(ckpt_path, run)

    share_cores(settings)
    moderator = Moderator(ModelRepository(settings.model_dir), policy, tuple(p for p in settings.providers.split(",") if p) or None,
                          settings.intra_op_threads or None)
    for stage in moderator.stages.values():
        stage.batcher.max_batch_size = max(stage.batcher.max_batch_size, options.batch_size)
        stage.batcher.max_wait_s = max(stage.batcher.max_wait_s, 0.02)
    pipeline = ModerationPipeline(settings, moderator, verdicts_topic=options.output,
                                  dead_letters_topic=options.dead_letters or settings.topic(DEAD_LETTERS),
                                  versioned_keys=True, extra={"replay": {"run": digest, "policy": policy.source}})
    handle = pipeline.handle_posts if options.source == POSTS else pipeline.handle_frames
    topic = settings.topic(options.source)

    await ensure_topics(settings)
    for name in {options.output, options.dead_letters or settings.topic(DEAD_LETTERS)}:
        await ensure_output_topic(settings, name)
    kafka = consumer(settings, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
                     max_poll_records=options.batch_size * 4)
    out = producer(settings)
    await kafka.start()
    await out.start()
    try:
        tps, beginnings, starts, ends, method = await plan_range(kafka, topic, options)
        ranges = {p: PartitionRange(p, starts[p], ends[p], max(starts[p], checkpoint.next.get(p, starts[p])))
                  for p in beginnings}
        summary = await _process(kafka, out, tps, ranges, options, checkpoint, handle, settings)
    finally:
        await kafka.stop()
        await out.stop()
        await pipeline.close()
    summary.update({"source": topic, "output": options.output, "time_range_method": method if options.start.timestamp_ms else "offsets",
                    "from": options.start.describe(), "to": options.end.describe(), "checkpoint": str(ckpt_path),
                    "models": moderator.model_info, "run": digest,
                    "partitions": {p: {"start": r.start, "end": r.end} for p, r in ranges.items()}})
    return summary


async def ensure_output_topic(settings: Settings, name: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, **settings.kafka_client_options())
    await admin.start()
    try:
        if name not in set(await admin.list_topics()):
            try:
                await admin.create_topics([NewTopic(name, settings.partitions, settings.replication_factor)])
            except TopicAlreadyExistsError:
                pass  # created meanwhile by someone else: fine
    finally:
        await admin.close()


async def _process(kafka, out, tps, ranges: dict[int, PartitionRange], options: ReplayOptions, checkpoint: Checkpoint,
                   handle, settings: Settings) -> dict[str, Any]:
    partition_of = PartitionsByKey(out.partitions_for)

    async def send(output: Output):
        partition = output.partition
        if partition is None and output.partition_key is not None:
            partition = await partition_of(output.topic, output.partition_key)
        return await out.send(output.topic, output.value, key=output.key, headers=output.headers, partition=partition)

    acker = OrderedAcker(send, max_in_flight=max(256, options.batch_size * 4), name=tps[0].topic)
    delivering = asyncio.ensure_future(acker.run())
    bars = {p: tqdm(total=r.total, initial=r.next - r.start, desc=f"partition {p}", unit="rec", position=i, leave=True,
                    file=sys.stderr, dynamic_ncols=True)
            for i, (p, r) in enumerate(sorted(ranges.items()))} if options.progress else {}
    selected = skipped = 0
    started = time.monotonic()
    saver = asyncio.ensure_future(_save_every(checkpoint, options.checkpoint_interval_s))
    try:
        active = []
        for tp in tps:
            r = ranges[tp.partition]
            checkpoint.next.setdefault(tp.partition, r.next)
            if r.next < r.end:
                kafka.seek(tp, r.next)
                active.append(tp)
        while active:
            batch = await kafka.getmany(*active, timeout_ms=500, max_records=options.batch_size * 4)
            for tp, records in batch.items():
                r = ranges[tp.partition]
                done: list[_Done] = []
                sources: list[SourceRecord | None] = []  # None: outside the time range, no outputs
                for rec in records:
                    if rec.offset >= r.end:
                        break
                    done.append(_Done(checkpoint, tp.partition, rec.offset, bars.get(tp.partition)))
                    if _in_time_range(rec.timestamp, options):
                        sources.append(SourceRecord(rec.topic, rec.partition, rec.offset, rec.timestamp, rec.key,
                                                    decode_headers(rec.headers), rec.value))
                        selected += 1
                    else:
                        sources.append(None)
                        skipped += 1
                if done:
                    await acker.add_batch(done, _outputs_of(handle, sources))
            active = [tp for tp in active if (await kafka.position(tp)) < ranges[tp.partition].end]
        while acker.in_flight:
            await asyncio.sleep(0.01)
        checkpoint.done = True
    finally:
        saver.cancel()
        delivering.cancel()
        checkpoint.save()
        for bar in bars.values():
            bar.close()
    elapsed = time.monotonic() - started
    return {"selected": selected, "outside_time_range": skipped, "seconds": round(elapsed, 3),
            "records_per_s": round((selected + skipped) / elapsed, 1) if elapsed > 0 else None, "complete": checkpoint.done}


def _in_time_range(timestamp_ms: int | None, options: ReplayOptions) -> bool:
    lo, hi = options.start.timestamp_ms, options.end.timestamp_ms
    if timestamp_ms is None:
        return lo is None and hi is None
    return (lo is None or timestamp_ms >= lo) and (hi is None or timestamp_ms < hi)


async def _save_every(checkpoint: Checkpoint, seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        checkpoint.save()


def run_replay(settings: Settings, options: ReplayOptions) -> dict[str, Any]:
    try:
        return asyncio.run(replay(settings, options))
    except PolicyError as exc:
        raise ReplayError(str(exc)) from exc
