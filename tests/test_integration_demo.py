"""`make run` (inferstream demo --keep-running): verdicts flow, and Ctrl-C stops everything it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO

from streams.broker import free_port

pytestmark = pytest.mark.integration


def test_demo_prints_verdicts_and_ctrl_c_stops_broker_and_worker():
    port = free_port()
    # a terminal's Ctrl-C: SIGINT to the whole foreground process group, with default handling
    proc = subprocess.Popen(
        [sys.executable, "-m", "streams.cli", "demo", "--port", str(port), "--seconds", "2", "--keep-running"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: (os.setsid(), signal.signal(signal.SIGINT, signal.SIG_DFL)),
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "keep running" in line:
                break
        frames = [x for x in lines if x.startswith("frame ")]
        posts = [x for x in lines if x.startswith("post ")]
        assert len(frames) == 20, "".join(lines)  # 2 s at 10 fps: every frame judged
        assert len(posts) == 14, "".join(lines)  # the 12 sample posts + 2 with photos
        assert any("Egyptian cat" in x or "tiger cat" in x or "tabby" in x for x in frames)
        assert any("espresso" in x for x in frames)
        assert any("UNSAFE forbidden_objects:missile" in x for x in frames)  # the rocket photo

        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 0
        assert time.monotonic() - started < 30
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    leftovers = subprocess.run(["pgrep", "-f", f"tcp://127.0.0.1:{port}"], capture_output=True, text=True).stdout
    assert leftovers.strip() == "", "the broker outlived the demo"
