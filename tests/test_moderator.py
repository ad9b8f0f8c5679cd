"""Moderator: every model a policy names, each through its own batcher, joined per record."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from tiny_models import tiny_logits, write_tiny_repository
from tiny_text_models import text_classifier_weights, tiny_text_classifier, write_text_model

from operators.classify import ImagePreprocess, preprocess_image, softmax
from operators.errors import BadInput
from operators.images import encode_image
from operators.model_repository import ModelRepository
from operators.moderation import ModelFailed, Moderator, RecordInput
from operators.policy import Policy, PolicyError
from operators.routing import Shadow
from operators.serving_state import STATE_FILE, ModelState, ServingState

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
        classes = result["tiny@1"]  # typed: the Classification the policy reads
        assert classes.class_ids == top.tolist()
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


# ------------------------------------------------------------------------- one call per batch
def moderate(moderator, records, shadows=True):
    async def run():
        with ThreadPoolExecutor(2) as pool:
            try:
                return await moderator.moderate(records, pool, 2, shadows=shadows)
            finally:
                await moderator.close()
    return asyncio.run(run())


def png(image: np.ndarray) -> bytes:
    return encode_image(image, "png")


def test_a_batch_is_moderated_in_one_call_and_each_failure_names_its_stage(repo):
    good = np.full((16, 16, 3), 120, np.uint8)
    moderator = Moderator(repo, policy(above=0.0), providers=("cpu",))
    outcomes = moderate(moderator, [RecordInput("p-1", image=(png(good), "png", None, None)),
                                    RecordInput("p-2", image=(b"not an image", "png", None, None)),
                                    RecordInput("p-3", text="text only")])
    first, broken, text_only = outcomes
    top = np.argsort(-softmax(tiny_logits(preprocess_image(good, PRE)[None]))[0], kind="stable")[:3].tolist()
    assert [c["class_id"] for c in first.live.fields["classifications"]] == top
    assert first.live.safe is (0 not in top) and first.live.models["objects"]["version"] == "1"
    assert first.refs == ("tiny@1",) and first.shadow is None and first.failure is None
    assert isinstance(broken.failure, BadInput) and broken.stage == "decode" and broken.live is None
    assert text_only.live.fields == moderator.judgement({}) and text_only.live.models == {}  # no image check ran


def test_a_model_failure_is_an_inference_failure_and_a_rule_error_a_verdict_failure(repo, tmp_path):
    image = (png(np.full((16, 16, 3), 255, np.uint8)), "png", None, None)
    (failed,) = moderate(Moderator(repo, policy("poisoned"), providers=("cpu",)), [RecordInput("p-1", image=image)])
    assert isinstance(failed.failure, ModelFailed) and failed.stage == "inference" and failed.live is None
    write_text_model(tmp_path / "text", "tiny-text", "text-classify",
                     lambda p: tiny_text_classifier(p, text_classifier_weights(num_classes=3)), ["a", "b", "c"],
                     {"input": "tokens", "max_length": 64}, {"softmax": True})
    no_such_label = Policy.from_dict({"checks": {"tox": {"model": "tiny-text", "input": "text", "label": "toxic"}}})
    moderator = Moderator(ModelRepository(tmp_path / "text"), no_such_label, providers=("cpu",))
    ok, wrong = moderate(moderator, [RecordInput("p-1"), RecordInput("p-2", text="hello there")])
    assert ok.failure is None and ok.live.safe  # no text: the check does not run
    assert isinstance(wrong.failure, PolicyError) and wrong.stage == "verdict" and "no label 'toxic'" in str(wrong.failure)


def test_a_shadowed_record_gets_both_judgements_from_one_run(tmp_path):
    write_tiny_repository(tmp_path, "tiny", "1")
    write_tiny_repository(tmp_path, "tiny", "2")
    ServingState({"tiny": ModelState(pin="1", shadow=Shadow("2", 1.0))}).save(tmp_path / STATE_FILE)
    moderator = Moderator(ModelRepository(tmp_path), policy(above=0.0), providers=("cpu",))
    image = (png(np.full((16, 16, 3), 90, np.uint8)), "png", None, None)
    (both,) = moderate(moderator, [RecordInput("p-1", image=image)])
    assert both.live.models["objects"]["version"] == "1" and both.live.models["objects"]["arm"] == "serving"
    assert both.shadow.models["objects"] == {**both.live.models["objects"], "version": "2", "arm": "shadow"}
    assert both.shadow_checks == ("objects",) and both.refs == ("tiny@1",)
    assert both.shadow.fields == both.live.fields  # the same network in both versions: the same judgement
    moderator = Moderator(ModelRepository(tmp_path), policy(above=0.0), providers=("cpu",))
    (live_only,) = moderate(moderator, [RecordInput("p-1", image=image)], shadows=False)
    assert live_only.shadow is None and live_only.live.fields == both.live.fields
