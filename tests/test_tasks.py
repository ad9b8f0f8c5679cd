"""The task table: one entry per task, and what the rest of the code reads from it."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import write_tiny_repository

from operators import tasks
from operators.model_repository import ModelRepository
from operators.policy import RULES
from operators.stages import open_stage

REPO = Path(__file__).resolve().parent.parent


def test_every_served_task_names_its_input_a_rule_the_policy_has_and_an_importable_operator():
    for task in tasks.TASKS.values():
        if task.operator is not None:
            assert task.input in tasks.INPUTS and task.rule in RULES, task.name
            assert callable(tasks.resolve(task.operator)), task.name
            assert task.warm_up_input() is not None
        tasks.resolve(task.evaluation)  # importable


def test_an_unknown_task_is_refused_naming_the_known_ones():
    with pytest.raises(tasks.UnknownTask, match="unknown task 'audio'.*classify"):
        tasks.get("audio")


@pytest.mark.parametrize("kwargs, problem", [
    ({"operator": "operators.classify:ImageClassifier"}, "input kind"),
    ({"input": "image"}, "input kind"),
    ({"operator": "m:C", "input": "audio"}, "input kind"),
    ({"rule": "scores"}, "name the operator"),
])
def test_an_inconsistent_entry_is_refused(kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        tasks.Task("x", **kwargs)


def test_a_stage_gets_its_operator_from_the_entry_and_raw_tensor_tasks_get_none(tmp_path):
    write_tiny_repository(tmp_path, "tiny", "1")
    stage = open_stage(ModelRepository(tmp_path).load("tiny@1"))
    assert type(stage.operator).__name__ == "ImageClassifier" and stage.input_kind == "image"
    assert stage.task is tasks.get("classify") and stage.batcher is not None
    stage.discard()
    assert tasks.get("embed").operator_for(None) is None and tasks.get("embed").input is None


@pytest.mark.parametrize("ref", ["pii-ner@1", "toxicity@1", "nudenet-320n@1"])
def test_a_stage_warms_up_on_a_full_batch_of_the_largest_input(ref):
    """The arena reaches its ceiling at load, not under the first backlog: one session call of
    max_batch_size inputs, text filling max_length tokens."""
    model = ModelRepository(REPO / "models").load(ref)
    calls = []
    run = model.session.run

    def spy(feeds, *args, **kwargs):
        calls.append({name: getattr(value, "shape", None) for name, value in feeds.items()})
        return run(feeds, *args, **kwargs)

    model.session.run = spy
    stage = open_stage(model)
    stage.discard()
    cfg = model.config
    assert len(calls) == 1
    (shape, *_) = calls[0].values()
    assert shape[0] == cfg.max_batch_size
    if ref.startswith("pii-ner"):
        assert shape == (cfg.max_batch_size, stage.operator.pre.max_length)
