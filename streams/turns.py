"""Per-partition turns for the stateful pipelines (recommendations, alerts): a partition's records are
applied in consume order, batch after batch, while other partitions go on.

Batches run concurrently (streams/ordered.py's OrderedAcker), and the first batch to meet a partition
recovers its state from the changelog, which can take tens of seconds after a takeover. A later batch
of that partition must wait, or its records would be applied first and the earlier ones would then
look like redeliveries (1.7% of events were lost that way). A single lock did that, but held back
every partition behind one recovery: in the hour's soak (session 8) 126 events batches waited 7-38 s
while one partition's user states were read. Here each partition waits only for its own previous batch.

The turn is taken when `apply_in_turn` starts, before its first await: callers start batches in consume
order (as tasks, which asyncio starts first come, first served).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from streams.schemas import SourceRecord

T = TypeVar("T")


class PartitionTurns:
    """Keyed by partition number: the unit of a changelog state (co-partitioned topics share it)."""

    def __init__(self) -> None:
        self._last: dict[int, asyncio.Event] = {}  # per partition: set when its latest batch is done

    async def apply_in_turn(self, sources: Sequence[SourceRecord],
                            apply: Callable[[SourceRecord], Awaitable[T]]) -> list[T]:
        """`apply(source)` for every source, one at a time within a partition and in order there, after
        that partition's earlier batches; results in the order of `sources`. An exception is raised once
        every partition of the batch has finished (so later batches still get their turn)."""
        by_partition: dict[int, list[int]] = {}
        for i, source in enumerate(sources):
            by_partition.setdefault(source.partition, []).append(i)
        turns = []
        for partition, indices in by_partition.items():  # no await before every turn is taken
            mine = asyncio.Event()
            turns.append((partition, self._last.get(partition), mine, indices))
            self._last[partition] = mine
        results: list = [None] * len(sources)

        async def run(partition: int, before: asyncio.Event | None, mine: asyncio.Event, indices: list[int]) -> None:
            try:
                if before is not None:
                    await before.wait()
                for i in indices:
                    results[i] = await apply(sources[i])
            finally:
                self._done(partition, mine)

        try:
            outcomes = await asyncio.gather(*(run(*t) for t in turns), return_exceptions=True)
        finally:  # cancelled: a run cancelled before it started never reached its own `finally`
            for partition, _, mine, _ in turns:
                self._done(partition, mine)
        failures = [r for r in outcomes if isinstance(r, BaseException)]
        if failures:
            raise failures[0]
        return results

    def _done(self, partition: int, mine: asyncio.Event) -> None:
        mine.set()
        if self._last.get(partition) is mine:
            del self._last[partition]
