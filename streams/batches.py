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

Back-pressure is per agent. Each agent has an inbox of at most `max_batches` batches; when one is
full, the partitions of its topics are held (taken out of the fetched set, as a new set: Faust's fetch
filters what it returns by the set it started with, so changing that set in place dropped records
mid-fetch) and the fetch loop goes on serving every other agent: one slow agent (a model loading, a
camera's detector behind) no longer stops the worker's other topics, which a blocking hand-over did
(the soak's stall reports showed the fetch loop waiting on one agent's queue while the others'
partitions lagged). When the inbox is down to half, its partitions are fetched again. Should a fetch
still return a record of a held partition, the loop passes over it and, before fetching the partition
again, seeks back to the first one passed over: Faust's gap tracking would otherwise commit over them
as if they had been read.

A fetch that keeps coming back empty for a partition with lag raises the consumer's fetch wait. The
embedded broker (tansu, memory storage) answers a fetch when `fetch_max_wait_ms` is up with what it
found by then, and finding an offset takes it longer the longer the partition: in the hour's soak,
events partitions of ~180,000 records got empty answers at 50 ms forever (a fresh consumer at the
same offset: nothing at 50 ms, 844 records at 100 ms, 11,748 at 200 ms), which stalled events for
good at minute 47 of two runs. Apache Kafka answers as soon as it has data and never starves this way.
Only answers that arrive count, so a frozen broker (no answers at all) leaves the wait alone. The raised
wait stays raised: on tansu the search is slowest at a partition's end, where a caught-up consumer
reads, so lowering it again would starve the partition again; on Apache Kafka a fetch with data
returns at once (`fetch_min_bytes` 1), so the longer wait costs nothing while records flow.

Written against faust-streaming 0.15.3 (pinned in pyproject.toml): `_drain_messages` below follows that
version's loop line by line except for the hand-over.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from time import monotonic
from typing import Any

import faust
from aiokafka import TopicPartition as KafkaTopicPartition
from aiokafka.errors import IllegalStateError
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaFaustConsumer
from faust.types import TP

log = logging.getLogger(__name__)

STARVED_AFTER_S = 5.0  # lag, fetch answers, and no record for this long: the fetch wait is too short
MAX_FETCH_WAIT_MS = 1000


def fetch_states(kafka: Any) -> Any:
    """An aiokafka consumer's per-partition fetch state (position, high watermark, last answer), or None
    before it has an assignment."""
    subscription = kafka._fetcher._subscriptions.subscription if kafka is not None else None
    return subscription.assignment if subscription is not None else None


def starved_since(before: tuple[int, Any] | None, position: int, last_answer: Any, highwater: int | None,
                  prefetched: bool) -> bool:
    """Whether a partition starved since the last look (`before`: its position and last fetch answer then):
    the broker answered fetches (the answer's time changed), the partition has lag, yet its position did
    not move and nothing is prefetched for it. A frozen broker sends no answers, so it never counts; an
    agent that is merely slow leaves records prefetched or holds the partition, so neither does it."""
    return (before is not None and before[0] == position and last_answer != before[1]
            and (highwater or 0) > position and not prefetched)


class AgentInbox:
    """One agent's batches waiting to be processed, and when its partitions are held or fetched again."""

    def __init__(self, topics: Iterable[str], max_batches: int) -> None:
        self.topics = frozenset(topics)
        self.max_batches = max_batches
        self.queue: asyncio.Queue[list[Any]] = asyncio.Queue()  # bounded by holding, not by blocking

    def full(self) -> bool:
        return self.queue.qsize() >= self.max_batches

    def caught_up(self) -> bool:
        return self.queue.qsize() <= self.max_batches // 2

    def forget(self, revoked: set[TP]) -> None:
        """Drop queued records of revoked partitions: their new owner reads them from the commit."""
        queued = [self.queue.get_nowait() for _ in range(self.queue.qsize())]
        for batch in queued:
            if kept := [m for m in batch if m.tp not in revoked]:
                self.queue.put_nowait(kept)


class BatchingConsumer(AIOKafkaFaustConsumer):
    """Faust's aiokafka consumer whose fetch loop hands the records of registered topics over per fetch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inboxes: dict[str, AgentInbox] = {}  # topic -> the inbox of the agent that reads it
        self.held_partitions: set[TP] = set()
        self._passed_over_from: dict[TP, int] = {}  # a held partition's first record the loop passed over
        self._fetch_progress: dict[KafkaTopicPartition, tuple[int, int | None]] = {}  # position, last answer
        self._next_starvation_check = 0.0

    def verify_event_path(self, now: float, tp: TP) -> None:
        """Faust's livelock check (every 2.5 commit intervals) reads aiokafka's fetch position, which
        asserts when a partition has none yet (just assigned, or reset to the beginning): the
        AssertionError crashed a worker of the soak. Such a partition is not fetching yet, so there is
        nothing to check."""
        assignment = fetch_states(self._thread._consumer)
        state = assignment.state_value(KafkaTopicPartition(tp.topic, tp.partition)) if assignment else None
        if state is None or not state.has_valid_position:
            return None
        return super().verify_event_path(now, tp)

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        self.held_partitions -= revoked  # the new assignment starts from the committed offsets
        for tp in revoked:
            self._passed_over_from.pop(tp, None)
        await super().on_partitions_revoked(revoked)

    def _hold(self, inbox: AgentInbox) -> None:
        held = {tp for tp in self.assignment() if tp.topic in inbox.topics}
        self.held_partitions |= held
        # a new set: a fetch in progress keeps filtering by the set it started with
        self._active_partitions = set(self._get_active_partitions()) - held

    async def _release_caught_up(self) -> None:
        for inbox in {id(i): i for i in self.inboxes.values()}.values():
            held = {tp for tp in self.held_partitions if tp.topic in inbox.topics}
            if held and inbox.caught_up():
                await self._fetch_again(held)

    async def _fetch_again(self, tps: set[TP]) -> None:
        """Fetch held partitions again, from the first record passed over while they were held."""
        kafka = self._thread._ensure_consumer()
        for tp in tps:
            offset = self._passed_over_from.pop(tp, None)
            if offset is not None:
                try:  # aiokafka rejects Faust's TP type
                    await self._thread.call_thread(kafka.seek, KafkaTopicPartition(tp.topic, tp.partition), offset)
                except IllegalStateError:  # revoked meanwhile: its new owner starts from the commit
                    pass
        self.held_partitions -= tps
        self._active_partitions = set(self._get_active_partitions()) | (tps & self.assignment())

    def _raise_fetch_wait_if_starved(self) -> None:
        """Every STARVED_AFTER_S: a fetched partition with lag that got fetch answers but no record since
        the last look, with nothing prefetched for it, means the broker needs a longer wait (above)."""
        now = monotonic()
        if now < self._next_starvation_check or (assignment := fetch_states(self._thread._consumer)) is None:
            return
        self._next_starvation_check = now + STARVED_AFTER_S
        fetcher = self._thread._consumer._fetcher
        progress, starved = {}, []
        for tp in self._get_active_partitions():
            ktp = KafkaTopicPartition(tp.topic, tp.partition)
            state = assignment.state_value(ktp)
            if state is None or not state.has_valid_position:
                continue
            progress[ktp] = (state.position, state.timestamp)
            if starved_since(self._fetch_progress.get(ktp), state.position, state.timestamp, state.highwater,
                             prefetched=ktp in fetcher._records):
                starved.append(f"{tp.topic}[{tp.partition}]@{state.position} (lag {state.highwater - state.position})")
        self._fetch_progress = progress
        wait_ms = fetcher._fetch_max_wait_ms
        if starved and wait_ms < MAX_FETCH_WAIT_MS:
            fetcher._fetch_max_wait_ms = min(MAX_FETCH_WAIT_MS, max(2 * wait_ms, 20))
            log.warning("fetches answered without records for %.0f s on %s: fetch_max_wait_ms %d -> %d (the broker "
                        "needs longer to find these offsets)", STARVED_AFTER_S, ", ".join(starved), wait_ms,
                        fetcher._fetch_max_wait_ms)

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - exercised by every worker test
        inboxes = self.inboxes
        held = self.held_partitions
        passed_over_from = self._passed_over_from
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
                await self._release_caught_up()
                self._raise_fetch_wait_if_starved()
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
                        if tp in held:  # not read: sought back to when its agent catches up
                            passed_over_from.setdefault(tp, message.offset)
                            continue
                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is None or offset >= r_offset:
                            gap = offset - (r_offset or 0)
                            if gap > 1 and r_offset and acks_enabled_for(message.topic):
                                await self._add_gap(tp, r_offset + 1, offset)
                            if commit_every is not None and self._n_acked >= commit_every:
                                self._n_acked = 0
                                await self.commit()
                            if message.topic in inboxes:
                                batches.setdefault(message.topic, []).append(message)
                            else:
                                await self.wait_first(callback(message), self.suspend_flow.wait())
                            set_read_offset(tp, offset)
                    if self.suspend_flow.is_set():
                        batches.clear()  # a rebalance: unacked, and sought back to the commit
                    for topic, messages in batches.items():
                        inbox = inboxes[topic]
                        inbox.queue.put_nowait(messages)
                        if inbox.full():
                            self._hold(inbox)
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
    never acked here: ack each with `message.ack(app.consumer)` once its outputs are delivered. When
    `max_batches` wait here, these topics' partitions are held (back-pressure on this agent alone)."""
    consumer = app.consumer
    if not isinstance(consumer, BatchingConsumer):
        raise TypeError("the app's consumer is not a BatchingConsumer: call use_batching_consumer(app) first")
    inbox = AgentInbox(topics, max_batches)

    @app.on_partitions_revoked.connect
    async def _forget_revoked(sender: Any, revoked: set, **kwargs: Any) -> None:
        inbox.forget(revoked)

    for topic in topics:
        consumer.inboxes[topic] = inbox
    try:
        while True:
            batch = await inbox.queue.get()
            if not app.flow_control.is_active():  # taken during a rebalance: dropped, fetched again
                continue
            taken_at, inbound_time = monotonic(), app.monitor.stream_inbound_time
            for message in batch:  # unacked until delivered: a rebalance waits for it (Faust's wait_empty)
                if not message.tracked:
                    message.tracked = True
                    consumer.track_message(message)
                # what Faust's streams record per event: its livelock check warns when a partition with
                # lag has had none for stream_processing_timeout (it logged every partition, every 2.5
                # commit intervals, while this path left the time unset)
                inbound_time[message.tp] = taken_at
            yield batch
    finally:
        for topic in topics:
            consumer.inboxes.pop(topic, None)
