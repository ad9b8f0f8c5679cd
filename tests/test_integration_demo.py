"""`make run` (inferstream demo --keep-running): verdicts flow, and Ctrl-C stops everything it started."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import REPO

from streams.broker import free_port

pytestmark = pytest.mark.integration


def output_lines(proc: subprocess.Popen) -> queue.Queue:
    """`proc`'s output lines as they come (a reader thread), so a test can wait for one with a timeout."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    return lines


def read_until(lines: queue.Queue, done, timeout_s: float) -> list[str]:
    """Lines until one satisfies `done` (included) or the timeout passes."""
    seen, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            seen.append(lines.get(timeout=max(0.01, deadline - time.monotonic())))
        except queue.Empty:
            break
        if done(seen[-1]):
            break
    return seen


def test_demo_prints_verdicts_and_ctrl_c_stops_broker_and_worker():
    port = free_port()
    # a terminal's Ctrl-C: SIGINT to the whole foreground process group, with default handling
    proc = subprocess.Popen(
        [sys.executable, "-m", "streams.cli", "demo", "--port", str(port), "--seconds", "2", "--keep-running"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: (os.setsid(), signal.signal(signal.SIGINT, signal.SIG_DFL)),
    )
    output = output_lines(proc)
    try:
        lines = read_until(output, lambda line: "keep running" in line, timeout_s=300)
        frames = [x for x in lines if x.startswith("frame ")]
        posts = [x for x in lines if x.startswith("post ")]
        assert len(frames) == 20, "".join(lines)  # 2 s at 10 fps: every frame judged
        assert len(posts) == 14, "".join(lines)  # the 12 sample posts + 2 with photos
        assert any("Egyptian cat" in x or "tiger cat" in x or "tabby" in x for x in frames)
        assert any("espresso" in x for x in frames)
        assert any("UNSAFE forbidden_objects:missile" in x for x in frames)  # the rocket photo
        # ... shown in 5 frames (k=3 of n=5 in the default policy): a stream alert starts, perhaps after the
        # line above; the video ends before m frames without it could end it
        if not any(x.startswith("ALERT") for x in lines):
            lines += read_until(output, lambda line: line.startswith("ALERT"), timeout_s=30)
        alerts = [x for x in lines if x.startswith("ALERT")]
        assert len(alerts) == 1, "".join(lines)
        assert alerts[0].startswith("ALERT start demo-cam forbidden_objects:missile  frames 1"), alerts

        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 0
        assert time.monotonic() - started < 30
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    leftovers = subprocess.run(["pgrep", "-f", f"tcp://127.0.0.1:{port}"], capture_output=True, text=True).stdout
    assert leftovers.strip() == "", "the broker outlived the demo"
