"""`inferstream tail`: print a topic's records as JSON lines (reads without a consumer group)."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from typing import IO, Any

from aiokafka import TopicPartition

from streams.config import Settings
from streams.kafka import consumer


def record_as_json(msg: Any, with_meta: bool) -> dict[str, Any]:
    """A JSON value as itself; anything else (frames) as a description with its size and headers."""
    headers = {k: v.decode("utf-8", "replace") for k, v in (msg.headers or [])}
    try:
        value: Any = json.loads(msg.value) if msg.value is not None else None
        is_json = True
    except (UnicodeDecodeError, json.JSONDecodeError):
        value, is_json = {"value_bytes": len(msg.value), "headers": headers}, False
    if not with_meta and is_json:
        return value
    key = msg.key.decode("utf-8", "replace") if msg.key is not None else None
    return {"topic": msg.topic, "partition": msg.partition, "offset": msg.offset, "timestamp_ms": msg.timestamp,
            "key": key, "headers": headers, "value": value if is_json else {
                "value_bytes": len(msg.value), "value_b64_prefix": base64.b64encode(msg.value[:48]).decode()}}


async def tail(settings: Settings, topic: str, count: int | None = None, timeout_s: float | None = None,
               from_beginning: bool = True, with_meta: bool = False, out: IO[str] = sys.stdout) -> int:
    """Print up to `count` records (all partitions, from the beginning by default) until `timeout_s`
    has passed. Returns how many were printed."""
    name = topic if topic.startswith(settings.topic_prefix) else settings.topic(topic)
    kafka = consumer(settings, enable_auto_commit=False, group_id=None,
                     auto_offset_reset="earliest" if from_beginning else "latest")
    await kafka.start()
    printed = 0
    deadline = time.monotonic() + timeout_s if timeout_s is not None else None
    try:
        partitions = await _wait_for_partitions(kafka, name, deadline)
        kafka.assign([TopicPartition(name, p) for p in partitions])
        while count is None or printed < count:
            wait = 1.0 if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                break
            batch = await kafka.getmany(timeout_ms=int(min(wait, 1.0) * 1000), max_records=500)
            messages = [m for msgs in batch.values() for m in msgs]
            if count is not None:
                messages = messages[: count - printed]
            for msg in messages:
                out.write(json.dumps(record_as_json(msg, with_meta), ensure_ascii=False) + "\n")
            printed += len(messages)
            out.flush()
    finally:
        await kafka.stop()
    return printed


async def _wait_for_partitions(kafka, name: str, deadline: float | None) -> list[int]:
    while True:
        partitions = kafka.partitions_for_topic(name)
        if partitions:
            return sorted(partitions)
        if deadline is not None and time.monotonic() >= deadline:
            return []
        await kafka._client.force_metadata_update()  # the topic may be created after we start
        await asyncio.sleep(0.3)


def run_tail(settings: Settings, topic: str, **kwargs: Any) -> int:
    return asyncio.run(tail(settings, topic, **kwargs))
