"""CTR ranking: features for every (user, candidate) pair built at once and scored in one session
call per `max_pairs` pairs, checked pair by pair against the ONNX model run on features built by
hand. The model is a tiny DeepFM built by the real recipes (generator -> CF -> DeepFM -> ONNX) in a
few seconds."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from test_interactions import load_recipe

from operators.errors import BadInput
from operators.model_repository import ModelRepository
from operators.ranking import FIELDS, CandidateRanker, RankRequest, popularity_bucket, recent_bucket
from operators.retrieval import CFRetriever, Retrieval, UserHistory

REPO = Path(__file__).resolve().parent.parent
TINY = {"n_users": 300, "n_items": 200, "n_categories": 6, "mean_sessions": 5, "days": 20}


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> dict:
    """models/{cf-retrieval,deepfm-ctr}/1 built from a tiny log with the committed configs."""
    interactions, cf, deepfm = load_recipe("interactions"), load_recipe("collab_filter"), load_recipe("deepfm")
    root = tmp_path_factory.mktemp("models")
    for name in ("cf-retrieval", "deepfm-ctr"):
        (root / name / "1").mkdir(parents=True)
        shutil.copy(REPO / "models" / name / "1" / "config.yaml", root / name / "1")
    data = interactions.generate(seed=5, **TINY)
    cf.build(root / "cf-retrieval" / "1", data, dataclasses.replace(cf.ALSConfig(), iterations=3))
    report = deepfm.build(root / "deepfm-ctr" / "1", data, root / "cf-retrieval" / "1",
                          dataclasses.replace(deepfm.DeepFMConfig(), epochs=1, hidden=(16,), candidates=30))
    return {"root": root, "data": data, "report": report}


@pytest.fixture
def ranker(built) -> CandidateRanker:
    return CandidateRanker(ModelRepository(built["root"]).load("deepfm-ctr@1", providers=("cpu",), intra_op_threads=1))


class CountingSession:
    """Wraps a session and counts `run` calls, keeping each call's feeds."""

    def __init__(self, session) -> None:
        self.session, self.calls, self.feeds = session, 0, []
        self.inputs, self.outputs = session.inputs, session.outputs

    def run(self, feeds, output_names=None):
        self.calls += 1
        self.feeds.append(feeds)
        return self.session.run(feeds, output_names)


def requests_for(data, n_users: int, n_candidates: int, seed: int = 0) -> list[RankRequest]:
    rng = np.random.default_rng(seed)
    out = []
    for n in range(n_users):
        candidates = data.item_ids[rng.choice(data.n_items, n_candidates, replace=False)].tolist()
        recent = data.item_ids[rng.choice(data.n_items, rng.integers(0, 12))].tolist()
        scores = rng.normal(size=n_candidates).tolist() if n % 2 else None
        out.append(RankRequest(str(data.user_ids[n]), candidates, int(rng.integers(0, 24)), recent, scores))
    return out


def features_by_hand(ranker: CandidateRanker, req: RankRequest, item_id: str) -> dict[str, np.ndarray]:
    """The documented features of one pair, with dict lookups and loops (independent of ctr_inputs)."""
    users = {u: n for n, u in enumerate(ranker.users.ids.tolist())}
    items = {i: n for n, i in enumerate(ranker.items.ids.tolist())}
    row = items.get(item_id)
    cats = [int(ranker.item_categories[items[i]]) for i in list(req.recent_items)[-ranker.recent_window:] if i in items]
    same = sum(c == ranker.item_categories[row] for c in cats) if row is not None else 0
    if not cats:
        recent = 0
    elif same == 0:
        recent = 1
    else:
        share = same / len(cats)
        recent = 2 if share <= 1 / 3 else 3 if share <= 2 / 3 else 4
    values = {
        "user": users[req.user_id] + 1 if req.user_id in users else 0,
        "item": row + 1 if row is not None else 0,
        "category": int(ranker.item_categories[row]) + 1 if row is not None else 0,
        "hour": req.hour,
        "recent": recent,
        "popularity": int(ranker.item_popularity_bucket[row]) if row is not None else 0,
    }
    return {f: np.array([values[f]], np.int64) for f in FIELDS}


def test_the_recipe_build_is_fast_and_the_export_matches_torch(built):
    assert built["report"]["onnx_max_abs_diff_vs_torch"] < 1e-5
    assert set(built["report"]["quality"]["metrics"]) >= {"popularity", "cf", "cf+deepfm"}


def test_a_batch_of_users_is_scored_in_one_session_call(ranker, built):
    ranker.model.session = counting = CountingSession(ranker.model.session)
    results = ranker.rank(requests_for(built["data"], n_users=25, n_candidates=30), k=30)
    assert counting.calls == 1
    assert [len(r.item_ids) for r in results] == [30] * 25


def test_more_pairs_than_max_pairs_run_in_several_calls_with_the_same_probabilities(ranker, built):
    requests = requests_for(built["data"], n_users=25, n_candidates=30, seed=3)  # 750 pairs
    whole = ranker.rank(requests, k=30)
    small = CandidateRanker(ranker.model, max_pairs=100)
    small.model.session = counting = CountingSession(ranker.model.session)
    chunked = small.rank(requests, k=30)
    assert counting.calls == 8  # ceil(750 / 100)
    for a, b in zip(chunked, whole, strict=True):  # other batch shapes: equal to float noise
        assert a.item_ids == b.item_ids
        np.testing.assert_allclose(a.click_probabilities, b.click_probabilities, rtol=1e-5, atol=1e-7)


def test_the_ranker_warms_up_with_one_call_of_max_pairs_unknown_rows(ranker):
    ranker.model.session = counting = CountingSession(ranker.model.session)
    CandidateRanker(ranker.model, max_pairs=500)
    (feeds,) = counting.feeds
    assert set(feeds) == set(FIELDS) and all(v.shape == (500,) and not v.any() for v in feeds.values())
    assert ranker.model.config.max_pairs == 3200  # the committed config's bound, the default's source


def test_probabilities_match_the_onnx_model_run_pair_by_pair(ranker, built):
    requests = requests_for(built["data"], n_users=8, n_candidates=12, seed=1)
    requests.append(RankRequest("unknown-user", ["unknown-item", built["data"].item_ids[0]], 3, ["unknown-item"]))
    single = ort.InferenceSession(str(ranker.model.config.model_path), providers=["CPUExecutionProvider"])
    for req, got in zip(requests, ranker.rank(requests, k=100), strict=True):
        want = {c: float(single.run(["probability"], features_by_hand(ranker, req, c))[0][0]) for c in req.candidates}
        assert sorted(got.item_ids) == sorted(req.candidates)
        np.testing.assert_allclose(got.click_probabilities, [want[i] for i in got.item_ids], rtol=1e-5, atol=1e-7)


def test_candidates_are_ranked_by_log_probability_plus_weighted_retrieval_score(ranker, built):
    requests = requests_for(built["data"], n_users=6, n_candidates=15, seed=2)
    for req, got in zip(requests, ranker.rank(requests, k=15), strict=True):
        prior = dict(zip(req.candidates, req.retrieval_scores or [0.0] * len(req.candidates), strict=True))
        expected = [math.log(p) + ranker.retrieval_weight * prior[i] for i, p in zip(got.item_ids, got.click_probabilities, strict=True)]
        np.testing.assert_allclose(got.scores, expected, rtol=1e-6)
        assert got.scores == sorted(got.scores, reverse=True)


def test_equal_scores_keep_the_candidate_order(ranker, built):
    item = str(built["data"].item_ids[0])
    (got,) = ranker.rank([RankRequest("u0", [item, item, item], 5)])
    assert got.item_ids == [item] * 3 and len(set(got.scores)) == 1


def test_top_k_cuts_each_list(ranker, built):
    results = ranker.rank(requests_for(built["data"], n_users=3, n_candidates=10), k=4)
    assert all(len(r.item_ids) == len(r.scores) == len(r.click_probabilities) == 4 for r in results)


def test_requests_without_candidates_make_no_session_call(ranker):
    ranker.model.session = counting = CountingSession(ranker.model.session)
    assert ranker.rank([RankRequest("u0", [], 1)])[0].as_dict()["item_ids"] == []
    assert counting.calls == 0


def test_a_bad_hour_is_bad_input():
    with pytest.raises(BadInput) as err:
        RankRequest("u0", ["i0"], 24)
    assert err.value.reason == "bad_hour"


def test_only_cf_scores_become_the_retrieval_prior():
    cf = RankRequest.from_retrieval(Retrieval("u", ["a", "b"], [0.5, 0.1], "cf"), hour=3)
    popular = RankRequest.from_retrieval(Retrieval("u", ["a", "b"], [90.0, 10.0], "popular"), hour=3)
    assert cf.retrieval_scores == [0.5, 0.1] and popular.retrieval_scores is None


def test_recent_buckets_follow_the_documented_shares():
    same = np.array([0, 0, 1, 1, 2, 3, 3])
    window = np.array([0, 5, 3, 4, 3, 3, 9])
    assert recent_bucket(same, window).tolist() == [0, 1, 2, 2, 3, 4, 2]


def test_popularity_buckets_are_log2_and_keep_zero_for_unknown():
    assert popularity_bucket(np.array([0, 1, 3, 7, 10**9]), buckets=6).tolist() == [1, 2, 3, 4, 5]


def test_retrieval_then_ranking_end_to_end(ranker, built):
    retriever = CFRetriever.from_directory(built["root"] / "cf-retrieval" / "1")
    data = built["data"]
    histories = [UserHistory(str(u), {str(data.item_ids[0])}, [str(data.item_ids[1])], n_events=10) for u in data.user_ids[:5]]
    histories.append(UserHistory("cold-user"))
    found = retriever.retrieve(histories, k=20)
    ranked = ranker.rank([RankRequest.from_retrieval(r, 12, h.recent_items) for r, h in zip(found, histories, strict=True)], k=10)
    assert [r.user_id for r in ranked] == [h.user_id for h in histories]
    assert all(str(data.item_ids[0]) not in r.item_ids and len(r.item_ids) == 10 for r in ranked)
    assert found[-1].source == "popular"
