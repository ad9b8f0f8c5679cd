"""Moderator: every model a policy names, each through its own batcher, joined per record."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from tiny_models import tiny_logits, write_tiny_repository

from operators.classify import ImagePreprocess, preprocess_image, softmax
from operators.model_repository import ModelRepository
from operators.moderation import ModelFailed, Moderator
from operators.policy import Policy

PRE = ImagePreprocess(height=32, width=32, resize="stretch", mean=(0, 0, 0), std=(255, 255, 255))


@pytest.fixture
def repo(tmp_path):
    write_tiny_repository(tmp_path, "tiny", "1")
    write_tiny_repository(tmp_path, "poisoned", "1", poison=True)
    return ModelRepository(tmp_path)


def policy(model="tiny", labels=("class-0",), above=0.5):
    return Policy.from_dict({"checks": {"objects": {"model": model, "input": "image", "labels": list(labels), "top_k": 3,
                                                    "above": above}}})


def judge_many(moderator, images):
    async def run():
        try:
            return await asyncio.gather(*(moderator.judge(moderator.prepare(image=img)) for img in images),
                                        return_exceptions=True)
        finally:
            await moderator.close()
    return asyncio.run(run())


def test_concurrent_records_get_their_own_results_and_policy(repo):
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 220, size=(20 + i, 30, 3), dtype=np.uint8) for i in range(12)]
    moderator = Moderator(repo, policy(), providers=("cpu",), intra_op_threads=1)
    results = judge_many(moderator, images)
    for img, result in zip(images, results, strict=True):
        probs = softmax(tiny_logits(preprocess_image(img, PRE)[None]))[0]
        top = np.argsort(-probs, kind="stable")[:3]
        classes = result["tiny@1"]
        assert [c["class_id"] for c in classes] == top.tolist()
        judgement = moderator.judgement(result)
        flagged = 0 in top and probs[0] > 0.5
        assert judgement["safe"] is (not flagged)
    assert moderator.stages["tiny@1"].batcher.stats.batches < len(images)  # records were batched together


def test_text_only_record_skips_image_checks(repo):
    moderator = Moderator(repo, policy(), providers=("cpu",))
    assert moderator.prepare(text="hello") == {}
    assert moderator.judgement({}) == {"safe": True, "violations": [], "scores": {}, "entities": [],
                                       "detections": [], "classifications": []}


def test_a_model_failure_names_the_model_and_spares_other_records(repo):
    images = [np.full((16, 16, 3), 100, np.uint8), np.full((16, 16, 3), 255, np.uint8), np.full((16, 16, 3), 50, np.uint8)]
    moderator = Moderator(repo, policy("poisoned"), providers=("cpu",))
    ok1, failed, ok2 = judge_many(moderator, images)
    assert isinstance(failed, ModelFailed) and failed.model == "poisoned@1" and "Gather" in str(failed)
    assert "poisoned@1" in ok1 and "poisoned@1" in ok2


def test_one_model_is_loaded_once_for_several_checks(repo):
    both = Policy.from_dict({"checks": {
        "a": {"model": "tiny", "input": "image", "labels": ["class-0"]},
        "b": {"model": "tiny@1", "input": "image", "labels": ["class-1"]},
        "c": {"model": "tiny", "input": "image", "labels": ["class-2"]}}})
    moderator = Moderator(repo, both, providers=("cpu",))
    assert sorted(moderator.stages) == ["tiny@1"]  # `tiny` and `tiny@1` are the same model
    assert moderator.model_info["a"] == moderator.model_info["c"] == {"name": "tiny", "version": "1",
                                                                      "provider": "CPUExecutionProvider"}
