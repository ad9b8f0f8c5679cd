"""Per-user state folding: what a stream of events leaves behind, and idempotence under redelivery."""

from __future__ import annotations

import copy
import dataclasses
import json

from operators.user_state import RECENT_ITEMS, UserState


def ev(item: str, kind: str = "view", ts: str = "2026-11-25T10:00:00+00:00") -> dict:
    return {"user_id": "u", "item_id": item, "kind": kind, "ts": ts}


def test_events_fold_into_recent_seen_counts_and_last_activity():
    s = UserState("u")
    for offset, (item, kind, cat) in enumerate([("a", "view", "1"), ("b", "click", "2"), ("a", "like", "1")]):
        assert s.apply(ev(item, kind, f"2026-11-25T10:0{offset}:00+00:00"), offset, cat)
    assert s.recent_items == ["b", "a"]  # a moved to the end when seen again
    assert s.seen_items == ["a", "b"]
    assert s.category_counts == {"1": 2, "2": 1} and s.kind_counts == {"view": 1, "click": 1, "like": 1}
    assert s.last_ts == "2026-11-25T10:02:00+00:00" and s.n_events == 3 and s.last_offset == 2


def test_a_redelivered_event_is_not_applied_twice():
    s = UserState("u")
    assert s.apply(ev("a"), 10, "1")
    before = copy.deepcopy(s.to_dict())  # to_dict is shallow: the state's own lists
    assert not s.apply(ev("a"), 10, "1")  # same offset again (at-least-once redelivery)
    assert not s.apply(ev("z"), 7, "9")  # an older offset
    assert s.to_dict() == before


def test_recent_items_are_bounded_and_state_round_trips():
    s = UserState("u")
    for i in range(RECENT_ITEMS + 7):
        s.apply(ev(f"i{i}"), i, None)
    assert len(s.recent_items) == RECENT_ITEMS and s.recent_items[-1] == f"i{RECENT_ITEMS + 6}"
    assert len(s.seen_items) == RECENT_ITEMS + 7
    assert UserState.from_dict(s.to_dict()) == s


def test_states_share_one_copy_of_each_item_id():
    """Ids parsed from separate records are separate strings; every state (applied or recovered from
    a snapshot) holds the same one."""
    a, b = UserState("a"), UserState("b")
    a.apply(json.loads('{"item_id": "i-shared", "kind": "view", "ts": "2026-11-25T10:00:00+00:00"}'), 0, None)
    b.apply(json.loads('{"item_id": "i-shared", "kind": "view", "ts": "2026-11-25T10:00:00+00:00"}'), 0, None)
    recovered = UserState.from_dict(json.loads(json.dumps(a.to_dict())))
    assert a.seen_items[0] is b.seen_items[0] is recovered.seen_items[0] is recovered.recent_items[0]
    assert recovered == a


def test_the_snapshot_has_every_field_as_dataclasses_asdict_gives_them():
    s = UserState("u")
    for offset, (item, kind) in enumerate([("a", "view"), ("b", "click"), ("a", "purchase")]):
        s.apply(ev(item, kind), offset, str(offset % 2))
    snapshot = s.to_dict()
    assert snapshot == dataclasses.asdict(s)  # the oracle, which deep-copies (what to_dict no longer does)
    assert json.dumps(snapshot) == json.dumps(dataclasses.asdict(s))  # same keys in the same order
