"""A real RTSP camera for tests: GStreamer's RTSP server serving an H.264 MP4 clip, live-paced.

Two halves in one file:
- run as a script with Debian's own /usr/bin/python3 (the GStreamer bindings are Debian packages
  bound to that interpreter, not to the virtualenv's): `rtsp_server.py --port P --mount /cam CLIP`
  serves rtsp://127.0.0.1:P/cam and prints "ready" once it listens; `rtsp_server.py --check` exits 0
  when the packages and elements are there (the Makefile installs them otherwise);
- imported by the tests (virtualenv's python): `RtspServer` starts that script, and kills and
  restarts it on the same port as a camera that drops and comes back.

Every client gets its own pipeline (not shared), so each starts at the clip's first frame, paced by
the clip's timestamps as a camera is. FFmpeg cannot serve RTSP: see shared/notes/rtsp-test-server.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

SYSTEM_PYTHON = "/usr/bin/python3"
DEBIAN_PACKAGES = ("python3-gi", "gir1.2-gst-rtsp-server-1.0", "gstreamer1.0-plugins-base",
                   "gstreamer1.0-plugins-good", "gstreamer1.0-plugins-bad", "gstreamer1.0-libav")
ELEMENTS = ("filesrc", "qtdemux", "h264parse", "rtph264pay")


def _gst():
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer

    Gst.init(None)
    return GLib, Gst, GstRtspServer


def _serve(port: int, mounts: list[tuple[str, str]]) -> None:
    GLib, Gst, GstRtspServer = _gst()
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(port))
    for mount, clip in mounts:
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(f"( filesrc location={clip} ! qtdemux ! h264parse config-interval=-1 ! "
                           "rtph264pay name=pay0 pt=96 )")
        factory.set_shared(False)
        server.get_mount_points().add_factory(mount, factory)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{port}", file=sys.stderr, flush=True)
        sys.exit(2)
    print("ready", flush=True)
    GLib.MainLoop().run()


def _check() -> None:
    _, Gst, _ = _gst()
    missing = [e for e in ELEMENTS if Gst.ElementFactory.find(e) is None]
    if missing:
        sys.exit(f"GStreamer elements missing: {', '.join(missing)}")


class RtspServerUnavailable(RuntimeError):
    pass


class RtspServer:
    """The script above as a child process on a fixed port (the same port after a restart)."""

    def __init__(self, port: int, mounts: dict[str, Path], log_path: Path) -> None:
        self.port = port
        self.mounts = mounts
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def url(self, mount: str) -> str:
        return f"rtsp://127.0.0.1:{self.port}{mount}"

    @staticmethod
    def check() -> None:
        """Raise (never skip) when the Debian packages are missing: `make test` installs them."""
        try:
            done = subprocess.run([SYSTEM_PYTHON, __file__, "--check"], capture_output=True, text=True, timeout=60)
        except FileNotFoundError as exc:
            raise RtspServerUnavailable(f"{SYSTEM_PYTHON} not found; the RTSP tests need Debian's python3") from exc
        if done.returncode:
            raise RtspServerUnavailable(
                f"GStreamer's RTSP server is not usable with {SYSTEM_PYTHON}: {done.stderr.strip()[-400:]}\n"
                f"install it with `make rtsp-test-deps` (apt-get install {' '.join(DEBIAN_PACKAGES)})")

    def start(self, timeout_s: float = 20.0) -> RtspServer:
        args = [SYSTEM_PYTHON, __file__, "--port", str(self.port)]
        for mount, clip in self.mounts.items():
            args += ["--mount", f"{mount}={clip}"]
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child writes to it until it stops)
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True)
        log.close()
        line = _readline(self.proc, timeout_s)
        if line.strip() != "ready":
            self.kill()
            raise RtspServerUnavailable(f"RTSP server did not start: {line!r}; log: {self.log_path.read_text()[-800:]}")
        return self

    def kill(self) -> None:
        """SIGKILL: the camera drops without a goodbye (no RTSP TEARDOWN, the TCP connection just ends)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> RtspServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


def _readline(proc: subprocess.Popen, timeout_s: float) -> str:
    import threading

    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    return lines[0] if lines else ""


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--port", type=int)
    parser.add_argument("--mount", action="append", default=[], help="/PATH=CLIP.mp4 (repeatable)")
    ns = parser.parse_args()
    if ns.check:
        _check()
    else:
        _serve(ns.port, [tuple(m.split("=", 1)) for m in ns.mount])
