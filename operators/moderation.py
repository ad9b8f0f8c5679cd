"""Moderation: run every model a policy names on a post's text and image, each model through its own
micro-batcher, and turn the results into a judgement (safe, violations, entities, detections).

Each distinct model version is loaded once and shared by the checks that name it. One record's parts
are batched with other records' parts per model, then joined back into one judgement. Which version
serves a record comes from the model registry (operators/registry.py), chosen once per record by its
key (`Moderator.assign`): pins, A/B splits and shadows change without dropping a record.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from operators.model_repository import ModelRepository
from operators.policy import Policy, PolicyError, verdict_fields
from operators.registry import MODERATION_TASKS, Lease, ModelRegistry, Stage, operator_for

__all__ = ["Assignment", "ModelFailed", "Moderator", "Stage", "operator_for"]

log = logging.getLogger(__name__)


class ModelFailed(Exception):
    """A model failed on this record even alone; `model` names it."""

    def __init__(self, model: str, detail: str) -> None:
        super().__init__(f"{model}: {detail}")
        self.model = model


@dataclass
class Assignment:
    """Which stage serves each check for one record, chosen once when the record starts: the record
    is preprocessed and inferred by exactly these versions, whatever switches meanwhile. Holds a lease
    on them until released (use as a context manager), so a retired version drains before it closes."""

    key: str | None
    stages: dict[str, Stage]  # check name -> stage (its model version) for this record
    arms: dict[str, str]  # check name -> "serving" | "split" | "policy" (name@version in the policy)
    shadows: dict[str, Stage] = field(default_factory=dict)  # check name -> shadow stage (sampled keys only)
    lease: Lease | None = None

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()

    def __enter__(self) -> Assignment:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    @property
    def shadow_refs(self) -> set[str]:
        """Refs that run only as shadows: their failure never fails the record."""
        return {s.ref for s in self.shadows.values()} - {s.ref for s in self.stages.values()}

    def models(self) -> dict[str, dict[str, str]]:
        """check -> {name, version, provider, arm}: the `models` field of a verdict."""
        return {check: {**stage.info, "arm": self.arms[check]} for check, stage in self.stages.items()}

    def shadowed(self) -> Assignment:
        """The same record with each shadowed check served by its shadow version (arm `shadow`)."""
        return Assignment(self.key, {**self.stages, **self.shadows},
                          {**self.arms, **{check: "shadow" for check in self.shadows}})


class Moderator:
    """Every model of a policy, each through its own batcher. A check naming `name` follows the model's
    route in the registry (serving version, A/B split, shadow: operators/registry.py); a check naming
    `name@version` always uses that version."""

    def __init__(self, repo: ModelRepository, policy: Policy, providers: tuple[str, ...] | None = None,
                 intra_op_threads: int | None = None, registry: ModelRegistry | None = None) -> None:
        self.policy = policy
        self.registry = registry or ModelRegistry(repo, providers, intra_op_threads)
        self._model_of: dict[str, tuple[str, str | None]] = {}  # check -> (model name, pinned ref or None)
        for check in policy.checks:
            cfg = self.registry.repo.config(check.model)
            if cfg.task not in MODERATION_TASKS:
                raise PolicyError(f"{cfg.ref}: task {cfg.task!r} cannot serve a moderation check")
            if "@" in check.model:
                self._model_of[check.name] = (cfg.name, self.registry.fixed(cfg.ref).ref)
            else:
                self.registry.route_sync(cfg.name)
                self._model_of[check.name] = (cfg.name, None)

    @property
    def stages(self) -> dict[str, Stage]:
        """The loaded stages of the policy's models, keyed by resolved `name@version`."""
        names = {name for name, _ in self._model_of.values()}
        return {ref: s for ref, s in self.registry.stages.items() if s.model.config.name in names}

    def assign(self, key: str | None, lease: bool = True, shadows: bool = True) -> Assignment:
        """The stages that serve each check for the record `key` (None: the serving versions), with the
        shadow versions of a sampled key unless `shadows` is False (nowhere to report them)."""
        stages, arms, shadow_of = {}, {}, {}
        for check, (name, pinned) in self._model_of.items():
            if pinned is not None:
                stages[check], arms[check] = self.registry.stage(pinned), "policy"
                continue
            stages[check], arms[check], shadow = self.registry.assign(name, key)
            if shadow is not None and shadows:
                shadow_of[check] = shadow
        held = self.registry.lease([*stages.values(), *shadow_of.values()]) if lease else None
        return Assignment(key, stages, arms, shadow_of, held)

    def models_for(self, kind: str) -> list[str]:
        serving = self.assign(None, lease=False)
        return list(dict.fromkeys(serving.stages[c.name].ref for c in self.policy.for_input(kind)))

    @property
    def model_info(self) -> dict[str, dict[str, str]]:
        """check name -> the model (name, version, provider) that serves it by default."""
        return {check: stage.info for check, stage in self.assign(None, lease=False).stages.items()}

    def policy_model(self, check_name: str) -> str:
        """The stage (resolved `name@version`) that serves a check by default; its key in judge() results."""
        return self.assign(None, lease=False).stages[check_name].ref

    def prepare(self, text: str | None = None, image: np.ndarray | None = None,
                assignment: Assignment | None = None) -> dict[str, Any]:
        """Per-record preprocessing for every model that reads this record's parts (CPU work: run it in
        a worker thread), keyed by stage ref. Raises BadInput for input a model cannot take. Shadow
        versions are prepared too; a shadow that cannot take the input is skipped, never fatal."""
        a = assignment or self.assign(None, lease=False)
        items: dict[str, Any] = {}
        for kind, value in (("text", text), ("image", image)):
            if value is None:
                continue
            for check in self.policy.for_input(kind):
                stage = a.stages[check.name]
                if stage.ref not in items:
                    items[stage.ref] = stage.operator.preprocess(value)
            for check in self.policy.for_input(kind):
                shadow = a.shadows.get(check.name)
                if shadow is None or shadow.ref in items:
                    continue
                try:
                    items[shadow.ref] = shadow.operator.preprocess(value)
                except Exception as exc:  # the shadow must never change what happens to the record
                    log.warning("shadow %s cannot preprocess record %s: %s", shadow.ref, a.key, exc)
        return items

    async def judge(self, items: dict[str, Any], assignment: Assignment | None = None) -> dict[str, Any]:
        """Submit each prepared part to its model's batcher concurrently; the results as_dict() by stage
        ref. A shadow that fails is left out of the results (logged); any other failure raises."""
        from operators.batcher import BatchFailed

        stages = {s.ref: s for s in [*assignment.stages.values(), *assignment.shadows.values()]} if assignment else {}
        optional = assignment.shadow_refs if assignment else set()
        refs = list(items)
        chosen = [stages.get(r) or self.registry.stage(r) for r in refs]
        outcomes = await asyncio.gather(*(s.batcher.submit(items[s.ref]) for s in chosen), return_exceptions=True)
        results = {}
        for stage, outcome in zip(chosen, outcomes, strict=True):
            if isinstance(outcome, BaseException) and stage.ref in optional and isinstance(outcome, Exception):
                log.warning("shadow %s failed on record %s: %s", stage.ref, assignment.key, outcome)
                continue
            if isinstance(outcome, BatchFailed):
                raise ModelFailed(stage.model.ref, str(outcome))
            if isinstance(outcome, BaseException):
                raise outcome
            results[stage.ref] = outcome.as_dict()
        return results

    def judgement(self, results: dict[str, Any], assignment: Assignment | None = None) -> dict[str, Any]:
        """Policy over the results that are present (a post without an image skips the image checks)."""
        a = assignment or self.assign(None, lease=False)
        applied = []
        for check in self.policy.checks:
            stage = a.stages[check.name]
            if stage.ref in results:
                applied.append((check, stage.model.config.task, results[stage.ref]))
        return verdict_fields(applied)

    async def close(self) -> None:
        await self.registry.close()
