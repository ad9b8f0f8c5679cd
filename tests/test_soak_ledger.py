"""The soak's books (bench/soak_ledger.py): how a second verdict for the same input is classified.

At-least-once allows a rewrite after a crash; the books accept one that is identical apart from
timing fields, or one judged across the hot swap by another version of the same model (the verdict
names the version in `models.<check>` and in each violation's `model`), and flag any other."""

from __future__ import annotations

import copy

import pytest

from bench.soak_ledger import GOOD, Ledger

TOPIC = "soak-frames"


def verdict(offset: int = 7, version: str = "1", safe: bool = False, produced_at_ms: int = 1_000) -> dict:
    return {
        "id": f"cam:{offset}", "kind": "frame", "safe": safe,
        "source": {"topic": TOPIC, "partition": 0, "offset": offset},
        "models": {"labels": {"name": "efficientnet-lite0", "version": version, "arm": "serving"}},
        "violations": [] if safe else [{"check": "labels", "label": "revolver", "score": 0.91,
                                        "model": f"efficientnet-lite0@{version}"}],
        "produced_at_ms": produced_at_ms, "latency_ms": {"end_to_end": 40.0}, "worker": "w1",
    }


@pytest.fixture
def books() -> Ledger:
    ledger = Ledger({TOPIC: "frames"}, started_ms=0)
    ledger.sent(TOPIC, 0, 7, seq=7, variant=GOOD, at_ms=500, key=b"cam")
    ledger.verdict(verdict(), expected_id=lambda kind, seq: f"cam:{seq}")
    return ledger


def test_a_rewrite_that_differs_only_in_timing_is_identical(books):
    later = verdict(produced_at_ms=9_000)
    later["latency_ms"] = {"end_to_end": 4000.0}
    later["worker"] = "w2"
    books.verdict(later, expected_id=lambda kind, seq: f"cam:{seq}")
    assert books.duplicates == {"frames identical": 1} and not books.differing


def test_a_rewrite_by_another_version_of_the_model_is_accepted_as_such(books):
    swapped = verdict(version="2", produced_at_ms=9_000)
    swapped["models"]["labels"]["arm"] = "canary"
    books.verdict(swapped, expected_id=lambda kind, seq: f"cam:{seq}")
    assert books.duplicates == {"frames other model version": 1} and not books.differing


@pytest.mark.parametrize("change", ["decision", "label", "other model"])
def test_any_other_difference_is_flagged(books, change):
    other = verdict(version="2")
    if change == "decision":
        other = verdict(safe=True)
    elif change == "label":
        other["violations"][0]["label"] = "knife"
    else:
        other["models"]["labels"]["name"] = other["violations"][0]["model"] = "nudenet-320n@2"
    books.verdict(copy.deepcopy(other), expected_id=lambda kind, seq: f"cam:{seq}")
    assert books.duplicates == {"frames differ": 1}
    assert books.differing[0]["offset"] == 7 and books.differing[0]["record"] == other
