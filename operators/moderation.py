"""Moderation: run every model a policy names on a post's text and image, each model through its own
micro-batcher, and turn the results into a judgement (safe, violations, entities, detections).

Each distinct model is loaded once and shared by the checks that name it. One record's parts are
batched with other records' parts per model, then joined back into one judgement.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from operators.batcher import MicroBatcher
from operators.model_repository import LoadedModel, ModelRepository
from operators.policy import Policy, PolicyError, verdict_fields

log = logging.getLogger(__name__)


def operator_for(model: LoadedModel):
    """The pre/post-processing operator for a model's task (imported lazily: each task's deps)."""
    task = model.config.task
    if task == "classify":
        from operators.classify import ImageClassifier

        return ImageClassifier(model)
    if task == "detect":
        from operators.detect import ObjectDetector

        return ObjectDetector(model)
    if task == "text-classify":
        from operators.text import TextClassifier

        return TextClassifier(model)
    if task == "ner":
        from operators.ner import TokenClassifier

        return TokenClassifier(model)
    raise PolicyError(f"{model.ref}: task {task!r} cannot serve a moderation check")


@dataclass
class Stage:
    """One loaded model with its operator and micro-batcher."""

    ref: str  # the reference used in the policy (name or name@version)
    model: LoadedModel
    operator: Any
    batcher: MicroBatcher

    @property
    def info(self) -> dict[str, str]:
        cfg = self.model.config
        return {"name": cfg.name, "version": cfg.version, "provider": self.model.session.provider}


class ModelFailed(Exception):
    """A model failed on this record even alone; `model` names it."""

    def __init__(self, model: str, detail: str) -> None:
        super().__init__(f"{model}: {detail}")
        self.model = model


class Moderator:
    def __init__(self, repo: ModelRepository, policy: Policy, providers: tuple[str, ...] | None = None,
                 intra_op_threads: int | None = None) -> None:
        self.policy = policy
        self.stages: dict[str, Stage] = {}  # keyed by resolved `name@version`: each model loaded once
        self._stage_of: dict[str, str] = {}  # check name -> stage key
        for check in policy.checks:
            ref = repo.config(check.model).ref
            self._stage_of[check.name] = ref
            if ref in self.stages:
                continue
            model = repo.load(ref, providers=providers, intra_op_threads=intra_op_threads)
            operator = operator_for(model)
            cfg = model.config
            batcher = MicroBatcher(operator.run_batch, cfg.max_batch_size, cfg.max_wait_ms / 1000, name=cfg.ref)
            self.stages[ref] = Stage(ref, model, operator, batcher)
            log.info("moderation model %s (%s) on %s", cfg.ref, cfg.task, model.session.providers)

    def models_for(self, kind: str) -> list[str]:
        return list(dict.fromkeys(self._stage_of[c.name] for c in self.policy.for_input(kind)))

    @property
    def model_info(self) -> dict[str, dict[str, str]]:
        """check name -> the model (name, version, provider) that serves it."""
        return {name: self.stages[ref].info for name, ref in self._stage_of.items()}

    def policy_model(self, check_name: str) -> str:
        """The stage (resolved `name@version`) that serves a check; its key in judge() results."""
        return self._stage_of[check_name]

    def prepare(self, text: str | None = None, image: np.ndarray | None = None) -> dict[str, Any]:
        """Per-record preprocessing for every model that reads this record's parts (CPU work: run it in
        a worker thread). Raises BadInput for input a model cannot take."""
        items: dict[str, Any] = {}
        for kind, value in (("text", text), ("image", image)):
            if value is None:
                continue
            for ref in self.models_for(kind):
                items[ref] = self.stages[ref].operator.preprocess(value)
        return items

    async def judge(self, items: dict[str, Any]) -> dict[str, Any]:
        """Submit each prepared part to its model's batcher concurrently; the results as_dict() by model."""
        from operators.batcher import BatchFailed

        refs = list(items)
        outcomes = await asyncio.gather(*(self.stages[r].batcher.submit(items[r]) for r in refs), return_exceptions=True)
        results = {}
        for ref, outcome in zip(refs, outcomes, strict=True):
            if isinstance(outcome, BatchFailed):
                raise ModelFailed(self.stages[ref].model.ref, str(outcome))
            if isinstance(outcome, BaseException):
                raise outcome
            results[ref] = outcome.as_dict()
        return results

    def judgement(self, results: dict[str, Any]) -> dict[str, Any]:
        """Policy over the results that are present (a post without an image skips the image checks)."""
        applied = []
        for check in self.policy.checks:
            ref = self._stage_of[check.name]
            if ref in results:
                applied.append((check, self.stages[ref].model.config.task, results[ref]))
        return verdict_fields(applied)

    async def close(self) -> None:
        for stage in self.stages.values():
            await stage.batcher.close()
