"""Two latency-shaping behaviours: live pacing of video frames, and the bounded Faust fetch wait."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from aiokafka import TopicPartition

from operators.video import write_video
from streams import app as app_module
from streams.config import Settings
from streams.kafka import consumer
from streams.produce import frame_records, produce_video
from streams.schemas import FRAMES


def test_realtime_frames_are_due_at_their_pts_divided_by_the_speed(tmp_path):
    settings = Settings()
    video = write_video(tmp_path / "v.mp4", [np.full((32, 32, 3), i * 20, np.uint8) for i in range(10)], fps=10)
    due = [r[3] for r in frame_records(settings, video, "cam", realtime=2.0)]
    assert due == pytest.approx([i / 10 / 2.0 for i in range(10)], abs=1e-6)
    assert all(r[3] is None for r in frame_records(settings, video, "cam"))  # not paced by default


@pytest.mark.integration
def test_realtime_produce_spreads_frames_over_the_video_duration(settings, tmp_path):
    video = write_video(tmp_path / "v.mp4", [np.full((32, 32, 3), i * 10, np.uint8) for i in range(20)], fps=10)
    assert produce_video(settings, video, "cam", realtime=2.0).sent == 20  # 2 s of video at 2x: ~0.95 s

    async def record_times():
        kafka = consumer(settings, group_id=None, auto_offset_reset="earliest", enable_auto_commit=False)
        await kafka.start()
        try:
            tps = [TopicPartition(settings.topic(FRAMES), p) for p in kafka.partitions_for_topic(settings.topic(FRAMES))]
            kafka.assign(tps)
            got = []
            while len(got) < 20:
                for msgs in (await kafka.getmany(timeout_ms=1000)).values():
                    got += [m.timestamp for m in msgs]
            return got
        finally:
            await kafka.stop()

    times = sorted(asyncio.run(record_times()))
    assert (times[-1] - times[0]) / 1000 >= 0.9  # sent as a camera would, not as fast as they decode


def test_faust_consumer_fetch_wait_is_set_from_settings_and_patched_once(monkeypatch):
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    class FakeConsumer:
        _fetch_max_wait_ms = 1500  # what Faust hard-codes

    monkeypatch.setattr(AIOKafkaConsumerThread, "_create_worker_consumer", lambda self, transport: FakeConsumer())
    app_module._shorten_fetch_wait(77)
    app_module._shorten_fetch_wait(50)  # a second app in the process re-patches, it does not stack
    created = AIOKafkaConsumerThread._create_worker_consumer(object(), None)
    assert created._fetch_max_wait_ms == 50
    assert AIOKafkaConsumerThread._create_worker_consumer.__wrapped__(object(), None)._fetch_max_wait_ms == 1500
