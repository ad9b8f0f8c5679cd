"""Moderation policy: which model outputs count as violations. Pure data + rules, no models.

A policy is a YAML file of named checks. Each check names a model (`name` or `name@version`), the
input it reads (`text` or `image`) and its rule; the rule's shape follows the model's task:

    checks:
      toxicity:          {model: toxicity, input: text, label: toxic, above: 0.7}
      pii:               {model: pii-ner, input: text, types: [EMAIL, PHONE, CARD, IBAN, NATIONAL_ID], above: 0.5}
      nsfw:              {model: nudenet-320n, input: image, labels: [FEMALE_BREAST_EXPOSED], above: 0.5}
      forbidden_objects: {model: efficientnet-lite0, input: image, labels: [revolver, rifle], top_k: 3, above: 0.3}

Rules (`RULES`), each task entry of operators/tasks.py names the one that judges its results; a rule
reads a result in its verdict form (`as_dict()`, taken here from the operator's typed result):
- scores (text-classify): violation when the score of `label` is above `above`.
- entities (ner): entities of `types` scoring at least `above` are reported as sensitive; they are a
  violation unless `violation: false` (report only).
- detections (detect): violation for each detection whose label is in `labels` and score is above `above`.
- classes (classify): violation when a label in `labels` is within the `top_k` and above `above`.

Redaction (off by default): `redact: true` (every entity the verdict lists) or `redact: {types: [EMAIL,
PHONE]}` makes `Policy.redacted(text, entities)` return the text with those spans replaced by `[TYPE]`,
for consumers that must not see PII; with no `redact` it returns None.

Stream alerts (operators/alerts.py): `alerts: {k: 3, n: 5, m: 10, checks: [forbidden_objects]}` starts an
alert when a frame check's violation (per label) is present in k of a stream's last n judged frames and
ends it after m judged frames without it; `checks` defaults to every image check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from operators import tasks
from operators.alerts import AlertRule, AlertRuleError
from operators.pii_patterns import redact

INPUTS = ("text", "image")
_RULE_KEYS = {"label", "labels", "types", "above", "top_k", "violation"}


class PolicyError(ValueError):
    """A policy file that cannot be applied, and why."""


@dataclass(frozen=True)
class Check:
    name: str
    model: str
    input: str
    label: str | None = None
    labels: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()
    above: float = 0.5
    top_k: int = 5
    violation: bool = True

    def evaluate(self, task: str, result: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """(violations, report) for one result of a model of `task`: a typed result (or its `as_dict()`
        form). The report holds what the verdict shows for this check (scores, sensitive entities,
        detections, classifications)."""
        rule = RULES.get(tasks.get(task).rule)
        if rule is None:
            raise PolicyError(f"check {self.name!r}: no rule for task {task!r}")
        return rule(self, verdict_form(result))

    def _violation(self, score: float, **extra: Any) -> dict[str, Any]:
        return {"check": self.name, "model": self.model, "score": round(float(score), 6), **extra}

    def _scores(self, scores: dict[str, float]) -> tuple[list, dict]:
        if self.label not in scores:
            raise PolicyError(f"check {self.name!r}: model has no label {self.label!r} (has {sorted(scores)})")
        score = scores[self.label]
        violations = [self._violation(score, label=self.label)] if score > self.above else []
        return violations, {"scores": {self.name: scores}}

    def _entities(self, entities: list[dict[str, Any]]) -> tuple[list, dict]:
        sensitive = [e for e in entities if (not self.types or e["type"] in self.types) and e["score"] >= self.above]
        violations = []
        if sensitive and self.violation:
            violations = [self._violation(max(e["score"] for e in sensitive), types=sorted({e["type"] for e in sensitive}))]
        return violations, {"entities": sensitive}

    def _detections(self, detections: list[dict[str, Any]]) -> tuple[list, dict]:
        hits = [d for d in detections if d["label"] in self.labels and d["score"] > self.above]
        return [self._violation(d["score"], label=d["label"], box=d["box"]) for d in hits], {"detections": detections}

    def _classes(self, classes: list[dict[str, Any]]) -> tuple[list, dict]:
        hits = [c for c in classes[: self.top_k] if c["label"] in self.labels and c["score"] > self.above]
        return [self._violation(c["score"], label=c["label"]) for c in hits], {"classifications": classes}


def verdict_form(result: Any) -> Any:
    """A typed result (operators/tasks.py `Result`) -> its `as_dict()` form, what the rules read; a
    result already in that form as it is."""
    return result.as_dict() if hasattr(result, "as_dict") else result


# rule name (a task entry's `rule`) -> the check's method that applies it
RULES = {"scores": Check._scores, "entities": Check._entities, "detections": Check._detections, "classes": Check._classes}


@dataclass(frozen=True)
class Redaction:
    """Which entity types a redacted copy of the text hides; empty: every entity of the verdict."""

    types: frozenset[str] = frozenset()

    @classmethod
    def from_spec(cls, spec: Any, source: str) -> Redaction | None:
        if spec is None or spec is False:
            return None
        if spec is True:
            return cls()
        if isinstance(spec, dict) and set(spec) <= {"types"} and isinstance(spec.get("types", []), list):
            return cls(frozenset(map(str, spec.get("types", []))))
        raise PolicyError(f"{source}: 'redact' must be true, false or {{types: [TYPE, ...]}}")


@dataclass(frozen=True)
class Policy:
    checks: tuple[Check, ...]
    source: str = "<inline>"
    raw: dict[str, Any] = field(default_factory=dict, compare=False)
    redaction: Redaction | None = None  # None: no redacted copy of the text (the default)
    alerts: AlertRule = AlertRule()  # stream alerts from frame verdicts: k of n frames to start, m to end

    @property
    def alerted_checks(self) -> list[str]:
        """The image checks stream alerts watch: none means there is nothing to alert on."""
        return [c.name for c in self.checks if c.input == "image" and self.alerts.watches(c.name)]

    def redacted(self, text: str | None, entities: list[dict[str, Any]]) -> str | None:
        """The text with the verdict's `entities` (of the redaction's types) replaced by `[TYPE]`; None
        when the policy asks for no redaction or there is no text."""
        if self.redaction is None or text is None:
            return None
        return redact(text, entities, self.redaction.types or None)

    def for_input(self, kind: str) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.input == kind)

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise PolicyError(f"{path}: {exc}") from exc
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<inline>") -> Policy:
        if not isinstance(raw, dict) or not isinstance(raw.get("checks"), dict) or not raw["checks"]:
            raise PolicyError(f"{source}: a policy needs a non-empty 'checks' mapping")
        checks = []
        for name, spec in raw["checks"].items():
            if not isinstance(spec, dict):
                raise PolicyError(f"{source}: check {name!r} must be a mapping")
            if "required" in spec:  # there is no optional check: a model that fails dead-letters the record
                raise PolicyError(f"{source}: check {name!r}: 'required' is not supported: every check runs on "
                                  "every record that has its input, and a record whose model fails is dead-lettered; "
                                  "remove the key")
            unknown = set(spec) - _RULE_KEYS - {"model", "input"}
            if unknown:
                raise PolicyError(f"{source}: check {name!r} has unknown keys {sorted(unknown)}")
            if spec.get("input") not in INPUTS or not spec.get("model"):
                raise PolicyError(f"{source}: check {name!r} needs 'model' and 'input' (one of {', '.join(INPUTS)})")
            above = float(spec.get("above", 0.5))
            if not 0.0 <= above <= 1.0:
                raise PolicyError(f"{source}: check {name!r}: 'above' must be within [0, 1]")
            checks.append(Check(
                name=str(name), model=str(spec["model"]), input=spec["input"], label=spec.get("label"),
                labels=frozenset(map(str, spec.get("labels", []))), types=frozenset(map(str, spec.get("types", []))),
                above=above, top_k=int(spec.get("top_k", 5)), violation=bool(spec.get("violation", True)),
            ))
        try:
            alerts = AlertRule.from_spec(raw.get("alerts"), source)
        except AlertRuleError as exc:
            raise PolicyError(str(exc)) from exc
        unknown = alerts.checks - {c.name for c in checks if c.input == "image"}
        if unknown:
            raise PolicyError(f"{source}: alerts name checks that are not image checks: {sorted(unknown)}")
        return cls(tuple(checks), source, raw, Redaction.from_spec(raw.get("redact"), source), alerts)


def verdict_fields(policy_results: list[tuple[Check, str, Any]]) -> dict[str, Any]:
    """Combine every check's (check, task, result) into the verdict's judgement fields; a typed result
    read by several checks is put in its verdict form once."""
    violations: list[dict[str, Any]] = []
    body: dict[str, Any] = {"scores": {}, "entities": [], "detections": [], "classifications": []}
    forms: dict[int, Any] = {}
    for check, task, result in policy_results:
        if id(result) not in forms:
            forms[id(result)] = verdict_form(result)
        found, report = check.evaluate(task, forms[id(result)])
        violations.extend(found)
        for key, value in report.items():
            if isinstance(body[key], dict):
                body[key].update(value)
            else:
                body[key].extend(value)
    return {"safe": not violations, "violations": violations, **body}
