"""Posts through a real worker: text and image parts batched per model, joined into one verdict."""

from __future__ import annotations

import base64
import json
import shutil

import numpy as np
import pytest
from conftest import write_policy
from kafka_helpers import collect, frame_image, ids, send_records
from tiny_models import tiny_logits

from operators.classify import ImagePreprocess, preprocess_image, softmax
from operators.images import encode_image
from streams.config import REPO_MODELS
from streams.schemas import DEAD_LETTERS, POSTS, VERDICTS

pytestmark = pytest.mark.integration

PRE = ImagePreprocess(height=32, width=32, resize="stretch", mean=(0, 0, 0), std=(255, 255, 255))
TEXTS = ["What a lovely morning at the lake", "you are a fucking idiot and everyone hates you",
         "Café crème, s'il vous plaît", "shut up you stupid bitch", "", "Great match, the defence looked solid"]


@pytest.fixture
def text_settings(settings, tiny_repo, tmp_path):
    """The real toxicity model (built by `make models`) beside the tiny image model."""
    shutil.copytree(REPO_MODELS / "toxicity", tiny_repo / "toxicity")
    policy = write_policy(tmp_path / "posts-policy.yaml", {
        "toxicity": {"model": "toxicity", "input": "text", "label": "toxic", "above": 0.7},
        "objects": {"model": "tiny", "input": "image", "labels": ["class-0"], "top_k": 3, "above": 0.5},
    })
    return settings.replace(policy=policy)


def post(i: int, text: str, with_image: bool) -> tuple[bytes, bytes, None]:
    record = {"id": f"p{i}", "user_id": f"u{i % 4}", "text": text, "created_at": "2026-11-25T10:00:00Z"}
    if with_image:
        record["image"] = {"encoding": "png", "data": base64.b64encode(encode_image(frame_image(i), "png")).decode()}
    return f"p{i}".encode(), json.dumps(record).encode(), None


def test_posts_get_one_verdict_joining_text_and_image_models(text_settings, start_worker, run):
    from profanity_check import predict_prob  # the package's own model: the oracle

    posts = [post(i, TEXTS[i % len(TEXTS)], with_image=i % 3 != 1) for i in range(30)]
    posts = [p for p in posts if json.loads(p[1])["text"] or "image" in json.loads(p[1])]
    run(send_records(text_settings, POSTS, posts))
    start_worker(text_settings)

    verdicts = collect(text_settings, VERDICTS, lambda rs: len(ids(rs)) >= len(posts), timeout_s=90)
    assert ids(verdicts) == {json.loads(p[1])["id"] for p in posts}
    for r in verdicts:
        v = r["value"]
        sent = json.loads(next(p[1] for p in posts if p[0].decode() == v["id"]))
        assert v["kind"] == "post" and v["user_id"] == sent["user_id"] and r["key"] == v["id"]
        violations = {x["check"] for x in v["violations"]}
        if sent["text"]:
            toxic = v["scores"]["toxicity"]["toxic"]
            assert toxic == pytest.approx(float(predict_prob([sent["text"]])[0]), abs=1e-5)
            assert ("toxicity" in violations) is (toxic > 0.7)
        else:
            assert "toxicity" not in v["scores"]  # no text: the text check did not run
        if "image" in sent:
            rgb = frame_image(int(v["id"][1:]))
            probs = softmax(tiny_logits(preprocess_image(rgb, PRE)[None]))[0]
            assert [c["class_id"] for c in v["classifications"]] == np.argsort(-probs, kind="stable")[:3].tolist()
            assert ("objects" in violations) is bool(probs[0] > 0.5 and 0 in np.argsort(-probs, kind="stable")[:3])
        else:
            assert v["classifications"] == []
        assert v["safe"] is (not violations)
        assert v["models"]["toxicity"]["name"] == "toxicity"


def test_bad_posts_go_to_dead_letters_with_their_reason(text_settings, start_worker, run):
    bad = [
        (b"x1", b"{this is not json", None),
        (b"x2", json.dumps({"user_id": "u1", "text": "no id"}).encode(), None),
        (b"x3", json.dumps({"id": "x3", "user_id": "u1", "text": "a" * 20_001}).encode(), None),
        (b"x4", json.dumps({"id": "x4", "user_id": "u1", "image": {"encoding": "jpeg",
                                                                 "data": base64.b64encode(b"garbage").decode()}}).encode(), None),
        (b"x5", json.dumps({"schema": "inferstream.post.v9", "id": "x5", "user_id": "u1", "text": "hi"}).encode(), None),
    ]
    run(send_records(text_settings, POSTS, [*bad, post(99, "still here", False)]))
    worker = start_worker(text_settings)

    dead = collect(text_settings, DEAD_LETTERS, lambda rs: len(rs) >= len(bad), timeout_s=90)
    assert ids(collect(text_settings, VERDICTS, lambda rs: "p99" in ids(rs), timeout_s=30)) == {"p99"}
    reasons = {d["value"]["key"]: d["value"]["reason"] for d in dead}
    assert reasons == {"x1": "malformed_json", "x2": "wrong_schema", "x3": "text_too_long",
                       "x4": "image_decode_failed", "x5": "unknown_schema"}
    assert all(d["value"]["source"]["topic"] == text_settings.topic(POSTS) for d in dead)
    assert worker.alive()
