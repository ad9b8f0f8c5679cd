"""The value every PII recognizer returns (`PatternMatch`) and the one rule that resolves overlapping
spans (`resolve`): validated first, then score, then length. Shared by operators/pii_patterns.py,
operators/pii_ids.py and the merge with the NER model (operators/ner.py).

>>> a = PatternMatch("PHONE", "046 454 286", 4, 15, 0.95, True, "phone_US")
>>> b = PatternMatch("NATIONAL_ID", "046 454 286", 4, 15, 1.0, True, "ca_sin")
>>> [m.recognizer for m in resolve([a, b])]
['ca_sin']
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PatternMatch:
    """One recognizer hit: `text == original[start:end]`, offsets in characters."""

    type: str
    text: str
    start: int
    end: int  # exclusive
    score: float
    validated: bool  # a checksum or a format rule confirmed it (not just a shape or a context word)
    recognizer: str  # e.g. "card_luhn", "us_ssn", "phone"


def rank_key(span: Any) -> tuple:
    """The merge order of overlapping spans: validated first, then score, then length, then earlier."""
    return (not getattr(span, "validated", False), -span.score, -(span.end - span.start), span.start)


def resolve(spans: Iterable[Any]) -> list[Any]:
    """Keep the best of every group of overlapping spans (by `rank_key`), in text order.

    Works on anything with `start`, `end`, `score` and optionally `validated` (PatternMatch, ner.Entity).
    """
    kept: list[Any] = []
    for span in sorted(spans, key=rank_key):
        if all(span.end <= k.start or span.start >= k.end for k in kept):
            kept.append(span)
    return sorted(kept, key=lambda s: (s.start, s.end))
