"""Live cameras into the `frames` topic (`inferstream cameras FILE.yaml`), one module per concern:

- config: the cameras file -> validated CameraConfig values (and URL redaction for logs);
- feed: one camera's reader thread, bounded newest-first queue and sender;
- web: the ingester's /metrics and /health;
- ingester: the process that runs every feed until stopped.
"""

from streams.cameras.config import CameraConfig, load_cameras, parse_cameras, redact_url
from streams.cameras.feed import CameraFeed
from streams.cameras.ingester import run_ingester, serve_cameras

__all__ = ["CameraConfig", "CameraFeed", "load_cameras", "parse_cameras", "redact_url", "run_ingester", "serve_cameras"]
