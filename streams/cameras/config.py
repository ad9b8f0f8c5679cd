"""A cameras file (`inferstream cameras FILE.yaml`): one validated CameraConfig per camera.

`defaults:` apply to every camera that does not set a key; unknown keys, duplicate ids and values out of
range are refused with a message naming the camera (a typo must not silently run a camera at defaults).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from operators.video import SourceOptions
from streams.schemas import MAX_ID_CHARS


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
    backoff_max_s: float = 5.0  # measured: a 30 s cap kept a camera back after 15 s waiting until ~31 s
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

