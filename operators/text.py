"""Text classification: preprocess -> (session) -> postprocess, for both kinds of text model.

- `preprocess.input: strings`: the model takes raw text, a string tensor [N, 1] (e.g. a scikit-learn
  pipeline converted with skl2onnx) and outputs probabilities [N, C].
- `preprocess.input: tokens`: a transformer takes input_ids + attention_mask (+ token_type_ids when
  the ONNX model has that input) from the model's tokenizer.json and outputs logits [N, C]; each
  length bucket of a batch is one session call.
Whether scores still need a softmax is declared by `postprocess.softmax`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from operators.classify import softmax
from operators.errors import BadInput
from operators.model_repository import ModelConfigError
from operators.tokens import (
    TextTokenizer,
    TokenizedText,
    check_text,
    check_token_inputs,
    preprocess_texts,
    text_model_preprocess,
)

POSTPROCESS_KEYS = {"softmax", "output"}


@dataclass(frozen=True)
class TextClassification:
    """Scores of every class of one text, in class-id order."""

    labels: tuple[str, ...]
    scores: tuple[float, ...]  # probabilities, one per label
    truncated: bool = False  # the model saw only the first max_length tokens

    @property
    def label(self) -> str:
        """The best class (the lower class id on ties)."""
        return self.labels[int(np.argmax(self.scores))]

    @property
    def score(self) -> float:
        return max(self.scores)

    def as_dict(self) -> dict[str, float]:
        """{label: probability} for every class: what a moderation policy's text rule reads."""
        return dict(zip(self.labels, self.scores, strict=True))


def score_output(model, postprocess: dict[str, Any]) -> str:
    """The output tensor that holds the scores: `postprocess.output`, else the first float output
    (skl2onnx classifiers put an int64 `label` output first)."""
    names = [o.name for o in model.session.outputs]
    name = postprocess.get("output")
    if name is None:
        name = next((o.name for o in model.session.outputs if np.issubdtype(o.dtype, np.floating)), None)
    if name not in names:
        raise ModelConfigError(f"{model.ref}: no score output {name!r} (outputs: {names})")
    return name


def class_labels(model, num_classes: int | str | None) -> list[str]:
    """The config's labels, checked against the model's class count; class ids when there are none."""
    labels = list(model.labels)
    if isinstance(num_classes, int):
        if labels and len(labels) != num_classes:
            raise ModelConfigError(f"{model.ref}: {len(labels)} labels but the model outputs {num_classes} classes")
        labels = labels or [str(i) for i in range(num_classes)]
    return labels


class TextClassifier:
    """One text classification model's three stages. `preprocess` runs per text (in a worker thread)
    and raises BadInput; `run_batch` runs the session once per length bucket (once for strings)."""

    def __init__(self, model) -> None:  # model: operators.model_repository.LoadedModel
        self.model = model
        cfg = model.config
        self.pre = text_model_preprocess(model, "text-classify", POSTPROCESS_KEYS)
        self.apply_softmax = bool(cfg.postprocess.get("softmax", True))
        self.output = score_output(model, cfg.postprocess)
        spec = next(o for o in model.session.outputs if o.name == self.output)
        self.labels = class_labels(model, spec.shape[-1] if len(spec.shape) == 2 else None)
        self.tokenizer: TextTokenizer | None = None
        if self.pre.input == "strings":
            inputs = model.session.inputs
            if len(inputs) != 1 or inputs[0].dtype != np.object_:
                raise ModelConfigError(f"{cfg.ref}: a strings model takes one string tensor, not {[i.name for i in inputs]}")
            self.input_name = inputs[0].name
        else:
            check_token_inputs(model.session.inputs, cfg.ref)
            self.tokenizer = TextTokenizer.for_model(cfg.directory, self.pre)

    def preprocess(self, text: object) -> str | TokenizedText:
        text = self._checked(text)
        return text if self.tokenizer is None else self.tokenizer.encode(text)

    def preprocess_many(self, texts: list[object]) -> list[str | TokenizedText | BadInput]:
        """`preprocess` of a batch: one tokenizer call for all; a refused text is a BadInput in its place."""
        return preprocess_texts(texts, self._checked, self.tokenizer)

    def _checked(self, text: object) -> str:
        text = check_text(text, self.pre.max_chars)
        return text.lower() if self.pre.lowercase else text

    def run_batch(self, items: list[str | TokenizedText]) -> list[TextClassification]:
        if self.tokenizer is None:
            texts = np.array(items, dtype=object).reshape(-1, 1)
            scores = self.model.session.run({self.input_name: texts}, [self.output])[self.output]
            return self._results(scores, [False] * len(items))
        results: list[TextClassification | None] = [None] * len(items)
        for indices, batch in self.tokenizer.batches(items, self.pre.call_cost_tokens):
            logits = self.model.session.run(batch.feeds(self.model.session.inputs), [self.output])[self.output]
            for i, result in zip(indices, self._results(logits, [items[i].truncated for i in indices]), strict=True):
                results[i] = result
        return results

    def _results(self, scores: np.ndarray, truncated: list[bool]) -> list[TextClassification]:
        """`(N, C)` logits or probabilities -> N results."""
        if scores.ndim != 2 or scores.shape[0] != len(truncated):
            raise ValueError(f"{self.model.ref}: expected ({len(truncated)}, C) scores, got shape {scores.shape}")
        if not np.all(np.isfinite(scores)):
            bad = np.flatnonzero(~np.isfinite(scores).all(axis=1)).tolist()
            raise FloatingPointError(f"model produced non-finite scores for batch rows {bad}")
        probs = softmax(scores.astype(np.float64)) if self.apply_softmax else scores.astype(np.float64)
        labels = tuple(self.labels) if self.labels else tuple(str(i) for i in range(scores.shape[1]))
        rounded = np.round(probs, 6).tolist()  # once per batch: what verdicts carry (6 decimals)
        return [TextClassification(labels, tuple(row), cut) for row, cut in zip(rounded, truncated, strict=True)]
