"""Producing test frames and collecting result topics through the real broker."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable

import numpy as np
from aiokafka import TopicPartition

from operators.images import encode_image
from streams import contracts
from streams.config import Settings
from streams.kafka import consumer, ensure_topics, producer
from streams.schemas import ALERT_STATE, USER_STATE, FrameMeta


def frame_image(i: int, size: int = 24) -> np.ndarray:
    """A deterministic frame whose pixels stay below 250 (never 'white' for the poisoned model)."""
    rng = np.random.default_rng(i)
    base = rng.integers(0, 200, size=3)
    noise = rng.integers(0, 40, size=(size, size, 3))
    return (base + noise).astype(np.uint8)


async def send_records(settings: Settings, topic: str, records: Iterable[tuple[bytes | None, bytes, list | None]]) -> int:
    await ensure_topics(settings)
    kafka = producer(settings)
    await kafka.start()
    try:
        futures = [await kafka.send(settings.topic(topic), value, key=key, headers=headers) for key, value, headers in records]
        await asyncio.gather(*futures)
        return len(futures)
    finally:
        await kafka.stop()


def frame_record(stream_id: str, index: int, rgb: np.ndarray, encoding: str = "png"):
    h, w = rgb.shape[:2]
    meta = FrameMeta(stream_id, index, index / 10, encoding, w, h)
    return stream_id.encode(), encode_image(rgb, encoding), meta.headers()


async def read_all(settings: Settings, topic: str, until: Callable[[list[dict]], bool], timeout_s: float) -> list[dict]:
    """Read `topic` from the beginning (no group) until `until(records)` holds or the timeout passes.
    Each record is {"key", "value" (parsed JSON), "partition", "offset"}."""
    name = settings.topic(topic)
    kafka = consumer(settings, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest")
    await kafka.start()
    records: list[dict] = []
    try:
        await ensure_topics(settings)
        deadline = time.monotonic() + timeout_s
        while not kafka.partitions_for_topic(name) and time.monotonic() < deadline:
            await kafka._client.force_metadata_update()
            await asyncio.sleep(0.2)
        kafka.assign([TopicPartition(name, p) for p in sorted(kafka.partitions_for_topic(name) or [])])
        while time.monotonic() < deadline and not until(records):
            batch = await kafka.getmany(timeout_ms=300)
            for messages in batch.values():
                for m in messages:
                    value = json.loads(m.value)
                    meets_contract(topic, value)
                    records.append({"key": m.key.decode() if m.key else None, "value": value,
                                    "partition": m.partition, "offset": m.offset})
    finally:
        await kafka.stop()
    return records


def meets_contract(topic: str, value) -> None:
    """Every record read back is checked against its contract (streams/contracts): verdicts, dead
    letters and recommendation lists by their `schema` field, user-state snapshots by topic."""
    name = {USER_STATE: "user_state", ALERT_STATE: "alert_state"}.get(topic)
    if isinstance(value, dict):
        name = contracts.BY_SCHEMA_FIELD.get(value.get("schema"), name)
    if name is not None:
        errors = sorted(contracts.validator(name).iter_errors(value), key=lambda e: list(e.absolute_path))
        assert not errors, f"a {topic} record breaks {name}.json: " + "; ".join(
            f"{'/'.join(map(str, e.absolute_path)) or '.'}: {e.message[:200]}" for e in errors[:5])


def collect(settings: Settings, topic: str, until: Callable[[list[dict]], bool], timeout_s: float = 60) -> list[dict]:
    return asyncio.run(read_all(settings, topic, until, timeout_s))


def ids(records: list[dict]) -> set[str]:
    return {r["value"]["id"] for r in records}
