"""Records of the worker's input topics in batches, straight from the consumer Faust already holds.

Faust hands every fetched record to its streams one at a time: its fetch loop awaits a task pair per
record (`wait_first(callback(message), suspend_flow.wait())`) and its conductor decodes each into an
Event and queues it. Measured on 30,000 records with nothing else to do: 10,400-10,900 records/s
through a stream, 13,200/s taken from the channel queue, while a plain aiokafka loop reached ~42,000/s
(shared/notes/kafka-stack.md); with the toxicity model that per-record path held the worker at about a
third of the model's speed. So for the topics an agent registers here (`batches_of`), the fetch loop
hands each fetch's records over as one list instead; every other topic (tables, changelogs) goes
Faust's way unchanged.

What Faust's own path does per record and this one keeps: read-offset bookkeeping and gap tracking
(the same loop), periodic commits of acked offsets, tracking each message as unacked until the
OrderedAcker acks it (so a rebalance waits for records in flight), dropping fetches while the flow is
suspended (rebalancing), and forgetting queued records of revoked partitions. Acks go through
`Message.ack`, so Faust's commit logic is untouched.

Written against faust-streaming 0.15.3 (pinned in pyproject.toml): `_drain_messages` below follows that
version's loop line by line except for the hand-over.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import faust
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaFaustConsumer

BatchHandler = Callable[[list[Any]], Awaitable[None]]


class BatchingConsumer(AIOKafkaFaustConsumer):
    """Faust's aiokafka consumer whose fetch loop hands the records of registered topics over per fetch."""

    batch_handlers: dict[str, BatchHandler]

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - exercised by every worker test
        handlers = getattr(self, "batch_handlers", {})
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                self.diag.set_flag(CONSUMER_FETCHING)
                ait = getmany(timeout=1.0)
                await self.sleep(0)
                if not self.should_stop:
                    batches: dict[str, list[Any]] = {}
                    since_yield = 0
                    async for tp, message in ait:
                        since_yield += 1
                        if since_yield > 100:
                            await asyncio.sleep(0)
                            since_yield = 0
                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is None or offset >= r_offset:
                            gap = offset - (r_offset or 0)
                            if gap > 1 and r_offset and acks_enabled_for(message.topic):
                                await self._add_gap(tp, r_offset + 1, offset)
                            if commit_every is not None and self._n_acked >= commit_every:
                                self._n_acked = 0
                                await self.commit()
                            if message.topic in handlers:
                                batches.setdefault(message.topic, []).append(message)
                            else:
                                await self.wait_first(callback(message), self.suspend_flow.wait())
                            set_read_offset(tp, offset)
                    for topic, messages in batches.items():
                        # a rebalance (suspend_flow) abandons the hand-over: unacked, so fetched again
                        await self.wait_first(handlers[topic](messages), self.suspend_flow.wait())
                self.diag.unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise


def use_batching_consumer(app: faust.App) -> None:
    """Make the app's consumer a BatchingConsumer (call before the app's consumer is created)."""
    app.transport.Consumer = BatchingConsumer


async def batches_of(app: faust.App, topics: list[str], max_batches: int = 4) -> AsyncIterator[list[Any]]:
    """Every record of `topics` in batches (one per fetch and topic) of Faust messages, in fetch order,
    never acked here: ack each with `message.ack(app.consumer)` once its outputs are delivered. At most
    `max_batches` wait here; beyond that the fetch loop waits (back-pressure on consumption)."""
    consumer = app.consumer
    if not isinstance(consumer, BatchingConsumer):
        raise TypeError("the app's consumer is not a BatchingConsumer: call use_batching_consumer(app) first")
    queue: asyncio.Queue[list[Any]] = asyncio.Queue(max_batches)

    async def hand_over(messages: list[Any]) -> None:
        await queue.put(messages)

    @app.on_partitions_revoked.connect
    async def _forget_revoked(sender: Any, revoked: set, **kwargs: Any) -> None:
        kept = []
        while not queue.empty():
            batch = [m for m in queue.get_nowait() if m.tp not in revoked]
            if batch:
                kept.append(batch)
        for batch in kept:
            queue.put_nowait(batch)

    handlers = consumer.__dict__.setdefault("batch_handlers", {})
    for topic in topics:
        handlers[topic] = hand_over
    try:
        while True:
            batch = await queue.get()
            if not app.flow_control.is_active():  # taken during a rebalance: dropped, fetched again
                continue
            for message in batch:  # unacked until delivered: a rebalance waits for it (Faust's wait_empty)
                if not message.tracked:
                    message.tracked = True
                    consumer.track_message(message)
            yield batch
    finally:
        for topic in topics:
            handlers.pop(topic, None)
