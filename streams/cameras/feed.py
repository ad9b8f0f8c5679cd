"""One camera: a reader thread (source -> bounded newest-first queue) and a sender coroutine
(queue -> the shared producer), with the counters the ingester reports.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import av
from aiokafka.errors import KafkaError

from operators.images import encode_image
from operators.video import DecodedFrame, DecodeStats, open_source, read_frames
from streams.cameras.config import CameraConfig, redact_url
from streams.config import Settings
from streams.produce import oversize_reason
from streams.schemas import FrameMeta

log = logging.getLogger(__name__)

_IN_FLIGHT = 4  # unacknowledged sends per camera: enough to keep the link busy, few enough to stay fresh
DROP_REASONS = ("queue_full", "send_failed", "oversized", "shutdown")
DISCONNECT_REASONS = ("ended", "timeout", "error")


def backoff_delays(initial_s: float, max_s: float):
    """Waits before successive reconnect attempts: doubling from `initial_s`, capped at `max_s`.

    >>> import itertools; list(itertools.islice(backoff_delays(0.5, 4.0), 6))
    [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    """
    delay = initial_s
    while True:
        yield delay
        delay = min(delay * 2, max_s)


class Pace:
    """How far a reader is behind its camera: wall time since a session's first frame minus the camera's
    own time (pts) since then. A live camera sends in real time, so this stays near 0 while the reader
    keeps up and grows when it cannot (decoding too slow for the camera's rate); frames still arrive, so
    `seconds_since_last_frame` does not show it."""

    def __init__(self) -> None:
        self._anchor: tuple[float, float] | None = None  # (monotonic, pts) of the session's first frame
        self.behind_s = 0.0

    def start_session(self) -> None:
        self._anchor, self.behind_s = None, 0.0

    def frame(self, pts: float, now: float) -> float:
        if self._anchor is None:
            self._anchor = (now, pts)
        self.behind_s = max(0.0, (now - self._anchor[0]) - (pts - self._anchor[1]))
        return self.behind_s


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
        self.pace = Pace()
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

    def abandon_reader(self) -> None:
        """Let the sender finish once the queue is sent, even if the reader is still blocked in FFmpeg
        (a daemon thread, left behind at exit)."""
        self.state = "stopped"
        self._notify()

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
                self.pace.start_session()
                for frame in frames:
                    self.last_frame_at = time.monotonic()
                    self.pace.frame(frame.pts, self.last_frame_at)
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
            "seconds_behind": round(self.pace.behind_s, 3),
            "frames_read": self.stats.decode.decoded, "published": self.stats.published,
            "dropped": dict(self.stats.dropped), "decode_errors": self.stats.decode.errors,
            "reconnects": self.stats.reconnects, "connect_failures": self.stats.connect_failures,
            "disconnects": dict(self.stats.disconnects), "queue_frames": frames, "queue_bytes": nbytes,
        }

    def seconds_since_last_frame(self) -> float:
        """Since the last frame read, or since the ingester started when none came yet."""
        return time.monotonic() - (self.last_frame_at if self.last_frame_at is not None else self.started_at)

