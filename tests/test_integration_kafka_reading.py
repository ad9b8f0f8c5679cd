"""streams/kafka.py against the embedded broker: the range reader (what the replays, the replay report
and the changelog recoveries read; the oracle is the producer's own delivery metadata), and topics
created by name (a replay's output) with the limits of the workers' own topics."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from streams.kafka import (
    consumer,
    ensure_named_topics,
    ensure_topics,
    producer,
    read_range,
    read_to_high_watermark,
)
from streams.schemas import VERDICTS

pytestmark = pytest.mark.integration


async def produce(settings, topic: str, n: int) -> dict[tuple[int, int], bytes]:
    """`n` keyed records on `topic`; (partition, offset) -> value, as the broker acknowledged them."""
    await ensure_named_topics(settings, [topic])
    kafka = producer(settings)
    await kafka.start()
    try:
        values = [f"record-{i}".encode() for i in range(n)]
        futures = [await kafka.send(topic, v, key=f"key-{i % 7}".encode()) for i, v in enumerate(values)]
        acks = await asyncio.gather(*futures)
        return {(m.partition, m.offset): v for m, v in zip(acks, values, strict=True)}
    finally:
        await kafka.stop()


async def read_all(settings, topic: str, **options) -> list[tuple[int, int, bytes]]:
    async with aclosing(read_to_high_watermark(settings, topic, **options)) as records:
        return [(r.partition, r.offset, r.value) async for r in records]


def test_every_record_up_to_the_high_watermark_once_in_offset_order(settings, run):
    topic = settings.topic("reading")
    sent = run(produce(settings, topic, 300))
    assert {p for p, _ in sent} == {0, 1}  # both partitions hold records

    read = run(read_all(settings, topic))

    assert {(p, o): v for p, o, v in read} == sent and len(read) == len(sent)
    for partition in (0, 1):
        offsets = [o for p, o, _ in read if p == partition]
        assert offsets == sorted(offsets)


def test_one_partition_from_an_offset(settings, run):
    topic = settings.topic("reading")
    sent = run(produce(settings, topic, 200))

    read = run(read_all(settings, topic, partitions=[1], from_offset=40))

    assert {(p, o): v for p, o, v in read} == {(p, o): v for (p, o), v in sent.items() if p == 1 and o >= 40}


def test_a_topic_that_does_not_exist_has_no_records(settings, run):
    assert run(read_all(settings, settings.topic("never-created"))) == []


def test_a_range_ends_at_its_stop_offset_though_more_records_follow(settings, run):
    topic = settings.topic("reading")
    sent = run(produce(settings, topic, 200))
    assert max(o for p, o in sent if p == 0) > 30

    async def read_offsets_10_to_30_of_partition_0() -> list[tuple[int, int]]:
        kafka = consumer(settings, group_id=None, enable_auto_commit=False, max_poll_records=7)
        await kafka.start()
        try:
            tp = TopicPartition(topic, 0)
            kafka.assign([tp])
            async with aclosing(read_range(kafka, {tp: range(10, 30)}, max_records=7)) as fetches:
                return [(t.partition, r.offset) async for t, records in fetches for r in records]
        finally:
            await kafka.stop()

    assert run(read_offsets_10_to_30_of_partition_0()) == [(0, o) for o in range(10, 30)]


def test_a_topic_created_by_name_has_the_message_size_limit_of_the_workers_topics(settings, run):
    output = settings.topic("replay-output")

    async def limits() -> dict[str, str]:
        await ensure_topics(settings, (VERDICTS,))
        await ensure_named_topics(settings, [output])
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
        await admin.start()
        try:
            topics = [settings.topic(VERDICTS), output]
            (response,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
            return {name: dict((entry[0], entry[1]) for entry in entries)["max.message.bytes"]
                    for _, _, _, name, entries in response.resources}
        finally:
            await admin.close()

    found = run(limits())
    assert found[output] == found[settings.topic(VERDICTS)]
    assert int(found[output]) > settings.max_message_bytes  # room for the largest accepted value and its headers
