"""Kafka clients configured from Settings (bootstrap, security, size limits) and topic creation."""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from streams.config import Settings
from streams.schemas import ALL_TOPICS

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
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, **settings.kafka_client_options())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [settings.topic(n) for n in names if settings.topic(n) not in existing]
        if not wanted:
            return []
        new = [NewTopic(name, num_partitions=settings.partitions, replication_factor=settings.replication_factor,
                        topic_configs={"max.message.bytes": str(settings.max_message_bytes + _REQUEST_HEADROOM)})
               for name in wanted]
        try:
            await admin.create_topics(new)
        except TopicAlreadyExistsError:
            pass  # another process created them between list and create: what we wanted
        log.info("created topics %s", wanted)
        return wanted
    finally:
        await admin.close()
