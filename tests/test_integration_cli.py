"""The `inferstream` commands as a user runs them, against the real broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO
from kafka_helpers import collect, ids
from skimage import data

from operators.video import write_video
from streams.broker import free_port
from streams.config import REPO_MODELS, REPO_POLICY
from streams.schemas import VERDICTS

pytestmark = pytest.mark.integration


def cli(settings, *args, timeout=120, env_extra=None):
    env = {**os.environ, **settings.to_env(), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def photo_video(path: Path, photos, frames_each: int = 3, size=(320, 240)) -> Path:
    frames = [np.ascontiguousarray(cv2.resize(p, size, interpolation=cv2.INTER_AREA)) for p in photos for _ in range(frames_each)]
    return write_video(path, frames, fps=10)


def test_broker_refuses_a_taken_port_with_one_line(broker, settings):
    result = cli(settings, "broker", "--port", str(broker.port), timeout=30)
    assert result.returncode == 1
    assert f"port {broker.port}" in result.stderr and "already in use" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_broker_command_serves_kafka_and_stops_cleanly_on_ctrl_c(settings):
    port = free_port()
    # a terminal's Ctrl-C reaches a process whose SIGINT is handled: a CI job started in the background
    # inherits SIGINT ignored, so the child gets the default handling back
    proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "broker", "--port", str(port)], cwd=REPO,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert "broker ready" in proc.stderr.readline()
        posts = Path(settings.data_dir) / "posts.jsonl"
        posts.parent.mkdir(parents=True, exist_ok=True)
        posts.write_text(json.dumps({"id": "p1", "user_id": "u1", "text": "hello"}) + "\n")
        sent = cli(settings.replace(broker=f"127.0.0.1:{port}"), "produce", "posts", str(posts), timeout=60)
        assert sent.returncode == 0 and json.loads(sent.stdout)["sent"] == 1
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0


def test_produce_video_publishes_sampled_frames_with_headers(settings, tmp_path):
    video = photo_video(tmp_path / "v.mp4", [data.chelsea(), data.coffee()], frames_each=5)
    result = cli(settings, "produce", "video", str(video), "--stream-id", "cam-7", "--every", "3")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["sent"] == 4  # frames 0, 3, 6, 9 of 10

    tail = cli(settings, "tail", "frames", "--count", "4", "--timeout", "20", "--with-meta")
    assert tail.returncode == 0, tail.stderr
    rows = [json.loads(line) for line in tail.stdout.splitlines()]
    assert sorted(int(r["headers"]["frame_index"]) for r in rows) == [0, 3, 6, 9]
    for r in rows:
        h = r["headers"]
        assert r["key"] == "cam-7" and h["stream_id"] == "cam-7" and h["encoding"] == "jpeg"
        assert (h["width"], h["height"]) == ("320", "240") and h["schema"] == "inferstream.frame.v1"
        assert abs(float(h["pts"]) - int(h["frame_index"]) / 10) < 1e-6


def test_oversized_frames_are_refused_naming_frame_and_size(settings, tmp_path):
    video = photo_video(tmp_path / "v.mp4", [data.coffee()], frames_each=2)
    limit = {"INFERSTREAM_MAX_MESSAGE_BYTES": "100000"}  # raw 320x240 rgb24 = 230,400 bytes
    refused = cli(settings, "produce", "video", str(video), "--stream-id", "big", "--encoding", "raw", env_extra=limit)
    assert refused.returncode == 1
    assert "frame 0 of stream 'big'" in refused.stderr and " is 230,5" in refused.stderr  # 230,400 pixels + headers and "100,000" in refused.stderr

    skipped = cli(settings, "produce", "video", str(video), "--stream-id", "big", "--encoding", "raw",
                  "--skip-oversized", env_extra=limit)
    assert skipped.returncode == 0 and json.loads(skipped.stdout) == {"sent": 0, "refused": 2}


def test_invalid_jsonl_is_refused_whole_with_its_line_number(settings, tmp_path):
    events = tmp_path / "events.jsonl"
    good = {"user_id": "u1", "item_id": "i1", "kind": "click", "ts": "2026-11-25T10:00:00Z"}
    events.write_text(json.dumps(good) + "\n" + json.dumps({**good, "kind": "teleport"}) + "\n")
    refused = cli(settings, "produce", "events", str(events))
    assert refused.returncode == 1 and "events.jsonl:2" in refused.stderr and "unknown_event_kind" in refused.stderr
    tail = cli(settings, "tail", "events", "--timeout", "3")
    assert tail.stdout == ""  # all or nothing: line 1 was not sent either

    kept = cli(settings, "produce", "events", str(events), "--skip-invalid")
    assert json.loads(kept.stdout) == {"sent": 1, "refused": 1}
    assert [json.loads(x) for x in cli(settings, "tail", "events", "--count", "1", "--timeout", "20").stdout.splitlines()] == [good]


def test_tail_exits_1_when_count_is_not_reached(settings):
    result = cli(settings, "tail", "verdicts", "--count", "1", "--timeout", "2")
    assert result.returncode == 1 and "only 0 of 1" in result.stderr


def test_real_efficientnet_classifies_sample_photos_end_to_end(settings, start_worker, tmp_path):
    settings = settings.replace(model_dir=str(REPO_MODELS), policy=str(REPO_POLICY))
    video = photo_video(tmp_path / "v.mp4", [data.chelsea(), data.coffee()], frames_each=3, size=(448, 300))
    assert cli(settings, "produce", "video", str(video), "--stream-id", "pets").returncode == 0
    start_worker(settings)
    started = time.monotonic()
    verdicts = collect(settings, VERDICTS, lambda rs: len(ids(rs)) >= 6, timeout_s=120)
    assert ids(verdicts) == {f"pets:{i}" for i in range(6)}, f"after {time.monotonic() - started:.0f}s"
    top1 = {r["value"]["frame_index"]: r["value"]["classifications"][0]["class_id"] for r in verdicts}
    assert all(281 <= top1[i] <= 285 for i in range(3))  # chelsea: a domestic cat class
    assert all(top1[i] == 967 for i in range(3, 6))  # coffee: espresso


def test_tail_prints_exactly_count_records(settings, tmp_path):
    posts = tmp_path / "posts.jsonl"
    posts.write_text("".join(json.dumps({"id": f"p{i}", "user_id": "u", "text": f"post {i}"}) + "\n" for i in range(6)))
    assert cli(settings, "produce", "posts", str(posts)).returncode == 0
    lines = cli(settings, "tail", "posts", "--count", "4", "--timeout", "20").stdout.splitlines()
    assert len(lines) == 4
    assert {json.loads(x)["id"] for x in lines} <= {f"p{i}" for i in range(6)}


def test_broker_without_a_binary_fails_with_one_line(settings):
    result = cli(settings, "broker", "--port", str(free_port()), env_extra={"CALF_TANSU_BIN": "/nonexistent/tansu"}, timeout=30)
    assert result.returncode == 1
    assert "no tansu broker binary" in result.stderr and "Traceback" not in result.stderr
