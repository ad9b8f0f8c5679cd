"""Moderation policy: loading, and each task's rule, checked against hand-computed expectations."""

from __future__ import annotations

import pytest

from operators.policy import Check, Policy, PolicyError, verdict_fields


def check(**kw) -> Check:
    base = {"name": "c", "model": "m", "input": "text"}
    return Check(**{**base, **kw})


def test_policy_loads_checks_from_yaml(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("checks:\n  tox: {model: toxicity@2, input: text, label: toxic, above: 0.7}\n"
                    "  guns: {model: effnet, input: image, labels: [rifle, revolver], top_k: 3}\n")
    policy = Policy.load(path)
    assert [c.name for c in policy.checks] == ["tox", "guns"]
    assert policy.checks[0].model == "toxicity@2" and policy.checks[0].above == 0.7
    assert policy.checks[1].labels == frozenset({"rifle", "revolver"}) and policy.checks[1].top_k == 3
    assert [c.name for c in policy.for_input("image")] == ["guns"]


@pytest.mark.parametrize("raw, problem", [
    ({}, "checks"),
    ({"checks": {}}, "checks"),
    ({"checks": {"x": {"model": "m", "input": "audio"}}}, "input"),
    ({"checks": {"x": {"input": "text"}}}, "model"),
    ({"checks": {"x": {"model": "m", "input": "text", "treshold": 0.5}}}, "unknown keys"),
    ({"checks": {"x": {"model": "m", "input": "text", "above": 7}}}, "above"),
    ({"checks": {"x": "toxicity"}}, "mapping"),
    ({"checks": {"x": {"model": "m", "input": "text", "required": False}}}, "'required' is not supported"),
])
def test_invalid_policies_are_refused_with_the_reason(raw, problem):
    with pytest.raises(PolicyError, match=problem):
        Policy.from_dict(raw, "p.yaml")


def test_text_classification_rule_flags_scores_strictly_above_the_threshold():
    c = check(label="toxic", above=0.7)
    assert c.evaluate("text-classify", {"clean": 0.3, "toxic": 0.7})[0] == []
    violations, report = c.evaluate("text-classify", {"clean": 0.2, "toxic": 0.8})
    assert violations == [{"check": "c", "model": "m", "score": 0.8, "label": "toxic"}]
    assert report == {"scores": {"c": {"clean": 0.2, "toxic": 0.8}}}


def test_text_rule_naming_a_label_the_model_lacks_is_an_error():
    with pytest.raises(PolicyError, match="no label 'toxic'"):
        check(label="toxic").evaluate("text-classify", {"negative": 0.1, "positive": 0.9})


def test_ner_rule_reports_sensitive_types_only_and_can_be_report_only():
    entities = [{"type": "EMAIL", "text": "a@b.c", "start": 0, "end": 5, "score": 0.9},
                {"type": "LOCATION", "text": "Paris", "start": 9, "end": 14, "score": 0.95},
                {"type": "PHONE", "text": "555", "start": 20, "end": 23, "score": 0.3}]
    c = check(types=frozenset({"EMAIL", "PHONE"}), above=0.5)
    violations, report = c.evaluate("ner", entities)
    assert report == {"entities": [entities[0]]}  # LOCATION not sensitive, PHONE below 0.5
    assert violations == [{"check": "c", "model": "m", "score": 0.9, "types": ["EMAIL"]}]
    assert check(types=frozenset({"EMAIL"}), violation=False).evaluate("ner", entities)[0] == []


def test_detection_rule_flags_each_listed_label_above_threshold():
    dets = [{"label": "A", "score": 0.9, "box": [0, 0, 1, 1]}, {"label": "A", "score": 0.4, "box": [1, 1, 2, 2]},
            {"label": "B", "score": 0.99, "box": [2, 2, 3, 3]}]
    violations, report = check(input="image", labels=frozenset({"A"}), above=0.5).evaluate("detect", dets)
    assert violations == [{"check": "c", "model": "m", "score": 0.9, "label": "A", "box": [0, 0, 1, 1]}]
    assert report == {"detections": dets}


def test_classification_rule_only_looks_within_top_k():
    classes = [{"class_id": 1, "label": "cat", "score": 0.5}, {"class_id": 2, "label": "rifle", "score": 0.35},
               {"class_id": 3, "label": "syringe", "score": 0.34}]
    c = check(input="image", labels=frozenset({"rifle", "syringe"}), top_k=2, above=0.3)
    violations, _ = c.evaluate("classify", classes)
    assert [v["label"] for v in violations] == ["rifle"]  # syringe is third: outside the top 2


def test_verdict_fields_merge_checks_and_safe_means_no_violation():
    tox = check(name="tox", label="toxic", above=0.5)
    pii = check(name="pii", types=frozenset({"EMAIL"}), above=0.5)
    entity = {"type": "EMAIL", "text": "x@y.z", "start": 0, "end": 5, "score": 0.99}
    clean = verdict_fields([(tox, "text-classify", {"toxic": 0.1, "clean": 0.9}), (pii, "ner", [])])
    assert clean["safe"] is True and clean["violations"] == [] and clean["scores"] == {"tox": {"toxic": 0.1, "clean": 0.9}}
    flagged = verdict_fields([(tox, "text-classify", {"toxic": 0.1, "clean": 0.9}), (pii, "ner", [entity])])
    assert flagged["safe"] is False and [v["check"] for v in flagged["violations"]] == ["pii"]
    assert flagged["entities"] == [entity]


def test_rules_read_typed_results_as_their_verdict_form():
    """The rule sees what the verdict will carry: a typed result and its as_dict() judge alike."""
    import numpy as np

    from operators.classify import Classification
    from operators.detect import Detections
    from operators.ner import Entities, Entity
    from operators.text import TextClassification

    dets = Detections(np.array([[0, 0, 1, 1], [2, 2, 3, 3]], np.float32), np.array([0.9, 0.4], np.float32),
                      np.array([0, 0]), ["A", "A"])
    scores = TextClassification(("clean", "toxic"), (0.2, 0.8))
    classes = Classification([2, 1], ["rifle", "cat"], [0.6, 0.3])
    entities = Entities((Entity("EMAIL", "a@b.c", 0, 5, 0.9), Entity("PHONE", "555", 9, 12, 0.2)))
    cases = [(check(input="image", labels=frozenset({"A"})), "detect", dets),
             (check(label="toxic", above=0.7), "text-classify", scores),
             (check(input="image", labels=frozenset({"rifle"}), top_k=1), "classify", classes),
             (check(types=frozenset({"EMAIL", "PHONE"})), "ner", entities)]
    for c, task, typed in cases:
        assert c.evaluate(task, typed) == c.evaluate(task, typed.as_dict())
        assert c.evaluate(task, typed)[0], task  # each case is a violation: the comparison is not vacuous
    assert verdict_fields([(c, t, r) for c, t, r in cases]) == verdict_fields([(c, t, r.as_dict()) for c, t, r in cases])


def test_a_task_without_a_rule_cannot_be_judged():
    with pytest.raises(PolicyError, match="no rule for task 'embed'"):
        check().evaluate("embed", {})
