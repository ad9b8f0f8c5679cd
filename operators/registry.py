"""Model registry: which version of each model serves which record, and version changes without a gap.

Per model name the registry holds a `Route` (operators/routing.py): the serving version
(`ModelRepository.serving_version`, newest non-candidate, or a pinned one), an optional A/B split by
record key and an optional shadow. Pins, splits and shadows live in the serving state file
(operators/serving_state.py); the admin methods here write it and every worker's poll follows it.

Version changes follow the order Triton learnt the hard way (shared/notes/kafka-stack.md): load the new
version fully (operators/stages.py: session, operator, a warm-up inference), then switch new records to
it, then let the old version's batcher drain and close. A record takes a lease on the stages it was
assigned before it is preprocessed and returns it after inference, so it is processed by exactly one
version, and a stage is closed only when its last lease has come back. A version that fails to load is
reported (`on_failed` hook, log) and the current one keeps serving: a bad model never takes the worker down.

No Kafka and no Faust here: the worker wires the hooks to its metrics and runs `watch()` as a task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from operators.model_repository import ModelConfigError, ModelRef, ModelRepository, version_key
from operators.routing import Route
from operators.serving_state import (
    DEFAULT_POLL_INTERVAL_S,
    STATE_FILE,
    ModelState,
    ServingState,
    ServingStateError,
    desired_route,
    file_signature,
    parse_shadow,
    parse_split,
)
from operators.stages import Lease, LoadFailed, RegistryHooks, Stage, open_stage

log = logging.getLogger(__name__)


class NotLoaded(LookupError):
    """A version exists in the repository but is not loaded in this process."""


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
        self._state_signature = file_signature(self.state_path)
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
        return self._stages[ModelRef.of(name, version)], arm, self._stages[ModelRef.of(name, shadow)] if shadow else None

    def lease(self, stages: Iterable[Stage]) -> Lease:
        return Lease(stages, self._schedule_close)

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
            self._add_route(name, *self._initial_route(name))
        return self._routes[name]

    def _add_route(self, name: str, route: Route, loaded: list[Stage]) -> None:
        for stage in loaded:
            self._install(stage)
        self._routes[name] = route

    def _initial_route(self, name: str) -> tuple[Route, list[Stage]]:
        """The desired route; if its serving version fails to load, the newest older version that loads
        (a bad model never keeps the worker from starting); split arms or a shadow that fail are dropped."""
        versions = self.repo.versions(name)
        if not versions:
            raise ModelConfigError(f"unknown model {name!r} in {self.repo.root} (known: {', '.join(self.repo.names()) or 'none'})")
        loaded: dict[str, Stage] = {}

        def get(version: str) -> Stage:
            ref = ModelRef.of(name, version)
            if ref in self._stages:
                return self._stages[ref]
            if ref not in loaded:
                loaded[ref] = self._load_stage(ref)
            return loaded[ref]

        try:
            desired = desired_route(self.repo, name, self.state.model(name))
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
        needed = {ModelRef.of(name, v) for v in route.versions()}
        for stage in [s for ref, s in loaded.items() if ref not in needed]:
            self._close_now(stage)
        return route, [s for ref, s in loaded.items() if ref in needed]

    # ------------------------------------------------------------------------------------- loading
    def _load_stage(self, ref: str) -> Stage:
        """Load a version fully (operators/stages.py `open_stage`: a model that cannot run never serves).
        Reports failures and raises LoadFailed."""
        ref = ModelRef(ref)
        try:
            model = self.repo.load(ref, providers=self.providers, intra_op_threads=self.intra_op_threads)
            stage = open_stage(model, self.warm_up)
        except Exception as exc:  # any failure of a new model is reported; the worker keeps serving
            detail = f"{type(exc).__name__}: {exc}"
            self.errors[ref] = detail
            self._failed[ref] = self.repo.signature(ref)
            self.hooks.on_failed(ref.name, ref.version, detail)
            log.error("model %s failed to load: %s", ref, detail)
            raise LoadFailed(ref, detail) from exc
        cfg = model.config
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
                self._add_route(name, *await asyncio.get_running_loop().run_in_executor(None, self._initial_route, name))
        return self._routes[name]

    async def _switch(self, name: str, desired: Route, reload: bool = False,
                      commit: Callable[[], None] | None = None) -> Route:
        """Load what `desired` needs that is not loaded (every version when `reload`), then `commit()`
        (e.g. write the state file), then switch in one step, then retire what is no longer routed.
        Raises LoadFailed (nothing changed) when a version does not load. Call with the lock held."""
        needed = {ModelRef.of(name, v) for v in desired.versions()}
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
        still_routed = {ModelRef.of(n, v) for n, r in self._routes.items() for v in r.versions()} | self._fixed
        for ref in [r for r in self._stages if ModelRef(r).name == name and r not in still_routed]:
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
        await stage.close()
        if stage in self._draining:
            self._draining.remove(stage)
        if stage.ref not in self._stages:  # a reload of the same version keeps its metrics
            self.hooks.on_retired(stage)
        log.info("model %s drained and closed", stage.ref)

    def _close_now(self, stage: Stage) -> None:
        """Close a stage no record ever saw (loaded, then not switched to)."""
        stage.discard()
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
                    desired = desired_route(self.repo, name, self.state.model(name))
                except (ModelConfigError, OSError) as exc:
                    if (name, str(exc)) not in self._skip_logged:
                        self._skip_logged.add((name, str(exc)))
                        log.error("%s: desired route cannot be served (%s); keeping %s", name, exc, self._routes[name].describe())
                    continue
                self._skip_logged = {x for x in self._skip_logged if x[0] != name}
                if desired == self._routes[name]:
                    continue
                refs = [ModelRef.of(name, v) for v in desired.versions()]
                if any(r in self._failed and self._failed[r] == self.repo.signature(r) for r in refs):
                    continue  # known bad and unchanged: keep serving what we have, quietly
                try:
                    await self._switch(name, desired)
                    switched.append(name)
                except LoadFailed as exc:
                    failed[name] = str(exc)
            return {"switched": switched, "failed": failed}

    def _reread_state(self) -> None:
        signature = file_signature(self.state_path)
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

    # ----------------------------------------------------------------------------------------- admin
    async def _change(self, name: str, update: Callable[[ModelState, Route], ModelState], reload: bool = False) -> Route:
        """Apply an admin change to a model's serving state: validate, load, write the file, switch."""
        await self.ensure(name)
        async with self._lock_():
            self._reread_state()
            current = self._routes[name]
            new_state = update(self.state.model(name), current)
            desired = desired_route(self.repo, name, new_state)
            state = self.state.with_model(name, new_state)

            def commit() -> None:
                state.save(self.state_path)
                self.state = state
                self._state_signature = file_signature(self.state_path)

            return await self._switch(name, desired, reload=reload, commit=commit)

    async def pin(self, name: str, version: str | None) -> Route:
        """Serve `version` (loaded fully before the switch); None unpins (newest non-candidate)."""
        def update(state: ModelState, current: Route) -> ModelState:
            target = version or self.repo.serving_version(name)
            return replace(state, pin=version, history=state.history_after(current.serving, target))
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
                                  history=state.history_after(current.serving, version))
            return await self._change(name, update)
        except BaseException:
            if was_candidate:  # the version did not load: leave it a candidate
                self.repo.set_candidate(name, version, True)
            raise

    async def rollback(self, name: str) -> Route:
        """Serve (pinned) the previous serving version: the last of `history`, else the newest
        non-candidate version older than the current one."""
        def update(state: ModelState, current: Route) -> ModelState:
            older = [v for v in self.repo.versions(name) if version_key(v) < version_key(current.serving)
                     and not self.repo.is_candidate(name, v)]
            return state.rolled_back(name, current.serving, older)
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
            stage = self._stages.get(ModelRef.of(name, version))
            if stage is None:
                raise NotLoaded(f"{ModelRef.of(name, version)} is not loaded here: serve it (admin load, split or shadow) first")
        return self.lease([stage])

    def describe(self) -> dict[str, Any]:
        """Every model of the repository: versions (candidate, loaded, state), routes, providers."""
        models = []
        for name in self.repo.names():
            route = self._routes.get(name)
            desired_state = self.state.model(name)
            versions = []
            for version in self.repo.versions(name):
                ref = ModelRef.of(name, version)
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
            if not stage.closed:
                await stage.close()


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
