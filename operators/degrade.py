"""Graceful degradation under sustained lag: a ladder of cheaper ways to keep up.

A model's config may declare rungs, each a cheaper way to serve its records: another version of the
model (e.g. the INT8 candidate `models quantize` writes) and, for frames, judging only every Nth frame
of each stream. When the lag of the model's input topics stays above `lag_records` for `for_s`
seconds, the ladder steps down one rung (and again after each further `for_s` above it); once the lag
has stayed below `recover_below` for `for_s`, it steps back up one rung (hysteresis: the two
thresholds and the wait keep it from flapping). Posts are never skipped: a stride applies to frames.

    degrade:
      lag_records: 2000      # step down when this many records wait for this model ...
      for_s: 10              # ... for this long
      recover_below: 200     # step up when fewer wait, for as long
      rungs:
        - {version: "2"}                   # the cheaper version serves every record
        - {version: "2", frame_stride: 2}  # and only every 2nd frame of a stream is judged
        - {version: "2", frame_stride: 4}
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class LadderConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Rung:
    version: str | None = None  # a version of the same model that serves every record; None: as routed
    frame_stride: int = 1  # judge every Nth frame of each stream (frames only)


@dataclass(frozen=True)
class LadderConfig:
    rungs: tuple[Rung, ...]
    lag_records: int = 1000
    for_s: float = 10.0
    recover_below: int = 100

    @classmethod
    def from_config(cls, raw: Any, where: str) -> LadderConfig | None:
        """The `degrade:` mapping of a model config (None when absent); LadderConfigError when invalid."""
        if raw in (None, {}):
            return None
        if not isinstance(raw, dict) or not isinstance(raw.get("rungs"), list) or not raw["rungs"]:
            raise LadderConfigError(f"{where}: degrade needs a non-empty list of rungs")
        unknown = set(raw) - {"rungs", "lag_records", "for_s", "recover_below"}
        if unknown:
            raise LadderConfigError(f"{where}: unknown degrade keys {sorted(unknown)}")
        rungs = []
        for i, rung in enumerate(raw["rungs"]):
            if not isinstance(rung, dict) or set(rung) - {"version", "frame_stride"} or not rung:
                raise LadderConfigError(f"{where}: rung {i} must be {{version, frame_stride}}, got {rung!r}")
            stride = rung.get("frame_stride", 1)
            if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
                raise LadderConfigError(f"{where}: rung {i} frame_stride must be an integer >= 1")
            rungs.append(Rung(None if rung.get("version") is None else str(rung["version"]), stride))
        config = cls(tuple(rungs), int(raw.get("lag_records", 1000)), float(raw.get("for_s", 10.0)),
                     int(raw.get("recover_below", 100)))
        if config.lag_records < 1 or config.for_s < 0 or not 0 <= config.recover_below < config.lag_records:
            raise LadderConfigError(f"{where}: degrade needs lag_records >= 1, for_s >= 0 and 0 <= recover_below < lag_records")
        return config


class DegradationLadder:
    """Where one model stands on its ladder (level 0: full quality), from the lag it is shown."""

    def __init__(self, config: LadderConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.level = 0
        self._above_since: float | None = None
        self._below_since: float | None = None

    @property
    def rung(self) -> Rung | None:
        """The rung in force (None at full quality)."""
        return self.config.rungs[self.level - 1] if self.level else None

    @property
    def frame_stride(self) -> int:
        return self.rung.frame_stride if self.rung else 1

    def observe(self, lag_records: int) -> int:
        """Record the lag now; returns the level in force after it."""
        now, cfg = self.clock(), self.config
        if lag_records > cfg.lag_records:
            self._below_since = None
            self._above_since = now if self._above_since is None else self._above_since
            if now - self._above_since >= cfg.for_s and self.level < len(cfg.rungs):
                self.level += 1
                self._above_since = now  # the next rung needs another full window above the threshold
        elif lag_records < cfg.recover_below:
            self._above_since = None
            self._below_since = now if self._below_since is None else self._below_since
            if now - self._below_since >= cfg.for_s and self.level > 0:
                self.level -= 1
                self._below_since = now
        else:  # between the thresholds: hold the level, restart both windows
            self._above_since = self._below_since = None
        return self.level
