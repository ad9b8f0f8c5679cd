"""Frame verdicts -> per-stream alert state -> `alerts` (operators/alerts.py has the rule).

One stream's frame verdicts sit in one partition of `verdicts`, in frame order (streams/moderation.py
partitions them by stream id), so the alert agent reads them partition by partition like the
recommendation agent reads events, and keeps its state the same exact way (streams/recommend.py):

- `alert-state` is the changelog: one snapshot per changed stream, written to the partition number of
  the stream's verdicts, before the verdict is acked (OrderedAcker). Alerts go to the same partition
  number of `alerts` (one stream's alerts in order), keyed by alert id.
- Recovery, before the first verdict of a partition: the state partition read to its high watermark
  (the last snapshot of each stream wins), then the alerts partition from the oldest point any of
  those snapshots may not reflect (`alerts_from`: the alerts high watermark its writer saw when it
  recovered) to its high watermark. An alert already there is never sent again when its verdict is
  redelivered (its snapshot was lost); an alert a snapshot records but the topic lacks (the crash fell
  between the two) is sent at recovery. So a kill -9 gives neither a duplicate nor a missing start.
- Idempotence: a stream's state remembers the frames-topic offset of the last frame it applied, so a
  verdict rewritten after a crash of the frames agent is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from aiokafka import TopicPartition

from operators.alerts import AlertRule, JudgedFrame, StreamAlerts
from streams import metrics
from streams.config import Settings
from streams.kafka import consumer, fetch_high_watermarks, read_to_high_watermark
from streams.ordered import Output
from streams.schemas import ALERT_STATE, ALERTS, SourceRecord, dumps
from streams.turns import PartitionTurns

log = logging.getLogger(__name__)

# JSON structure, never inside a string (quotes there are escaped): only frame verdicts contain it
_FRAME_MARK = b'"kind":"frame"'
RECENT_ALERTS = 8  # per stream, kept in its snapshot until they are surely on the topic


class AlertStore:
    """Alert state of the verdicts partitions this worker holds, backed by `alert-state`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_topic = settings.topic(ALERT_STATE)
        self.alerts_topic = settings.topic(ALERTS)
        self.streams: dict[str, StreamAlerts] = {}
        self.recent: dict[str, list[dict[str, Any]]] = {}  # stream -> [{"from": offset, "alert": record}]
        self.partition_of: dict[str, int] = {}
        self.alerts_from: dict[int, int] = {}  # partition -> alerts high watermark at this worker's recovery
        self.on_topic: set[tuple[str, int]] = set()  # (alert id, first frame offset) found at recovery
        self.recovered: set[int] = set()
        self._locks: dict[int, asyncio.Lock] = {}

    async def ensure(self, partition: int) -> list[Output]:
        """Recover `partition` once, before any of its verdicts is applied; the alerts to send again."""
        if partition in self.recovered:
            return []
        async with self._locks.setdefault(partition, asyncio.Lock()):
            if partition in self.recovered:
                return []
            started = time.monotonic()
            resend = await self._recover(partition)
            self.recovered.add(partition)
            log.info("recovered alert state of partition %d in %.2fs (%d alerts sent again)", partition,
                     time.monotonic() - started, len(resend))
            return resend

    async def _recover(self, partition: int) -> list[Output]:
        snapshots: dict[str, dict[str, Any]] = {}
        async for record in read_to_high_watermark(self.settings, self.state_topic, [partition]):
            if record.value:
                snapshot = orjson.loads(record.value)
                snapshots[snapshot["state"]["stream_id"]] = snapshot
        self.alerts_from[partition] = await _high_watermark(self.settings, self.alerts_topic, partition)
        starts = [s["alerts_from"] for s in snapshots.values()] + [r["from"] for s in snapshots.values() for r in s["recent"]]
        if starts:  # no snapshot: nothing this partition ever alerted can be missing or sent twice
            async for record in read_to_high_watermark(self.settings, self.alerts_topic, [partition], from_offset=min(starts)):
                if record.value:
                    self.on_topic.add(_identity(orjson.loads(record.value)))
        resend = []
        for stream_id, snapshot in snapshots.items():
            self.streams[stream_id] = StreamAlerts.from_dict(snapshot["state"])
            self.recent[stream_id] = snapshot["recent"]
            self.partition_of[stream_id] = partition
            resend += [self.alert_output(r["alert"], partition) for r in snapshot["recent"]
                       if _identity(r["alert"]) not in self.on_topic]
        return resend

    def forget(self, partitions: set[int]) -> None:
        """Partitions revoked: drop their states; recovered again if they come back."""
        self.recovered -= partitions
        for stream in [s for s, p in self.partition_of.items() if p in partitions]:
            for table in (self.streams, self.recent, self.partition_of):
                table.pop(stream, None)

    def get(self, stream_id: str, partition: int) -> StreamAlerts:
        state = self.streams.get(stream_id)
        if state is None:
            state = self.streams[stream_id] = StreamAlerts(stream_id)
            self.partition_of[stream_id] = partition
        return state

    def record(self, stream_id: str, alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Remember what `stream_id` just raised; the alerts still to send (not found on the topic at recovery)."""
        unsent = [a for a in alerts if _identity(a) not in self.on_topic]
        recent = self.recent.setdefault(stream_id, [])
        recent += [{"from": self.alerts_from[self.partition_of[stream_id]], "alert": a} for a in unsent]
        del recent[:-RECENT_ALERTS]
        return unsent

    def snapshot(self, stream_id: str) -> Output:
        partition = self.partition_of[stream_id]
        value = {"state": self.streams[stream_id].to_dict(), "recent": self.recent.get(stream_id, []),
                 "alerts_from": self.alerts_from[partition]}
        return Output(self.state_topic, stream_id.encode(), dumps(value), partition=partition)

    def alert_output(self, alert: dict[str, Any], partition: int) -> Output:
        return Output(self.alerts_topic, alert["id"].encode(), dumps(alert), partition=partition)


class AlertPipeline:
    """Frame verdicts in, alert records and state snapshots out; post verdicts and anything that is not a
    frame verdict are passed over (nothing to alert on)."""

    def __init__(self, settings: Settings, rule: AlertRule, store: AlertStore | None = None) -> None:
        self.rule = rule
        self.store = store or AlertStore(settings)
        self._turns = PartitionTurns()

    async def handle_batch(self, sources: list[SourceRecord]) -> list[list[Output]]:
        """In consume order within each partition, batch after batch (streams/turns.py: a partition
        being recovered holds back only its own later batches). One snapshot per changed stream and
        batch, with the stream's last verdict in it: a batch is acked as a whole, once all its outputs
        are delivered."""
        applied = await self._turns.apply_in_turn(sources, self._apply)
        last = {stream: i for i, (stream, _) in enumerate(applied) if stream is not None}
        for stream, i in last.items():
            applied[i][1].append(self.store.snapshot(stream))
        return [outputs for _, outputs in applied]

    async def _apply(self, source: SourceRecord) -> tuple[str | None, list[Output]]:
        """(the stream it changed or None, the alerts it raised and any sent again at recovery)."""
        if not source.value or _FRAME_MARK not in source.value:
            return None, []  # a post verdict (most of the topic at text rates): not parsed at all
        try:
            frame = JudgedFrame.from_verdict(orjson.loads(source.value))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            # our own verdicts topic: a record we cannot read is not ours to judge; counted, not alerted on
            metrics.ALERT_INPUTS_IGNORED.inc()
            log.warning("verdict at %s:%d:%d not readable for alerts: %s", source.topic, source.partition, source.offset, exc)
            return None, []
        if frame is None:
            return None, []
        outputs = await self.store.ensure(source.partition)
        state = self.store.get(frame.stream_id, source.partition)
        alerts = state.apply(frame, self.rule)
        if alerts is None:
            return None, outputs  # a verdict this state already holds
        for alert in self.store.record(frame.stream_id, alerts):
            metrics.ALERTS.labels(alert["check"], alert["event"]).inc()
            outputs.append(self.store.alert_output(alert, source.partition))
        return frame.stream_id, outputs


def _identity(alert: dict[str, Any]) -> tuple[str, int]:
    """An alert's id with the frames-topic offset of its first frame: unique even when a restarted
    camera counts its frames from 0 again."""
    return alert["id"], alert["first"]["offset"]


async def _high_watermark(settings: Settings, topic: str, partition: int) -> int:
    kafka = consumer(settings, group_id=None, enable_auto_commit=False)
    await kafka.start()
    try:
        tp = TopicPartition(topic, partition)
        kafka.assign([tp])
        return (await fetch_high_watermarks(kafka, [tp]))[partition]
    finally:
        await kafka.stop()
