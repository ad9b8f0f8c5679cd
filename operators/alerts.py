"""Stream-level alerts: per video stream, a violation that persists across frames becomes one alert
episode with a start and an end, instead of thirty verdicts a second. Pure state (no Kafka): streams/
feeds it frame verdicts in stream order and keeps it in a changelog topic.

Rule (`alerts:` in the policy, k of n to start, m to end): for each (check, label) of a stream, an
episode starts when the violation is present in at least `k` of the last `n` judged frames, and ends
once it has been absent for `m` judged frames in a row. Frames that were not judged (skipped by a
degradation stride, dead-lettered) do not count either way.

Idempotent under redelivery: a stream remembers the position (frames-topic partition and offset) of
the last frame it applied; one stream's frames live in one partition in order, so a verdict rewritten
after a crash carries a position already applied and is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

ALERT_SCHEMA = "inferstream.alert.v1"
EVENTS = ("start", "end")


class AlertRuleError(ValueError):
    """An `alerts:` policy section that cannot be applied, and why."""


@dataclass(frozen=True)
class AlertRule:
    """Start when present in >= k of the last n judged frames; end after m judged frames without it."""

    k: int = 3
    n: int = 5
    m: int = 10
    checks: frozenset[str] = frozenset()  # checks that raise alerts; empty: every check on frames

    @classmethod
    def from_spec(cls, spec: Any, source: str = "<inline>") -> AlertRule:
        if spec is None:
            return cls()
        if not isinstance(spec, dict) or not set(spec) <= {"k", "n", "m", "checks"}:
            raise AlertRuleError(f"{source}: 'alerts' must be a mapping of k, n, m and checks")
        try:
            rule = cls(int(spec.get("k", cls.k)), int(spec.get("n", cls.n)), int(spec.get("m", cls.m)),
                       frozenset(map(str, spec.get("checks", []))))
        except (TypeError, ValueError) as exc:
            raise AlertRuleError(f"{source}: alerts: {exc}") from exc
        if not 1 <= rule.k <= rule.n or rule.m < 1:
            raise AlertRuleError(f"{source}: alerts need 1 <= k <= n and m >= 1 (got k={rule.k}, n={rule.n}, m={rule.m})")
        return rule

    def watches(self, check: str) -> bool:
        return not self.checks or check in self.checks


@dataclass(frozen=True)
class JudgedFrame:
    """What an alert needs from one frame verdict."""

    stream_id: str
    frame_index: int
    frame_id: str  # the verdict's id
    partition: int  # of the frame in the frames topic
    offset: int
    timestamp_ms: int | None  # the frame record's timestamp (capture time, as the producer stamped it)
    pts: float | None
    violations: tuple[tuple[str, str, float], ...]  # (check, label, score)

    @classmethod
    def from_verdict(cls, verdict: dict[str, Any]) -> JudgedFrame | None:
        """None for anything but a frame verdict."""
        if verdict.get("kind") != "frame":
            return None
        source = verdict["source"]
        hits: dict[tuple[str, str], float] = {}
        for v in verdict.get("violations", []):
            key = (str(v["check"]), str(v.get("label") or ",".join(v.get("types", []))))
            hits[key] = max(hits.get(key, 0.0), float(v["score"]))
        return cls(str(verdict["stream_id"]), int(verdict["frame_index"]), str(verdict["id"]), int(source["partition"]),
                   int(source["offset"]), source.get("timestamp_ms"), verdict.get("pts"),
                   tuple((c, lab, s) for (c, lab), s in hits.items()))


def _moment(frame: JudgedFrame) -> dict[str, Any]:
    return {"frame_index": frame.frame_index, "frame_id": frame.frame_id, "pts": frame.pts,
            "timestamp_ms": frame.timestamp_ms, "offset": frame.offset}


@dataclass
class Episode:
    """One (check, label) of one stream: recent hits while quiet, the open episode while alerting."""

    check: str
    label: str
    hits: list[tuple[int, dict[str, Any], float]] = field(default_factory=list)  # (seq, moment, score), last n
    first: dict[str, Any] | None = None  # set while an episode is open
    last: dict[str, Any] | None = None
    peak: float = 0.0
    evidence: dict[str, Any] | None = None
    present_frames: int = 0
    absent_run: int = 0

    @property
    def open(self) -> bool:
        return self.first is not None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Episode:
        data = dict(data)
        data["hits"] = [tuple(h) for h in data.get("hits", [])]
        return cls(**data)


@dataclass
class StreamAlerts:
    """The alert state of one stream."""

    stream_id: str
    seq: int = 0  # judged frames applied
    partition: int = -1  # position of the last applied frame in the frames topic
    offset: int = -1
    episodes: dict[str, Episode] = field(default_factory=dict)  # "check\tlabel" -> state

    def apply(self, frame: JudgedFrame, rule: AlertRule) -> list[dict[str, Any]] | None:
        """Fold one judged frame in; the alerts it raises (start/end records), or None (and no change)
        when this frame's position was already applied (a redelivery)."""
        if frame.partition == self.partition and frame.offset <= self.offset:
            return None
        self.partition, self.offset = frame.partition, frame.offset
        self.seq += 1
        moment = _moment(frame)
        present = {f"{c}\t{lab}": s for c, lab, s in frame.violations if rule.watches(c)}
        alerts = []
        for key in present.keys() - self.episodes.keys():
            check, label = key.split("\t", 1)
            self.episodes[key] = Episode(check, label)
        for key, episode in list(self.episodes.items()):
            score = present.get(key)
            alerts.extend(self._step(episode, score, moment, rule))
            if not episode.open and not episode.hits:
                del self.episodes[key]  # nothing to remember: keeps the state bounded
        return alerts

    def _step(self, ep: Episode, score: float | None, moment: dict[str, Any], rule: AlertRule) -> list[dict[str, Any]]:
        if ep.open:
            if score is None:
                ep.absent_run += 1
                if ep.absent_run >= rule.m:
                    end = self._alert("end", ep, rule, moment)
                    ep.first = ep.last = ep.evidence = None
                    ep.peak, ep.present_frames, ep.absent_run, ep.hits = 0.0, 0, 0, []
                    return [end]
                return []
            ep.absent_run = 0
            ep.last, ep.present_frames = moment, ep.present_frames + 1
            if score > ep.peak:
                ep.peak, ep.evidence = score, moment
            return []
        ep.hits = [h for h in ep.hits if h[0] > self.seq - rule.n]
        if score is None:
            return []
        ep.hits.append((self.seq, moment, score))
        if len(ep.hits) < rule.k:
            return []
        ep.first, ep.last = ep.hits[0][1], moment
        _, ep.evidence, ep.peak = max(ep.hits, key=lambda h: h[2])
        ep.present_frames, ep.absent_run, ep.hits = len(ep.hits), 0, []
        return [self._alert("start", ep, rule, moment)]

    def _alert(self, event: str, ep: Episode, rule: AlertRule, at: dict[str, Any]) -> dict[str, Any]:
        first, last = ep.first, ep.last
        return {
            "schema": ALERT_SCHEMA,
            "id": f"{self.stream_id}:{first['frame_index']}:{ep.check}:{ep.label}:{event}",
            "episode": f"{self.stream_id}:{first['frame_index']}:{ep.check}:{ep.label}",
            "event": event,
            "stream_id": self.stream_id,
            "check": ep.check,
            "label": ep.label,
            "first": {**first, "at": _iso(first["timestamp_ms"])},
            "last": {**last, "at": _iso(last["timestamp_ms"])},
            "decided_at_frame": at["frame_index"],  # the frame that completed the rule
            "peak_score": round(ep.peak, 6),
            "evidence_frame_id": ep.evidence["frame_id"],
            "frames_present": ep.present_frames,
            "rule": {"k": rule.k, "n": rule.n, "m": rule.m},
        }

    def to_dict(self) -> dict[str, Any]:
        return {"stream_id": self.stream_id, "seq": self.seq, "partition": self.partition, "offset": self.offset,
                "episodes": {k: e.to_dict() for k, e in self.episodes.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamAlerts:
        return cls(data["stream_id"], data["seq"], data["partition"], data["offset"],
                   {k: Episode.from_dict(e) for k, e in data.get("episodes", {}).items()})


def _iso(timestamp_ms: int | None) -> str | None:
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC).isoformat(timespec="milliseconds") if timestamp_ms else None
