"""Replay/backfill through the real broker: exact time ranges, idempotence, resume after SIGKILL,
dead letters as live, and a version-diff report that sees a changed policy threshold."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from conftest import REPO, image_policy, wait_until
from kafka_helpers import collect, frame_image, frame_record

from operators.images import encode_image
from streams.kafka import ensure_topics, producer
from streams.schemas import FRAMES, POSTS, VERDICTS

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def post_record(i: int) -> tuple[bytes, bytes]:
    image = {"encoding": "png", "data": base64.b64encode(encode_image(frame_image(i), "png")).decode()}
    return f"p{i}".encode(), json.dumps({"id": f"p{i}", "user_id": f"u{i % 3}", "image": image}).encode()


async def send_historic(settings, topic, records, minutes):
    """Records with explicit (historic) CreateTimes T0 + minutes[i]."""
    await ensure_topics(settings)
    kafka = producer(settings)
    await kafka.start()
    try:
        futures = [await kafka.send(settings.topic(topic), value, key=key, headers=headers,
                                    timestamp_ms=int((T0 + timedelta(minutes=m)).timestamp() * 1000))
                   for (key, value, headers), m in zip(records, minutes, strict=True)]
        for f in futures:
            await f
    finally:
        await kafka.stop()


def replay_cli(settings, *args, timeout=180):
    env = {**os.environ, **settings.to_env()}
    return subprocess.run([sys.executable, "-m", "streams.cli", "replay", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def stable(verdict: dict) -> dict:
    """A verdict without the fields that describe when and where it was computed."""
    return {k: v for k, v in verdict.items() if k not in ("latency_ms", "produced_at_ms", "worker")}


def test_time_range_selects_exactly_the_records_in_range_and_twice_is_idempotent(settings, run):
    minutes = [(i * 7) % 60 for i in range(60)]  # timestamps out of offset order, spread over an hour
    run(send_historic(settings, POSTS, [(*post_record(i), None) for i in range(60)], minutes))
    start, end = T0 + timedelta(minutes=10), T0 + timedelta(minutes=40)
    expected = {f"p{i}" for i, m in enumerate(minutes) if 10 <= m < 40}
    args = ["--source", "posts", "--from", start.isoformat(), "--to", end.isoformat(), "--output", "replayed"]
    args[-1] = settings.topic("replayed")

    first = replay_cli(settings, *args)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["selected"] == len(expected) and summary["outside_time_range"] == 60 - len(expected)
    assert "filtered by record timestamp" in summary["time_range_method"]
    out1 = collect(settings, "replayed", lambda rs: len(rs) >= len(expected), timeout_s=30)
    assert {r["value"]["id"] for r in out1} == expected
    assert all(r["key"] == f"{r['value']['id']}|tiny@1" for r in out1)  # keys name the model versions

    second = replay_cli(settings, *args, "--restart")
    assert second.returncode == 0, second.stderr
    out2 = collect(settings, "replayed", lambda rs: len(rs) >= 2 * len(expected), timeout_s=30)
    by_key: dict[str, list[dict]] = {}
    for r in out2:
        by_key.setdefault(r["key"], []).append(stable(r["value"]))
    assert len(by_key) == len(expected)  # same keys: a compacted or keyed consumer sees no change
    assert all(len(vs) == 2 and vs[0] == vs[1] for vs in by_key.values())


def test_replay_resumes_after_sigkill_without_losing_or_skipping(settings, tmp_path, run):
    n = 8000
    run(send_historic(settings, FRAMES, [frame_record(f"cam-{i % 4}", i, frame_image(i % 40)) for i in range(n)],
                      [0] * n))
    checkpoint = tmp_path / "ckpt.json"
    args = ["--source", "frames", "--output", settings.topic("backfill"), "--checkpoint", str(checkpoint),
            "--batch-size", "16", "--checkpoint-interval", "0.05"]
    env = {**os.environ, **settings.to_env()}
    proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "replay", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def progressed():
        try:
            return sum(json.loads(checkpoint.read_text())["next"].values()) >= 300
        except (OSError, ValueError, KeyError):
            return False

    assert wait_until(progressed, 90, 0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    state = json.loads(checkpoint.read_text())
    assert not state["done"] and sum(state["next"].values()) < n, "the kill must land mid-replay"

    resumed = replay_cli(settings, *args)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["complete"] is True
    out = collect(settings, "backfill", lambda rs: len({r["value"]["id"] for r in rs}) >= n, timeout_s=60)
    assert {r["value"]["id"] for r in out} == {f"cam-{i % 4}:{i}" for i in range(n)}
    assert json.loads(checkpoint.read_text())["done"] is True


def test_bad_records_in_the_range_go_to_dead_letters_and_the_replay_finishes(settings, run):
    good = [(*post_record(i), None) for i in range(5)]
    bad = [(b"p-bad", b"{not json", None), (b"p-empty", b"", None)]
    run(send_historic(settings, POSTS, good[:2] + bad + good[2:], [1] * 7))
    result = replay_cli(settings, "--source", "posts", "--output", settings.topic("replayed"),
                        "--dead-letters", settings.topic("replay-dead"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["selected"] == 7, result.stdout
    dead = collect(settings, "replay-dead", lambda rs: len(rs) >= 2, timeout_s=30)
    assert sorted(d["value"]["reason"] for d in dead) == ["empty_record", "malformed_json"]
    replayed = collect(settings, "replayed", lambda rs: len(rs) >= 5, timeout_s=30)
    assert len(replayed) == 5, result.stdout


def test_report_detects_a_changed_policy_threshold(settings, start_worker, tmp_path, run):
    n = 40
    run(send_historic(settings, POSTS, [(*post_record(i), None) for i in range(n)], list(range(n))))
    live_policy = image_policy(tmp_path / "live", "tiny", labels=("class-0", "class-1", "class-2", "class-3"), above=0.3)
    start_worker(settings.replace(policy=live_policy))
    live = collect(settings, VERDICTS, lambda rs: len(rs) >= n, timeout_s=90)
    unsafe_live = sum(not r["value"]["safe"] for r in live)
    assert unsafe_live > 0

    strict = image_policy(tmp_path / "strict", "tiny", labels=("class-0", "class-1", "class-2", "class-3"), above=0.9)
    report_path = tmp_path / "report.json"
    result = replay_cli(settings, "--source", "posts", "--output", settings.topic("replayed"), "--policy", strict,
                        "--report", str(report_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    # every live violation scored <= 0.9 or not: the oracle is the live verdicts' own scores
    expected_flips = sum(1 for r in live if not r["value"]["safe"]
                         and all(v["score"] <= 0.9 for v in r["value"]["violations"]))
    assert expected_flips > 0
    assert report["compared"] == n and report["flips"]["unsafe_to_safe"] == expected_flips
    assert report["flips"]["safe_to_unsafe"] == 0
    assert report["by_check"]["objects"]["violations_removed"] == expected_flips
    assert report["agreement"] == pytest.approx((n - expected_flips) / n)
    assert "unsafe -> safe" in result.stderr  # the readable summary


def test_replay_reproduces_the_live_ab_split_by_key(settings, tiny_repo, start_worker, run):
    from tiny_models import write_tiny_repository

    write_tiny_repository(tiny_repo, "tiny", "2")  # same weights, another version: the arm is what is compared
    (tiny_repo / "serving.yaml").write_text('poll_interval_s: 0\nmodels:\n  tiny:\n    split: {"1": 50, "2": 50}\n')
    n = 40
    run(send_historic(settings, POSTS, [(*post_record(i), None) for i in range(n)], list(range(n))))
    start_worker(settings)
    live = collect(settings, VERDICTS, lambda rs: len(rs) >= n, timeout_s=90)
    live_arm = {r["value"]["id"]: r["value"]["models"]["objects"]["version"] for r in live}
    assert set(live_arm.values()) == {"1", "2"}  # both arms served

    result = replay_cli(settings, "--source", "posts", "--output", settings.topic("replayed"))
    assert result.returncode == 0, result.stderr
    replayed = collect(settings, "replayed", lambda rs: len(rs) >= n, timeout_s=30)
    assert {r["value"]["id"]: r["value"]["models"]["objects"]["version"] for r in replayed} == live_arm
    assert all(r["key"].endswith(f"|tiny@{live_arm[r['value']['id']]}") for r in replayed)
