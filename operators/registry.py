"""Model registry: which version of each model serves which record, and version changes without a gap.

Per model name the registry holds a `Route`:

- the serving version: `ModelRepository.serving_version` (newest non-candidate), or a pinned one;
- an optional A/B split `{version: weight}`: a record's arm is chosen by a stable hash of
  (model name, record key), so a key gets the same arm in every process, after restarts and on replay;
- an optional shadow `{version, sample_rate}`: on a deterministic sample of keys the shadow version
  also runs, and its result is reported beside the live one without acting on it.

Pins, splits and shadows live in `<repository>/serving.yaml` (format in `ServingState`), so they survive
restarts and every worker sharing the repository follows them; the admin API writes that file.

Version changes follow the order Triton learnt the hard way (shared/notes/kafka-stack.md): load the new
version fully (session, operator, a warm-up inference), then switch new records to it, then let the old
version's batcher drain and close. A record takes a lease on the stages it was assigned before it is
preprocessed and returns it after inference, so it is processed by exactly one version, and a stage is
closed only when its last lease has come back. A version that fails to load is reported (`on_failed`
hook, log) and the current one keeps serving: a bad model never takes the worker down.

No Kafka and no Faust here: the worker wires the hooks to its metrics and runs `watch()` as a task.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from operators.batch_control import BatchController
from operators.batcher import MicroBatcher
from operators.model_repository import LoadedModel, ModelConfigError, ModelRepository
from operators.policy import PolicyError

log = logging.getLogger(__name__)

STATE_FILE = "serving.yaml"
DEFAULT_POLL_INTERVAL_S = 5.0
IMAGE_TASKS = ("classify", "detect")
TEXT_TASKS = ("text-classify", "ner")
MODERATION_TASKS = IMAGE_TASKS + TEXT_TASKS
HISTORY_LIMIT = 20
_WARM_UP_INPUTS: dict[str, Any] = {"image": np.zeros((64, 64, 3), np.uint8), "text": "warm-up"}


class ServingStateError(ValueError):
    """A serving state file (or an admin change to it) that cannot be applied, and why."""


class Conflict(ServingStateError):
    """A change that the current state does not allow (e.g. nothing to roll back to)."""


class LoadFailed(RuntimeError):
    """A model version could not be loaded (or failed its warm-up); the current version keeps serving."""

    def __init__(self, ref: str, detail: str) -> None:
        super().__init__(f"{ref}: {detail}")
        self.ref = ref
        self.detail = detail


class NotLoaded(LookupError):
    """A version exists in the repository but is not loaded in this process."""


# ------------------------------------------------------------------------------------- assignment
def bucket(key: str, salt: str) -> float:
    """A stable uniform number in [0, 1) for `key`: the first 8 bytes of sha256(salt, key).

    Not Python's `hash()`, which is salted per process: the same key must land in the same bucket in
    every worker, after restarts and on replay.

    >>> bucket("p-1001", "split/tiny") == bucket("p-1001", "split/tiny")
    True
    """
    digest = hashlib.sha256(f"{salt}\x1f{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def choose_arm(key: str, name: str, split: Sequence[tuple[str, float]]) -> str:
    """The version of `split` (`(version, weight)` pairs, weights summing to 1, in a fixed order) that
    serves `key`: the arm whose cumulative-weight interval holds the key's bucket."""
    b = bucket(key, f"split/{name}")
    acc = 0.0
    for version, weight in split:
        acc += weight
        if b < acc:
            return version
    return split[-1][0]  # rounding at the top edge


def in_shadow_sample(key: str, name: str, sample_rate: float) -> bool:
    """Whether `key` is in the shadow sample of model `name` (independent of its split arm)."""
    return bucket(key, f"shadow/{name}") < sample_rate


def version_order(version: str) -> tuple:
    """Repository order: numeric versions by number, then the others by name."""
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


# ------------------------------------------------------------------------------------ state file
@dataclass(frozen=True)
class Shadow:
    version: str
    sample_rate: float


@dataclass
class ModelState:
    """One model's entry in serving.yaml."""

    pin: str | None = None  # serve this version; None: the repository's newest non-candidate version
    split: dict[str, float] = field(default_factory=dict)  # A/B weights by version (normalised when used)
    shadow: Shadow | None = None
    history: list[str] = field(default_factory=list)  # earlier serving versions, newest last (rollback)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.pin is not None:
            out["pin"] = self.pin
        if self.split:
            out["split"] = dict(self.split)
        if self.shadow is not None:
            out["shadow"] = {"version": self.shadow.version, "sample_rate": self.shadow.sample_rate}
        if self.history:
            out["history"] = list(self.history)
        return out

    @classmethod
    def from_dict(cls, name: str, raw: Any, source: str) -> ModelState:
        where = f"{source}: model {name!r}"
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ServingStateError(f"{where}: expected a mapping")
        unknown = set(raw) - {"pin", "split", "shadow", "history"}
        if unknown:
            raise ServingStateError(f"{where}: unknown keys {sorted(unknown)} (pin, split, shadow, history)")
        pin = None if raw.get("pin") is None else str(raw["pin"])
        split = parse_split(raw.get("split") or {}, where)
        shadow = parse_shadow(raw.get("shadow"), where)
        history = [str(v) for v in raw.get("history") or []]
        return cls(pin, split, shadow, history)


def parse_split(raw: Any, where: str = "split") -> dict[str, float]:
    """`{version: weight}` -> validated `{str version: float weight}`; `{}` means no split."""
    if not isinstance(raw, dict):
        raise ServingStateError(f"{where}: split must be a mapping of version to weight")
    try:
        split = {str(v): float(w) for v, w in raw.items()}
    except (TypeError, ValueError) as exc:
        raise ServingStateError(f"{where}: split weights must be numbers ({exc})") from exc
    if any(not np.isfinite(w) or w < 0 for w in split.values()):
        raise ServingStateError(f"{where}: split weights must be finite and >= 0")
    if split and sum(split.values()) <= 0:
        raise ServingStateError(f"{where}: split weights must not all be 0")
    return {v: w for v, w in split.items() if w > 0}


def parse_shadow(raw: Any, where: str = "shadow") -> Shadow | None:
    """`{version, sample_rate}` -> Shadow; None (or a null version) means no shadow."""
    if raw is None or (isinstance(raw, dict) and raw.get("version") is None):
        return None
    if not isinstance(raw, dict) or set(raw) - {"version", "sample_rate"}:
        raise ServingStateError(f"{where}: shadow must be {{version, sample_rate}}")
    try:
        rate = float(raw.get("sample_rate", 1.0))
    except (TypeError, ValueError) as exc:
        raise ServingStateError(f"{where}: shadow sample_rate must be a number") from exc
    if not 0.0 <= rate <= 1.0:
        raise ServingStateError(f"{where}: shadow sample_rate must be within [0, 1]")
    return Shadow(str(raw["version"]), rate)


@dataclass
class ServingState:
    """The contents of `<repository>/serving.yaml`:

        poll_interval_s: 5            # seconds between rescans of the repository and this file (0: off)
        models:
          toxicity:
            pin: "1"                  # serve version 1 (default: newest non-candidate version)
            split: {"1": 90, "2": 10} # A/B by record key; weights are normalised
            shadow: {version: "3", sample_rate: 0.1}
            history: ["2"]            # earlier serving versions, newest last (rollback pops it)

    Every key is optional; an absent file means defaults for every model.
    """

    models: dict[str, ModelState] = field(default_factory=dict)
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S

    def model(self, name: str) -> ModelState:
        return self.models.get(name) or ModelState()

    def with_model(self, name: str, state: ModelState) -> ServingState:
        models = {**self.models, name: state}
        return ServingState({k: v for k, v in models.items() if v.to_dict()}, self.poll_interval_s)

    def to_dict(self) -> dict[str, Any]:
        return {"poll_interval_s": self.poll_interval_s,
                "models": {name: s.to_dict() for name, s in sorted(self.models.items()) if s.to_dict()}}

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<inline>") -> ServingState:
        if raw is None:
            return cls()
        if not isinstance(raw, dict) or set(raw) - {"models", "poll_interval_s"}:
            raise ServingStateError(f"{source}: expected a mapping with 'models' and 'poll_interval_s'")
        models = raw.get("models") or {}
        if not isinstance(models, dict):
            raise ServingStateError(f"{source}: 'models' must be a mapping of model name to settings")
        try:
            interval = float(raw.get("poll_interval_s", DEFAULT_POLL_INTERVAL_S))
        except (TypeError, ValueError) as exc:
            raise ServingStateError(f"{source}: poll_interval_s must be a number") from exc
        return cls({str(n): ModelState.from_dict(str(n), m, source) for n, m in models.items()}, interval)

    @classmethod
    def load(cls, path: Path) -> ServingState:
        if not path.is_file():
            return cls()
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ServingStateError(f"{path}: {exc}") from exc
        return cls.from_dict(raw, str(path))

    def save(self, path: Path) -> None:
        """Atomic: a worker polling the file sees the old or the new state, never half of one."""
        text = "# written by inferstream's admin API; format: operators/registry.py ServingState\n"
        text += yaml.safe_dump(self.to_dict(), sort_keys=False)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# ----------------------------------------------------------------------------------------- routes
@dataclass(frozen=True)
class Route:
    """What one model name serves right now."""

    name: str
    serving: str
    split: tuple[tuple[str, float], ...] = ()  # normalised weights, in repository order
    shadow: Shadow | None = None

    def versions(self) -> set[str]:
        found = {self.serving, *(v for v, _ in self.split)}
        if self.shadow is not None:
            found.add(self.shadow.version)
        return found

    def arm(self, key: str | None) -> tuple[str, str]:
        """(version, arm) for a record key: arm `split` when the A/B split chose it, else `serving`."""
        if self.split and key is not None:
            return choose_arm(key, self.name, self.split), "split"
        return self.serving, "serving"

    def shadow_version(self, key: str | None, primary: str) -> str | None:
        """The shadow version for this key, if the key is sampled and the shadow is not its own version."""
        s = self.shadow
        if s is None or key is None or s.version == primary or not in_shadow_sample(key, self.name, s.sample_rate):
            return None
        return s.version

    def describe(self) -> dict[str, Any]:
        return {"serving_version": self.serving,
                "split": {v: round(w, 6) for v, w in self.split} or None,
                "shadow": {"version": self.shadow.version, "sample_rate": self.shadow.sample_rate} if self.shadow else None}


def normalised_split(split: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    total = sum(split.values())
    return tuple((v, split[v] / total) for v in sorted(split, key=version_order)) if total > 0 else ()


# ----------------------------------------------------------------------------------------- stages
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


@dataclass(eq=False)
class Stage:
    """One loaded model version with its operator and micro-batcher (no operator for tasks that only
    take raw tensors, e.g. embeddings). `leases` counts the records and requests using it right now."""

    ref: str  # resolved `name@version`
    model: LoadedModel
    operator: Any
    batcher: MicroBatcher | None
    leases: int = 0
    retiring: bool = False
    closed: bool = False

    @property
    def info(self) -> dict[str, str]:
        cfg = self.model.config
        return {"name": cfg.name, "version": cfg.version, "provider": self.model.session.provider}

    @property
    def input_kind(self) -> str | None:
        task = self.model.config.task
        return "image" if task in IMAGE_TASKS else "text" if task in TEXT_TASKS else None


class Lease:
    """Holds stages open: a retired stage is closed only after its last lease is released."""

    def __init__(self, registry: ModelRegistry, stages: Iterable[Stage]) -> None:
        self._registry = registry
        self._stages = list({id(s): s for s in stages}.values())
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
                self._registry._schedule_close(stage)

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


# --------------------------------------------------------------------------------------- registry
class ModelRegistry:
    """Loaded model versions and the route of each model name. Start-up calls (`route_sync`, `fixed`)
    are synchronous; everything after start-up runs on the event loop and is serialised by a lock."""

    def __init__(self, repo: ModelRepository, providers: tuple[str, ...] | None = None,
                 intra_op_threads: int | None = None, state_path: str | Path | None = None,
                 hooks: RegistryHooks | None = None, warm_up: bool = True) -> None:
        self.repo = repo
        self.providers = providers
        self.intra_op_threads = intra_op_threads
        self.state_path = Path(state_path) if state_path else repo.root / STATE_FILE
        self.hooks = hooks or RegistryHooks()
        self.warm_up = warm_up
        self.state = ServingState.load(self.state_path)  # a broken file fails start-up, loudly
        self._state_signature = _file_signature(self.state_path)
        self._stages: dict[str, Stage] = {}  # ref -> the live stage (routed or fixed)
        self._routes: dict[str, Route] = {}
        self._fixed: set[str] = set()  # refs a policy names explicitly: never retired
        self._draining: list[Stage] = []
        self._failed: dict[str, tuple] = {}  # ref -> signature of its directory when it failed
        self.errors: dict[str, str] = {}  # ref -> last load error, for /models
        self._lock: asyncio.Lock | None = None
        self._closing: set[asyncio.Task] = set()
        self._skip_logged: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------------------------- queries
    @property
    def stages(self) -> dict[str, Stage]:
        return dict(self._stages)

    @property
    def routes(self) -> dict[str, Route]:
        return dict(self._routes)

    @property
    def draining(self) -> list[Stage]:
        return [s for s in self._draining if not s.closed]

    def route(self, name: str) -> Route:
        return self._routes[name]

    def stage(self, ref: str) -> Stage:
        return self._stages[ref]

    def assign(self, name: str, key: str | None) -> tuple[Stage, str, Stage | None]:
        """(primary stage, arm, shadow stage or None) of a routed model for a record key. Synchronous:
        read together with taking the lease, no other coroutine can switch the route in between."""
        route = self._routes[name]
        version, arm = route.arm(key)
        shadow = route.shadow_version(key, version)
        return self._stages[f"{name}@{version}"], arm, self._stages[f"{name}@{shadow}"] if shadow else None

    def lease(self, stages: Iterable[Stage]) -> Lease:
        return Lease(self, stages)

    # ---------------------------------------------------------------------------------- start-up
    def fixed(self, ref: str) -> Stage:
        """A version named explicitly (`name@version` in a policy): loaded once, never switched."""
        ref = self.repo.config(ref).ref
        if ref not in self._stages:
            self._install(self._load_stage(ref))
        self._fixed.add(ref)
        return self._stages[ref]

    def route_sync(self, name: str) -> Route:
        """Route `name` (synchronously, for start-up): load its serving version, split arms and shadow."""
        if name not in self._routes:
            route, loaded = self._initial_route(name)
            for stage in loaded:
                self._install(stage)
            self._routes[name] = route
        return self._routes[name]

    def _initial_route(self, name: str) -> tuple[Route, list[Stage]]:
        """The desired route; if its serving version fails to load, the newest older version that loads
        (a bad model never keeps the worker from starting); split arms or a shadow that fail are dropped."""
        versions = self.repo.versions(name)
        if not versions:
            raise ModelConfigError(f"unknown model {name!r} in {self.repo.root} (known: {', '.join(self.repo.names()) or 'none'})")
        loaded: dict[str, Stage] = {}

        def get(version: str) -> Stage:
            ref = f"{name}@{version}"
            if ref in self._stages:
                return self._stages[ref]
            if ref not in loaded:
                loaded[ref] = self._load_stage(ref)
            return loaded[ref]

        try:
            desired = self._desired(name, self.state.model(name))
        except (ModelConfigError, ServingStateError) as exc:
            log.error("%s: serving state cannot be applied (%s); serving the repository default", name, exc)
            desired = Route(name, self.repo.serving_version(name))
        failures = []
        fallbacks = [v for v in reversed(versions) if not self.repo.is_candidate(name, v)]
        for version in dict.fromkeys([desired.serving, *fallbacks]):
            try:
                get(version)
            except LoadFailed as exc:
                failures.append(str(exc))
                continue
            if version != desired.serving:
                log.error("%s: serving version %s failed to load; serving %s instead", name, desired.serving, version)
            route = replace(desired, serving=version)
            break
        else:
            raise ModelConfigError(f"model {name!r}: no version could be loaded: {'; '.join(failures)}")
        try:
            for version, _ in route.split:
                get(version)
        except LoadFailed as exc:
            log.error("%s: A/B split dropped: %s", name, exc)
            route = replace(route, split=())
        if route.shadow is not None:
            try:
                get(route.shadow.version)
            except LoadFailed as exc:
                log.error("%s: shadow dropped: %s", name, exc)
                route = replace(route, shadow=None)
        needed = {f"{name}@{v}" for v in route.versions()}
        unused = [s for ref, s in loaded.items() if ref not in needed]
        for stage in unused:
            self._close_now(stage)
        return route, [s for ref, s in loaded.items() if ref in needed]

    def _desired(self, name: str, state: ModelState) -> Route:
        """The route that the repository and a model's serving state ask for (validated, not loaded)."""
        versions = self.repo.versions(name)
        if not versions:
            raise ModelConfigError(f"unknown model {name!r} in {self.repo.root}")

        def check(version: str, what: str) -> str:
            if version not in versions:
                raise ModelConfigError(f"model {name!r} has no version {version!r} ({what}; have {', '.join(versions)})")
            return version

        serving = check(state.pin, "pinned") if state.pin else self.repo.serving_version(name)
        split = {check(v, "in the split"): w for v, w in state.split.items()}
        shadow = state.shadow
        if shadow is not None:
            check(shadow.version, "shadow")
        return Route(name, serving, normalised_split(split), shadow)

    # ------------------------------------------------------------------------------------- loading
    def _load_stage(self, ref: str) -> Stage:
        """Load a version fully: session, operator, batcher, and one warm-up inference through the
        operator (a model that cannot run never serves). Reports failures and raises LoadFailed."""
        name, _, version = ref.partition("@")
        try:
            model = self.repo.load(ref, providers=self.providers, intra_op_threads=self.intra_op_threads)
            operator = operator_for(model) if model.config.task in MODERATION_TASKS else None
            if operator is not None and self.warm_up:
                kind = "image" if model.config.task in IMAGE_TASKS else "text"
                (_,) = operator.run_batch([operator.preprocess(_WARM_UP_INPUTS[kind])])
        except Exception as exc:  # any failure of a new model is reported; the worker keeps serving
            detail = f"{type(exc).__name__}: {exc}"
            self.errors[ref] = detail
            self._failed[ref] = _dir_signature(self.repo.root / name / version)
            self.hooks.on_failed(name, version, detail)
            log.error("model %s failed to load: %s", ref, detail)
            raise LoadFailed(ref, detail) from exc
        cfg = model.config
        controller = BatchController(cfg.max_batch_size, cfg.max_wait_ms / 1000, target_s=cfg.target_p99_ms / 1000,
                                     adaptive=cfg.adaptive_batching)
        batcher = MicroBatcher(operator.run_batch, name=cfg.ref, controller=controller) if operator else None
        stage = Stage(cfg.ref, model, operator, batcher)
        self.errors.pop(ref, None)
        self._failed.pop(ref, None)
        self.hooks.on_loaded(stage)
        log.info("model %s (%s) loaded on %s", cfg.ref, cfg.task, model.session.providers)
        return stage

    async def _load_async(self, ref: str) -> Stage:
        return await asyncio.get_running_loop().run_in_executor(None, self._load_stage, ref)

    def _install(self, stage: Stage) -> None:
        self._stages[stage.ref] = stage

    # ------------------------------------------------------------------------------------- switching
    def _lock_(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def ensure(self, name: str) -> Route:
        """Route `name` if it is not yet (a model no policy uses, asked for by predict)."""
        if name in self._routes:
            return self._routes[name]
        async with self._lock_():
            if name not in self._routes:
                route, loaded = await asyncio.get_running_loop().run_in_executor(None, self._initial_route, name)
                for stage in loaded:
                    self._install(stage)
                self._routes[name] = route
        return self._routes[name]

    async def _switch(self, name: str, desired: Route, reload: bool = False,
                      commit: Callable[[], None] | None = None) -> Route:
        """Load what `desired` needs that is not loaded (every version when `reload`), then `commit()`
        (e.g. write the state file), then switch in one step, then retire what is no longer routed.
        Raises LoadFailed (nothing changed) when a version does not load. Call with the lock held."""
        needed = {f"{name}@{v}" for v in desired.versions()}
        fresh: dict[str, Stage] = {}
        revived: list[Stage] = []
        try:
            for ref in sorted(needed):
                if not reload and ref in self._stages:
                    continue
                old = None if reload else next((s for s in self._draining if s.ref == ref and not s.closed), None)
                if old is not None:
                    revived.append(old)  # still draining: take it back instead of loading it again
                    continue
                fresh[ref] = await self._load_async(ref)
            if commit is not None:
                commit()
        except BaseException:
            for stage in fresh.values():
                self._close_now(stage)
            raise
        # the switch: no await from here on, so no record sees half of it
        previous = self._routes.get(name)
        replaced = [self._stages[ref] for ref in fresh if ref in self._stages]
        for stage in revived:
            stage.retiring = False
            self._draining.remove(stage)
            self._stages[stage.ref] = stage
        self._stages.update(fresh)
        self._routes[name] = desired
        if previous != desired or reload:
            log.info("model %s now serves %s (was %s)", name, desired.describe(), previous.describe() if previous else None)
        still_routed = {f"{n}@{v}" for n, r in self._routes.items() for v in r.versions()} | self._fixed
        for ref in [r for r in self._stages if r.startswith(f"{name}@") and r not in still_routed]:
            self._retire(self._stages.pop(ref))
        for stage in replaced:
            self._retire(stage)
        return desired

    def _retire(self, stage: Stage) -> None:
        """No new record gets this stage; it closes when its last lease is released."""
        stage.retiring = True
        self._draining.append(stage)
        log.info("model %s draining (%d in flight)", stage.ref, stage.leases)
        if stage.leases == 0:
            self._schedule_close(stage)

    def _schedule_close(self, stage: Stage) -> None:
        task = asyncio.get_running_loop().create_task(self._close(stage))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, stage: Stage) -> None:
        if stage.closed or stage.leases or not stage.retiring:
            return
        stage.closed = True
        if stage.batcher is not None:
            await stage.batcher.close()
        if stage in self._draining:
            self._draining.remove(stage)
        if stage.ref not in self._stages:  # a reload of the same version keeps its metrics
            self.hooks.on_retired(stage)
        log.info("model %s drained and closed", stage.ref)

    def _close_now(self, stage: Stage) -> None:
        """Close a stage no record ever saw (loaded, then not switched to)."""
        stage.closed = True
        if stage.batcher is not None:
            stage.batcher.discard()
        if stage.ref not in self._stages:
            self.hooks.on_retired(stage)

    # --------------------------------------------------------------------------------------- polling
    async def refresh(self) -> dict[str, Any]:
        """One poll: re-read the state file if it changed, and bring every routed model to its desired
        route (a new version directory, a changed pin/split/shadow). A version that failed to load is
        retried only when its directory changes."""
        async with self._lock_():
            self._reread_state()
            switched, failed = [], {}
            for name in list(self._routes):
                try:
                    desired = self._desired(name, self.state.model(name))
                except (ModelConfigError, OSError) as exc:
                    if (name, str(exc)) not in self._skip_logged:
                        self._skip_logged.add((name, str(exc)))
                        log.error("%s: desired route cannot be served (%s); keeping %s", name, exc, self._routes[name].describe())
                    continue
                self._skip_logged = {x for x in self._skip_logged if x[0] != name}
                if desired == self._routes[name]:
                    continue
                refs = [f"{name}@{v}" for v in desired.versions()]
                if any(r in self._failed and self._failed[r] == _dir_signature(self._dir(r)) for r in refs):
                    continue  # known bad and unchanged: keep serving what we have, quietly
                try:
                    await self._switch(name, desired)
                    switched.append(name)
                except LoadFailed as exc:
                    failed[name] = str(exc)
            return {"switched": switched, "failed": failed}

    def _reread_state(self) -> None:
        signature = _file_signature(self.state_path)
        if signature == self._state_signature:
            return
        try:
            self.state = ServingState.load(self.state_path)
        except ServingStateError as exc:
            log.error("serving state unchanged: %s", exc)
        self._state_signature = signature

    async def watch(self) -> None:
        """Poll forever (every `poll_interval_s` of the state file; 0 disables polling)."""
        while True:
            interval = self.state.poll_interval_s
            await asyncio.sleep(interval if interval > 0 else DEFAULT_POLL_INTERVAL_S)
            if interval <= 0:
                self._reread_state()
                continue
            try:
                await self.refresh()
            except Exception:  # the poll must outlive any surprise; the next one retries
                log.exception("model repository poll failed")

    def _dir(self, ref: str) -> Path:
        name, _, version = ref.partition("@")
        return self.repo.root / name / version

    # ----------------------------------------------------------------------------------------- admin
    async def _change(self, name: str, update: Callable[[ModelState, Route], ModelState], reload: bool = False) -> Route:
        """Apply an admin change to a model's serving state: validate, load, write the file, switch."""
        await self.ensure(name)
        async with self._lock_():
            self._reread_state()
            current = self._routes[name]
            new_state = update(self.state.model(name), current)
            desired = self._desired(name, new_state)
            state = self.state.with_model(name, new_state)

            def commit() -> None:
                state.save(self.state_path)
                self.state = state
                self._state_signature = _file_signature(self.state_path)

            return await self._switch(name, desired, reload=reload, commit=commit)

    @staticmethod
    def _served(state: ModelState, current: Route, version: str | None) -> list[str]:
        """History after the serving version changes from `current.serving` to `version`."""
        history = list(state.history)
        if version != current.serving and (not history or history[-1] != current.serving):
            history.append(current.serving)
        return history[-HISTORY_LIMIT:]

    async def pin(self, name: str, version: str | None) -> Route:
        """Serve `version` (loaded fully before the switch); None unpins (newest non-candidate)."""
        def update(state: ModelState, current: Route) -> ModelState:
            target = version or self.repo.serving_version(name)
            return replace(state, pin=version, history=self._served(state, current, target))
        return await self._change(name, update)

    async def promote(self, name: str, version: str) -> Route:
        """Make `version` the serving version: drop its candidate flag, clear the split (and the shadow
        if it shadows this version). It follows new versions again when it is the newest, else is pinned."""
        if version not in self.repo.versions(name):
            raise ModelConfigError(f"model {name!r} has no version {version!r}")
        was_candidate = self.repo.is_candidate(name, version)
        if was_candidate:
            self.repo.promote(name, version)
        try:
            def update(state: ModelState, current: Route) -> ModelState:
                newest = self.repo.serving_version(name)
                shadow = None if state.shadow and state.shadow.version == version else state.shadow
                return ModelState(pin=None if version == newest else version, split={}, shadow=shadow,
                                  history=self._served(state, current, version))
            return await self._change(name, update)
        except BaseException:
            if was_candidate:  # the version did not load: leave it a candidate
                path = self.repo.root / name / version / "config.yaml"
                path.write_text(path.read_text().rstrip("\n") + "\ncandidate: true\n")
            raise

    async def rollback(self, name: str) -> Route:
        """Serve (pinned) the previous serving version: the last of `history`, else the newest
        non-candidate version older than the current one."""
        def update(state: ModelState, current: Route) -> ModelState:
            history = list(state.history)
            while history and history[-1] == current.serving:
                history.pop()
            if history:
                target = history.pop()
            else:
                older = [v for v in self.repo.versions(name) if version_order(v) < version_order(current.serving)
                         and not self.repo.is_candidate(name, v)]
                if not older:
                    raise Conflict(f"model {name!r}: no version to roll back to from {current.serving}")
                target = older[-1]
            return replace(state, pin=target, history=history)
        return await self._change(name, update)

    async def set_split(self, name: str, weights: Mapping[str, Any] | None) -> Route:
        """A/B split `{version: weight}` (every arm loaded before the switch); empty or None clears it."""
        split = parse_split(dict(weights or {}), f"model {name!r}")
        return await self._change(name, lambda state, current: replace(state, split=split))

    async def set_shadow(self, name: str, version: str | None, sample_rate: float = 1.0) -> Route:
        """Shadow `version` on a `sample_rate` share of keys; None clears it."""
        shadow = parse_shadow(None if version is None else {"version": version, "sample_rate": sample_rate},
                              f"model {name!r}")
        return await self._change(name, lambda state, current: replace(state, shadow=shadow))

    async def reload(self, name: str) -> Route:
        """Load every routed version of `name` afresh from disk (a model file replaced in place), then switch."""
        return await self._change(name, lambda state, current: state, reload=True)

    # ------------------------------------------------------------------------------ direct tensors
    async def acquire(self, name: str, version: str | None = None, key: str | None = None) -> Lease:
        """A lease on the stage that serves `name` (`version`, or the arm for `key`, or the serving
        version). Raises ModelConfigError for an unknown model or version, NotLoaded for a version
        that exists but is not loaded here."""
        await self.ensure(name)
        if version is None:
            stage, _, _ = self.assign(name, key)
        else:
            if version not in self.repo.versions(name):
                raise ModelConfigError(f"model {name!r} has no version {version!r}")
            stage = self._stages.get(f"{name}@{version}")
            if stage is None:
                raise NotLoaded(f"{name}@{version} is not loaded here: serve it (admin load, split or shadow) first")
        return Lease(self, [stage])

    def describe(self) -> dict[str, Any]:
        """Every model of the repository: versions (candidate, loaded, state), routes, providers."""
        models = []
        for name in self.repo.names():
            route = self._routes.get(name)
            desired_state = self.state.model(name)
            versions = []
            for version in self.repo.versions(name):
                ref = f"{name}@{version}"
                stage = self._stages.get(ref)
                row: dict[str, Any] = {"version": version, "candidate": _safe(self.repo.is_candidate, name, version),
                                       "loaded": stage is not None, "roles": _roles(route, version, ref in self._fixed)}
                try:
                    cfg = self.repo.config(ref)
                    row.update(task=cfg.task, providers=list(cfg.providers))
                except ModelConfigError as exc:
                    row["error"] = str(exc)
                if stage is not None:
                    row["provider"] = stage.model.session.provider
                    row["in_flight"] = stage.leases
                if ref in self.errors:
                    row["load_error"] = self.errors[ref]
                if any(s.ref == ref for s in self.draining):
                    row["draining"] = True
                versions.append(row)
            entry: dict[str, Any] = {"name": name, "routed": route is not None, "versions": versions,
                                     "pin": desired_state.pin, "history": desired_state.history}
            if route is not None:
                entry.update(route.describe())
            else:
                entry.update(serving_version=_safe(self.repo.serving_version, name), split=None, shadow=None)
            models.append(entry)
        return {"models": models, "state_file": str(self.state_path), "poll_interval_s": self.state.poll_interval_s}

    async def close(self) -> None:
        for stage in [*self._stages.values(), *self._draining]:
            if not stage.closed and stage.batcher is not None:
                stage.closed = True
                await stage.batcher.close()


def _roles(route: Route | None, version: str, fixed: bool) -> list[str]:
    roles = ["policy"] if fixed else []
    if route is not None:
        if route.serving == version:
            roles.append("serving")
        if any(v == version for v, _ in route.split):
            roles.append("split")
        if route.shadow is not None and route.shadow.version == version:
            roles.append("shadow")
    return roles


def _safe(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except (ModelConfigError, OSError, yaml.YAMLError):
        return None


def _file_signature(path: Path) -> tuple:
    try:
        st = path.stat()
    except OSError:
        return ()
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _dir_signature(directory: Path) -> tuple:
    """Changes when any file of a version directory changes (a model being copied in, a fixed config)."""
    try:
        return tuple(sorted((str(p.relative_to(directory)), p.stat().st_mtime_ns, p.stat().st_size)
                            for p in directory.rglob("*") if p.is_file()))
    except OSError:
        return (time.time(),)  # vanished while listing: differs from any recorded signature


# ---------------------------------------------------------------------------------- raw tensors
class TensorError(ValueError):
    """Tensors a model cannot take (names, dtypes, shapes), and why."""


def check_feeds(session: Any, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Validate request tensors against a session's declared inputs (and asked-for outputs); returns
    the feeds ready to run (strings as object arrays)."""
    declared = {s.name: s for s in session.inputs}
    missing, unknown = sorted(declared.keys() - feeds.keys()), sorted(feeds.keys() - declared.keys())
    if missing or unknown:
        raise TensorError(f"inputs must be exactly {sorted(declared)} (missing {missing}, unknown {unknown})")
    outputs = {o.name for o in session.outputs}
    if output_names and set(output_names) - outputs:
        raise TensorError(f"unknown outputs {sorted(set(output_names) - outputs)} (model outputs: {sorted(outputs)})")
    ready = {}
    for name, array in feeds.items():
        spec = declared[name]
        if spec.dtype == np.dtype(object):
            if array.dtype.kind not in "OUS":
                raise TensorError(f"input {name!r}: the model takes strings, got {array.dtype}")
            array = array.astype(object)
        elif array.dtype != spec.dtype:
            raise TensorError(f"input {name!r}: dtype {array.dtype}, but the model takes {spec.dtype}")
        if spec.shape and (len(array.shape) != len(spec.shape) or any(
                isinstance(d, int) and d != n for d, n in zip(spec.shape, array.shape, strict=True))):
            raise TensorError(f"input {name!r}: shape {list(array.shape)}, but the model takes {list(spec.shape)}")
        ready[name] = array
    return ready


def run_requests(session: Any, requests: Sequence[Mapping[str, np.ndarray]],
                 output_names: Sequence[str] | None = None) -> list[dict[str, np.ndarray]]:
    """Run several requests (validated feeds) for one model; as one session call when they can be
    stacked (every input batch-dynamic, same trailing shapes), split back by each request's batch size.

    `requests[i][name]`: `(n_i, ...)`; result `i` holds outputs of leading dimension `n_i`.
    """
    requests = list(requests)
    names = sorted(requests[0]) if requests else []
    specs = {s.name: s for s in session.inputs}
    sizes = [r[names[0]].shape[0] if names and r[names[0]].ndim else -1 for r in requests]
    stackable = (
        len(requests) > 1 and names and all(specs[n].dynamic_batch for n in names)
        and all(sorted(r) == names for r in requests) and min(sizes) > 0
        and all(r[n].ndim >= 1 and r[n].shape[0] == size for r, size in zip(requests, sizes, strict=True) for n in names)
        and all(len({r[n].shape[1:] for r in requests}) == 1 for n in names)
    )
    if stackable:
        joined = session.run({n: np.concatenate([r[n] for r in requests]) for n in names}, output_names)
        total = sum(sizes)
        if all(o.ndim >= 1 and o.shape[0] == total for o in joined.values()):
            cuts = np.cumsum(sizes)[:-1]
            parts = {n: np.split(o, cuts) for n, o in joined.items()}
            return [{n: parts[n][i] for n in joined} for i in range(len(requests))]
    return [session.run(r, output_names) for r in requests]
