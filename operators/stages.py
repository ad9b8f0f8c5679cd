"""A loaded model version ready to serve (`Stage`: model, operator, micro-batcher) and the leases that
keep it open while records use it.

A stage is opened fully before it serves: session, operator, batcher, and a warm-up inference
through the operator, so a model that cannot run never serves. The warm-up is a full batch of the
largest input: ONNX Runtime's memory arena grows to its ceiling at load, where a memory limit sees it
at once, not under the first backlog hours later (a 60-minute soak saw pii-ner's arena grow from
~150 to ~540 MB that way), and the first full batch does not pay for the allocation. A retired stage closes only when its
last lease comes back (operators/registry.py retires them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from operators import tasks
from operators.batch_control import BatchController
from operators.batcher import MicroBatcher
from operators.errors import BadInput
from operators.model_repository import LoadedModel, ModelRef
from operators.tasks import Operator


class LoadFailed(RuntimeError):
    """A model version could not be loaded (or failed its warm-up); the current version keeps serving."""

    def __init__(self, ref: str, detail: str) -> None:
        super().__init__(f"{ref}: {detail}")
        self.ref = ref
        self.detail = detail


@dataclass(eq=False)
class Stage:
    """One loaded model version with its operator and micro-batcher (neither for tasks that only take
    raw tensors, e.g. embeddings). `leases` counts the records and requests using it right now."""

    ref: ModelRef  # resolved `name@version`
    model: LoadedModel
    operator: Operator | None
    batcher: MicroBatcher | None
    leases: int = 0
    retiring: bool = False
    closed: bool = False

    @property
    def info(self) -> dict[str, str]:
        cfg = self.model.config
        return {"name": cfg.name, "version": cfg.version, "provider": self.model.session.provider}

    @property
    def task(self) -> tasks.Task:
        return tasks.get(self.model.config.task)

    @property
    def input_kind(self) -> str | None:
        return self.task.input

    async def close(self) -> None:
        """Let the batcher finish what it holds, then stop it (a stage that served)."""
        self.closed = True
        if self.batcher is not None:
            await self.batcher.close()

    def discard(self) -> None:
        """Stop a stage no record ever saw (loaded, then not switched to)."""
        self.closed = True
        if self.batcher is not None:
            self.batcher.discard()


def open_stage(model: LoadedModel, warm_up: bool = True) -> Stage:
    """The model's operator (by its task), a warm-up inference through it, and its batcher."""
    task = tasks.get(model.config.task)
    operator = task.operator_for(model)
    cfg = model.config
    if operator is not None and warm_up:
        _warm_up(task, operator, cfg.max_batch_size)
    batcher = None
    if operator is not None:
        controller = BatchController(cfg.max_batch_size, cfg.max_wait_ms / 1000, target_s=cfg.target_p99_ms / 1000,
                                     adaptive=cfg.adaptive_batching)
        batcher = MicroBatcher(operator.run_batch, name=cfg.ref, controller=controller)
    return Stage(cfg.ref, model, operator, batcher)


def _warm_up(task: tasks.Task, operator: Operator, batch_size: int) -> None:
    try:
        item = operator.preprocess(task.warm_up_input(largest=True))
    except BadInput:  # longer than this model's max_chars
        item = operator.preprocess(task.warm_up_input())
    results = operator.run_batch([item] * batch_size)
    if len(results) != batch_size:
        raise ValueError(f"warm-up: {batch_size} inputs gave {len(results)} results")


class Lease:
    """Holds stages open: `on_idle(stage)` runs when a retiring stage's last lease is released."""

    def __init__(self, stages: Iterable[Stage], on_idle: Callable[[Stage], None]) -> None:
        self._stages = list({id(s): s for s in stages}.values())
        self._on_idle = on_idle
        for stage in self._stages:
            stage.leases += 1
        self._held = True

    @property
    def stage(self) -> Stage:
        """The (first) stage held: what `ModelRegistry.acquire` resolved."""
        return self._stages[0]

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        for stage in self._stages:
            stage.leases -= 1
            if stage.retiring and stage.leases == 0:
                self._on_idle(stage)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


@dataclass
class RegistryHooks:
    """Callbacks for metrics (the worker wires them to Prometheus)."""

    on_loaded: Callable[[Stage], None] = lambda stage: None
    on_failed: Callable[[str, str, str], None] = lambda name, version, detail: None  # name, version, reason
    on_retired: Callable[[Stage], None] = lambda stage: None
