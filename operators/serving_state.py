"""The serving state file, `<repository>/serving.yaml`: pins, A/B splits, shadows and the rollback
history of each model, so they survive restarts and every worker sharing the repository follows them.
The admin API writes it (atomically); workers poll it (operators/registry.py)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from operators.model_repository import ModelConfigError, ModelRepository
from operators.routing import Route, Shadow, normalised_split

STATE_FILE = "serving.yaml"
DEFAULT_POLL_INTERVAL_S = 5.0
HISTORY_LIMIT = 20


class ServingStateError(ValueError):
    """A serving state file (or an admin change to it) that cannot be applied, and why."""


class Conflict(ServingStateError):
    """A change that the current state does not allow (e.g. nothing to roll back to)."""


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

    def history_after(self, serving: str, version: str | None) -> list[str]:
        """History after the serving version changes from `serving` to `version`."""
        history = list(self.history)
        if version != serving and (not history or history[-1] != serving):
            history.append(serving)
        return history[-HISTORY_LIMIT:]

    def rolled_back(self, name: str, serving: str, older: list[str]) -> ModelState:
        """Pinned to the previous serving version: the last of `history` that is not `serving`, else the
        newest of `older` (the non-candidate versions older than `serving`, oldest first)."""
        history = list(self.history)
        while history and history[-1] == serving:
            history.pop()
        if history:
            target = history.pop()
        elif older:
            target = older[-1]
        else:
            raise Conflict(f"model {name!r}: no version to roll back to from {serving}")
        return replace(self, pin=target, history=history)

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
        text = "# written by inferstream's admin API; format: operators/serving_state.py ServingState\n"
        text += yaml.safe_dump(self.to_dict(), sort_keys=False)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise




def desired_route(repo: ModelRepository, name: str, state: ModelState) -> Route:
    """The route that the repository and a model's serving state ask for (validated, not loaded)."""
    versions = repo.versions(name)
    if not versions:
        raise ModelConfigError(f"unknown model {name!r} in {repo.root}")

    def check(version: str, what: str) -> str:
        if version not in versions:
            raise ModelConfigError(f"model {name!r} has no version {version!r} ({what}; have {', '.join(versions)})")
        return version

    serving = check(state.pin, "pinned") if state.pin else repo.serving_version(name)
    split = {check(v, "in the split"): w for v, w in state.split.items()}
    if state.shadow is not None:
        check(state.shadow.version, "shadow")
    return Route(name, serving, normalised_split(split), state.shadow)


def file_signature(path: Path) -> tuple:
    """Changes when the file is rewritten (a poll re-reads the state file only then)."""
    try:
        st = path.stat()
    except OSError:
        return ()
    return (st.st_mtime_ns, st.st_size, st.st_ino)
