"""streams/turns.py: within a partition, batches apply in the order they started, one record at a time;
partitions do not wait for each other; a failure or a cancellation never blocks the next batch."""

from __future__ import annotations

import asyncio

import pytest

from streams.schemas import EVENTS, SourceRecord
from streams.turns import PartitionTurns


def record(partition: int, offset: int) -> SourceRecord:
    return SourceRecord(EVENTS, partition, offset, None, None, {}, b"{}")


def test_a_later_batch_of_a_partition_waits_for_the_earlier_one_and_results_keep_source_order():
    async def scenario():
        turns, applied, gate = PartitionTurns(), [], asyncio.Event()

        async def apply(source: SourceRecord):
            if source.offset == 0:
                await gate.wait()  # the first batch is suspended on its first record
            applied.append((source.partition, source.offset))
            return source.offset * 10

        first = asyncio.ensure_future(turns.apply_in_turn([record(0, 0), record(1, 5), record(0, 1)], apply))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(turns.apply_in_turn([record(0, 2), record(1, 6)], apply))
        done, _ = await asyncio.wait({second}, timeout=0.2)  # an upper bound for a failure, not a sync point
        assert not done and applied == [(1, 5), (1, 6)]  # partition 1 went on; partition 0 waits its turn
        gate.set()
        return await first, await second, applied

    first, second, applied = asyncio.run(scenario())
    assert first == [0, 50, 10] and second == [20, 60]
    assert [o for p, o in applied if p == 0] == [0, 1, 2]


def test_a_failed_batch_raises_after_its_other_partitions_finish_and_the_next_batch_still_runs():
    async def scenario():
        turns, applied = PartitionTurns(), []

        async def apply(source: SourceRecord):
            if source.offset == 0:
                raise RuntimeError("boom")
            applied.append(source.offset)
            return source.offset

        first = asyncio.ensure_future(turns.apply_in_turn([record(0, 0), record(1, 1)], apply))
        second = asyncio.ensure_future(turns.apply_in_turn([record(0, 2)], apply))
        with pytest.raises(RuntimeError, match="boom"):
            await first
        return await asyncio.wait_for(second, 5), applied, turns._last

    second, applied, last = asyncio.run(scenario())
    assert second == [2] and sorted(applied) == [1, 2] and last == {}


def test_a_cancelled_batch_hands_its_turn_on():
    async def scenario():
        turns, never = PartitionTurns(), asyncio.Event()

        async def stuck(source: SourceRecord):
            await never.wait()

        async def quick(source: SourceRecord):
            return source.offset

        first = asyncio.ensure_future(turns.apply_in_turn([record(0, 0)], stuck))
        second = asyncio.ensure_future(turns.apply_in_turn([record(0, 1)], quick))
        await asyncio.sleep(0)
        first.cancel()
        return await asyncio.wait_for(second, 5), turns._last

    second, last = asyncio.run(scenario())
    assert second == [1] and last == {}


def test_a_batch_cancelled_before_it_ever_ran_hands_its_turn_on():
    async def scenario():
        turns = PartitionTurns()

        async def quick(source: SourceRecord):
            return source.offset

        first = asyncio.ensure_future(turns.apply_in_turn([record(0, 0)], quick))
        await asyncio.sleep(0)  # first took its turn and is inside gather, its run not started yet
        first.cancel()
        second = asyncio.ensure_future(turns.apply_in_turn([record(0, 1)], quick))
        return await asyncio.wait_for(second, 5)

    assert asyncio.run(scenario()) == [1]
