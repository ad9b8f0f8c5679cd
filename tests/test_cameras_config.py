"""Cameras file, frame session header and the per-camera queue, without a camera or a broker."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from operators.video import DecodedFrame, fit_within, is_live
from streams.cameras import CameraConfig, CameraFeed, parse_cameras, redact_url
from streams.config import Settings
from streams.schemas import FrameMeta


def test_defaults_apply_to_every_camera_unless_it_sets_its_own():
    cams = parse_cameras({"defaults": {"fps": 5, "max_side": 480},
                          "cameras": [{"id": "a", "url": "rtsp://h/a"}, {"id": "b", "url": "rtsp://h/b", "fps": 2}]})
    assert [(c.id, c.fps, c.max_side) for c in cams] == [("a", 5, 480), ("b", 2, 480)]
    assert cams[0].enabled and cams[0].rtsp_transport == "tcp" and cams[0].queue_frames == CameraConfig.queue_frames


@pytest.mark.parametrize("raw, message", [
    ({"cameras": []}, "non-empty list `cameras`"),
    ({"cameras": [{"id": "a", "url": "u", "fsp": 5}]}, "unknown keys ['fsp']"),
    ({"cameras": [{"id": "a"}]}, "lacks ['url']"),
    ({"cameras": [{"id": "a", "url": "u"}, {"id": "a", "url": "v"}]}, "duplicate camera ids ['a']"),
    ({"cameras": [{"id": "a", "url": "u", "fps": 0}]}, "fps must be > 0"),
    ({"cameras": [{"id": "a", "url": "u", "jpeg_quality": 101}]}, "jpeg_quality must be an integer in 1..100"),
    ({"cameras": [{"id": "a", "url": "u", "queue_frames": 0}]}, "queue_frames must be an integer >= 1"),
    ({"cameras": [{"id": "a", "url": "u", "backoff_initial_s": 5, "backoff_max_s": 1}]}, "backoff_max_s must be >="),
    ({"defaults": {"url": "u"}, "cameras": [{"id": "a"}]}, "other than id and url"),
    ({"camera": [], "cameras": [{"id": "a", "url": "u"}]}, "unknown top-level keys ['camera']"),
])
def test_a_bad_cameras_file_is_refused_naming_the_problem(raw, message):
    with pytest.raises(ValueError) as exc:
        parse_cameras(raw)
    assert message in str(exc.value)


def test_session_header_round_trips_and_stays_optional():
    with_session = FrameMeta("cam-7", 42, 4.2, "jpeg", 640, 480, "1795600935336-2")
    assert ("session", b"1795600935336-2") in with_session.headers()
    assert FrameMeta.from_headers(with_session.headers(), b"cam-7") == with_session
    without = FrameMeta("cam-7", 42, 4.2, "jpeg", 640, 480)
    assert "session" not in dict(without.headers())
    assert FrameMeta.from_headers(without.headers(), b"cam-7").session is None


def test_live_sources_and_edge_resize():
    assert [is_live(s) for s in ("rtmp://h/app/key", "http://cam/stream.ts", "/dev/video2", "/data/clip.mp4")] == \
        [True, True, True, False]
    assert fit_within(1920, 1080, 640) == (640, 360) and fit_within(480, 640, 320) == (240, 320)


def test_full_queue_drops_the_oldest_frame_and_counts_it():
    feed = CameraFeed(CameraConfig(id="cam", url="rtsp://h/cam", queue_frames=3), Settings(), run_id="1")
    loop = asyncio.new_event_loop()
    try:
        feed._loop, feed._wake = loop, asyncio.Event()
        feed.session = "1-1"
        for i in range(5):
            feed._enqueue(DecodedFrame(i, i / 10, np.full((48, 64, 3), i * 40, np.uint8)))
        assert feed.queued[0] == 3 and feed.stats.dropped["queue_full"] == 2
        kept = [dict(feed._pop()[2])["frame_index"] for _ in range(3)]
        assert kept == [b"2", b"3", b"4"] and feed._pop() is None and feed.queued == (0, 0)
    finally:
        loop.close()


def test_a_frame_over_the_message_limit_is_dropped_as_oversized():
    feed = CameraFeed(CameraConfig(id="cam", url="rtsp://h/cam"), Settings(max_message_bytes=1000), run_id="1")
    loop = asyncio.new_event_loop()
    try:
        feed._loop, feed._wake = loop, asyncio.Event()
        noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)  # JPEG of noise: ~60 kB
        feed._enqueue(DecodedFrame(0, 0.0, noise))
        assert feed.queued == (0, 0) and feed.stats.dropped["oversized"] == 1
    finally:
        loop.close()


def test_camera_passwords_stay_out_of_logs_and_health():
    message = "cannot open: [Errno 111] Connection refused: 'rtsp://admin:s3cret@10.0.0.7:554/stream1'"
    assert redact_url(message) == "cannot open: [Errno 111] Connection refused: 'rtsp://admin:***@10.0.0.7:554/stream1'"
    feed = CameraFeed(CameraConfig(id="cam", url="rtsp://admin:s3cret@10.0.0.7/stream1"), Settings(), run_id="1")
    assert "s3cret" not in json.dumps(feed.health())


def test_files_are_scaled_to_max_side_while_converting(tmp_path):
    from operators.video import sample_frames, write_video

    video = write_video(tmp_path / "v.mp4", [np.full((96, 128, 3), 40 * i, np.uint8) for i in range(3)], fps=10)
    assert [f.rgb.shape for f in sample_frames(video, max_side=64)] == [(48, 64, 3)] * 3
    assert [f.rgb.shape for f in sample_frames(video)] == [(96, 128, 3)] * 3


def test_pace_says_how_far_a_reader_falls_behind_its_camera():
    from streams.cameras.feed import Pace

    pace = Pace()
    pace.start_session()
    # frames 0.2 s apart on the camera's clock; the first session keeps up (jitter aside)
    assert [pace.frame(i * 0.2, 100 + i * 0.2 + (0.01 if i % 2 else 0)) for i in range(5)] == pytest.approx([0, 0.01, 0, 0.01, 0])
    # a reader that needs 0.3 s per 0.2 s of video falls 0.1 s further behind with every frame
    pace.start_session()
    assert [pace.frame(50 + i * 0.2, 200 + i * 0.3) for i in range(4)] == pytest.approx([0, 0.1, 0.2, 0.3])
    assert pace.behind_s == pytest.approx(0.3)
