"""The ingester's own web endpoints: /metrics (Prometheus, read from the feeds at scrape time) and
/health (JSON, per camera)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from streams.cameras.feed import DISCONNECT_REASONS, DROP_REASONS, CameraFeed


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
        yield gauge("inferstream_camera_seconds_behind", "How far the reader is behind the camera: wall time since the "
                    "session's first frame minus the camera's time since then (grows when decoding cannot keep up)",
                    lambda f: f.pace.behind_s)
        yield gauge("inferstream_camera_queue_frames", "Frames waiting for the producer", lambda f: f.queued[0])
        yield gauge("inferstream_camera_queue_bytes", "Encoded bytes waiting for the producer", lambda f: f.queued[1])
        yield gauge("inferstream_camera_connected", "1 while a session is streaming", lambda f: int(f.state == "streaming"))


def web_app(feeds: list[CameraFeed], registry: CollectorRegistry) -> web.Application:
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

