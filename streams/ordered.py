"""At-least-once consumption for agents that batch: ack an input only after its outputs are delivered.

Faust's own acking does not mean "result produced" once work is batched or concurrent (an exception
in a `take()` body acks the batch anyway; concurrency > 1 commits early, faust-streaming #606). So
agents read with `stream.noack()` and hand each event here together with the task that computes
its outputs. `OrderedAcker` then, strictly in consume order:

    wait for the oldest event's outputs -> send them (and any later ones already done) ->
    await the broker's acks -> ack those events

(sending and awaiting acks are two loops, so later outputs are buffered while earlier ones are on
the wire; both keep consume order)

Acks are in order per partition, so Faust's committed offset never passes a record whose output (or
dead letter) is not on the broker. Outputs are keyed by input id, so a redelivery after a crash
rewrites the same keys (idempotent for compacted or keyed consumers).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from streams import metrics

log = logging.getLogger(__name__)

# Exit code when outputs cannot be delivered: the un-acked inputs are redelivered after a restart.
EXIT_DELIVERY_FAILED = 75
DELIVERY_ATTEMPTS = 5


@dataclass(frozen=True)
class Output:
    """One record to produce."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] | None = None
    partition: int | None = None  # None: the producer's partitioner (by key)
    # partition by these bytes instead of the key (Kafka's murmur2 rule): e.g. every verdict of one video
    # stream in one partition, in frame order, while each keeps its own record id as key
    partition_key: bytes | None = None


Send = Callable[[Output], Awaitable[Awaitable[Any]]]  # returns once buffered; the inner awaitable is delivery


class OrderedAcker:
    """Events are added in consume order, singly (`add`) or as a batch sharing one computation of
    their outputs (`add_batch`); both kinds are delivered and acked in that order."""

    def __init__(self, send: Send, max_in_flight: int = 256, max_flush: int = 1000, name: str = "agent",
                 ack: Callable[[Any], Any] | None = None) -> None:
        """`name` is the source topic: the label of this acker's metrics; `ack(event)` acks an event
        (default: `event.ack()`)."""
        self._send = send
        self._ack = ack or (lambda event: event.ack())
        # (events, awaitable of one list of outputs per event), oldest first
        self._pending: deque[tuple[list[Any], asyncio.Future[list[list[Output]]]]] = deque()
        self._max_in_flight = max_in_flight
        self._space = asyncio.Event()
        self._wakeup = asyncio.Event()
        # sent to the producer, awaiting the broker: (events, outputs, their deliveries), oldest first
        self._sent: deque[tuple[list[Any], list[Output], list[Awaitable[Any]]]] = deque()
        self._delivering = asyncio.Event()
        self._max_flush = max_flush
        self.name = name
        self.delivered = 0
        self._unacked = 0  # added but not yet acked: pending, or popped and being delivered
        self._idle = asyncio.Event()  # set while nothing is un-acked
        self._idle.set()
        self._consumed = metrics.RECORDS_CONSUMED.labels(name)
        self._in_flight_gauge = metrics.IN_FLIGHT.labels(name)
        metrics.IN_FLIGHT_LIMIT.labels(name).set(max_in_flight)

    @property
    def in_flight(self) -> int:
        """Events added and not yet acked (including the ones whose outputs are being delivered now)."""
        return self._unacked

    async def add(self, event: Any, outputs: Awaitable[list[Output]]) -> None:
        """Register `event` (anything with `.ack()`) and the awaitable of its outputs, in consume order.
        Waits while `max_in_flight` events are pending: back-pressure on consumption."""
        await self.add_batch([event], _one(outputs))

    async def add_batch(self, events: list[Any], outputs: Awaitable[list[list[Output]]]) -> None:
        """Register consecutive `events` and the awaitable of their outputs (one list per event, in
        order). Waits while adding them would pass `max_in_flight` (a batch larger than the limit is
        admitted alone)."""
        while self._unacked and self._unacked + len(events) > self._max_in_flight:
            self._space.clear()
            await self._space.wait()
        self._pending.append((events, asyncio.ensure_future(outputs)))
        self._unacked += len(events)
        self._idle.clear()
        self._wakeup.set()
        self._consumed.inc(len(events))
        self._in_flight_gauge.set(self._unacked)

    async def run(self) -> None:
        """Deliver and ack forever. A delivery failure ends the process: acking would lose records,
        not acking would stall the partition, and a restart redelivers exactly what is un-acked.

        Two loops: one hands finished outputs to the producer in consume order, the other awaits the
        broker's acknowledgements in the same order and acks the events. Outputs of later records are
        buffered while earlier ones are on the wire, so the producer's batches fill while a request is
        in flight (aiokafka keeps one request in flight per broker)."""
        loops = [asyncio.ensure_future(self._send_in_order()), asyncio.ensure_future(self._ack_in_order())]
        try:
            done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.critical("%s: cannot deliver outputs; exiting so un-acked inputs are redelivered", self.name, exc_info=True)
            logging.shutdown()
            os._exit(EXIT_DELIVERY_FAILED)
        finally:
            for task in loops:
                task.cancel()

    async def _send_in_order(self) -> None:
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            await asyncio.wait([self._pending[0][1]])  # the oldest decides; later ones may already be done
            ready = [self._pending.popleft()]
            records = len(ready[0][0])
            while self._pending and self._pending[0][1].done() and records < self._max_flush:
                ready.append(self._pending.popleft())
                records += len(ready[-1][0])
            outputs = []
            for events, computed in ready:
                per_event = computed.result()
                if len(per_event) != len(events):
                    raise RuntimeError(f"{self.name}: {len(per_event)} output lists for {len(events)} events")
                outputs.extend(output for outs in per_event for output in outs)
            deliveries = [await self._send(o) for o in outputs]
            self._sent.append(([event for events, _ in ready for event in events], outputs, deliveries))
            self._delivering.set()

    async def _ack_in_order(self) -> None:
        while True:
            while not self._sent:
                self._delivering.clear()
                await self._delivering.wait()
            events, outputs, deliveries = self._sent[0]
            await self._confirm(outputs, deliveries)
            self._sent.popleft()
            for event in events:
                self._ack(event)
            self._unacked -= len(events)
            self.delivered += len(events)
            self._space.set()
            if not self._unacked:
                self._idle.set()
            for topic, count in Counter(output.topic for output in outputs).items():
                metrics.RECORDS_PRODUCED.labels(topic).inc(count)
            self._in_flight_gauge.set(self._unacked)

    async def _confirm(self, outputs: list[Output], deliveries: list[Awaitable[Any]]) -> None:
        """Await every acknowledgement; re-send the outputs that failed with a retriable error (e.g.
        NotLeaderForPartition right after a topic is created). Anything else raises."""
        for attempt in range(DELIVERY_ATTEMPTS):
            results = await asyncio.gather(*deliveries, return_exceptions=True)
            failed = [(o, r) for o, r in zip(outputs, results, strict=True) if isinstance(r, BaseException)]
            if not failed:
                return
            fatal = [r for _, r in failed if not getattr(r, "retriable", False)]
            if fatal or attempt == DELIVERY_ATTEMPTS - 1:
                raise (fatal or [failed[0][1]])[0]
            log.warning("%s: %d deliveries failed (%s); retrying", self.name, len(failed), failed[0][1])
            outputs = [o for o, _ in failed]
            await asyncio.sleep(0.2 * (attempt + 1))
            deliveries = [await self._send(o) for o in outputs]

    async def idle(self) -> None:
        """Wait until everything added so far is delivered and acked."""
        await self._idle.wait()

    async def drain(self, timeout_s: float) -> None:
        """`idle()`, bounded: a graceful stop does not wait forever (what is left is redelivered)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            pass


async def _one(outputs: Awaitable[list[Output]]) -> list[list[Output]]:
    return [await outputs]
