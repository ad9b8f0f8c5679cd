"""Video files <-> RGB frames with PyAV (FFmpeg), with frame sampling for producers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np


@dataclass(frozen=True)
class DecodedFrame:
    index: int  # position of the frame in the decoded stream (0-based), kept when sampling
    pts: float  # presentation time in seconds
    rgb: np.ndarray  # (H, W, 3) uint8


def sample_frames(path: str | Path, fps: float | None = None, every: int | None = None,
                  max_frames: int | None = None) -> Iterator[DecodedFrame]:
    """Decode `path` (threaded) and yield every `every`-th frame, or frames at about `fps` per second of
    video time, or all frames. Only sampled frames are converted to RGB arrays."""
    if fps is not None and every is not None:
        raise ValueError("choose --fps or --every, not both")
    if (fps is not None and fps <= 0) or (every is not None and every < 1):
        raise ValueError("fps must be > 0 and every >= 1")
    emitted = 0
    next_time = 0.0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or stream.guessed_rate or 30)
        for index, frame in enumerate(container.decode(stream)):
            pts = float(frame.time) if frame.time is not None else index / rate
            if every is not None and index % every:
                continue
            if fps is not None:
                if pts + 1e-9 < next_time:
                    continue
                next_time += 1.0 / fps
                if next_time <= pts:  # after a gap in the video, restart the grid instead of catching up
                    next_time = pts + 1.0 / fps
            yield DecodedFrame(index, pts, frame.to_ndarray(format="rgb24"))
            emitted += 1
            if max_frames is not None and emitted >= max_frames:
                return


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
