"""Frames through a real broker and a real `inferstream worker` process."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import image_policy
from kafka_helpers import collect, frame_image, frame_record, ids, send_records
from tiny_models import tiny_logits

from operators.classify import ImagePreprocess, preprocess_image, softmax
from streams.schemas import DEAD_LETTERS, FRAMES, VERDICTS, FrameMeta

pytestmark = pytest.mark.integration

TINY_PRE = ImagePreprocess(height=32, width=32, resize="stretch", mean=(0, 0, 0), std=(255, 255, 255))


def test_every_frame_gets_one_verdict_with_the_models_top_k(settings, start_worker, run):
    frames = {f"cam-{s}:{i}": frame_image(100 * s + i) for s in range(2) for i in range(30)}
    run(send_records(settings, FRAMES, [frame_record(k.split(":")[0], int(k.split(":")[1]), img) for k, img in frames.items()]))
    start_worker(settings)

    verdicts = collect(settings, VERDICTS, lambda rs: ids(rs) >= set(frames), timeout_s=90)

    assert ids(verdicts) == set(frames)
    for r in verdicts:
        v = r["value"]
        assert r["key"] == v["id"]  # keyed by input id: a redelivery rewrites the same key
        # oracle: numpy forward pass of the tiny model on our own preprocessing of the original pixels
        x = preprocess_image(frames[v["id"]], TINY_PRE)[None]
        probs = softmax(tiny_logits(x))[0]
        expected = np.argsort(-probs, kind="stable")[:3].tolist()
        assert [c["class_id"] for c in v["classifications"]] == expected
        assert np.allclose([c["score"] for c in v["classifications"]], probs[expected], atol=1e-5)
        assert v["models"]["objects"]["name"] == "tiny" and v["models"]["objects"]["version"] == "1"
        # policy: class-0 in the top 3 above 0.5 is a violation
        flagged = any(c["label"] == "class-0" and c["score"] > 0.5 for c in v["classifications"])
        assert v["safe"] is (not flagged)
        assert [x["label"] for x in v["violations"]] == (["class-0"] if flagged else [])
        assert v["latency_ms"]["end_to_end"] >= 0 and v["latency_ms"]["inference"] > 0
        assert v["source"]["topic"] == settings.topic(FRAMES)


def test_one_streams_verdicts_are_in_one_partition_in_frame_order(settings, start_worker, run):
    from aiokafka.partitioner import murmur2

    streams = [f"cam-{s}" for s in range(6)]
    # interleaved, as cameras publish; each stream's frames are keyed by its id, so they share a partition
    run(send_records(settings, FRAMES, [frame_record(cam, i, frame_image(i)) for i in range(25) for cam in streams]))
    start_worker(settings)

    verdicts = collect(settings, VERDICTS, lambda rs: len(ids(rs)) >= 25 * len(streams), timeout_s=90)

    by_stream: dict[str, list[dict]] = {}
    for r in verdicts:
        by_stream.setdefault(r["value"]["stream_id"], []).append(r)
    assert set(by_stream) == set(streams)
    used = set()
    for cam, records in by_stream.items():
        partitions = {r["partition"] for r in records}
        # the partition the Java client's default partitioner gives the stream id
        assert partitions == {(murmur2(cam.encode()) & 0x7FFFFFFF) % settings.partitions}
        in_offset_order = [r["value"]["frame_index"] for r in sorted(records, key=lambda r: r["offset"])]
        assert in_offset_order == sorted(in_offset_order) == list(range(25))
        assert all(r["key"] == r["value"]["id"] for r in records)  # still keyed by record id
        used |= partitions
    assert len(used) > 1  # streams spread over the partitions


def test_bad_frames_go_to_dead_letters_and_the_worker_keeps_going(settings, start_worker, run):
    good = frame_record("cam", 0, frame_image(1))
    png = good[1]
    jpeg = frame_record("cam", 0, frame_image(1), "jpeg")[1]
    meta = FrameMeta("cam", 0, 0.0, "png", 24, 24)
    headers = dict(meta.headers())

    def with_headers(**changes):
        h = {**headers, **{k: v.encode() for k, v in changes.items()}}
        return [(k, v) for k, v in h.items() if v != b"<drop>"]

    bad = {
        "not_an_image": (b"cam", b"hello, I am not a picture", with_headers(frame_index="1")),
        "truncated_jpeg": (b"cam", jpeg[: len(jpeg) // 2], with_headers(frame_index="2", encoding="jpeg")),
        "zero_size": (b"cam", b"", with_headers(frame_index="3")),
        "missing_headers": (b"cam", png, with_headers(frame_index="<drop>")),
        "absurd_dimensions": (b"cam", png, with_headers(frame_index="5", width="100000", height="100000")),
    }
    records = [good, *bad.values(), frame_record("cam", 6, frame_image(6))]
    run(send_records(settings, FRAMES, records))
    worker = start_worker(settings)

    dead = collect(settings, DEAD_LETTERS, lambda rs: len(rs) >= len(bad), timeout_s=90)
    verdicts = collect(settings, VERDICTS, lambda rs: {"cam:0", "cam:6"} <= ids(rs), timeout_s=30)

    assert {"cam:0", "cam:6"} <= ids(verdicts)  # the frame after the bad ones is still judged
    assert worker.alive()
    reasons = {r["value"]["source"]["offset"]: r["value"]["reason"] for r in dead}
    assert sorted(reasons) == [1, 2, 3, 4, 5]  # every bad record, by its original offset
    assert reasons[1] == "image_decode_failed"
    assert reasons[2] in ("image_truncated", "image_decode_failed")
    assert reasons[3] == "empty_image"
    assert reasons[4] == "missing_header"
    assert reasons[5] == "image_too_large"
    for r in dead:
        v = r["value"]
        assert v["key"] == "cam" and v["source"]["topic"] == settings.topic(FRAMES) and v["detail"]


def test_a_model_failing_mid_batch_dead_letters_only_the_record_that_broke_it(settings, start_worker, run, tmp_path):
    settings = settings.replace(policy=image_policy(tmp_path, "poisoned"))
    images = [frame_image(i) for i in range(40)]
    images[17] = np.full_like(images[17], 255)  # pure white: the poisoned model's Gather goes out of range
    run(send_records(settings, FRAMES, [frame_record("cam", i, img) for i, img in enumerate(images)]))
    worker = start_worker(settings)

    verdicts = collect(settings, VERDICTS, lambda rs: len(ids(rs)) >= 39, timeout_s=90)
    dead = collect(settings, DEAD_LETTERS, lambda rs: len(rs) >= 1, timeout_s=30)

    assert ids(verdicts) == {f"cam:{i}" for i in range(40) if i != 17}
    assert [d["value"]["reason"] for d in dead] == ["inference_failed"]
    assert dead[0]["value"]["headers"]["frame_index"] == "17"
    assert "Gather" in dead[0]["value"]["detail"]
    assert worker.alive()
