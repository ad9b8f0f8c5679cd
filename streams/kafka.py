"""Kafka clients configured from Settings (bootstrap, security, size limits), topic creation, and
reading a range of a topic up to its high watermark (no consumer group: nobody's offsets move)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.partitioner import murmur2

from streams.config import Settings
from streams.schemas import ALL_TOPICS, CHANGELOG_TOPICS

log = logging.getLogger(__name__)

# Room for headers and record overhead on top of the largest value we accept.
_REQUEST_HEADROOM = 64 * 1024


def producer(settings: Settings, **overrides) -> AIOKafkaProducer:
    # acks=all and no idempotence: the embedded broker lacks InitProducerId (shared/notes/kafka-stack.md).
    return AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        acks="all",
        max_request_size=settings.max_message_bytes + _REQUEST_HEADROOM,
        linger_ms=5,
        max_batch_size=settings.producer_batch_bytes,
        **settings.kafka_client_options(),
        **overrides,
    )


def consumer(settings: Settings, *topics: str, **overrides) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=settings.bootstrap_servers,
        max_partition_fetch_bytes=settings.max_message_bytes + _REQUEST_HEADROOM,
        fetch_max_bytes=max(52428800, settings.max_message_bytes + _REQUEST_HEADROOM),
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        **settings.kafka_client_options(),
        **overrides,
    )


async def ensure_topics(settings: Settings, names: tuple[str, ...] = ALL_TOPICS) -> list[str]:
    """Create the (prefixed) topics that do not exist yet; returns the ones created."""
    return await ensure_named_topics(settings, [settings.topic(n) for n in names])


async def ensure_named_topics(settings: Settings, topics: list[str]) -> list[str]:
    """Create those of `topics` (full names, e.g. a replay's --output) that do not exist yet, with the
    message size limit the clients use; returns the ones created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, **settings.kafka_client_options())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = list(dict.fromkeys(t for t in topics if t not in existing))
        if not wanted:
            return []
        compacted = {settings.topic(name) for name in CHANGELOG_TOPICS}
        new = [NewTopic(name, num_partitions=settings.partitions, replication_factor=settings.replication_factor,
                        topic_configs={"max.message.bytes": str(settings.max_message_bytes + _REQUEST_HEADROOM),
                                       **({"cleanup.policy": "compact"} if name in compacted else {})})
               for name in wanted]
        try:
            await admin.create_topics(new)
        except TopicAlreadyExistsError:
            pass  # another process created them between list and create: what we wanted
        log.info("created topics %s", wanted)
        return wanted
    finally:
        await admin.close()


async def fetch_high_watermarks(kafka, tps: list[TopicPartition], timeout_s: float = 15.0) -> dict[int, int]:
    """Each partition's high watermark from a fetch response. The embedded broker's ListOffsets
    ("latest", used by end_offsets) is wrong; its fetch responses carry the right high watermark
    (measured: end_offsets said 1 for 500 records, the fetch said 500). Leaves positions anywhere."""
    beginnings = await kafka.beginning_offsets(tps)
    for tp in tps:
        kafka.seek(tp, beginnings[tp])
    deadline = time.monotonic() + timeout_s
    while any(kafka.highwater(tp) is None for tp in tps) and time.monotonic() < deadline:
        await kafka.getmany(*[tp for tp in tps if kafka.highwater(tp) is None], timeout_ms=200, max_records=1)
    missing = [tp for tp in tps if kafka.highwater(tp) is None]
    if missing:
        raise RuntimeError(f"no fetch response for partitions {[tp.partition for tp in missing]} within {timeout_s:.0f}s")
    return {tp.partition: kafka.highwater(tp) for tp in tps}


async def read_range(kafka: AIOKafkaConsumer, offsets: dict[TopicPartition, range],
                     max_records: int | None = None) -> AsyncIterator[tuple[TopicPartition, list[ConsumerRecord]]]:
    """The records of each assigned partition whose offsets lie in its range, as (partition, records)
    per fetch, in offset order; ends once every partition has reached the end of its range."""
    active = []
    for tp, wanted in offsets.items():
        if wanted.start < wanted.stop:
            kafka.seek(tp, wanted.start)
            active.append(tp)
    while active:
        for tp, records in (await kafka.getmany(*active, timeout_ms=500, max_records=max_records)).items():
            inside = [r for r in records if r.offset < offsets[tp].stop]
            if inside:
                yield tp, inside
        active = [tp for tp in active if await kafka.position(tp) < offsets[tp].stop]


async def read_to_high_watermark(settings: Settings, topic: str, partitions: list[int] | None = None,
                                 timeout_s: float = 15.0, from_offset: int | None = None) -> AsyncIterator[ConsumerRecord]:
    """Every record of `topic` (or of its `partitions`) from the beginning (or `from_offset`) up to the
    high watermark at the call, read by a consumer of its own; a topic that does not exist has none."""
    kafka = consumer(settings, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest")
    await kafka.start()
    try:
        if partitions is None:
            if not kafka.partitions_for_topic(topic):
                await kafka._client.force_metadata_update()  # created since this consumer started
            partitions = sorted(kafka.partitions_for_topic(topic) or [])
        tps = [TopicPartition(topic, p) for p in partitions]
        if not tps:
            return
        kafka.assign(tps)
        ends = await fetch_high_watermarks(kafka, tps, timeout_s)
        beginnings = await kafka.beginning_offsets(tps)
        starts = {tp: max(beginnings[tp], from_offset or 0) for tp in tps}
        async with aclosing(read_range(kafka, {tp: range(starts[tp], ends[tp.partition]) for tp in tps})) as fetches:
            async for _, records in fetches:
                for record in records:
                    yield record
    finally:
        await kafka.stop()


class PartitionsByKey:
    """The partition for `Output.partition_key` on a topic: the Java client's default rule (murmur2 of the
    bytes; librdkafka's `murmur2_random`), over the topic's partitions as the producer's metadata lists
    them (`partitions_for`, awaited once per topic)."""

    def __init__(self, partitions_for) -> None:
        self._partitions_for = partitions_for
        self._counts: dict[str, int] = {}

    async def __call__(self, topic: str, key: bytes) -> int:
        count = self._counts.get(topic)
        if count is None:
            count = self._counts[topic] = len(await self._partitions_for(topic))
        return (murmur2(key) & 0x7FFFFFFF) % count
