"""User events -> per-user state -> recommendation lists.

State design (why not a Faust Table): Faust recovers a table's changelog up to the end offset that
ListOffsets reports, and the embedded broker's answer is wrong (rebuilt tables lost up to 205 of
20,000 updates: shared/notes/kafka-stack.md); Faust also refuses table writes from batched code, and
re-applies a redelivered event twice under at-least-once. So the agent keeps state itself, with the
same changelog idea done so that it is exact on both brokers:

- `user-state` is the changelog: one snapshot per changed user, written to the same partition number
  as the user's events partition, before the event is acked (OrderedAcker).
- Recovery: before the first event of an events partition is processed, the state partition is read
  from the beginning to its high watermark *from fetch responses* (right on tansu and on Kafka);
  the last snapshot of each user wins. A revoked partition is forgotten and recovered again when it
  comes back.
- Idempotence: a state remembers the offset of the last event it applied, so a redelivered event is
  recognised and skipped (operators.user_state).

Recommendations: a state change that matters (a click or purchase, or every N events) asks the
Recommender for the user's list; requests for one user within `rec_debounce_s` share one list.
The Recommender batches all due users (lists computed by operators/recommend_lists.py: one
retrieval pass over the item matrix, one ONNX call for all (user, candidate) pairs), then publishes
each list (keyed by user) and releases the events that asked for it, which are acked only after that.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from datetime import UTC, datetime, timedelta
from typing import Any

from operators.errors import BadInput
from operators.ranking import CandidateRanker
from operators.recommend_lists import ListRecommender
from operators.retrieval import CFRetriever
from operators.user_state import UserState
from streams import metrics
from streams.config import Settings
from streams.kafka import read_to_high_watermark
from streams.logs import record_fields
from streams.ordered import Output
from streams.schemas import (
    DEAD_LETTERS,
    EVENTS,
    RECOMMENDATIONS,
    USER_STATE,
    SourceRecord,
    dead_letter,
    dumps,
    parse_event,
    parse_recommendation_request,
)
from streams.turns import PartitionTurns

log = logging.getLogger(__name__)


class StateStore:
    """Per-user state of the events partitions this worker holds, backed by the user-state topic."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.topic(USER_STATE)
        self.states: dict[str, UserState] = {}
        self.partition_of: dict[str, int] = {}
        self.recovered: set[int] = set()
        self._locks: dict[int, asyncio.Lock] = {}

    async def ensure(self, partition: int) -> None:
        """Recover `partition`'s states once, before any of its events is applied."""
        if partition in self.recovered:
            return
        lock = self._locks.setdefault(partition, asyncio.Lock())
        async with lock:
            if partition in self.recovered:
                return
            started = time.monotonic()
            n = await self._recover(partition)
            self.recovered.add(partition)
            log.info("recovered %d user states of partition %d in %.2fs", n, partition, time.monotonic() - started)

    async def _recover(self, partition: int) -> int:
        """Each user's last snapshot in the partition. Only the last one of a key is parsed: a changelog
        holds one snapshot per event until compaction (never, on tansu), and parsing them all took a
        takeover 85 s for 1,500 users after 50 minutes of the soak, while that partition's events waited."""
        latest: dict[bytes | None, bytes] = {}
        async with aclosing(read_to_high_watermark(self.settings, self.topic, [partition])) as snapshots:
            async for r in snapshots:
                if r.value:
                    latest[r.key] = r.value  # keyed by user id; a later snapshot replaces an earlier one
        users = 0
        for value in latest.values():
            state = UserState.from_dict(json.loads(value))
            users += state.user_id not in self.states
            self.states[state.user_id] = state
            self.partition_of[state.user_id] = partition
        return users

    def forget(self, partitions: set[int]) -> None:
        """Partitions revoked: drop their states; recovered again if they come back."""
        self.recovered -= partitions
        for user in [u for u, p in self.partition_of.items() if p in partitions]:
            self.states.pop(user, None)
            self.partition_of.pop(user, None)

    def get(self, user_id: str, partition: int) -> UserState:
        state = self.states.get(user_id)
        if state is None:
            state = self.states[user_id] = UserState(user_id)
            self.partition_of[user_id] = partition
        return state

    def snapshot(self, state: UserState) -> Output:
        return Output(self.topic, state.user_id.encode(), dumps(state.to_dict()), partition=self.partition_of[state.user_id])


class Recommender:
    """Debounced, batched retrieval -> ranking -> published lists."""

    def __init__(self, settings: Settings, retriever: CFRetriever, ranker: CandidateRanker | None, send) -> None:
        self.settings = settings
        self.retriever = retriever  # the pipeline looks events' items up in its catalogue
        self.lists = ListRecommender(retriever, ranker)
        self.send = send
        self.topic = settings.topic(RECOMMENDATIONS)
        self._pending: dict[str, tuple[float, asyncio.Future, UserState, dict[str, Any]]] = {}
        self._wakeup = asyncio.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="recommend")

    @property
    def models(self) -> dict[str, str]:
        return self.lists.models

    def request(self, state: UserState, reason: str, k: int | None = None, request_id: str | None = None,
                immediate: bool = False) -> asyncio.Future:
        """The future of `state.user_id`'s next list; requests within the debounce window share it."""
        pending = self._pending.get(state.user_id)
        if pending is not None:
            if immediate:  # an explicit request does not wait for the debounce window
                self._pending[state.user_id] = (time.monotonic(), pending[1], state, {**pending[3], "request_id": request_id})
                self._wakeup.set()
            return pending[1]
        due = time.monotonic() + (0 if immediate else self.settings.rec_debounce_s)
        future = asyncio.get_running_loop().create_future()
        self._pending[state.user_id] = (due, future, state, {"reason": reason, "k": k or self.settings.rec_k,
                                                             "request_id": request_id})
        self._wakeup.set()
        return future

    async def run(self) -> None:
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            now = time.monotonic()
            next_due = min(due for due, *_ in self._pending.values())
            if next_due > now:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), next_due - now)
                except TimeoutError:
                    pass  # the earliest list is due
                continue
            due_users = [u for u, (due, *_) in self._pending.items() if due <= now]
            batch = [(u, *self._pending.pop(u)[1:]) for u in due_users]
            try:
                await self._publish(batch)
            except Exception as exc:  # the events waiting for these lists fail into dead letters
                for _, future, _, _ in batch:
                    if not future.done():
                        future.set_exception(exc)

    async def _publish(self, batch) -> None:
        states = [state for _, _, state, _ in batch]
        infos = [info for *_, info in batch]
        started = time.perf_counter()
        lists = await asyncio.get_running_loop().run_in_executor(self._pool, self.lists.lists, states, [i["k"] for i in infos])
        metrics.INFERENCE.labels("recommender", "1").observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.labels("recommender", "1").observe(len(batch))
        deliveries = []
        for state, info, made in zip(states, infos, lists, strict=True):
            record = made.record(reason=info["reason"], request_id=info["request_id"], generated_at=datetime.now(UTC).isoformat())
            deliveries.append(await self.send(Output(self.topic, state.user_id.encode(), dumps(record))))
            state.events_since_recommendation = 0
        await asyncio.gather(*deliveries)
        metrics.RECORDS_PRODUCED.labels(self.topic).inc(len(batch))
        for (_, future, _, _), made in zip(batch, lists, strict=True):
            if not future.done():
                future.set_result(made)


class RecommendationPipeline:
    def __init__(self, settings: Settings, store: StateStore, recommender: Recommender) -> None:
        self.settings = settings
        self.store = store
        self.recommender = recommender
        self.dead_letters_topic = settings.topic(DEAD_LETTERS)
        self.trigger_kinds = {k.strip() for k in settings.rec_on_kinds.split(",") if k.strip()}
        self._turns = PartitionTurns()

    async def handle_batch(self, sources: list[SourceRecord]) -> list[list[Output]]:
        """Every record's state change applied in consume order within its partition, batch after batch
        (streams/turns.py: a partition being recovered holds back only its own later batches), then the
        lists they ask for awaited together (an event may wait for its debounced list)."""
        finishing = await self._turns.apply_in_turn(sources, self._apply)
        return list(await asyncio.gather(*finishing))

    async def _apply(self, source: SourceRecord) -> Awaitable[list[Output]]:
        """Validate and apply `source` now; the awaitable of its outputs. Never raises: bad records
        become dead letters."""
        try:
            if source.topic == self.settings.topic(EVENTS):
                return self._guarded(source, await self._event(source))
            return self._guarded(source, await self._request(source))
        except BadInput as exc:
            return _ready([self._dead_letter(source, exc.reason, exc.detail)])
        except Exception as exc:
            return _ready([self._internal_error(source, exc)])

    async def _guarded(self, source: SourceRecord, outputs: Awaitable[list[Output]]) -> list[Output]:
        try:
            return await outputs
        except Exception as exc:
            return [self._internal_error(source, exc)]

    async def _event(self, source: SourceRecord) -> Awaitable[list[Output]]:
        event = parse_event(source.value)
        ts = datetime.fromisoformat(event["ts"])
        if ts > datetime.now(UTC) + timedelta(seconds=self.settings.max_event_future_s):
            raise BadInput("timestamp_in_future", f"ts {event['ts']} is more than {self.settings.max_event_future_s:.0f}s ahead")
        row = self.recommender.retriever.item_index.rows([event["item_id"]])[0]
        if row < 0:  # counted and skipped: not the producer's fault that the catalogue is older
            metrics.UNKNOWN_ITEMS.labels(source.topic).inc()
            return _ready([])
        await self.store.ensure(source.partition)
        state = self.store.get(event["user_id"], source.partition)
        category = str(int(self.recommender.retriever.item_categories[row]))
        if not state.apply(event, source.offset, category):
            return _ready([])  # a redelivery of an event this state already holds
        reason = None
        if event["kind"] in self.trigger_kinds:
            reason = f"event:{event['kind']}"
        elif state.events_since_recommendation >= self.settings.rec_every_n_events:
            reason = f"every {self.settings.rec_every_n_events} events"
        return self._snapshot_after(state, reason)

    async def _snapshot_after(self, state, reason: str | None) -> list[Output]:
        if reason is not None:
            await self.recommender.request(state, reason)
        return [self.store.snapshot(state)]

    async def _request(self, source: SourceRecord) -> Awaitable[list[Output]]:
        request = parse_recommendation_request(source.value)
        await self.store.ensure(source.partition)
        state = self.store.get(request["user_id"], source.partition)
        return self._list_for(state, request)

    async def _list_for(self, state, request: dict[str, Any]) -> list[Output]:
        await self.recommender.request(state, "request", request["k"], request["request_id"], immediate=True)
        return []

    def _internal_error(self, source: SourceRecord, exc: Exception) -> Output:
        log.exception("recommendation failed: %s", exc, extra=record_fields(source, stage="recommend"))
        return self._dead_letter(source, "internal_error", f"{type(exc).__name__}: {exc}")

    def _dead_letter(self, source: SourceRecord, reason: str, detail: str) -> Output:
        metrics.DEAD_LETTERS.labels(source.topic, reason).inc()
        log.warning("dead letter: %s: %s", reason, detail, extra=record_fields(source, reason=reason, stage="recommend"))
        return Output(self.dead_letters_topic, source.key, dumps(dead_letter(source, reason, detail, "recommend")))


async def _ready(outputs: list[Output]) -> list[Output]:
    return outputs
