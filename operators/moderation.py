"""Moderation: run every model a policy names on a post's text and image, each model through its own
micro-batcher, and turn the results into a judgement (safe, violations, entities, detections).

Each distinct model version is loaded once and shared by the checks that name it. One record's parts
are batched with other records' parts per model, then joined back into one judgement. Which version
serves a record comes from the model registry (operators/registry.py), chosen once per record by its
key (`Moderator.assign`): pins, A/B splits and shadows change without dropping a record.

streams/ calls `Moderator.moderate` once per batch of records: versions assigned on the event loop,
images decoded and every model's preprocessing done in the decode threads (one hand-off per chunk),
one batcher submission per model, then the policy over the typed results; each record comes back as
a `Moderated` (its live judgement, its shadow judgement, or why it failed and where).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from operators import tasks
from operators.batcher import STREAM, BatchFailed
from operators.degrade import DegradationLadder, LadderConfig
from operators.images import ImageLimits, decode_source
from operators.model_repository import ModelRef, ModelRepository
from operators.policy import Policy, PolicyError, verdict_fields
from operators.registry import ModelRegistry
from operators.stages import Lease, Stage

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

    def stage_of(self, ref: str) -> Stage:
        """The stage (primary or shadow) of this record named `ref`."""
        for stage in (*self.stages.values(), *self.shadows.values()):
            if stage.ref == ref:
                return stage
        raise KeyError(ref)

    def models(self) -> dict[str, dict[str, str]]:
        """check -> {name, version, provider, arm}: the `models` field of a verdict."""
        return {check: {**stage.info, "arm": self.arms[check]} for check, stage in self.stages.items()}

    def shadowed(self) -> Assignment:
        """The same record with each shadowed check served by its shadow version (arm `shadow`)."""
        return Assignment(self.key, {**self.stages, **self.shadows},
                          {**self.arms, **{check: "shadow" for check in self.shadows}})


@dataclass(eq=False, slots=True)
class RecordInput:
    """One record to moderate: its key (the record id: which versions serve it) and its parts."""

    key: str | None
    text: str | None = None
    image: tuple[Any, str, int | None, int | None] | None = None  # (data, encoding, declared width, height)


@dataclass(slots=True)
class Judgement:
    """The policy's judgement of one record by one set of versions: the verdict's judgement fields
    (safe, violations, scores, entities, detections, classifications), the models of the checks that
    ran (check -> name, version, provider, arm) and the redacted text when the policy asks for one."""

    fields: dict[str, Any]
    models: dict[str, dict[str, str]]
    redacted_text: str | None = None

    @property
    def safe(self) -> bool:
        return self.fields["safe"]


@dataclass(slots=True)
class Moderated:
    """One record's outcome: its live judgement and, when it ran shadow versions that all succeeded,
    the shadow one (`shadow_checks` the checks they served); or `failure` and the `stage` it failed in
    (decode, inference, verdict). `refs`: the versions that served its checks."""

    live: Judgement | None = None
    shadow: Judgement | None = None
    shadow_checks: tuple[str, ...] = ()
    refs: tuple[str, ...] = ()
    inference_s: float = 0.0
    failure: Exception | None = None
    stage: str = "decode"


def preprocess_all(operator: Any, values: Sequence[Any]) -> list[Any]:
    """An operator's preprocessing of a batch of values: its own `preprocess_many` when it has one
    (e.g. one tokenizer call), else `preprocess` per value; a value refused is its exception."""
    many = getattr(operator, "preprocess_many", None)
    if many is not None and values:
        return many(values)
    out: list[Any] = []
    for value in values:
        try:
            out.append(operator.preprocess(value))
        except Exception as exc:  # refused (BadInput) or a bug: either way this value alone
            out.append(exc)
    return out


class Moderator:
    """Every model of a policy, each through its own batcher. A check naming `name` follows the model's
    route in the registry (serving version, A/B split, shadow: operators/registry.py); a check naming
    `name@version` always uses that version."""

    def __init__(self, repo: ModelRepository, policy: Policy, providers: tuple[str, ...] | None = None,
                 intra_op_threads: int | None = None, registry: ModelRegistry | None = None) -> None:
        self.policy = policy
        self.registry = registry or ModelRegistry(repo, providers, intra_op_threads)
        self._model_of: dict[str, tuple[str, str | None]] = {}  # check -> (model name, pinned ref or None)
        self.ladders: dict[str, DegradationLadder] = {}  # model name -> its ladder (configs that declare one)
        for check in policy.checks:
            cfg = self.registry.repo.config(check.model)
            if tasks.get(cfg.task).rule is None:
                raise PolicyError(f"{cfg.ref}: task {cfg.task!r} cannot serve a moderation check")
            if ModelRef(check.model).version:
                self._model_of[check.name] = (cfg.name, self.registry.fixed(cfg.ref).ref)
            else:
                self.registry.route_sync(cfg.name)
                self._model_of[check.name] = (cfg.name, None)
                self._add_ladder(cfg)

    def _add_ladder(self, cfg) -> None:
        """The degradation ladder of a routed model (its serving version's config), with every rung's
        version loaded now, so stepping down never waits for a load."""
        config = LadderConfig.from_config(cfg.degrade, cfg.ref)
        if config is None or cfg.name in self.ladders:
            return
        for rung in config.rungs:
            if rung.version is not None:
                self.registry.fixed(ModelRef.of(cfg.name, rung.version))
        self.ladders[cfg.name] = DegradationLadder(config)

    def inputs_of(self, name: str) -> set[str]:
        """The inputs (text, image) that the policy's checks of model `name` read."""
        return {c.input for c in self.policy.checks if ModelRef(c.model).name == name}

    @property
    def frame_stride(self) -> int:
        """Judge every Nth frame of a stream: the largest stride in force on an image model's ladder."""
        return max((ladder.frame_stride for name, ladder in self.ladders.items() if "image" in self.inputs_of(name)),
                   default=1)

    def degradation(self) -> dict[str, Any] | None:
        """What a verdict says of the ladders (None when no model of the policy has one)."""
        if not self.ladders:
            return None
        return {"level": max(ladder.level for ladder in self.ladders.values()), "frame_stride": self.frame_stride,
                "models": {name: ladder.level for name, ladder in self.ladders.items()}}

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
            ladder = self.ladders.get(name)
            if ladder is not None and ladder.rung is not None and ladder.rung.version is not None:
                # a degraded rung serves every record with its cheaper version (no A/B, no shadow on it)
                stages[check], arms[check] = self.registry.stage(ModelRef.of(name, ladder.rung.version)), "degraded"
                continue
            stages[check], arms[check], shadow = self.registry.assign(name, key)
            if shadow is not None and shadows:
                shadow_of[check] = shadow
        held = self.registry.lease([*stages.values(), *shadow_of.values()]) if lease else None
        return Assignment(key, stages, arms, shadow_of, held)

    def assign_many(self, keys: Sequence[str | None], shadows: bool = True) -> list[Assignment]:
        """`assign(key, lease=False)` for each key; when no model of the policy has an A/B split or a
        shadow, no assignment depends on its key and the records share one (assigning per record was
        5% of a busy worker's event loop)."""
        routes = [self.registry.route(name) for name, pinned in self._model_of.values() if pinned is None]
        if any(route.split or route.shadow for route in routes):  # (a degraded rung depends on no key either)
            return [self.assign(key, lease=False, shadows=shadows) for key in keys]
        return [self.assign(None, lease=False, shadows=shadows)] * len(keys)

    def lease(self, assignments: Iterable[Assignment]) -> Lease:
        """One lease on every stage (primary and shadow) of `assignments`: e.g. for a batch of records
        assigned with `lease=False`."""
        return self.registry.lease({id(s): s for a in assignments
                                    for s in (*a.stages.values(), *a.shadows.values())}.values())

    @property
    def model_info(self) -> dict[str, dict[str, str]]:
        """check name -> the model (name, version, provider) that serves it by default."""
        return {check: stage.info for check, stage in self.assign(None, lease=False).stages.items()}

    def reduction_limit(self, assignment: Assignment, width: int, height: int) -> float:
        """How many times smaller than `width` x `height` this record's image may be decoded: the least
        that any model reading it (shadows included) can take without losing detail; 1 when a model
        does not say."""
        limits = [getattr(stage.operator, "reduction_limit", lambda w, h: 1.0)(width, height)
                  for check in self.policy.for_input("image")
                  for stage in (assignment.stages[check.name], assignment.shadows.get(check.name)) if stage is not None]
        return min(limits, default=1.0)

    def prepare(self, text: str | None = None, image: np.ndarray | None = None,
                assignment: Assignment | None = None) -> dict[str, Any]:
        """Preprocessing of one record for every model that reads its parts, keyed by stage ref (CPU
        work: run it in a worker thread). Raises BadInput for input a model cannot take."""
        (items,) = self.prepare_many([(text, image)], [assignment or self.assign(None, lease=False)])
        if isinstance(items, Exception):
            raise items
        return items

    def prepare_many(self, parts: Sequence[tuple[str | None, np.ndarray | None]],
                     assignments: Sequence[Assignment]) -> list[dict[str, Any] | Exception]:
        """Per-record preprocessing for a batch of records (`(text, image)` each, None where absent):
        each model preprocesses all the records it reads in one call (one tokenizer call per text
        model). Returns per record its items keyed by stage ref, or the exception that refuses it
        (BadInput for input a model cannot take). Shadow versions are prepared too; a shadow that
        cannot take the input is skipped, never fatal."""
        out: list[dict[str, Any] | Exception] = [{} for _ in parts]
        for position, kind in enumerate(("text", "image")):
            checks = self.policy.for_input(kind)
            primary: dict[str, tuple[Stage, dict[int, None]]] = {}
            shadow: dict[str, tuple[Stage, dict[int, None]]] = {}
            for i, (part, a) in enumerate(zip(parts, assignments, strict=True)):
                if part[position] is None:
                    continue
                for check in checks:
                    stage = a.stages[check.name]
                    primary.setdefault(stage.ref, (stage, {}))[1][i] = None
                    extra = a.shadows.get(check.name)
                    if extra is not None:
                        shadow.setdefault(extra.ref, (extra, {}))[1][i] = None
            for optional, groups in ((False, primary), (True, shadow)):
                for ref, (stage, rows) in groups.items():
                    wanted = [i for i in rows if isinstance(out[i], dict) and ref not in out[i]]
                    items = preprocess_all(stage.operator, [parts[i][position] for i in wanted])
                    for i, item in zip(wanted, items, strict=True):
                        if not isinstance(item, Exception):
                            out[i][ref] = item
                        elif optional:  # the shadow must never change what happens to the record
                            log.warning("shadow %s cannot preprocess record %s: %s", ref, assignments[i].key, item)
                        else:
                            out[i] = item
        return out

    async def judge(self, items: dict[str, Any], assignment: Assignment | None = None, lane: int = STREAM) -> dict[str, Any]:
        """The typed results of one prepared record by stage ref; raises ModelFailed."""
        (results,) = await self.judge_many([items], [assignment or self.assign(None, lease=False)], lane)
        if isinstance(results, Exception):
            raise results
        return results

    async def judge_many(self, items: Sequence[dict[str, Any]], assignments: Sequence[Assignment],
                         lane: int = STREAM) -> list[dict[str, Any] | ModelFailed]:
        """Every prepared record's parts through their models' batchers: one submission per model for
        the whole batch, all models concurrently. Per record its typed results by stage ref, or
        ModelFailed when one of its (non-shadow) models failed on it even alone. A shadow that fails
        is left out of the results (logged)."""
        groups: dict[str, tuple[Stage, list[int]]] = {}
        for i, (record_items, a) in enumerate(zip(items, assignments, strict=True)):
            for ref in record_items:
                if ref not in groups:
                    groups[ref] = (a.stage_of(ref), [])
                groups[ref][1].append(i)
        outcomes = await asyncio.gather(*(stage.batcher.submit_many([items[i][ref] for i in rows], lane)
                                          for ref, (stage, rows) in groups.items()))
        results: list[dict[str, Any] | ModelFailed] = [{} for _ in items]
        for (ref, (stage, rows)), outs in zip(groups.items(), outcomes, strict=True):
            for i, outcome in zip(rows, outs, strict=True):
                done = results[i]
                if isinstance(done, ModelFailed):
                    continue
                if not isinstance(outcome, BatchFailed):
                    done[ref] = outcome
                elif ref in assignments[i].shadow_refs:
                    log.warning("shadow %s failed on record %s: %s", ref, assignments[i].key, outcome)
                else:
                    results[i] = ModelFailed(stage.model.ref, str(outcome))
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

    def _judged(self, results: dict[str, Any], assignment: Assignment, text: str | None,
                models_seen: dict[tuple, dict[str, dict[str, str]]]) -> Judgement:
        fields = self.judgement(results, assignment)
        key = (id(assignment), *results)  # records of a batch mostly share both: one models dict for them
        models = models_seen.get(key)
        if models is None:
            models = models_seen[key] = {check: info for check, info in assignment.models().items()
                                         if assignment.stages[check].ref in results}
        return Judgement(fields, models, self.policy.redacted(text, fields["entities"]))

    # ------------------------------------------------------------------------------ a batch of records
    async def moderate(self, records: Sequence[RecordInput], pool: Executor, threads: int,
                       limits: ImageLimits | None = None,
                       decode_rule: Callable[[Assignment], Callable[[int, int], float] | None] = lambda a: None,
                       shadows: bool = True, lane: int = STREAM) -> list[Moderated]:
        """Each record's live (and shadow) judgement, or its failure: the one call per batch. Images are
        decoded in `pool` (up to `threads` chunks; `decode_rule(assignment)`: how much smaller a JPEG may
        be decoded, None for full size); without `shadows` no shadow version runs (nowhere to report it).
        Never raises for one record: its exception is its `failure`."""
        assignments = self.assign_many([r.key for r in records], shadows=shadows)
        refs = {id(a): tuple(s.ref for s in a.stages.values()) for a in {id(a): a for a in assignments}.values()}
        outcomes = [Moderated(refs=refs[id(a)]) for a in assignments]
        lease = self.lease(assignments)  # none of the versions assigned retires under the batch
        try:
            items = await self._prepare_in_threads(records, assignments, outcomes, pool, threads, limits or ImageLimits(),
                                                   decode_rule)
            live = [i for i, o in enumerate(outcomes) if o.failure is None]
            started = time.perf_counter()
            judged = await self.judge_many([items[i] for i in live], [assignments[i] for i in live], lane)
            elapsed = time.perf_counter() - started
            models_seen: dict[tuple, dict[str, dict[str, str]]] = {}
            shadowed: dict[int, Assignment] = {}  # held for the batch: ids stay unique while cached by them
            for i, results in zip(live, judged, strict=True):
                outcome, assignment = outcomes[i], assignments[i]
                outcome.inference_s = elapsed
                if isinstance(results, Exception):
                    outcome.stage, outcome.failure = "inference", results
                    continue
                outcome.stage = "verdict"
                try:
                    outcome.live = self._judged(results, assignment, records[i].text, models_seen)
                    if assignment.shadows and all(s.ref in results for s in assignment.shadows.values()):
                        if id(assignment) not in shadowed:
                            shadowed[id(assignment)] = assignment.shadowed()
                        outcome.shadow = self._judged(results, shadowed[id(assignment)], records[i].text, models_seen)
                        outcome.shadow_checks = tuple(sorted(assignment.shadows))
                except Exception as exc:  # e.g. a rule naming a label the model lacks: this record's dead letter
                    outcome.failure = exc
        finally:
            lease.release()
        return outcomes

    async def _prepare_in_threads(self, records: Sequence[RecordInput], assignments: Sequence[Assignment],
                                  outcomes: list[Moderated], pool: Executor, threads: int, limits: ImageLimits,
                                  decode_rule: Callable[[Assignment], Any]) -> list[dict[str, Any] | None]:
        """Decode and preprocess in the decode threads: one hand-off per chunk (as many chunks as
        threads when there are images to decode, else one)."""
        items: list[dict[str, Any] | None] = [None] * len(records)
        if not records:
            return items
        chunks = max(1, min(threads, sum(1 for r in records if r.image is not None)))
        size = -(-len(records) // chunks)

        def chunk(start: int) -> None:
            parts, ready = [], []
            rules: dict[int, Any] = {}  # per assignment, not per record (records usually share one)
            for i in range(start, min(start + size, len(records))):
                record, assignment = records[i], assignments[i]
                try:
                    rgb = None
                    if record.image is not None:
                        if id(assignment) not in rules:
                            rules[id(assignment)] = decode_rule(assignment)
                        rgb = decode_source(*record.image, limits, rules[id(assignment)])
                except Exception as exc:
                    outcomes[i].failure = exc
                    continue
                parts.append((record.text, rgb))
                ready.append(i)
            for i, prepared in zip(ready, self.prepare_many(parts, [assignments[i] for i in ready]), strict=True):
                if isinstance(prepared, Exception):
                    outcomes[i].failure = prepared
                else:
                    items[i] = prepared

        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(pool, chunk, start) for start in range(0, len(records), size)))
        return items

    async def close(self) -> None:
        await self.registry.close()
