"""operators/recommend_lists.py: lists for many users in one pass equal the retriever and the ranker
called one user at a time, and the record they publish meets its contract."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from operators.model_repository import ModelRepository
from operators.ranking import FIELDS, CandidateRanker, RankRequest
from operators.recommend_lists import ListRecommender
from operators.retrieval import CFRetriever, UserHistory
from operators.user_state import UserState
from streams import contracts
from streams.config import REPO_MODELS


@pytest.fixture(scope="module")
def repo() -> ModelRepository:
    return ModelRepository(REPO_MODELS)


def state_of(user: str, items: list[str], hour: int) -> UserState:
    state = UserState(user)
    for offset, item in enumerate(items):
        state.apply({"item_id": item, "kind": "view", "ts": f"2026-11-25T{hour:02d}:{offset:02d}:00+00:00"}, offset, None)
    return state


USERS = {"u1000": ([f"i{n:04d}" for n in (5, 17, 99, 140)], 9), "u1003": (["i0230", "i0012"], 17),
         "cold-user": ([], 3)}


def test_batched_lists_equal_the_operators_called_one_user_at_a_time(repo):
    retriever = CFRetriever.from_repository(repo, "cf-retrieval")
    ranker = CandidateRanker(repo.load("deepfm-ctr", providers=("cpu",)))
    states = [state_of(user, items, hour) for user, (items, hour) in USERS.items() if items]
    ks = [10, 4]

    lists = ListRecommender(retriever, ranker).lists(states, ks)

    for state, k, made in zip(states, ks, lists, strict=True):
        hour = USERS[state.user_id][1]  # the hour of the user's latest event, not of the computation
        (retrieval,) = retriever.retrieve([UserHistory(state.user_id, state.seen_items, state.recent_items, state.n_events)], k=50)
        (ranking,) = ranker.rank([RankRequest.from_retrieval(retrieval, hour, state.recent_items)], k=k)
        assert [i.item_id for i in made.items] == ranking.item_ids
        assert [i.rank for i in made.items] == list(range(1, k + 1))
        assert [i.click_probability for i in made.items] == pytest.approx(ranking.click_probabilities, abs=1e-6)
        assert made.source == retrieval.source and made.based_on_events == len(USERS[state.user_id][0])
        assert made.models == {"retrieval": "cf-retrieval@1", "ranking": "deepfm-ctr@1"}


def test_a_backlog_of_users_is_ranked_max_users_at_a_time_with_the_same_lists(repo):
    retriever = CFRetriever.from_repository(repo, "cf-retrieval")
    ranker = CandidateRanker(repo.load("deepfm-ctr", providers=("cpu",)))
    assert ListRecommender(retriever, ranker).max_users == ranker.model.config.max_batch_size
    states = [state_of(f"u{1000 + n}", [f"i{(7 * n + j) % 3000:04d}" for j in range(3)], n % 24) for n in range(5)]
    ks = [10, 4, 10, 7, 10]
    calls: list[int] = []
    score = ranker.score
    ranker.score = lambda feeds: calls.append(len(feeds["user"])) or score(feeds)  # pairs per session call

    chunked = ListRecommender(retriever, ranker, max_users=2).lists(states, ks)
    per_call, calls[:] = list(calls), []
    whole = ListRecommender(retriever, ranker, max_users=100).lists(states, ks)

    assert len(per_call) == 3 and len(calls) == 1 and sum(per_call) == calls[0]  # 2 + 2 + 1 users' pairs
    assert [m.user_id for m in chunked] == [s.user_id for s in states]
    for a, b in zip(chunked, whole, strict=True):  # the same lists; scores to float noise (other batch shapes)
        assert [i.item_id for i in a.items] == [i.item_id for i in b.items] and a.source == b.source
        assert [i.click_probability for i in a.items] == pytest.approx([i.click_probability for i in b.items], abs=1e-5)


def _growth_mb(recommender: ListRecommender, states: list[UserState], k: int) -> float:
    """malloc's live bytes after lists of `k` items for `states`, against before them."""
    from streams.memory import malloc_stats

    before = malloc_stats()["allocated"]
    made = recommender.lists(states, [k] * len(states))
    assert all(len(m.items) == k for m in made)
    del made
    return (malloc_stats()["allocated"] - before) / 2**20


def test_lists_with_the_largest_k_do_not_grow_the_rankers_arena_past_its_warm_up(repo):
    retriever = CFRetriever.from_repository(repo, "cf-retrieval")
    ranker = CandidateRanker(repo.load("deepfm-ctr", providers=("cpu",)))
    assert ranker.max_pairs == 3200  # batching.max_pairs: 64 users x 50 candidates, the warm-up's size
    states = [state_of(f"u{1000 + n}", [f"i{(7 * n + j) % 3000:04d}" for j in range(3)], n % 24) for n in range(64)]
    bounded = ListRecommender(retriever, ranker)
    bounded.lists(states[:1], [200])  # retrieval's and numpy's first-use allocations, outside the measure
    # k = 200 (the schema's largest) ranks 1,000 candidates a user: 64,000 pairs in 20 calls of 3,200
    assert _growth_mb(bounded, states, k=200) < 16  # ~0 measured
    unbounded = CandidateRanker(repo.load("deepfm-ctr", providers=("cpu",)), max_pairs=10**6, warm_up=False)
    unbounded.score({f: np.zeros(3200, np.int64) for f in FIELDS})  # the same warm-up, without the bound
    # the oracle: without the bound, one call of 64,000 pairs extends the arena for good (~130 MB)
    assert _growth_mb(ListRecommender(retriever, unbounded), states, k=200) > 64


def test_without_a_ranker_the_list_is_the_retrieval_order_with_no_click_probabilities(repo):
    retriever = CFRetriever.from_repository(repo, "cf-retrieval")
    states = [state_of(user, items, hour) for user, (items, hour) in USERS.items()]

    lists = ListRecommender(retriever).lists(states, [5] * len(states))

    for state, made in zip(states, lists, strict=True):
        (retrieval,) = retriever.retrieve([UserHistory(state.user_id, state.seen_items, state.recent_items, state.n_events)], k=5)
        assert [i.item_id for i in made.items] == retrieval.item_ids
        assert [i.score for i in made.items] == pytest.approx(retrieval.scores, abs=1e-6)
        assert all(i.click_probability is None for i in made.items)
        assert made.models == {"retrieval": "cf-retrieval@1"}
    assert lists[-1].source == "popular"  # a user without history gets the cold-start fallback


def test_live_and_replay_records_meet_the_recommendations_contract(repo):
    retriever = CFRetriever.from_repository(repo, "cf-retrieval")
    ranker = CandidateRanker(repo.load("deepfm-ctr", providers=("cpu",)))
    (made,) = ListRecommender(retriever, ranker).lists([state_of("u1000", ["i0005", "i0017"], 9)], [10])

    live = made.record(reason="event:click", request_id="r-1", generated_at="2026-11-25T09:02:00+00:00")
    replayed = made.record(reason="replay", request_id=None, generated_at=None, replay={"run": "abc"})

    for record in (live, replayed):
        contracts.check("recommendations", json.loads(json.dumps(record)))
    assert live["user_id"] == "u1000" and live["request_id"] == "r-1" and len(live["items"]) == 10
    assert replayed["replay"] == {"run": "abc"} and replayed["items"] == live["items"]
    assert live["items"] == [dataclasses.asdict(item) for item in made.items]  # every field, as the dataclass has them
