"""Routing: which version of a model serves a record, by a stable hash of its key.

A model's `Route` holds its serving version, an optional A/B split `{version: weight}` (a record's arm
is chosen by a stable hash of (model name, record key), so a key gets the same arm in every process,
after restarts and on replay) and an optional shadow `{version, sample_rate}` (on a deterministic
sample of keys the shadow version also runs, reported beside the live result without acting on it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from operators.model_repository import version_key


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


@dataclass(frozen=True)
class Shadow:
    version: str
    sample_rate: float


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
    return tuple((v, split[v] / total) for v in sorted(split, key=version_key)) if total > 0 else ()


