"""Recommendations through a real worker: events -> state -> debounced lists; state recovered after
kill -9; bad events dead-lettered; unknown items counted and skipped."""

from __future__ import annotations

import json
import shutil
import urllib.request
from datetime import UTC, datetime

import pytest
from conftest import wait_until
from kafka_helpers import collect, send_records

from operators.model_repository import ModelRepository
from operators.ranking import CandidateRanker, RankRequest
from operators.retrieval import CFRetriever, UserHistory
from operators.user_state import UserState
from streams.config import REPO_MODELS
from streams.schemas import DEAD_LETTERS, EVENTS, RECOMMENDATION_REQUESTS, RECOMMENDATIONS

pytestmark = pytest.mark.integration


@pytest.fixture
def rec_settings(settings, tiny_repo):
    for name in ("cf-retrieval", "deepfm-ctr"):
        shutil.copytree(REPO_MODELS / name, tiny_repo / name)
    # lists only on explicit triggers: a click, or a request
    return settings.replace(recommendations="on", rec_every_n_events=1000, rec_debounce_s=1.0, rec_k=10)


def events_for(user: str, items: list[str], click_last: bool = True, hour: int = 9) -> list[tuple[bytes, bytes, None]]:
    out = []
    for n, item in enumerate(items):
        kind = "click" if click_last and n == len(items) - 1 else "view"
        ts = f"2026-11-25T{hour:02d}:{n:02d}:00Z"
        out.append((user.encode(), json.dumps({"user_id": user, "item_id": item, "kind": kind, "ts": ts}).encode(), None))
    return out


def expected_list(repo_root, user: str, items: list[str], k: int = 10) -> list[str]:
    """Oracle: the operators called directly on the state the events should leave."""
    repo = ModelRepository(repo_root)
    retriever = CFRetriever.from_repository(repo, "cf-retrieval")
    ranker = CandidateRanker(repo.load("deepfm-ctr", providers=("cpu",)))
    state = UserState(user)
    for offset, item in enumerate(items):
        state.apply({"user_id": user, "item_id": item, "kind": "view", "ts": f"2026-11-25T09:{offset:02d}:00+00:00"}, offset, None)
    (retrieval,) = retriever.retrieve([UserHistory(user, state.seen_items, state.recent_items, state.n_events)], k=50)
    (ranking,) = ranker.rank([RankRequest.from_retrieval(retrieval, 9, state.recent_items)], k=k)
    return ranking.item_ids


def test_a_burst_of_events_yields_one_list_per_user_equal_to_the_operators(rec_settings, tiny_repo, start_worker, run):
    users = {f"u{1000 + n}": [f"i{(37 * n + 11 * j) % 300:04d}" for j in range(8)] for n in range(6)}
    run(send_records(rec_settings, EVENTS, [r for u, items in users.items() for r in events_for(u, items)]))
    start_worker(rec_settings)

    lists = collect(rec_settings, RECOMMENDATIONS, lambda rs: len(rs) >= len(users), timeout_s=90)
    extra = collect(rec_settings, RECOMMENDATIONS, lambda rs: False, timeout_s=3)
    assert len(extra) == len(users)  # debounced: 8 events (one click) per user -> one list each
    for r in lists:
        body = r["value"]
        user = body["user_id"]
        assert r["key"] == user and body["based_on_events"] == 8 and body["reason"] == "event:click"
        got = [i["item_id"] for i in body["items"]]
        assert not set(got) & set(users[user])  # seen items are never recommended
        assert got == expected_list(tiny_repo, user, users[user])
        assert body["models"] == {"retrieval": "cf-retrieval@1", "ranking": "deepfm-ctr@1"}


def test_state_is_recovered_after_kill_9_and_requests_get_the_same_list(rec_settings, start_worker, run):
    items = [f"i{n:04d}" for n in (5, 17, 99, 140, 230, 12)]
    run(send_records(rec_settings, EVENTS, events_for("u1000", items)))
    first = start_worker(rec_settings)
    before = collect(rec_settings, RECOMMENDATIONS, lambda rs: len(rs) >= 1, timeout_s=90)[0]["value"]
    first.kill()

    start_worker(rec_settings)
    run(send_records(rec_settings, RECOMMENDATION_REQUESTS, [(b"u1000", b'{"user_id": "u1000", "request_id": "r-1"}', None)]))
    after = collect(rec_settings, RECOMMENDATIONS, lambda rs: any(r["value"]["request_id"] == "r-1" for r in rs),
                    timeout_s=90)
    answer = next(r["value"] for r in after if r["value"]["request_id"] == "r-1")
    assert answer["based_on_events"] == before["based_on_events"] == len(items)  # nothing lost or applied twice
    assert [i["item_id"] for i in answer["items"]] == [i["item_id"] for i in before["items"]]


def test_bad_events_are_dead_lettered_and_unknown_items_counted(rec_settings, start_worker, run):
    good = events_for("u1001", ["i0001", "i0002"])
    bad = [
        (b"u1", b"{nope", None),
        (b"u1", json.dumps({"user_id": "u1", "item_id": "i0001", "kind": "teleport", "ts": "2026-11-25T09:00:00Z"}).encode(), None),
        (b"u1", json.dumps({"item_id": "i0001", "kind": "view", "ts": "2026-11-25T09:00:00Z"}).encode(), None),
        (b"u1", json.dumps({"user_id": "u1", "item_id": "i0001", "kind": "view", "ts": "2099-01-01T00:00:00Z"}).encode(), None),
    ]
    unknown = (b"u1001", json.dumps({"user_id": "u1001", "item_id": "no-such-item", "kind": "view",
                                     "ts": "2026-11-25T09:00:00Z"}).encode(), None)
    run(send_records(rec_settings, EVENTS, [*bad, unknown, *good]))
    worker = start_worker(rec_settings)

    dead = collect(rec_settings, DEAD_LETTERS, lambda rs: len(rs) >= len(bad), timeout_s=90)
    assert sorted(d["value"]["reason"] for d in dead) == ["malformed_json", "timestamp_in_future", "unknown_event_kind",
                                                          "wrong_schema"]
    lists = collect(rec_settings, RECOMMENDATIONS, lambda rs: len(rs) >= 1, timeout_s=30)
    assert lists[0]["value"]["based_on_events"] == 2  # the unknown item was skipped, not applied

    def unknown_count():
        with urllib.request.urlopen(f"http://127.0.0.1:{worker.settings.web_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        return [line for line in text.splitlines() if line.startswith("inferstream_unknown_items_total{")]

    assert wait_until(lambda: any(line.endswith(" 1.0") for line in unknown_count()), 10)
    assert worker.alive()


def test_events_replay_reproduces_live_lists_and_selects_users_by_time(rec_settings, start_worker, run, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO
    from kafka_helpers import ids  # noqa: F401  (shared helpers)

    from streams.kafka import ensure_topics, producer

    users = {f"u{2000 + n}": [f"i{(53 * n + 7 * j) % 300:04d}" for j in range(6)] for n in range(4)}
    records = [(r, 9 if n < 2 else 10) for n, (u, items) in enumerate(users.items())
               for r in events_for(u, items, hour=9 if n < 2 else 10)]

    async def send_with_record_times():  # the replay range selects by Kafka record timestamp
        await ensure_topics(rec_settings)
        kafka = producer(rec_settings)
        await kafka.start()
        try:
            for (key, value, _), hour in records:
                ts = int(datetime(2026, 11, 25, hour, tzinfo=UTC).timestamp() * 1000)
                await kafka.send_and_wait(rec_settings.topic(EVENTS), value, key=key, timestamp_ms=ts)
        finally:
            await kafka.stop()

    run(send_with_record_times())
    start_worker(rec_settings)
    live = collect(rec_settings, RECOMMENDATIONS, lambda rs: len(rs) >= len(users), timeout_s=90)
    env = {**os.environ, **rec_settings.to_env()}

    def replay(*args):
        result = subprocess.run([sys.executable, "-m", "streams.cli", "replay", "--source", "events", *args], env=env,
                                cwd=REPO, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.splitlines()[0]), result.stderr

    report_path = tmp_path / "lists.json"
    summary, stderr = replay("--output", rec_settings.topic("recs-replay"), "--report", str(report_path),
                             "--model", "deepfm-ctr@1")
    assert summary["users"] == len(users) and summary["events_read"] == len(records)
    report = json.loads(report_path.read_text())
    assert report["compared"] == len(users) and report["identical_lists"] == len(users)  # same models: same lists
    assert report["mean_overlap@10"] == 1.0 and report["mean_kendall_tau"] == 1.0
    out = collect(rec_settings, "recs-replay", lambda rs: len(rs) >= len(users), timeout_s=30)
    assert {r["key"] for r in out} == {f"{u}|cf-retrieval@1,deepfm-ctr@1" for u in users}
    live_items = {r["value"]["user_id"]: [i["item_id"] for i in r["value"]["items"]] for r in live}
    assert all([i["item_id"] for i in r["value"]["items"]] == live_items[r["value"]["user_id"]] for r in out)

    later, _ = replay("--output", rec_settings.topic("recs-later"), "--from", "2026-11-25T10:00:00Z")
    assert later["users"] == 2 and later["in_range"] == 12  # only the two users active from 10:00
    assert "filtered by record timestamp" in later["time_range_method"]
