"""Stream alerts through the real broker and a real worker: EfficientNet-Lite0 judges scikit-image's
rocket photo a missile, so a stream that shows it for a while raises one alert that starts and ends
around that segment; across a kill -9 every alert is still there exactly once.

The oracle is the rule read literally (tests/test_alerts.py `reference`) over the verdicts the worker
published, independent of the agent's incremental state, its snapshots and its recovery."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from kafka_helpers import collect, ids, send_records
from skimage import data
from test_alerts import reference

from operators.images import encode_image
from streams.schemas import ALERTS, FRAMES, VERDICTS, FrameMeta

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent / "models"
K, N, M = 3, 5, 6


def real_model(root: Path) -> Path:
    source = REPO / "efficientnet-lite0" / "1"
    config = yaml.safe_load((source / "config.yaml").read_text())
    config["runtime"] = {**config.get("runtime", {}), "providers": ["cpu"]}
    directory = root / "efficientnet-lite0" / "1"
    directory.mkdir(parents=True)
    for name in ("model.onnx", "labels.json"):
        (directory / name).symlink_to(source / name)
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def alert_settings(settings, tmp_path: Path):
    policy = {"checks": {"objects": {"model": "efficientnet-lite0", "input": "image", "labels": ["missile"],
                                     "top_k": 3, "above": 0.3}},
              "alerts": {"k": K, "n": N, "m": M}}
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    return settings.replace(model_dir=str(real_model(tmp_path / "models")), policy=str(tmp_path / "policy.yaml"),
                            recommendations="off")


def photo_jpeg(photo: np.ndarray) -> bytes:
    h, w = photo.shape[:2]
    return encode_image(np.ascontiguousarray(cv2.resize(photo, (320, 320 * h // w), interpolation=cv2.INTER_AREA)), "jpeg")


def frames(stream: str, pictures: list[bytes]) -> list[tuple[bytes, bytes, list]]:
    return [(stream.encode(), jpeg, FrameMeta(stream, i, i / 5, "jpeg", 320, 213).headers()) for i, jpeg in enumerate(pictures)]


def expected_alerts(verdicts: list[dict]) -> dict[str, list[tuple[str, int, int]]]:
    """Per stream, the (event, first, last) the rule gives over its judged frames, from the verdicts. A
    frame judged again after a crash may score a little differently (another batch), so each frame counts
    as its first verdict in its partition says, as the agent reads it (a rewrite is skipped)."""
    present: dict[str, dict[int, bool]] = {}
    for r in sorted(verdicts, key=lambda r: (r["partition"], r["offset"])):
        v = r["value"]
        hit = any(x["check"] == "objects" and x["label"] == "missile" for x in v["violations"])
        present.setdefault(v["stream_id"], {}).setdefault(v["frame_index"], hit)
    expected = {stream: reference([by_index[i] for i in sorted(by_index)], K, N, M) for stream, by_index in present.items()}
    return {stream: events for stream, events in expected.items() if events}


def published(alerts: list[dict]) -> dict[str, list[tuple[str, int, int]]]:
    by_stream: dict[str, list] = {}
    for a in sorted((r["value"] for r in alerts), key=lambda a: (a["stream_id"], a["decided_at_frame"])):
        by_stream.setdefault(a["stream_id"], []).append((a["event"], a["first"]["frame_index"], a["last"]["frame_index"]))
    return by_stream


@pytest.fixture(scope="module")
def pictures() -> tuple[bytes, bytes]:
    return photo_jpeg(data.rocket()), photo_jpeg(data.coffee())


def test_a_rocket_segment_starts_and_ends_one_alert(settings, start_worker, run, tmp_path, pictures):
    rocket, coffee = pictures
    settings = alert_settings(settings, tmp_path)
    run(send_records(settings, FRAMES, frames("cam-a", [coffee] * 20 + [rocket] * 15 + [coffee] * 20)
                     + frames("cam-b", [coffee] * 40)))
    start_worker(settings)

    verdicts = collect(settings, VERDICTS, lambda rs: len(ids(rs)) >= 95, timeout_s=120)
    alerts = collect(settings, ALERTS, lambda rs: len(rs) >= 2, timeout_s=60)
    collect(settings, VERDICTS, lambda rs: False, timeout_s=2)  # nothing more is on its way

    assert published(alerts) == expected_alerts(verdicts)
    start, end = sorted((r["value"] for r in alerts), key=lambda a: a["event"] == "end")
    assert (start["event"], end["event"], start["stream_id"]) == ("start", "end", "cam-a")
    # every rocket frame (20-34) scores missile 0.36: k=3 of n=5 completes at frame 22, m=6 ends at frame 40
    assert (start["first"]["frame_index"], start["last"]["frame_index"], end["last"]["frame_index"]) == (20, 22, 34)
    assert (start["decided_at_frame"], end["decided_at_frame"]) == (22, 40)
    assert start["episode"] == end["episode"] and start["label"] == "missile"
    assert end["evidence_frame_id"].startswith("cam-a:") and end["peak_score"] >= start["peak_score"] > 0.3
    assert [r["key"] for r in alerts] == [r["value"]["id"] for r in alerts]
    assert len({r["partition"] for r in alerts} | {r["partition"] for r in verdicts if r["value"]["stream_id"] == "cam-a"}) == 1


def test_after_a_kill_minus_9_every_alert_is_there_exactly_once(settings, start_worker, run, tmp_path, pictures):
    rocket, coffee = pictures
    settings = alert_settings(settings, tmp_path)
    segments = [rocket] * 12 + [coffee] * 12
    streams = {f"cam-{s}": segments * 15 for s in "abx"}  # 15 episodes per stream, 360 frames; both partitions
    run(send_records(settings, FRAMES, [r for stream, pics in streams.items() for r in frames(stream, pics)]))
    total = sum(map(len, streams.values()))

    first = start_worker(settings)
    before = collect(settings, ALERTS, lambda rs: len(rs) >= 6, timeout_s=120)
    first.kill()
    verdicts_at_kill = ids(collect(settings, VERDICTS, lambda rs: False, timeout_s=2))
    assert len(before) >= 6 and len(verdicts_at_kill) < total, "the kill must land mid-stream"

    start_worker(settings)
    verdicts = collect(settings, VERDICTS, lambda rs: len(ids(rs)) >= total, timeout_s=200)
    assert len(ids(verdicts)) == total, "every frame judged (else the oracle below would be partial)"
    expected = expected_alerts(verdicts)
    want = sum(map(len, expected.values()))
    assert want == 90  # the rocket (missile 0.36 > 0.3) starts and ends an alert in each of 45 segments
    collect(settings, ALERTS, lambda rs: len(rs) >= want, timeout_s=120)
    alerts = collect(settings, ALERTS, lambda rs: False, timeout_s=3)  # everything, a little after the last

    assert published(alerts) == expected  # none lost, none twice, none invented
    assert len({r["value"]["id"] for r in alerts}) == len(alerts)


def test_a_rebalance_mid_stream_keeps_every_alert_exactly_once(settings, start_worker, run, tmp_path, pictures):
    rocket, coffee = pictures
    # few records in flight: a revoked partition's records are finished before the rebalance completes
    settings = alert_settings(settings, tmp_path).replace(max_in_flight=64)
    block = ([rocket] * 12 + [coffee] * 12) * 5  # 5 episodes per stream and round
    sent = 0

    def send_round() -> None:
        nonlocal sent
        run(send_records(settings, FRAMES, [(key, value, FrameMeta(s, sent + i, i / 5, "jpeg", 320, 213).headers())
                                            for s in ("cam-a", "cam-b", "cam-x")
                                            for i, (key, value, _) in enumerate(frames(s, block))]))
        sent += len(block)

    send_round()
    start_worker(settings)
    collect(settings, ALERTS, lambda rs: len(rs) >= 6, timeout_s=120)
    start_worker(settings)  # joins the group: the partitions of frames and verdicts are shared out again
    # keep frames coming until the second worker judges some, so the rebalance lands mid-stream
    for _ in range(30):
        send_round()
        if len({r["value"]["worker"] for r in collect(settings, VERDICTS, lambda rs: len({r["value"]["worker"] for r in rs}) >= 2,
                                                      timeout_s=3)}) >= 2:
            break
    verdicts = collect(settings, VERDICTS, lambda rs: len(ids(rs)) >= 3 * sent, timeout_s=200)
    assert len(ids(verdicts)) == 3 * sent, "every frame judged (else the oracle below would be partial)"
    assert len({r["value"]["worker"] for r in verdicts}) == 2, "the rebalance must land mid-stream"
    expected = expected_alerts(verdicts)
    collect(settings, ALERTS, lambda rs: len(rs) >= sum(map(len, expected.values())), timeout_s=120)
    alerts = collect(settings, ALERTS, lambda rs: False, timeout_s=3)

    assert published(alerts) == expected
    assert len({r["value"]["id"] for r in alerts}) == len(alerts)
