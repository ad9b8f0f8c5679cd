"""User-state recovery through the broker: each user's last snapshot in the changelog wins, and only
that one is parsed (tansu never compacts: a changelog holds a snapshot per event)."""

from __future__ import annotations

import json

import pytest
from kafka_helpers import send_records

from operators.user_state import UserState
from streams.recommend import StateStore
from streams.schemas import USER_STATE

pytestmark = pytest.mark.integration


def test_recovery_keeps_each_users_last_snapshot_and_parses_only_it(settings, run, monkeypatch):
    users, rounds = [f"u{i}" for i in range(40)], 25
    written = []
    for n in range(1, rounds + 1):  # round after round, as snapshots follow events
        for i, user in enumerate(users):
            if n <= rounds - i % 3:  # some users stop earlier: their last snapshot is older
                state = UserState(user, recent_items=[f"i{n}"], n_events=n, last_offset=100 * n + i)
                written.append((user.encode(), json.dumps(state.to_dict()).encode(), None))
    run(send_records(settings, USER_STATE, written))
    expected = {}
    for key, value, _ in written:  # the oracle: the last value written under each key
        expected[key.decode()] = json.loads(value)

    parsed = []
    original = UserState.from_dict
    monkeypatch.setattr(UserState, "from_dict", classmethod(lambda cls, d: parsed.append(d["user_id"]) or original(d)))
    store = StateStore(settings)

    async def recover_all():
        for partition in range(settings.partitions):
            await store.ensure(partition)

    run(recover_all())
    assert {u: s.to_dict() for u, s in store.states.items()} == expected
    assert sorted(parsed) == sorted(users)  # one parse per user, not one per snapshot
