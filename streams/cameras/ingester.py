"""`inferstream cameras FILE.yaml`: one process ingests many live cameras into the `frames` topic.

One CameraFeed per enabled camera (streams/cameras/feed.py) shares one producer; the ingester serves
/metrics and /health (streams/cameras/web.py); SIGTERM or Ctrl-C stops reading, sends what is queued
(bounded wait), and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector

from streams.broker import wait_for_metadata
from streams.cameras.config import CameraConfig, load_cameras
from streams.cameras.feed import CameraFeed
from streams.cameras.web import CameraCollector, web_app
from streams.config import Settings
from streams.kafka import ensure_topics, producer
from streams.schemas import FRAMES

log = logging.getLogger(__name__)


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
    runner = web.AppRunner(web_app(feeds, registry), access_log=None)
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
            f.abandon_reader()
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
