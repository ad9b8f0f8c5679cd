"""Producers: video files and live sources -> `frames`, JSONL -> `posts` / `events`.

Every record is validated before it is sent, and every send is awaited: a producer that exits 0 has
put every record on the broker. A frame too large for a Kafka message is refused with its index and
size; it is never dropped silently. Many live cameras in one process: streams/cameras/.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from operators.errors import BadInput
from operators.images import encode_image
from operators.video import SourceOptions, is_live, open_source, read_frames, sample_frames
from streams import contracts
from streams.config import Settings
from streams.kafka import ensure_topics, producer
from streams.schemas import EVENTS, FRAMES, POSTS, FrameMeta, parse_event, parse_post


class ProduceError(RuntimeError):
    """A user-facing reason why records were refused."""


@dataclass
class ProduceReport:
    sent: int = 0
    refused: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"sent": self.sent, "refused": len(self.refused)}


_IN_FLIGHT = 500  # sends awaited in groups: fast, and every one is still confirmed


Record = tuple[bytes | None, bytes, list | None, float | None]  # key, value, headers, due (s after start) or None


async def _records_off_loop(records: Iterable[Record]):
    """Records of a blocking source (a live camera) taken in a thread, so the producer's network I/O
    (linger, sends, acks) goes on while the source waits for its next frame."""
    it = iter(records)
    done = object()
    while (record := await asyncio.to_thread(next, it, done)) is not done:
        yield record


async def _aiter(records: Iterable[Record]):
    for record in records:
        yield record


async def _send_all(settings: Settings, topic: str, records: Iterable[Record], report: ProduceReport,
                    progress: tqdm | None, blocking_source: bool = False) -> None:
    await ensure_topics(settings)
    kafka = producer(settings)
    await kafka.start()
    try:
        pending = []
        started = time.monotonic()
        async for key, value, headers, due in (_records_off_loop(records) if blocking_source else _aiter(records)):
            if due is not None:  # live pacing: wait without blocking the producer's network I/O
                await asyncio.sleep(max(0.0, started + due - time.monotonic()))
            pending.append(await kafka.send(topic, value, key=key, headers=headers))
            if len(pending) >= _IN_FLIGHT:
                await asyncio.gather(*pending)
                report.sent += len(pending)
                if progress is not None:
                    progress.update(len(pending))
                pending.clear()
        await asyncio.gather(*pending)
        report.sent += len(pending)
        if progress is not None:
            progress.update(len(pending))
    finally:
        await kafka.stop()


def _progress(show: bool, unit: str, total: int | None = None) -> tqdm | None:
    return tqdm(total=total, unit=unit, dynamic_ncols=True, leave=False) if show else None


def oversize_reason(settings: Settings, meta: FrameMeta, value: bytes, headers: list) -> str | None:
    """Why a frame record cannot be sent (over the message limit), or None when it fits."""
    size = len(value) + sum(len(k) + len(v) for k, v in headers) + len(meta.stream_id)
    if size <= settings.max_message_bytes:
        return None
    return (f"frame {meta.frame_index} of stream {meta.stream_id!r} ({meta.width}x{meta.height}, {meta.encoding}) is "
            f"{size:,} bytes, over the {settings.max_message_bytes:,}-byte message limit (INFERSTREAM_MAX_MESSAGE_BYTES); "
            f"use --encoding jpeg or a smaller video")


def _source_frames(source: str | Path, fps: float | None, every: int | None, max_frames: int | None,
                   max_side: int | None, options: SourceOptions | None):
    if not is_live(source):
        yield from sample_frames(source, fps=fps, every=every, max_frames=max_frames, max_side=max_side)
        return
    with open_source(source, options) as container:
        yield from read_frames(container, fps=fps, every=every, max_frames=max_frames, max_side=max_side)


def frame_records(settings: Settings, path: str | Path, stream_id: str, *, fps: float | None = None,
                  every: int | None = None, encoding: str = "jpeg", max_frames: int | None = None,
                  skip_oversized: bool = False, report: ProduceReport | None = None,
                  warn: Callable[[str], None] = print, realtime: float | None = None,
                  max_side: int | None = None, jpeg_quality: int = 90, source_options: SourceOptions | None = None):
    """Decoded, sampled and encoded frames as Records (due at pts / `realtime` when pacing); raises ProduceError on an
    oversized frame unless `skip_oversized` (then each refusal is reported through `warn`). Frames are scaled to
    fit `max_side`; `path` may be a live source (operators.video.is_live), read as the source sends."""
    report = report or ProduceReport()
    for frame in _source_frames(path, fps, every, max_frames, max_side, source_options):
        h, w = frame.rgb.shape[:2]
        meta = FrameMeta(stream_id, frame.index, frame.pts, encoding, w, h)
        value = encode_image(frame.rgb, encoding, jpeg_quality)
        headers = meta.headers()
        reason = oversize_reason(settings, meta, value, headers)
        if reason is not None:
            if not skip_oversized:
                raise ProduceError(reason)
            report.refused.append(reason)
            warn(f"refused: {reason}")
            continue
        yield stream_id.encode(), value, headers, (frame.pts / realtime if realtime else None)


def produce_video(settings: Settings, path: str | Path, stream_id: str, *, fps: float | None = None,
                  every: int | None = None, encoding: str = "jpeg", max_frames: int | None = None,
                  skip_oversized: bool = False, show_progress: bool = False,
                  realtime: float | None = None, max_side: int | None = None, jpeg_quality: int = 90,
                  source_options: SourceOptions | None = None) -> ProduceReport:
    """Publish sampled frames; with `realtime` (a speed factor, 1.0 = as recorded) frames are paced by
    their pts like a live camera instead of being sent as fast as they decode. A live source (rtsp://,
    rtmp://, http(s)://, /dev/videoN) is paced by the source itself, until it ends or `max_frames`."""
    live = is_live(path)
    if not live and not Path(path).is_file():
        raise ProduceError(f"no such video file: {path}")
    if realtime is not None and (realtime <= 0 or live):
        raise ProduceError("--realtime speed must be > 0" if not live else
                           "--realtime paces files; a live source is paced by the source itself")
    report = ProduceReport()
    records = frame_records(settings, path, stream_id, fps=fps, every=every, encoding=encoding,
                            max_frames=max_frames, skip_oversized=skip_oversized, report=report,
                            warn=lambda m: tqdm.write(m, file=sys.stderr), realtime=realtime,
                            max_side=max_side, jpeg_quality=jpeg_quality, source_options=source_options)
    progress = _progress(show_progress, "frame")
    try:
        asyncio.run(_send_all(settings, settings.topic(FRAMES), records, report, progress, blocking_source=live))
    finally:
        if progress is not None:
            progress.close()
    return report


# Posts are keyed by post id (verdicts are per post); events by user id (one user's state, one partition).
_JSONL_KINDS = {POSTS: (parse_post, "id"), EVENTS: (parse_event, "user_id")}
_CONTRACTS = {POSTS: "post", EVENTS: "event"}  # streams/contracts/*.json


def jsonl_records(kind: str, path: str | Path, skip_invalid: bool = False, report: ProduceReport | None = None,
                  warn: Callable[[str], None] = print):
    """Validated records (key, value, no headers, not paced) from a JSONL file of `kind` (posts or events)."""
    parse, key_field = _JSONL_KINDS[kind]
    report = report or ProduceReport()
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = parse(line.encode())
                contracts.check(_CONTRACTS[kind], json.loads(line))  # what any consumer may rely on, not only the worker
            except BadInput as exc:
                reason = f"{path}:{lineno}: {exc.reason}: {exc.detail}"
                if not skip_invalid:
                    raise ProduceError(reason) from exc
                report.refused.append(reason)
                warn(f"refused: {reason}")
                continue
            yield record[key_field].encode(), json.dumps(json.loads(line), ensure_ascii=False).encode(), None, None


def produce_jsonl(settings: Settings, kind: str, path: str | Path, skip_invalid: bool = False,
                  show_progress: bool = False) -> ProduceReport:
    if not Path(path).is_file():
        raise ProduceError(f"no such file: {path}")
    if not skip_invalid:
        for _ in jsonl_records(kind, path):  # validate the whole file first: all or nothing
            pass
    report = ProduceReport()
    records = jsonl_records(kind, path, skip_invalid, report, warn=lambda m: tqdm.write(m, file=sys.stderr))
    progress = _progress(show_progress, "record")
    try:
        asyncio.run(_send_all(settings, settings.topic(kind), records, report, progress))
    finally:
        if progress is not None:
            progress.close()
    return report

