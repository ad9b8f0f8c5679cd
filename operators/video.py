"""Video files and live sources <-> RGB frames with PyAV (FFmpeg), with frame sampling for producers.

Files are decoded as fast as the decoder goes (`sample_frames`). Live sources (RTSP/RTMP/HTTP(S)/HLS
URLs, V4L2 devices: `is_live`) are opened with timeouts (`open_source`) and decoded packet by packet as
the source delivers them (`read_frames`): the source sets the pace, nothing is read ahead beyond
FFmpeg's stream probe, and a packet that fails to decode is counted and skipped instead of ending the
stream. Both sample with the same rule (`FrameSampler`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np


@dataclass(frozen=True)
class DecodedFrame:
    index: int  # position of the frame in the decoded stream (0-based), kept when sampling
    pts: float  # presentation time in seconds
    rgb: np.ndarray  # (H, W, 3) uint8


class FrameSampler:
    """Which frames to keep: every `every`-th, or about `fps` per second of video time, or all.

    >>> s = FrameSampler(fps=2)
    >>> [i for i in range(10) if s.keep(i, i / 10)]  # 10 fps video sampled at 2 fps
    [0, 5]
    """

    def __init__(self, fps: float | None = None, every: int | None = None) -> None:
        if fps is not None and every is not None:
            raise ValueError("choose --fps or --every, not both")
        if (fps is not None and fps <= 0) or (every is not None and every < 1):
            raise ValueError("fps must be > 0 and every >= 1")
        self.fps, self.every = fps, every
        self._next_time = 0.0

    def keep(self, index: int, pts: float) -> bool:
        if self.every is not None and index % self.every:
            return False
        if self.fps is not None:
            if pts + 1e-9 < self._next_time:
                return False
            self._next_time += 1.0 / self.fps
            if self._next_time <= pts:  # after a gap in the video, restart the grid instead of catching up
                self._next_time = pts + 1.0 / self.fps
        return True


def sample_frames(path: str | Path, fps: float | None = None, every: int | None = None,
                  max_frames: int | None = None, max_side: int | None = None) -> Iterator[DecodedFrame]:
    """Decode `path` (threaded) and yield every `every`-th frame, or frames at about `fps` per second of
    video time, or all frames. Only sampled frames are converted to RGB arrays (scaled to fit `max_side`)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or stream.guessed_rate or 30)
        timed = ((index, float(frame.time) if frame.time is not None else index / rate, frame)
                 for index, frame in enumerate(container.decode(stream)))
        yield from _sampled(timed, FrameSampler(fps, every), max_frames, max_side)


def _sampled(timed: Iterator[tuple[int, float, av.VideoFrame]], sampler: FrameSampler, max_frames: int | None,
             max_side: int | None) -> Iterator[DecodedFrame]:
    """The frames `sampler` keeps of (index, pts, frame), converted to RGB only then, `max_frames` at most."""
    if max_frames is not None and max_frames <= 0:
        return
    emitted = 0
    for index, pts, frame in timed:
        if sampler.keep(index, pts):
            yield DecodedFrame(index, pts, _to_rgb(frame, max_side))
            emitted += 1
            if emitted == max_frames:  # at once: a live source would otherwise be read for one frame more
                return


# ------------------------------------------------------------------------------------ live sources
LIVE_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "hls", "udp", "rtp", "srt", "tcp")


def is_live(source: str | Path) -> bool:
    """A URL of a protocol FFmpeg streams (rtsp://, rtmp://, http(s):// incl. HLS, ...) or a V4L2 device.

    >>> [is_live(s) for s in ("rtsp://10.0.0.7/stream1", "https://cdn/live.m3u8", "/dev/video0", "clip.mp4")]
    [True, True, True, False]
    """
    text = str(source)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    return scheme in LIVE_SCHEMES or text.startswith("/dev/video")


@dataclass(frozen=True)
class SourceOptions:
    """How a live source is opened. Timeouts are PyAV's: `open_timeout_s` bounds connecting and
    probing, `read_timeout_s` bounds each wait for data (a silent camera raises instead of hanging)."""

    rtsp_transport: str = "tcp"  # tcp: no lost UDP packets (smeared frames) behind NAT or on busy links
    open_timeout_s: float = 10.0
    read_timeout_s: float = 10.0
    # FFmpeg's probe reads ~5 s of a live stream before the first frame comes out; 1 s is enough for
    # a camera's H.264/H.265 and cuts that start (and reconnect) delay.
    analyze_duration_s: float = 1.0
    ffmpeg_options: dict[str, str] = field(default_factory=dict)  # any other AVOptions, e.g. {"rtsp_flags": "prefer_tcp"}


def open_source(source: str | Path, options: SourceOptions | None = None) -> av.container.InputContainer:
    """Open a file or a live source; raises av.FFmpegError (or OSError) when it cannot be opened in time."""
    options = options or SourceOptions()
    text = str(source)
    av_options: dict[str, str] = {}
    fmt = None
    if text.lower().startswith(("rtsp://", "rtsps://")):
        av_options["rtsp_transport"] = options.rtsp_transport
    if text.startswith("/dev/video"):
        fmt = "v4l2"
    if is_live(text):
        av_options["analyzeduration"] = str(int(options.analyze_duration_s * 1_000_000))
    av_options.update({k: str(v) for k, v in options.ffmpeg_options.items()})
    return av.open(text, format=fmt, options=av_options, timeout=(options.open_timeout_s, options.read_timeout_s))


@dataclass
class DecodeStats:
    """Counts kept by `read_frames` while it runs (read from other threads for metrics)."""

    decoded: int = 0  # frames that came out of the decoder, sampled or not
    errors: int = 0  # packets the decoder refused (corrupt or truncated data)


def fit_within(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """Size scaled down (never up) so that the longer side is at most `max_side`, aspect kept.

    >>> fit_within(1920, 1080, 640), fit_within(640, 480, 640), fit_within(640, 480, None)
    ((640, 360), (640, 480), (640, 480))
    """
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_rgb(frame: av.VideoFrame, max_side: int | None) -> np.ndarray:
    """(H, W, 3) uint8 RGB, scaled by swscale (area filter) to fit `max_side` in the same conversion."""
    width, height = fit_within(frame.width, frame.height, max_side)
    if (width, height) == (frame.width, frame.height):
        return frame.to_ndarray(format="rgb24")
    return frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="AREA")


def read_frames(container: av.container.InputContainer, *, fps: float | None = None, every: int | None = None,
                max_frames: int | None = None, max_side: int | None = None, first_index: int = 0,
                stats: DecodeStats | None = None) -> Iterator[DecodedFrame]:
    """Frames of an open source's first video stream as the source delivers them, sampled like
    `sample_frames` and scaled to fit `max_side` while converting to RGB (swscale, area filter).

    Ends when the source ends; raises av.FFmpegError when the source fails or stays silent past the
    read timeout. Indexes count decoded frames from `first_index` (a reconnecting reader continues its
    count). Decoding is single-threaded: frame threads would hold frames back, and many cameras in one
    process already use every core."""
    stats = stats if stats is not None else DecodeStats()
    stream = container.streams.video[0]
    stream.thread_count = 1
    rate = float(stream.average_rate or stream.guessed_rate or 25)

    def timed() -> Iterator[tuple[int, float, av.VideoFrame]]:
        index, first_pts = first_index - 1, None
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.InvalidDataError:
                stats.errors += 1
                continue
            for frame in frames:
                stats.decoded += 1
                index += 1
                pts = float(frame.time) if frame.time is not None else math.nan
                if math.isnan(pts):  # some cameras leave the first frames unstamped
                    pts = (first_pts or 0.0) + (index - first_index) / rate
                first_pts = pts if first_pts is None else first_pts
                yield index, pts, frame

    yield from _sampled(timed(), FrameSampler(fps, every), max_frames, max_side)


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: int = 10, codec: str = "mpeg4") -> Path:
    """Encode RGB frames (all the same even size) into a video file."""
    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = None
        for rgb in frames:
            if stream is None:
                stream = container.add_stream(codec, rate=fps)
                stream.height, stream.width = rgb.shape[:2]
                stream.pix_fmt = "yuv420p"
                stream.bit_rate = 2_000_000  # the encoder default blurs later frames noticeably
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        if stream is not None:
            for packet in stream.encode():
                container.mux(packet)
    return path
