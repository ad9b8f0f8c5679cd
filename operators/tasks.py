"""One entry per task: everything the rest of the code needs to know about a model family.

Registry, moderation, quantization, the repository and the policy look a task up here
(`tasks.get(config.task)`) instead of branching on its name, as ultralytics' `task_map` does. An entry
names:

- `operator`: the class that serves the task, implementing `Operator` (preprocess -> run ->
  postprocess with typed results); None for tasks served as raw tensors only (embeddings, ...);
- `input`: what its `preprocess` takes, `image` (RGB array or SourceImage) or `text`;
- `rule`: the policy rule that judges its results (`operators/policy.py` RULES); None: the task
  cannot serve a moderation check;
- `evaluation`: how quantization judges a new version of it: calibration and held-out samples, and
  the accuracy comparison against FP32 (`operators/evaluation.py`);
- `labels_are_classes`: the labels file must have one label per output class (checked at load).

Classes are named by import path (`module:Class`) and imported when a model of the task loads, so
each task's dependencies (OpenCV, tokenizers, ...) cost nothing to the others. Adding a model family
is one `register(Task(...))` plus its operator module (docs/architecture.md, tests/test_add_a_task.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import Any, Protocol, runtime_checkable

import numpy as np

# The model an operator serves is an operators.model_repository.LoadedModel; not imported here, because
# the repository looks tasks up in this module (no import cycle, even for type checking).
LoadedModel = Any
INPUTS = ("image", "text")


@runtime_checkable
class Result(Protocol):
    """A typed result of one input (Classification, Detections, Entities, TextClassification, ...)."""

    def as_dict(self) -> Any:
        """Its JSON form: what verdicts and the REST API carry."""


class Operator(Protocol):
    """A task's three stages for one loaded model. `preprocess` runs per value in a decode thread and
    raises BadInput for input the model cannot take; `run_batch` runs the session once for a batch of
    preprocessed items and postprocesses each into a typed `Result` (one call, because the batcher
    hands a batch over once). Optional: `preprocess_many` (a batch in one call, a refused value is its
    exception in its place) and `reduction_limit(width, height)` (how much smaller an image may be decoded)."""

    model: LoadedModel

    def preprocess(self, value: Any) -> Any: ...

    def run_batch(self, items: list[Any]) -> list[Result]: ...


def resolve(target: str | Callable[..., Any]) -> Callable[..., Any]:
    """`module:attribute` -> that attribute, imported now; anything else as it is."""
    if not isinstance(target, str):
        return target
    module, _, attribute = target.partition(":")
    return getattr(import_module(module), attribute)


_WARM_UP: dict[str, Callable[[], Any]] = {"image": lambda: np.zeros((64, 64, 3), np.uint8), "text": lambda: "warm-up"}
# Longer than any model's max_length in tokens (images are resized to the model's input anyway).
_LARGEST: dict[str, Callable[[], Any]] = {**_WARM_UP, "text": lambda: "warm up " * 256}


@dataclass(frozen=True)
class Task:
    name: str
    operator: str | type | None = None  # `module:Class` (or the class) implementing Operator
    input: str | None = None  # "image" | "text"; None: raw tensors only
    rule: str | None = None  # the policy rule over its results; None: no moderation check can use it
    evaluation: str | type = "operators.evaluation:OutputEvaluation"  # quantization's samples and accuracy
    labels_are_classes: bool = False

    def __post_init__(self) -> None:
        if (self.operator is None) != (self.input is None) or (self.input is not None and self.input not in INPUTS):
            raise ValueError(f"task {self.name!r}: an operator needs an input kind ({', '.join(INPUTS)}) and the reverse")
        if self.rule is not None and self.operator is None:
            raise ValueError(f"task {self.name!r}: a policy rule judges an operator's results: name the operator")

    def operator_for(self, model: LoadedModel) -> Operator | None:
        """The model's operator (None for a raw-tensor task)."""
        return None if self.operator is None else resolve(self.operator)(model)

    def warm_up_input(self, largest: bool = False) -> Any:
        """A value the operator's `preprocess` takes, run before a version serves; `largest`: one that
        fills the model's input (text truncated at max_length) where the input size varies."""
        return (_LARGEST if largest else _WARM_UP)[self.input]()

    def evaluation_for(self, model: LoadedModel) -> Any:
        """How quantization judges a new version of `model` (operators/evaluation.py `Evaluation`)."""
        return resolve(self.evaluation)(model)


class UnknownTask(LookupError):
    pass


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def get(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTask(f"unknown task {name!r}; expected one of {', '.join(TASKS)}") from None


def names() -> tuple[str, ...]:
    return tuple(TASKS)


register(Task("classify", "operators.classify:ImageClassifier", "image", rule="classes",
              evaluation="operators.evaluation:ClassifierEvaluation", labels_are_classes=True))
register(Task("detect", "operators.detect:ObjectDetector", "image", rule="detections",
              evaluation="operators.evaluation:DetectorEvaluation"))
register(Task("text-classify", "operators.text:TextClassifier", "text", rule="scores"))
register(Task("ner", "operators.ner:TokenClassifier", "text", rule="entities",
              evaluation="operators.evaluation:EntityEvaluation"))
register(Task("embed"))
register(Task("retrieve"))
register(Task("ctr", evaluation="operators.evaluation:ClickEvaluation"))
