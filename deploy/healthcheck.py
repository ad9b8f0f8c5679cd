"""Container health probe: GET a worker endpoint (/health or /ready) on this container's web port.

Used by the Dockerfiles' HEALTHCHECK and the compose healthchecks, so the images need no curl. The
port and host come from the worker's own Settings (INFERSTREAM_WEB_PORT / INFERSTREAM_WEB_HOST, or
the INFERSTREAM_CONFIG file), so the probe never disagrees with the port the worker listens on.

    python deploy/healthcheck.py /ready      # exit 0 on HTTP 200, 1 otherwise (reason on stderr)
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}


def probe_url(path: str) -> str:
    from streams.config import Settings

    settings = Settings.load()
    host = settings.web_host
    if host in WILDCARD_HOSTS:
        host = "127.0.0.1"  # bound on every interface: loopback reaches it
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.web_port}/{path.lstrip('/')}"


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/health"
    url = probe_url(path)
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            if response.status == 200:
                return 0
            print(f"healthcheck: {url} answered {response.status}", file=sys.stderr)
    except urllib.error.HTTPError as exc:  # 503 from /ready carries the failing checks
        print(f"healthcheck: {url} answered {exc.code}: {exc.read(2000).decode(errors='replace')}", file=sys.stderr)
    except OSError as exc:
        print(f"healthcheck: {url} unreachable: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
