"""OrderedAcker with fake events and a fake producer: in-order acks only after delivery."""

from __future__ import annotations

import asyncio
import os

import pytest

from streams import ordered
from streams.ordered import EXIT_DELIVERY_FAILED, OrderedAcker, Output


class ProcessExit(Exception):
    """Raised instead of os._exit so a failing acker cannot kill the test process."""


@pytest.fixture(autouse=True)
def no_real_exit(monkeypatch):
    def fake_exit(code):
        raise ProcessExit(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.setattr(ordered.logging, "shutdown", lambda: None)


class FakeEvent:
    def __init__(self, name: str, acks: list[str], on_ack=None) -> None:
        self.name, self._acks, self._on_ack = name, acks, on_ack

    def ack(self) -> None:
        if self._on_ack is not None:
            self._on_ack(self)
        self._acks.append(self.name)


class FakeProducer:
    """send() returns once 'buffered'; the delivery future is resolved by the test (or at once)."""

    def __init__(self, auto_deliver: bool = False) -> None:
        self.auto_deliver = auto_deliver
        self.sent: list[tuple[Output, asyncio.Future]] = []
        self.delivered: set[bytes] = set()

    async def send(self, output: Output):
        delivery = asyncio.get_running_loop().create_future()
        delivery.add_done_callback(lambda f, key=output.key: self.delivered.add(key) if not f.exception() else None)
        self.sent.append((output, delivery))
        if self.auto_deliver:
            delivery.set_result(None)
        return delivery

    def deliver(self, key: bytes) -> None:
        (fut,) = [f for o, f in self.sent if o.key == key]
        fut.set_result(None)


def _out(key: str) -> Output:
    return Output("t-verdicts", key.encode(), b"{}")


async def _settle(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _stop(task: asyncio.Task) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_out_of_order_outputs_are_acked_in_add_order_after_delivery():
    async def main():
        loop = asyncio.get_running_loop()
        producer, acks = FakeProducer(), []
        acked_with_delivered: dict[str, set[bytes]] = {}
        acker = OrderedAcker(producer.send, max_in_flight=16)
        runner = asyncio.create_task(acker.run())
        names = [f"e{i}" for i in range(5)]
        outputs = {n: loop.create_future() for n in names}
        for n in names:
            event = FakeEvent(n, acks, on_ack=lambda e: acked_with_delivered.setdefault(e.name, set(producer.delivered)))
            await acker.add(event, outputs[n])

        for n in reversed(names[1:]):  # every output but the oldest completes, newest first
            outputs[n].set_result([_out(f"{n}-a"), _out(f"{n}-b")])
            await _settle()
        assert acks == [] and producer.sent == []  # the oldest decides: nothing is sent before it
        outputs["e0"].set_result([_out("e0-a")])
        await _settle()
        assert len(producer.sent) == 9  # everything ready went to the producer at once ...
        assert acks == []  # ... but nothing is acked while deliveries are pending

        for output, _ in reversed(producer.sent[1:]):
            producer.deliver(output.key)
        await _settle()
        assert acks == []  # e0's delivery still pending blocks every ack
        producer.deliver(b"e0-a")
        await _settle()
        await _stop(runner)
        return acks, acked_with_delivered, acker.delivered, acker.in_flight

    acks, acked_with_delivered, delivered, in_flight = asyncio.run(main())
    assert acks == ["e0", "e1", "e2", "e3", "e4"]
    for name, delivered_keys in acked_with_delivered.items():
        own = {b"e0-a"} if name == "e0" else {f"{name}-a".encode(), f"{name}-b".encode()}
        assert own <= delivered_keys, name
    assert delivered == 5
    assert in_flight == 0


def test_pending_output_blocks_acks_of_later_events():
    async def main():
        loop = asyncio.get_running_loop()
        producer, acks = FakeProducer(auto_deliver=True), []
        acker = OrderedAcker(producer.send)
        runner = asyncio.create_task(acker.run())
        futs = [loop.create_future() for _ in range(4)]
        for i, fut in enumerate(futs):
            await acker.add(FakeEvent(f"e{i}", acks), fut)
        futs[0].set_result([_out("e0")])
        futs[2].set_result([_out("e2")])
        futs[3].set_result([])
        await _settle()
        first = list(acks)
        await asyncio.sleep(0.05)
        still = list(acks), acker.in_flight
        futs[1].set_result([_out("e1")])
        await _settle()
        await _stop(runner)
        return first, still, acks, [o.key for o, _ in producer.sent]

    first, (still, in_flight), acks, sent_keys = asyncio.run(main())
    assert first == ["e0"]
    assert still == ["e0"] and in_flight == 3  # e1 pending holds back e2 and e3 though they are done
    assert acks == ["e0", "e1", "e2", "e3"]
    assert sent_keys == [b"e0", b"e1", b"e2"]  # outputs also go out in consume order


def test_outputs_given_as_coroutines_are_scheduled_concurrently():
    async def main():
        producer, acks = FakeProducer(auto_deliver=True), []
        acker = OrderedAcker(producer.send)
        runner = asyncio.create_task(acker.run())
        order: list[str] = []

        async def compute(name: str, delay: float):
            await asyncio.sleep(delay)
            order.append(name)
            return [_out(name)]

        await acker.add(FakeEvent("slow", acks), compute("slow", 0.05))
        await acker.add(FakeEvent("fast", acks), compute("fast", 0.0))
        await acker.drain(timeout_s=2)
        await _stop(runner)
        return order, acks

    order, acks = asyncio.run(main())
    assert order == ["fast", "slow"]  # work completed out of order ...
    assert acks == ["slow", "fast"]  # ... acks did not


def test_add_waits_when_max_in_flight_events_are_pending():
    async def main():
        loop = asyncio.get_running_loop()
        producer, acks = FakeProducer(auto_deliver=True), []
        acker = OrderedAcker(producer.send, max_in_flight=2)
        runner = asyncio.create_task(acker.run())
        futs = [loop.create_future() for _ in range(3)]
        await acker.add(FakeEvent("e0", acks), futs[0])
        await acker.add(FakeEvent("e1", acks), futs[1])
        third = asyncio.create_task(acker.add(FakeEvent("e2", acks), futs[2]))
        await asyncio.sleep(0.05)
        blocked = not third.done() and acker.in_flight == 2
        futs[0].set_result([_out("e0")])
        await asyncio.wait_for(third, 1)  # a slot frees once e0 is delivered and acked
        in_flight_after = acker.in_flight
        futs[1].set_result([])
        futs[2].set_result([])
        await acker.drain(timeout_s=2)
        await _stop(runner)
        return blocked, in_flight_after, acks

    blocked, in_flight_after, acks = asyncio.run(main())
    assert blocked
    assert in_flight_after == 2
    assert acks == ["e0", "e1", "e2"]


def test_drain_returns_after_everything_is_acked():
    async def main():
        producer, acks = FakeProducer(auto_deliver=True), []
        acker = OrderedAcker(producer.send)
        runner = asyncio.create_task(acker.run())

        async def later(name):
            await asyncio.sleep(0.02)
            return [_out(name)]

        for i in range(10):
            await acker.add(FakeEvent(f"e{i}", acks), later(f"e{i}"))
        await acker.drain(timeout_s=2)
        result = list(acks), acker.in_flight, acker.delivered
        await _stop(runner)
        return result

    acks, in_flight, delivered = asyncio.run(main())
    assert acks == [f"e{i}" for i in range(10)]
    assert in_flight == 0 and delivered == 10


def test_drain_gives_up_after_its_timeout():
    async def main():
        acker = OrderedAcker(FakeProducer().send)
        await acker.add(FakeEvent("stuck", []), asyncio.get_running_loop().create_future())
        started = asyncio.get_running_loop().time()
        await acker.drain(timeout_s=0.05)
        return asyncio.get_running_loop().time() - started, acker.in_flight

    elapsed, in_flight = asyncio.run(main())
    assert 0.04 <= elapsed < 1
    assert in_flight == 1


def test_failed_delivery_exits_without_acking():
    async def main():
        producer, acks = FakeProducer(), []
        acker = OrderedAcker(producer.send)
        runner = asyncio.create_task(acker.run())
        await acker.add(FakeEvent("e0", acks), asyncio.sleep(0, result=[_out("e0")]))
        await _settle()
        producer.sent[0][1].set_exception(RuntimeError("broker said no"))
        with pytest.raises(ProcessExit) as excinfo:
            await asyncio.wait_for(runner, 1)
        return excinfo.value.args[0], acks

    code, acks = asyncio.run(main())
    assert code == EXIT_DELIVERY_FAILED
    assert acks == []


async def _ready(outputs):
    return outputs


def test_a_retriable_delivery_error_is_retried_and_then_acked():
    from aiokafka.errors import NotLeaderForPartitionError

    acks: list[str] = []
    attempts: list[bytes] = []

    async def flaky_send(output: Output):
        attempts.append(output.key)
        delivery = asyncio.get_running_loop().create_future()
        if attempts.count(output.key) == 1 and output.key == b"b":
            delivery.set_exception(NotLeaderForPartitionError())  # a fresh topic's leader is not known yet
        else:
            delivery.set_result(None)
        return delivery

    async def scenario():
        acker = OrderedAcker(flaky_send, max_in_flight=8)
        runner = asyncio.ensure_future(acker.run())
        for name in "abc":
            await acker.add(FakeEvent(name, acks), _ready([_out(name)]))
        while acker.in_flight:
            await asyncio.sleep(0.01)
        runner.cancel()

    asyncio.run(scenario())
    assert acks == ["a", "b", "c"]
    assert attempts.count(b"b") == 2 and attempts.count(b"a") == 1


def test_a_non_retriable_delivery_error_acks_nothing_and_exits():
    acks: list[str] = []

    async def broken_send(output: Output):
        delivery = asyncio.get_running_loop().create_future()
        delivery.set_exception(ValueError("record too large"))
        return delivery

    async def scenario():
        acker = OrderedAcker(broken_send, max_in_flight=8)
        await acker.add(FakeEvent("a", acks), _ready([_out("a")]))
        await acker.run()

    with pytest.raises(ProcessExit) as exit_info:
        asyncio.run(scenario())
    assert exit_info.value.args == (EXIT_DELIVERY_FAILED,) and acks == []


def test_a_batch_of_events_is_acked_in_order_after_its_outputs_and_earlier_ones_are_delivered():
    async def main():
        loop = asyncio.get_running_loop()
        producer, acks = FakeProducer(auto_deliver=True), []
        acker = OrderedAcker(producer.send)
        runner = asyncio.create_task(acker.run())
        single = loop.create_future()
        await acker.add(FakeEvent("e0", acks), single)
        await acker.add_batch([FakeEvent(f"e{i}", acks) for i in (1, 2, 3)],
                              _ready([[_out("e1")], [], [_out("e3a"), _out("e3b")]]))
        await _settle()
        before = list(acks)
        single.set_result([_out("e0")])
        await _settle()
        await _stop(runner)
        return before, acks, [o.key for o, _ in producer.sent]

    before, acks, sent_keys = asyncio.run(main())
    assert before == []  # the batch is done, but e0 before it is not
    assert acks == ["e0", "e1", "e2", "e3"]
    assert sent_keys == [b"e0", b"e1", b"e3a", b"e3b"]


def test_add_batch_waits_while_the_batch_would_pass_max_in_flight():
    async def main():
        producer, acks = FakeProducer(), []
        acker = OrderedAcker(producer.send, max_in_flight=4)
        runner = asyncio.create_task(acker.run())
        await acker.add_batch([FakeEvent(f"a{i}", acks) for i in range(3)], _ready([[_out(f"a{i}")] for i in range(3)]))
        second = asyncio.ensure_future(acker.add_batch([FakeEvent(f"b{i}", acks) for i in range(2)],
                                                       _ready([[], []])))
        await _settle()
        blocked = not second.done()
        for i in range(3):
            producer.deliver(f"a{i}".encode())
        await asyncio.wait_for(second, 1)
        await _settle()
        await _stop(runner)
        return blocked, acks

    blocked, acks = asyncio.run(main())
    assert blocked  # 3 in flight + 2 would pass 4
    assert acks == ["a0", "a1", "a2", "b0", "b1"]


def test_idle_wakes_when_the_last_event_is_acked_and_drain_gives_up_at_its_timeout():
    async def scenario():
        producer, acks = FakeProducer(), []
        acker = OrderedAcker(producer.send)
        runner = asyncio.ensure_future(acker.run())
        await acker.idle()  # nothing added: idle at once
        await acker.add(FakeEvent("e1", acks), asyncio.sleep(0, [_out("k1")]))
        waiting = asyncio.ensure_future(acker.idle())
        while not producer.sent:
            await asyncio.sleep(0)
        await acker.drain(timeout_s=0.05)  # not delivered: drain returns at its timeout, nothing acked
        assert acks == [] and not waiting.done()
        producer.deliver(b"k1")
        await asyncio.wait_for(waiting, 1)  # the ack wakes it
        assert acks == ["e1"]
        runner.cancel()

    asyncio.run(scenario())
