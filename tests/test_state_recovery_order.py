"""Found by the soak (bench/soak.py): batches of one partition run concurrently, and the one that meets
the partition's recovery first is suspended while the state topic is read. A later batch must not apply
its records first: the earlier ones would then look like redeliveries and be skipped (1.7% of events
were lost that way after every start and takeover). Both changelog pipelines, with the recovery held
open by the test until the later batch is waiting."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import orjson

from operators.alerts import AlertRule
from streams.alerts import AlertPipeline
from streams.config import Settings
from streams.recommend import RecommendationPipeline, StateStore
from streams.schemas import EVENTS, VERDICTS, SourceRecord

SETTINGS = Settings(rec_every_n_events=10_000)


def event(offset: int, partition: int = 0) -> SourceRecord:
    user = f"u{offset % 3}" if partition == 0 else f"p{partition}u{offset % 3}"
    value = {"user_id": user, "item_id": f"i{offset}", "kind": "view", "ts": "2026-11-25T10:00:00+00:00"}
    return SourceRecord(EVENTS, partition, offset, None, user.encode(), {}, orjson.dumps(value))


def frame_verdict(offset: int, partition: int = 0) -> SourceRecord:
    stream = "cam" if partition == 0 else f"cam{partition}"
    value = {"kind": "frame", "id": f"{stream}:{offset}", "stream_id": stream, "frame_index": offset, "pts": offset / 5,
             "source": {"topic": "frames", "partition": partition, "offset": offset, "timestamp_ms": 1000 + offset},
             "violations": [{"check": "objects", "label": "missile", "score": 0.9}]}
    return SourceRecord(VERDICTS, partition, offset, None, stream.encode(), {}, orjson.dumps(value))


async def two_batches_during_recovery(pipeline, store, first: list[SourceRecord], second: list[SourceRecord]):
    """Run `first` and `second` as the agent does (two tasks, in consume order), the second arriving
    just as the partition's recovery (held by the test) ends, while the first is still resuming."""
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow_recover(partition: int):
        entered.set()
        await release.wait()
        return 0 if isinstance(store, StateStore) else []

    store._recover = slow_recover
    tasks = [asyncio.ensure_future(pipeline.handle_batch(first))]
    await entered.wait()
    release.set()
    await asyncio.sleep(0)  # the recovery ends; the next fetch's batch comes a loop turn later
    await asyncio.sleep(0)
    tasks.append(asyncio.ensure_future(pipeline.handle_batch(second)))
    return await asyncio.gather(*tasks)


def test_every_event_reaches_its_users_state_when_a_later_batch_arrives_during_recovery():
    async def scenario():
        store = StateStore(SETTINGS)
        retriever = SimpleNamespace(item_index=SimpleNamespace(rows=lambda ids: [0]), item_categories=[7])
        pipeline = RecommendationPipeline(SETTINGS, store, SimpleNamespace(retriever=retriever))
        outputs = await two_batches_during_recovery(pipeline, store, [event(o) for o in range(0, 30)],
                                                    [event(o) for o in range(30, 60)])
        return store, outputs

    store, outputs = asyncio.run(scenario())
    assert {user: store.states[user].n_events for user in ("u0", "u1", "u2")} == {"u0": 20, "u1": 20, "u2": 20}
    assert all(len(per_event) == 1 for batch in outputs for per_event in batch)  # every event got its snapshot


def test_every_frame_counts_for_its_streams_alerts_when_a_later_batch_arrives_during_recovery():
    async def scenario():
        pipeline = AlertPipeline(SETTINGS, AlertRule(k=1, n=1, m=1))
        pipeline.store.alerts_from[0] = 0
        await two_batches_during_recovery(pipeline, pipeline.store, [frame_verdict(o) for o in range(0, 5)],
                                          [frame_verdict(o) for o in range(5, 10)])
        return pipeline.store.streams["cam"]

    state = asyncio.run(scenario())
    assert (state.seq, state.offset) == (10, 9)  # all ten frames applied, in order


async def other_partition_during_recovery(pipeline, store, held: list[SourceRecord], other: list[SourceRecord]):
    """`held` (partition 0) meets its partition's recovery, which the test holds open; `other` (another
    partition) arrives next and must be applied meanwhile. Returns (`other`'s outputs, `held`'s)."""
    entered, release = asyncio.Event(), asyncio.Event()

    async def recover(partition: int):
        if partition == 0:
            entered.set()
            await release.wait()
        return 0 if isinstance(store, StateStore) else []

    store._recover = recover
    first = asyncio.ensure_future(pipeline.handle_batch(held))
    await entered.wait()
    second = asyncio.ensure_future(pipeline.handle_batch(other))
    # a single lock for all partitions would keep `second` waiting here until the release
    done, _ = await asyncio.wait({second}, timeout=30)
    assert done == {second} and not first.done(), "a partition's recovery held back another partition's batch"
    release.set()
    return second.result(), await first


def recommendation_pipeline(store: StateStore) -> RecommendationPipeline:
    retriever = SimpleNamespace(item_index=SimpleNamespace(rows=lambda ids: [0]), item_categories=[7])
    return RecommendationPipeline(SETTINGS, store, SimpleNamespace(retriever=retriever))


def test_a_partition_in_recovery_does_not_hold_back_the_events_of_another_partition():
    async def scenario():
        store = StateStore(SETTINGS)
        outputs = await other_partition_during_recovery(recommendation_pipeline(store), store,
                                                        [event(o) for o in range(0, 30)],
                                                        [event(o, partition=1) for o in range(0, 30)])
        return store, outputs

    store, (other, held) = asyncio.run(scenario())
    assert {user: store.states[user].n_events for user in ("u0", "u1", "u2", "p1u0", "p1u1", "p1u2")} == dict.fromkeys(
        ("u0", "u1", "u2", "p1u0", "p1u1", "p1u2"), 10)
    assert all(len(per_event) == 1 for batch in (other, held) for per_event in batch)


def test_a_partition_in_recovery_does_not_hold_back_the_frames_of_another_partition():
    async def scenario():
        pipeline = AlertPipeline(SETTINGS, AlertRule(k=1, n=1, m=1))
        pipeline.store.alerts_from.update({0: 0, 1: 0})
        await other_partition_during_recovery(pipeline, pipeline.store, [frame_verdict(o) for o in range(0, 5)],
                                              [frame_verdict(o, partition=1) for o in range(0, 5)])
        return pipeline.store.streams

    streams = asyncio.run(scenario())
    assert (streams["cam"].seq, streams["cam"].offset) == (5, 4)
    assert (streams["cam1"].seq, streams["cam1"].offset) == (5, 4)
