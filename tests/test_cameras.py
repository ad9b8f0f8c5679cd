"""Live cameras (issue 15, items 1-2): `inferstream cameras` and `produce video rtsp://...` against a real
RTSP server (GStreamer's, tests/rtsp_server.py) and the real embedded broker.

The ingester runs as the command an operator starts; its own /metrics (parsed with prometheus_client's
parser) and /health tell what it counted, and the frames topic tells what arrived."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import yaml
from aiokafka import TopicPartition
from conftest import REPO, wait_until
from prometheus_client.parser import text_string_to_metric_families
from rtsp_server import RtspServer

from streams.broker import EmbeddedBroker, free_port
from streams.kafka import consumer, ensure_topics
from streams.schemas import FRAMES, FrameMeta, decode_headers

pytestmark = pytest.mark.integration

CLIP_FPS = 10
CLIP_SECONDS = 40
W, H = 640, 480


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """An H.264 MP4 (libx264, keyframe every second) of a moving gradient: 640x480 at 10 fps, 40 s."""
    RtspServer.check()  # missing Debian packages fail here, loudly (`make rtsp-test-deps` installs them)
    path = tmp_path_factory.mktemp("clip") / "camera.mp4"
    y, x = np.mgrid[0:H, 0:W]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=CLIP_FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"preset": "ultrafast", "tune": "zerolatency", "g": str(CLIP_FPS)}
        for i in range(CLIP_FPS * CLIP_SECONDS):
            rgb = np.stack([(x + 4 * i) % 256, (y + 2 * i) % 256, np.full_like(x, (3 * i) % 256)], -1).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture
def rtsp(clip, tmp_path):
    server = RtspServer(free_port(), {"/cam": clip, "/cam2": clip}, tmp_path / "rtsp.log").start()
    yield server
    server.kill()


class FrameReader:
    """Every record of the frames topic, read from the beginning in a background thread; waits are
    woken by each record that arrives."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.records: list[dict] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._read()), daemon=True)
        self._thread.start()

    async def _read(self) -> None:
        await ensure_topics(self.settings)
        name = self.settings.topic(FRAMES)
        kafka = consumer(self.settings, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest")
        await kafka.start()
        try:
            while not kafka.partitions_for_topic(name):
                await kafka._client.force_metadata_update()
            kafka.assign([TopicPartition(name, p) for p in sorted(kafka.partitions_for_topic(name))])
            while not self._stop.is_set():
                batch = await kafka.getmany(timeout_ms=200)
                rows = [{"key": m.key.decode(), "value": m.value, "timestamp_ms": m.timestamp,
                         "headers": decode_headers(m.headers)} for ms in batch.values() for m in ms]
                if rows:
                    with self._cond:
                        self.records.extend(rows)
                        self._cond.notify_all()
        finally:
            await kafka.stop()

    def wait_for(self, predicate, timeout_s: float) -> list[dict]:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.records), timeout_s):
                raise AssertionError(f"frames topic: condition not met in {timeout_s}s; {len(self.records)} records: "
                                     f"{[r['headers'] for r in self.records[-3:]]}")
            return list(self.records)

    def of(self, camera: str, session: str | None = None) -> list[dict]:
        with self._cond:
            return [r for r in self.records if r["key"] == camera and (session is None or r["headers"].get("session") == session)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


class Ingester:
    """`inferstream cameras FILE` as a child process; its stderr goes to a log file, and its ready line
    (JSON with the web address) is awaited."""

    def __init__(self, settings, cameras: list[dict], tmp_path: Path, defaults: dict | None = None) -> None:
        self.config = tmp_path / "cameras.yaml"
        self.config.write_text(yaml.safe_dump({"defaults": defaults or {}, "cameras": cameras}))
        self.web_port = free_port()
        self.log_path = tmp_path / "ingester.log"
        env = {**os.environ, **settings.to_env()}
        self.proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "cameras", str(self.config),
                                      "--web-port", str(self.web_port)], env=env, cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._ready = threading.Event()
        self._log = open(self.log_path, "w")  # noqa: SIM115
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._ready.wait(60):
            self.stop()
            raise AssertionError(f"ingester not ready: {self.log()}")

    def _pump(self) -> None:
        for line in self.proc.stderr:
            self._log.write(line)
            self._log.flush()
            if line.startswith("{") and '"web"' in line:
                self._ready.set()

    def log(self) -> str:
        return self.log_path.read_text()

    def _get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}{path}", timeout=5) as r:
            return r.read().decode()

    def health(self) -> dict:
        return json.loads(self._get("/health"))

    def metrics(self) -> dict[tuple, float]:
        """{(sample name, sorted label pairs): value}"""
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(self._get("/metrics")) for s in family.samples}

    def metric(self, name: str, **labels) -> float:
        return self.metrics()[(name, tuple(sorted(labels.items())))]

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024

    def stop(self) -> tuple[int, dict | None]:
        """SIGTERM; the exit code and the final counts it prints."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        lines = [line for line in (out or "").splitlines() if line.startswith("{")]
        return self.proc.returncode, (json.loads(lines[-1]) if lines else None)


@pytest.fixture
def ingesters():
    started: list[Ingester] = []
    yield started
    for ingester in started:
        ingester.stop()


@pytest.fixture
def frames(settings):
    reader = FrameReader(settings)
    yield reader
    reader.close()


FAST_RETRY = {"backoff_initial_s": 0.2, "backoff_max_s": 1.0, "open_timeout_s": 5, "read_timeout_s": 3}


# ---------------------------------------------------------------------------------------------- tests
def test_ingester_publishes_rtsp_frames_sampled_resized_with_session_header(settings, rtsp, frames, ingesters, tmp_path):
    cam = {"id": "cam-1", "url": rtsp.url("/cam"), "fps": 5, "max_side": 320, "jpeg_quality": 80}
    ingester = Ingester(settings, [cam], tmp_path)
    ingesters.append(ingester)
    got = frames.wait_for(lambda rs: len(rs) >= 6, 30)[:6]

    sessions = {r["headers"]["session"] for r in got}
    assert len(sessions) == 1 and re.fullmatch(r"\d+-1", sessions.pop())
    for r in got:
        meta = FrameMeta.from_headers(r["headers"], r["key"].encode())  # the worker's own parser accepts it
        assert (r["key"], meta.stream_id, meta.encoding, meta.width, meta.height) == ("cam-1", "cam-1", "jpeg", 320, 240)
        image = cv2.imdecode(np.frombuffer(r["value"], np.uint8), cv2.IMREAD_COLOR)
        assert image.shape == (240, 320, 3)
    indexes = [int(r["headers"]["frame_index"]) for r in got]
    pts = [float(r["headers"]["pts"]) for r in got]
    assert np.all(np.diff(indexes) == 2)  # 5 of the camera's 10 fps, indexes of the decoded stream kept
    np.testing.assert_allclose(np.diff(pts), 0.2, atol=0.011)

    code, final = ingester.stop()
    assert code == 0, ingester.log()
    assert final["cam-1"]["published"] >= 6 and final["cam-1"]["reconnects"] == 0
    assert final["cam-1"]["state"] == "stopped"


def test_camera_killed_and_restarted_reconnects_with_a_new_session(settings, rtsp, frames, ingesters, tmp_path):
    ingester = Ingester(settings, [{"id": "cam-1", "url": rtsp.url("/cam"), "fps": 5}], tmp_path, defaults=FAST_RETRY)
    ingesters.append(ingester)
    first = frames.wait_for(lambda rs: len(rs) >= 3, 30)[0]["headers"]["session"]

    rtsp.kill()
    assert wait_until(lambda: ingester.health()["cameras"]["cam-1"]["state"] != "streaming", 10)
    assert ingester.health()["status"] == "degraded"
    before = len(frames.of("cam-1"))
    back_at = time.time()
    rtsp.start()
    again = frames.wait_for(lambda rs: any(r["headers"]["session"] != first for r in rs), 30)
    second = [r for r in again if r["headers"]["session"] != first]

    reconnect_s = second[0]["timestamp_ms"] / 1000 - back_at
    print(f"\nfirst frame {reconnect_s:.2f} s after the camera came back")
    assert second[0]["headers"]["session"] == first.rsplit("-", 1)[0] + "-2"
    assert reconnect_s < 5
    assert all(r["headers"]["session"] == first for r in again[:before])  # no frame of session 2 before the drop
    last_of_first = max(int(r["headers"]["frame_index"]) for r in again if r["headers"]["session"] == first)
    assert int(second[0]["headers"]["frame_index"]) > last_of_first  # indexes go on: record ids stay unique
    assert ingester.metric("inferstream_camera_reconnects_total", camera="cam-1") == 1
    assert ingester.metric("inferstream_camera_disconnects_total", camera="cam-1", reason="ended") == 1
    assert ingester.metric("inferstream_camera_connected", camera="cam-1") == 1


def test_stalled_broker_keeps_queue_bounded_and_counts_drops(settings, rtsp, ingesters, tmp_path):
    own = EmbeddedBroker(free_port(), log_path=tmp_path / "own-broker.log").start()
    try:
        settings = settings.replace(broker=own.bootstrap)
        cam = {"id": "cam-1", "url": rtsp.url("/cam"), "queue_frames": 3, "max_side": 640}  # every frame: 10/s
        ingester = Ingester(settings, [cam], tmp_path)
        ingesters.append(ingester)
        published = lambda: ingester.metric("inferstream_camera_frames_published_total", camera="cam-1")  # noqa: E731
        dropped = lambda: ingester.metric("inferstream_camera_frames_dropped_total", camera="cam-1", reason="queue_full")  # noqa: E731
        assert wait_until(lambda: published() >= 10, 30)
        rss_flowing = ingester.rss_bytes()

        os.kill(own.process.pid, signal.SIGSTOP)
        try:
            stalled_at = published()
            peak_queue, peak_bytes, peak_rss = 0, 0, 0

            def observe() -> bool:
                nonlocal peak_queue, peak_bytes, peak_rss
                m = ingester.metrics()
                peak_queue = max(peak_queue, m[("inferstream_camera_queue_frames", (("camera", "cam-1"),))])
                peak_bytes = max(peak_bytes, m[("inferstream_camera_queue_bytes", (("camera", "cam-1"),))])
                peak_rss = max(peak_rss, ingester.rss_bytes())
                return dropped() >= 40  # 4+ s of the camera's frames with nowhere to go

            assert wait_until(observe, 30, interval_s=0.1)
            assert published() - stalled_at <= 4 + 1  # at most the sends already in flight went through
        finally:
            os.kill(own.process.pid, signal.SIGCONT)

        print(f"\nstall: queue peak {peak_queue:.0f} frames / {peak_bytes / 1e3:.0f} kB, "
              f"RSS {rss_flowing / 1e6:.0f} -> {peak_rss / 1e6:.0f} MB, dropped {dropped():.0f}")
        assert peak_queue <= 3
        assert peak_bytes <= 3 * 640 * 480 * 3  # three frames, never more (JPEGs are far smaller)
        assert peak_rss - rss_flowing < 40e6  # 40+ frames dropped, not kept: no growth with the stall
        resumed = published()
        assert wait_until(lambda: published() >= resumed + 10, 30)  # frames flow again
        assert ingester.metric("inferstream_camera_reconnects_total", camera="cam-1") == 0  # the camera never noticed
        code, _ = ingester.stop()
        assert code == 0
    finally:
        own.stop()


def test_a_dead_camera_does_not_stop_the_others(settings, rtsp, frames, ingesters, tmp_path):
    dead_port = free_port()  # nothing listens there
    cams = [{"id": "dead", "url": f"rtsp://127.0.0.1:{dead_port}/cam"},
            {"id": "alive", "url": rtsp.url("/cam2"), "fps": 5},
            {"id": "off", "url": rtsp.url("/cam"), "enabled": False}]
    ingester = Ingester(settings, cams, tmp_path, defaults=FAST_RETRY)
    ingesters.append(ingester)
    frames.wait_for(lambda rs: len(rs) >= 10, 30)
    assert wait_until(lambda: ingester.metric("inferstream_camera_connect_failures_total", camera="dead") >= 3, 10)

    assert {r["key"] for r in frames.records} == {"alive"}
    health = ingester.health()
    assert health["status"] == "degraded"
    assert health["cameras"]["alive"]["state"] == "streaming"
    assert health["cameras"]["dead"]["state"] in ("connecting", "backoff") and health["cameras"]["dead"]["session"] is None
    assert health["cameras"]["off"]["state"] == "disabled" and health["cameras"]["off"]["frames_read"] == 0
    assert ingester.metric("inferstream_camera_frames_read_total", camera="dead") == 0
    assert ingester.metric("inferstream_camera_seconds_since_last_frame", camera="alive") < 2


def test_produce_video_reads_a_live_rtsp_source_at_the_cameras_pace(settings, rtsp, frames):
    env = {**os.environ, **settings.to_env()}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "streams.cli", "produce", "video", rtsp.url("/cam"), "--stream-id",
                           "live", "--fps", "5", "--max-side", "320", "--max-frames", "15"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"sent": 15, "refused": 0}
    got = frames.wait_for(lambda rs: len(rs) >= 15, 20)
    assert {(r["headers"]["width"], r["headers"]["height"]) for r in got} == {("320", "240")}
    pts = sorted(float(r["headers"]["pts"]) for r in got)
    assert pts[-1] - pts[0] == pytest.approx(2.8, abs=0.01)
    # paced by the camera: the 2.8 s of video took about that long to arrive (at most FFmpeg's 1 s probe early)
    stamps = sorted(r["timestamp_ms"] for r in got)
    assert (stamps[-1] - stamps[0]) / 1000 > 2.8 - 1.2 and elapsed > 2.8 - 1.2
