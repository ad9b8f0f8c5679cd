"""What a replay selects: the records (`--from`/`--to` bounds, planned as offsets per partition of a
topic) and the model versions (`--model` pins).

- The end of a partition is its high watermark when the replay starts, taken from fetch responses
  (the embedded broker's ListOffsets "latest" is wrong, its fetch high watermark is right; measured),
  capped by an offset `--to`.
- Time ranges select records by their own timestamps. The start offset comes from `offsets_for_times`
  only when the broker's answer checks out (the record before it is older than the range start);
  otherwise (the embedded broker indexes arrival time and answers historic times with 0) it scans
  from the earliest offset. Either way every record is filtered by timestamp (`RangePlan.selects`),
  and the plan says which method ran.
- A pin NAME@VERSION replaces every model of that name; a pin no model of the replay uses is refused
  (a typo must not silently replay the serving version).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, TopicPartition

from operators.model_repository import ModelRef
from streams.kafka import fetch_high_watermarks


class ReplayError(ValueError):
    """A user-facing reason why the replay cannot run."""


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


@dataclass(frozen=True)
class RangePlan:
    """Per partition of one topic: where its log begins, the first offset of the range, and the end
    (read offsets < end); `method` says how the start offsets were found."""

    topic: str
    beginnings: dict[int, int]
    starts: dict[int, int]
    ends: dict[int, int]
    method: str
    start: Bound
    end: Bound

    @property
    def partitions(self) -> list[TopicPartition]:
        return [TopicPartition(self.topic, p) for p in sorted(self.beginnings)]

    def selects(self, partition: int, offset: int, timestamp_ms: int | None) -> bool:
        """Whether a record read from the topic belongs to the range (time bounds by its own timestamp)."""
        if offset < self.starts[partition]:
            return False
        lo, hi = self.start.timestamp_ms, self.end.timestamp_ms
        if timestamp_ms is None:
            return lo is None and hi is None
        return (lo is None or timestamp_ms >= lo) and (hi is None or timestamp_ms < hi)


async def plan_range(kafka: AIOKafkaConsumer, topic: str, start: Bound, end: Bound) -> RangePlan:
    """Assign every partition of `topic` to `kafka` (no group) and plan the range from `start` to `end`."""
    partitions = sorted(kafka.partitions_for_topic(topic) or [])
    if not partitions:
        raise ReplayError(f"topic {topic} does not exist or has no partitions")
    tps = [TopicPartition(topic, p) for p in partitions]
    kafka.assign(tps)
    beginnings = {tp.partition: o for tp, o in (await kafka.beginning_offsets(tps)).items()}
    ends = await fetch_high_watermarks(kafka, tps)
    ends = {p: min(e, end.offset_for(p)) if end.offset_for(p) is not None else e for p, e in ends.items()}
    starts, method = await _start_offsets(kafka, tps, start, beginnings, ends)
    return RangePlan(topic, beginnings, starts, ends, method, start, end)


async def _start_offsets(kafka: AIOKafkaConsumer, tps: list[TopicPartition], bound: Bound, beginnings: dict[int, int],
                         ends: dict[int, int]) -> tuple[dict[int, int], str]:
    if bound.timestamp_ms is None:
        return {tp.partition: max(beginnings[tp.partition], bound.offset_for(tp.partition) or 0) for tp in tps}, "offsets"
    found = await kafka.offsets_for_times({tp: bound.timestamp_ms for tp in tps})
    starts, trusted = {}, True
    for tp in tps:
        hit = found.get(tp)
        offset = hit.offset if hit is not None else ends[tp.partition]
        if offset > beginnings[tp.partition]:  # the record just before must be older than the start
            before = await _record_timestamp(kafka, tp, offset - 1)
            trusted = trusted and before is not None and before < bound.timestamp_ms
        starts[tp.partition] = offset
    if trusted:
        return starts, "offsets_for_times (verified), then filtered by record timestamp"
    return dict(beginnings), "scan from the earliest offset, filtered by record timestamp (the broker's time index did not check out)"


async def _record_timestamp(kafka: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> int | None:
    kafka.seek(tp, offset)
    batch = await kafka.getmany(tp, timeout_ms=2000, max_records=1)
    records = batch.get(tp, [])
    return records[0].timestamp if records and records[0].offset == offset else None


def pinned(refs: Iterable[str], pins: Iterable[str], unused: str) -> dict[str, ModelRef]:
    """Each of `refs` -> the pin of its model's name, or itself. A pin that is not NAME@VERSION, or that
    names no model of `refs`, is a ReplayError (`unused` says why such a pin cannot apply)."""
    by_name: dict[str, ModelRef] = {}
    for pin in map(ModelRef, pins):
        if pin.version is None:
            raise ReplayError(f"--model {pin!r}: expected NAME@VERSION")
        by_name[pin.name] = pin
    used = [ModelRef(ref) for ref in refs]
    unknown = sorted(set(by_name) - {ref.name for ref in used})
    if unknown:
        raise ReplayError(f"--model {', '.join(unknown)}: {unused}")
    return {ref: by_name.get(ref.name, ref) for ref in used}
