"""The alert agent's recovery through the real broker, crash by crash: the two outputs of one verdict
(the alert and the stream's snapshot) are written separately, so a kill can land between them either
way; recovery must neither send an alert twice nor lose one."""

from __future__ import annotations

import orjson
import pytest
from kafka_helpers import collect

from operators.alerts import AlertRule
from streams.alerts import AlertPipeline
from streams.kafka import ensure_topics, producer
from streams.ordered import Output
from streams.schemas import ALERT_STATE, ALERTS, VERDICTS, SourceRecord

pytestmark = pytest.mark.integration

RULE = AlertRule(k=2, n=3, m=2)
PRESENT = [False, True, True, True, False, False, True, True, False, False]  # two episodes


def verdict(i: int, present: bool, stream: str = "cam-1", partition: int = 0) -> SourceRecord:
    value = {"schema": "inferstream.verdict.v1", "kind": "frame", "id": f"{stream}:{i}", "stream_id": stream,
             "frame_index": i, "pts": i / 5, "source": {"topic": "frames", "partition": 0, "offset": 100 + i, "timestamp_ms": 1000 + i},
             "violations": [{"check": "objects", "label": "missile", "score": 0.8}] if present else []}
    return SourceRecord(VERDICTS, partition, 500 + i, 1000 + i, f"{stream}:{i}".encode(), {}, orjson.dumps(value))


async def deliver(settings, outputs: list[Output]) -> None:
    kafka = producer(settings)
    await kafka.start()
    try:
        for o in outputs:
            await (await kafka.send(o.topic, o.value, key=o.key, partition=o.partition))
    finally:
        await kafka.stop()


async def process(settings, sources, drop=lambda o: False) -> list[Output]:
    """One worker's life: handle `sources` in order, deliver every output except the dropped ones."""
    pipeline, outputs = AlertPipeline(settings, RULE), []
    for source in sources:
        outputs += (await pipeline.handle_batch([source]))[0]
    await deliver(settings, [o for o in outputs if not drop(o)])
    return outputs


def alerts_on_topic(settings) -> list[str]:
    return sorted(r["value"]["id"] for r in collect(settings, ALERTS, lambda rs: False, timeout_s=2))


@pytest.fixture
def topics(settings, run):
    run(ensure_topics(settings))
    return settings


def is_start_snapshot(settings, o: Output) -> bool:
    return o.topic == settings.topic(ALERT_STATE) and orjson.loads(o.value)["state"]["seq"] == 3


def test_alert_delivered_but_snapshot_lost_is_not_sent_again(topics, run):
    settings, sources = topics, [verdict(i, p) for i, p in enumerate(PRESENT)]
    # the first life dies after frame 2's alert is on the broker but before its snapshot is
    run(process(settings, sources[:3], drop=lambda o: is_start_snapshot(settings, o)))
    assert alerts_on_topic(settings) == ["cam-1:1:objects:missile:start"]
    # the next life recovers from frame 1's snapshot: frame 2 is redelivered and completes k of n again
    outputs = run(process(settings, sources[2:]))
    assert [o.key.decode() for o in outputs if o.topic == settings.topic(ALERTS)] == [
        "cam-1:1:objects:missile:end", "cam-1:6:objects:missile:start", "cam-1:6:objects:missile:end"]
    assert alerts_on_topic(settings) == sorted(["cam-1:1:objects:missile:start", "cam-1:1:objects:missile:end",
                                                "cam-1:6:objects:missile:start", "cam-1:6:objects:missile:end"])


def test_snapshot_delivered_but_alert_lost_is_sent_at_recovery(topics, run):
    settings, sources = topics, [verdict(i, p) for i, p in enumerate(PRESENT)]
    # the first life dies after frame 2's snapshot (which says the episode is open) but before its alert
    run(process(settings, sources[:3], drop=lambda o: o.topic == settings.topic(ALERTS)))
    assert alerts_on_topic(settings) == []
    outputs = run(process(settings, sources[3:]))  # frame 2 was acked: the next life starts at frame 3
    assert [o.key.decode() for o in outputs if o.topic == settings.topic(ALERTS)][0] == "cam-1:1:objects:missile:start"
    assert alerts_on_topic(settings) == sorted(["cam-1:1:objects:missile:start", "cam-1:1:objects:missile:end",
                                                "cam-1:6:objects:missile:start", "cam-1:6:objects:missile:end"])


def test_a_redelivered_batch_after_everything_was_delivered_sends_nothing(topics, run):
    settings, sources = topics, [verdict(i, p) for i, p in enumerate(PRESENT)]
    run(process(settings, sources))  # everything delivered, but the verdicts were not acked
    again = run(process(settings, sources))
    assert [o for o in again if o.topic == settings.topic(ALERTS)] == []
    assert len(alerts_on_topic(settings)) == 4


def test_a_revoked_partition_is_recovered_when_it_comes_back(topics, run):
    settings, sources = topics, [verdict(i, p) for i, p in enumerate(PRESENT)]

    async def revoke_midway() -> list[Output]:
        pipeline, outputs = AlertPipeline(settings, RULE), []
        for source in sources[:4]:
            outputs += (await pipeline.handle_batch([source]))[0]
        await deliver(settings, outputs)
        pipeline.store.forget({0})
        assert pipeline.store.streams == {}
        later = []
        for source in sources[4:]:
            later += (await pipeline.handle_batch([source]))[0]
        await deliver(settings, later)
        return later

    later = run(revoke_midway())
    assert [o.key.decode() for o in later if o.topic == settings.topic(ALERTS)] == [
        "cam-1:1:objects:missile:end", "cam-1:6:objects:missile:start", "cam-1:6:objects:missile:end"]


def test_post_verdicts_and_unreadable_records_raise_nothing(topics, run):
    pipeline = AlertPipeline(topics, RULE)
    post = SourceRecord(VERDICTS, 0, 1, 1, b"p-1", {}, orjson.dumps({"kind": "post", "id": "p-1", "text": '"kind":"frame"'}))
    broken = SourceRecord(VERDICTS, 0, 2, 1, b"x", {}, b'{"kind":"frame", "id": 3')
    assert run(pipeline.handle_batch([post, broken])) == [[], []]
