"""`inferstream cameras FILE.yaml`: one process ingests many live cameras into the `frames` topic.

Per camera, one reader thread and one sender task:

- The reader thread opens the source (operators.video.open_source: RTSP over TCP, open/read
  timeouts), decodes as the camera delivers (no reading ahead), samples to the camera's fps, scales
  to fit `max_side` while converting to RGB, encodes a JPEG and puts the record in the camera's queue.
  When the source fails, ends or goes silent past the read timeout it is reopened after a capped
  exponential backoff (reset once a session delivers a frame); other cameras are not touched.
  Each successful open starts a new session, carried by every frame in the `session` header
  (`<ingester run>-<n>`): a consumer tells a reconnect (new session) from a stall (same session,
  a gap in time).
- The queue is bounded (`queue_frames`): when the broker is slower than the camera, the oldest
  queued frame is dropped (and counted) for the newest, so memory stays flat however long the
  broker stalls; the reader never waits for the broker (a camera left unread would stall too).
- The sender task (event loop) hands queued frames to one shared producer, oldest first, with at
  most `_IN_FLIGHT` unacknowledged sends per camera; a frame is counted published once the broker
  has acknowledged it (acks=all), and a failed send is counted as a drop, not retried (live frames
  are worth less the older they get).

Metrics per camera on the ingester's own /metrics (Prometheus) and /health (JSON); SIGTERM or Ctrl-C
stops reading, sends what is queued (bounded wait), and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import yaml
from aiohttp import web
from aiokafka.errors import KafkaError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from operators.images import encode_image
from operators.video import DecodedFrame, DecodeStats, SourceOptions, open_source, read_frames
from streams.broker import wait_for_metadata
from streams.config import Settings
from streams.kafka import ensure_topics, producer
from streams.produce import oversize_reason
from streams.schemas import FRAMES, MAX_ID_CHARS, FrameMeta

log = logging.getLogger(__name__)

_IN_FLIGHT = 4  # unacknowledged sends per camera: enough to keep the link busy, few enough to stay fresh
DROP_REASONS = ("queue_full", "send_failed", "oversized", "shutdown")
DISCONNECT_REASONS = ("ended", "timeout", "error")


# ------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class CameraConfig:
    """One camera of a cameras file (keys of `defaults:` apply to every camera that does not set them)."""

    id: str  # stream id: the frames' key and stream_id header
    url: str  # anything PyAV opens: rtsp://, rtmp://, http(s)://, /dev/videoN, a file
    enabled: bool = True
    fps: float | None = None  # sample about N frames per second of the camera's time; None: every frame
    max_side: int | None = 640  # scale down (never up) before encoding; None: publish at the camera's size
    jpeg_quality: int = 85
    queue_frames: int = 8  # newest frames kept while the broker is slower than the camera
    rtsp_transport: str = "tcp"
    open_timeout_s: float = 10.0
    read_timeout_s: float = 10.0  # no data for this long: the source is stalled, reconnect
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    ffmpeg_options: dict[str, str] = field(default_factory=dict)

    def source_options(self) -> SourceOptions:
        return SourceOptions(rtsp_transport=self.rtsp_transport, open_timeout_s=self.open_timeout_s,
                             read_timeout_s=self.read_timeout_s, ffmpeg_options=dict(self.ffmpeg_options))

    def validate(self) -> CameraConfig:
        problems = []
        if not isinstance(self.id, str) or not self.id or len(self.id) > MAX_ID_CHARS:
            problems.append(f"id must be a non-empty string of at most {MAX_ID_CHARS} characters")
        if not isinstance(self.url, str) or not self.url:
            problems.append("url must be a non-empty string")
        if self.fps is not None and not (isinstance(self.fps, int | float) and self.fps > 0):
            problems.append("fps must be > 0 (or null for every frame)")
        if self.max_side is not None and not (isinstance(self.max_side, int) and self.max_side >= 16):
            problems.append("max_side must be an integer >= 16 (or null)")
        if not (isinstance(self.jpeg_quality, int) and 1 <= self.jpeg_quality <= 100):
            problems.append("jpeg_quality must be an integer in 1..100")
        if not (isinstance(self.queue_frames, int) and self.queue_frames >= 1):
            problems.append("queue_frames must be an integer >= 1")
        if self.rtsp_transport not in ("tcp", "udp", "udp_multicast", "http", "https"):
            problems.append("rtsp_transport must be tcp, udp, udp_multicast, http or https")
        for name in ("open_timeout_s", "read_timeout_s", "backoff_initial_s", "backoff_max_s"):
            if not (isinstance(getattr(self, name), int | float) and getattr(self, name) > 0):
                problems.append(f"{name} must be > 0")
        if not problems and self.backoff_max_s < self.backoff_initial_s:
            problems.append("backoff_max_s must be >= backoff_initial_s")
        if not isinstance(self.enabled, bool):
            problems.append("enabled must be true or false")
        if not isinstance(self.ffmpeg_options, dict):
            problems.append("ffmpeg_options must be a mapping of FFmpeg option names to values")
        if problems:
            raise ValueError(f"camera {self.id!r}: " + "; ".join(problems))
        return self


_CAMERA_KEYS = {f.name for f in dataclasses.fields(CameraConfig)}


def parse_cameras(raw: Any, origin: str = "cameras file") -> list[CameraConfig]:
    """`{"defaults": {...}, "cameras": [{...}, ...]}` -> validated configs; ValueError names the problem."""
    if not isinstance(raw, dict) or not isinstance(raw.get("cameras"), list) or not raw["cameras"]:
        raise ValueError(f"{origin}: expected a mapping with a non-empty list `cameras`")
    unknown = set(raw) - {"defaults", "cameras"}
    if unknown:
        raise ValueError(f"{origin}: unknown top-level keys {sorted(unknown)} (expected defaults, cameras)")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict) or {"id", "url"} & set(defaults):
        raise ValueError(f"{origin}: `defaults` must be a mapping of camera settings other than id and url")
    configs: list[CameraConfig] = []
    for n, entry in enumerate(raw["cameras"], 1):
        if not isinstance(entry, dict):
            raise ValueError(f"{origin}: camera #{n} is not a mapping")
        values = {**defaults, **entry}
        bad = set(values) - _CAMERA_KEYS
        if bad:
            raise ValueError(f"{origin}: camera #{n} ({entry.get('id')!r}): unknown keys {sorted(bad)}")
        missing = {"id", "url"} - set(values)
        if missing:
            raise ValueError(f"{origin}: camera #{n} lacks {sorted(missing)}")
        configs.append(CameraConfig(**values).validate())
    ids = [c.id for c in configs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{origin}: duplicate camera ids {duplicates}")
    return configs


def load_cameras(path: str | Path) -> list[CameraConfig]:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    return parse_cameras(raw, str(path))


def redact_url(url: str) -> str:
    """`url` (or a message quoting URLs) without passwords, for logs and /health (camera URLs carry them).

    >>> redact_url("rtsp://admin:s3cret@10.0.0.7:554/stream1"), redact_url("/dev/video0")
    ('rtsp://admin:***@10.0.0.7:554/stream1', '/dev/video0')
    """
    return re.sub(r"([a-zA-Z][\w+.-]*://[^/@:\s']*):[^/@\s']*@", r"\1:***@", url)


def backoff_delays(initial_s: float, max_s: float):
    """Waits before successive reconnect attempts: doubling from `initial_s`, capped at `max_s`.

    >>> import itertools; list(itertools.islice(backoff_delays(0.5, 4.0), 6))
    [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    """
    delay = initial_s
    while True:
        yield delay
        delay = min(delay * 2, max_s)


# ------------------------------------------------------------------------------------- one camera
@dataclass
class CameraStats:
    published: int = 0  # acknowledged by the broker
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    disconnects: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DISCONNECT_REASONS, 0))
    connect_failures: int = 0
    reconnects: int = 0  # successful opens after the first
    decode: DecodeStats = field(default_factory=DecodeStats)  # frames decoded, packets refused


Record = tuple[bytes, bytes, list[tuple[str, bytes]]]  # key, JPEG, headers


class CameraFeed:
    """One camera: the reader thread (source -> bounded queue) and the sender coroutine (queue -> producer).

    Counters have one writer each (the reader thread or the event loop), so they need no lock; the
    queue is shared and locked."""

    def __init__(self, config: CameraConfig, settings: Settings, run_id: str) -> None:
        self.config = config
        self.settings = settings
        self.run_id = run_id
        self.stats = CameraStats()
        self.state = "starting" if config.enabled else "disabled"  # connecting | streaming | backoff | stopped
        self.session: str | None = None
        self.sessions = 0
        self.started_at = time.monotonic()
        self.last_frame_at: float | None = None
        self._queue: deque[Record] = deque()
        self._queued_bytes = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    # ---- reader thread
    def start_reader(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._wake = asyncio.Event()
        self._thread = threading.Thread(target=self._read_forever, name=f"camera-{self.config.id}", daemon=True)
        self._thread.start()

    def stop_reader(self) -> None:
        self._stop.set()

    def join_reader(self, timeout_s: float) -> bool:
        """True when the reader has ended (a read blocked in FFmpeg ends at its read timeout at the latest)."""
        if self._thread is not None:
            self._thread.join(timeout_s)
            return not self._thread.is_alive()
        return True

    def _read_forever(self) -> None:
        cfg = self.config
        delays = backoff_delays(cfg.backoff_initial_s, cfg.backoff_max_s)
        while not self._stop.is_set():
            self.state = "connecting"
            try:
                container = open_source(cfg.url, cfg.source_options())
            except (av.FFmpegError, OSError) as exc:
                self.stats.connect_failures += 1
                log.warning("camera %s: cannot open %s: %s", cfg.id, redact_url(cfg.url), redact_url(str(exc)))
            else:
                self.sessions += 1
                if self.sessions > 1:
                    self.stats.reconnects += 1
                self.session = f"{self.run_id}-{self.sessions}"
                self.state = "streaming"
                log.info("camera %s: streaming (session %s)", cfg.id, self.session)
                if self._read_session(container):
                    delays = backoff_delays(cfg.backoff_initial_s, cfg.backoff_max_s)  # it worked: retry soon
            if self._stop.is_set():
                break
            self.state = "backoff"
            self._stop.wait(next(delays) * random.uniform(0.9, 1.0))  # jitter: cameras of one site don't retry in step
        self.state = "stopped"
        self._notify()

    def _read_session(self, container) -> bool:
        """Read one connection until it ends, fails or stalls; True when it delivered a frame."""
        cfg = self.config
        delivered = False
        reason = "ended"
        try:
            with container:
                frames = read_frames(container, fps=cfg.fps, max_side=cfg.max_side, first_index=self.stats.decode.decoded,
                                     stats=self.stats.decode)
                for frame in frames:
                    self.last_frame_at = time.monotonic()
                    delivered = True
                    self._enqueue(frame)
                    if self._stop.is_set():
                        return delivered
        except av.error.ExitError:  # PyAV's interrupt: no data within the read timeout
            reason = "timeout"
        except (av.FFmpegError, OSError) as exc:
            reason = "error"
            log.warning("camera %s: source failed: %s", cfg.id, redact_url(str(exc)))
        self.stats.disconnects[reason] += 1
        log.warning("camera %s: session %s %s; reconnecting", cfg.id, self.session,
                    {"ended": "ended", "timeout": f"silent for {cfg.read_timeout_s:g}s", "error": "failed"}[reason])
        return delivered

    def _enqueue(self, frame: DecodedFrame) -> None:
        cfg = self.config
        h, w = frame.rgb.shape[:2]
        meta = FrameMeta(cfg.id, frame.index, frame.pts, "jpeg", w, h, self.session)
        value = encode_image(frame.rgb, "jpeg", cfg.jpeg_quality)
        headers = meta.headers()
        reason = oversize_reason(self.settings, meta, value, headers)
        if reason is not None:
            self.stats.dropped["oversized"] += 1
            log.warning("camera %s: dropped: %s (lower max_side or jpeg_quality)", cfg.id, reason)
            return
        with self._lock:
            if len(self._queue) >= cfg.queue_frames:  # broker behind: the newest frame is worth more
                _, old, _ = self._queue.popleft()
                self._queued_bytes -= len(old)
                self.stats.dropped["queue_full"] += 1
            self._queue.append((cfg.id.encode(), value, headers))
            self._queued_bytes += len(value)
        self._notify()

    def _notify(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: we are shutting down
            self._loop.call_soon_threadsafe(self._wake.set)

    def _pop(self) -> Record | None:
        with self._lock:
            if not self._queue:
                return None
            record = self._queue.popleft()
            self._queued_bytes -= len(record[1])
            return record

    @property
    def queued(self) -> tuple[int, int]:
        """(frames, bytes) waiting for the producer."""
        with self._lock:
            return len(self._queue), self._queued_bytes

    # ---- sender (event loop)
    async def send_forever(self, kafka, topic: str) -> None:
        """Queue -> producer until the reader has stopped and the queue is empty."""
        in_flight: set[asyncio.Future] = set()
        try:
            while True:
                record = self._pop()
                if record is None:
                    if self.state == "stopped":
                        break
                    await self._wake.wait()
                    self._wake.clear()
                    continue
                while len(in_flight) >= _IN_FLIGHT:
                    _, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                key, value, headers = record
                try:
                    delivery = await kafka.send(topic, value, key=key, headers=headers)
                except KafkaError as exc:  # e.g. no buffer space within the request timeout: broker stalled
                    self.stats.dropped["send_failed"] += 1
                    log.warning("camera %s: send failed: %s", self.config.id, exc)
                    continue
                delivery.add_done_callback(self._delivered)
                in_flight.add(delivery)
        finally:
            if in_flight:
                await asyncio.wait(in_flight)

    def _delivered(self, delivery: asyncio.Future) -> None:
        if delivery.cancelled() or delivery.exception() is not None:
            self.stats.dropped["send_failed"] += 1
        else:
            self.stats.published += 1

    def drop_queued(self, reason: str = "shutdown") -> int:
        with self._lock:
            n = len(self._queue)
            self._queue.clear()
            self._queued_bytes = 0
        self.stats.dropped[reason] += n
        return n

    def health(self) -> dict[str, Any]:
        frames, nbytes = self.queued
        return {
            "url": redact_url(self.config.url), "enabled": self.config.enabled, "state": self.state, "session": self.session,
            "seconds_since_last_frame": round(self.seconds_since_last_frame(), 3),
            "frames_read": self.stats.decode.decoded, "published": self.stats.published,
            "dropped": dict(self.stats.dropped), "decode_errors": self.stats.decode.errors,
            "reconnects": self.stats.reconnects, "connect_failures": self.stats.connect_failures,
            "disconnects": dict(self.stats.disconnects), "queue_frames": frames, "queue_bytes": nbytes,
        }

    def seconds_since_last_frame(self) -> float:
        """Since the last frame read, or since the ingester started when none came yet."""
        return time.monotonic() - (self.last_frame_at if self.last_frame_at is not None else self.started_at)


# ------------------------------------------------------------------------------------------ metrics
class CameraCollector:
    """Prometheus metrics read from the feeds at scrape time (the counters live on the feeds)."""

    def __init__(self, feeds: list[CameraFeed]) -> None:
        self.feeds = feeds

    def collect(self):
        def counter(name, doc, value_of, extra: tuple[str, tuple[str, ...]] | None = None):
            labels = ["camera"] + ([extra[0]] if extra else [])
            family = CounterMetricFamily(name, doc, labels=labels)
            for f in self.feeds:
                if extra is None:
                    family.add_metric([f.config.id], value_of(f))
                else:
                    for label in extra[1]:
                        family.add_metric([f.config.id, label], value_of(f)[label])
            return family

        def gauge(name, doc, value_of):
            family = GaugeMetricFamily(name, doc, labels=["camera"])
            for f in self.feeds:
                family.add_metric([f.config.id], value_of(f))
            return family

        yield counter("inferstream_camera_frames_read", "Frames decoded from the camera (before fps sampling)",
                      lambda f: f.stats.decode.decoded)
        yield counter("inferstream_camera_frames_published", "Frames acknowledged by the broker",
                      lambda f: f.stats.published)
        yield counter("inferstream_camera_frames_dropped", "Sampled frames not published, by reason (queue_full: the "
                      "broker was slower than the camera)", lambda f: f.stats.dropped, ("reason", DROP_REASONS))
        yield counter("inferstream_camera_decode_errors", "Packets the decoder refused (corrupt or truncated data)",
                      lambda f: f.stats.decode.errors)
        yield counter("inferstream_camera_reconnects", "Successful reopenings of the source after a session ended",
                      lambda f: f.stats.reconnects)
        yield counter("inferstream_camera_connect_failures", "Attempts to open the source that failed",
                      lambda f: f.stats.connect_failures)
        yield counter("inferstream_camera_disconnects", "Sessions that ended, by reason (timeout: silent past the read "
                      "timeout)", lambda f: f.stats.disconnects, ("reason", DISCONNECT_REASONS))
        yield gauge("inferstream_camera_seconds_since_last_frame", "Seconds since the camera's last frame (since start "
                    "when none came yet)", lambda f: f.seconds_since_last_frame())
        yield gauge("inferstream_camera_queue_frames", "Frames waiting for the producer", lambda f: f.queued[0])
        yield gauge("inferstream_camera_queue_bytes", "Encoded bytes waiting for the producer", lambda f: f.queued[1])
        yield gauge("inferstream_camera_connected", "1 while a session is streaming", lambda f: int(f.state == "streaming"))


def _web_app(feeds: list[CameraFeed], registry: CollectorRegistry) -> web.Application:
    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def health(_request: web.Request) -> web.Response:
        cameras = {f.config.id: f.health() for f in feeds}
        streaming = all(c["state"] == "streaming" for c in cameras.values() if c["enabled"])
        body = {"status": "ok" if streaming else "degraded", "cameras": cameras}
        return web.json_response(body)  # 200 either way: the process is alive; "degraded" names who is not

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    return app


# ----------------------------------------------------------------------------------------- ingester
async def run_ingester(settings: Settings, cameras: list[CameraConfig], stop: asyncio.Event, *,
                       web_host: str = "127.0.0.1", web_port: int = 0, stop_timeout_s: float = 10.0,
                       on_ready: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Ingest every enabled camera until `stop` is set; returns the final per-camera counts."""
    await wait_for_metadata(settings.broker, 30, settings.kafka_client_options())
    await ensure_topics(settings)
    run_id = str(int(time.time() * 1000))
    feeds = [CameraFeed(c, settings, run_id) for c in cameras]
    registry = CollectorRegistry()
    registry.register(CameraCollector(feeds))
    ProcessCollector(registry=registry)  # process_resident_memory_bytes: the flat-memory promise, observable
    runner = web.AppRunner(_web_app(feeds, registry), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, web_host, web_port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    kafka = producer(settings)
    await kafka.start()
    loop = asyncio.get_running_loop()
    topic = settings.topic(FRAMES)
    live = [f for f in feeds if f.config.enabled]
    for f in live:
        f.start_reader(loop)
    senders = [asyncio.ensure_future(f.send_forever(kafka, topic)) for f in live]
    if on_ready is not None:
        on_ready({"cameras": len(live), "disabled": len(feeds) - len(live), "web": f"{web_host}:{port}", "topic": topic})
    try:
        await stop.wait()
    finally:
        log.info("stopping: %d cameras", len(live))
        for f in live:
            f.stop_reader()
        deadline = time.monotonic() + stop_timeout_s

        def left(at_least: float) -> float:
            return max(at_least, deadline - time.monotonic())

        # readers end at their next frame (a blocked read at its read timeout); what they queued is still sent
        await asyncio.to_thread(lambda: [f.join_reader(left(0.0)) for f in live])
        for f in live:
            f.state = "stopped"  # a reader still blocked in FFmpeg is abandoned (daemon thread)
            f._notify()
        _, pending = await asyncio.wait(senders, timeout=left(0.1)) if senders else (set(), set())
        for task in pending:
            task.cancel()
        for f in live:
            f.drop_queued("shutdown")
        with contextlib.suppress(Exception):  # a stalled broker must not hold the exit
            await asyncio.wait_for(kafka.stop(), timeout=left(1.0))
        await runner.cleanup()
    return {f.config.id: f.health() for f in feeds}


def serve_cameras(settings: Settings, path: str | Path, *, web_host: str, web_port: int,
                  announce: Callable[[str], None] = print) -> dict[str, Any]:
    """The `inferstream cameras` command: run until SIGTERM/SIGINT, then stop gracefully."""
    import signal

    cameras = load_cameras(path)

    async def main() -> dict[str, Any]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await run_ingester(settings, cameras, stop, web_host=web_host, web_port=web_port,
                                  on_ready=lambda info: announce(json.dumps(info)))

    return asyncio.run(main())
