"""Candidate ranking with a CTR model (DeepFM, `task: ctr`): features -> (session) -> ranked lists.

preprocess: one feature row per (user, candidate) pair of every request in the batch, built with
array operations over all pairs at once; inference: one session call per `max_pairs` pairs
(batching.max_pairs; a warm-up call of that size at load, so ONNX Runtime's arena is at its ceiling
from the start instead of growing under the first large k or backlog, and stays there);
postprocess: per user, candidates sorted by score (ties: retrieval order), where

    score = log P(click | shown) + retrieval_weight * retrieval score   (postprocess.retrieval_weight)

The model predicts whether a user clicks an item *shown* to them; whether the user would ever get
to the item (the feed follows their taste) is what the CF retrieval score measures. Their blend
ranks held-out clicks better than either alone (models/deepfm-ctr/1/quality.json). With
retrieval_weight 0, or candidates without retrieval scores (the popularity fallback), the score is
log P(click).

Features (each an int64 input of shape [batch], one row per pair; 0 always means "unknown"):
- `user`: 1 + row in user_ids.npy; `item`: 1 + row in item_ids.npy;
- `category`: 1 + the item's category (item_categories.npy);
- `hour`: hour of day of the request, 0..23 (UTC, like the event timestamps);
- `recent`: how much of the user's recent history (the last `recent_window` events before the
  current session) is in the item's category: 0 no history, 1 none, 2 up to 1/3, 3 up to 2/3, 4 more;
- `popularity`: the item's popularity bucket, 1 + min(buckets - 2, floor(log2(1 + clicking users)))
  (item_popularity_bucket.npy).
`ctr_inputs` builds them; the training recipe (models/recipes/deepfm.py) calls the same function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from operators.errors import BadInput
from operators.model_repository import ModelConfigError
from operators.retrieval import IdIndex, Retrieval

FIELDS = ("user", "item", "category", "hour", "recent", "popularity")
RECENT_BUCKETS = 5
DEFAULT_MAX_PAIRS = 4096  # rows per session call when the config names no batching.max_pairs


# -------------------------------------------------------------------------------------- features
def recent_bucket(same: np.ndarray, window: np.ndarray) -> np.ndarray:
    """(M,) recent events in the item's category and (M,) recent events in all -> (M,) bucket 0..4."""
    same, window = np.asarray(same, np.int64), np.asarray(window, np.int64)
    share = 2 + (3 * same > window).astype(np.int64) + (3 * same > 2 * window)
    return np.where(window == 0, 0, np.where(same == 0, 1, share))


def popularity_bucket(counts: np.ndarray, buckets: int) -> np.ndarray:
    """(N,) clicking-user counts -> (N,) buckets 1..buckets-1 on a log2 scale (0 is kept for unknown items)."""
    return 1 + np.minimum(buckets - 2, np.floor(np.log2(1 + np.asarray(counts, np.float64)))).astype(np.int64)


def ctr_inputs(
    user_rows: np.ndarray,
    item_rows: np.ndarray,
    hours: np.ndarray,
    same_category: np.ndarray,
    window: np.ndarray,
    item_categories: np.ndarray,
    item_popularity_bucket: np.ndarray,
) -> dict[str, np.ndarray]:
    """Model inputs for M (user, item) pairs, all arguments (M,) aligned except the two item tables.

    user_rows / item_rows: rows in the vocabularies, -1 for unknown; hours: 0..23; same_category:
    the user's recent events in the item's category; window: the user's recent events.
    Returns {field: (M,) int64} keyed by FIELDS.
    """
    user_rows, item_rows = np.asarray(user_rows, np.int64), np.asarray(item_rows, np.int64)
    known = item_rows >= 0
    return {
        "user": np.maximum(user_rows, -1) + 1,
        "item": np.maximum(item_rows, -1) + 1,
        "category": np.where(known, _lookup(item_categories, item_rows) + 1, 0),
        "hour": np.asarray(hours, np.int64),
        "recent": recent_bucket(same_category, window),
        "popularity": np.where(known, _lookup(item_popularity_bucket, item_rows), 0),
    }


def _lookup(table: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """table[rows] as int64, 0 where a row is -1 (unknown)."""
    table = np.asarray(table, np.int64)
    if len(table) == 0:
        return np.zeros(len(rows), np.int64)
    return np.where(rows >= 0, table[np.maximum(rows, 0)], 0)


# ------------------------------------------------------------------------------- requests, results
@dataclass(frozen=True)
class RankRequest:
    """Candidates of one user to rank, with the context the model needs: the hour of the request
    (0..23, UTC), the user's recent items (most recent last, before the current session) and, when
    they come from CF retrieval, the candidates' retrieval scores (dot products)."""

    user_id: str
    candidates: Sequence[str]
    hour: int
    recent_items: Sequence[str] = field(default=())
    retrieval_scores: Sequence[float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.hour, bool) or not isinstance(self.hour, int | np.integer) or not 0 <= self.hour <= 23:
            raise BadInput("bad_hour", f"hour must be an integer 0..23, got {self.hour!r}")
        if self.retrieval_scores is not None and len(self.retrieval_scores) != len(self.candidates):
            raise BadInput("bad_candidates", f"{len(self.retrieval_scores)} retrieval scores for {len(self.candidates)} candidates")

    @classmethod
    def from_retrieval(cls, retrieval: Retrieval, hour: int, recent_items: Sequence[str] = ()) -> RankRequest:
        """Rank what `retrieval` found; its scores are a prior only when they are CF dot products."""
        scores = retrieval.scores if retrieval.source == "cf" else None
        return cls(retrieval.user_id, retrieval.item_ids, hour, recent_items, scores)


@dataclass(frozen=True)
class Ranking:
    """One user's candidates, best first: the ranking score (see the module docstring) and the
    model's click probability of each."""

    user_id: str
    item_ids: list[str]
    scores: list[float]
    click_probabilities: list[float]
    model: str

    def as_dict(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "model": self.model, "item_ids": list(self.item_ids),
                "scores": [float(s) for s in self.scores],
                "click_probabilities": [float(p) for p in self.click_probabilities]}


# ---------------------------------------------------------------------------------------- ranker
class CandidateRanker:
    """A loaded `task: ctr` model (operators.model_repository.LoadedModel) and its feature tables."""

    def __init__(self, model, max_pairs: int | None = None, warm_up: bool = True) -> None:
        cfg = model.config
        if cfg.task != "ctr":
            raise ModelConfigError(f"{cfg.ref}: task is {cfg.task!r}, not 'ctr'")
        pre, post = cfg.preprocess, cfg.postprocess

        def load(key: str) -> np.ndarray:
            if key not in pre:
                raise ModelConfigError(f"{cfg.ref}: config.yaml preprocess lacks {key!r}")
            path = cfg.directory / pre[key]
            if not path.is_file():
                raise ModelConfigError(f"{cfg.ref}: {path} is missing (run `make models`)")
            return np.load(path, allow_pickle=False)

        self.model = model
        self.users = IdIndex(load("user_ids"))
        self.items = IdIndex(load("item_ids"))
        self.item_categories = load("item_categories").astype(np.int64)
        self.item_popularity_bucket = load("item_popularity_bucket").astype(np.int64)
        if not len(self.item_categories) == len(self.item_popularity_bucket) == len(self.items):
            raise ModelConfigError(f"{cfg.ref}: item tables have different lengths")
        self.n_categories = int(self.item_categories.max()) + 1 if len(self.item_categories) else 0
        self.recent_window = int(pre.get("recent_window", 10))
        self.k = int(post.get("top_k", 50))
        self.retrieval_weight = float(post.get("retrieval_weight", 0.0))
        self.output = str(post.get("output", model.session.outputs[0].name))
        names = {i.name for i in model.session.inputs}
        if names != set(FIELDS):
            raise ModelConfigError(f"{cfg.ref}: model inputs {sorted(names)} are not the fields {list(FIELDS)}")
        self.max_pairs = max_pairs or cfg.max_pairs or DEFAULT_MAX_PAIRS
        if warm_up:  # 0 is every field's "unknown" row: valid input of the largest call this ranker makes
            self.score({name: np.zeros(self.max_pairs, np.int64) for name in FIELDS})

    @property
    def ref(self) -> str:
        return self.model.ref

    def preprocess(self, requests: Sequence[RankRequest]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Features of every (user, candidate) pair -> ({field: (P,) int64}, (R + 1,) offsets: the pairs
        of request r are rows offsets[r]:offsets[r + 1])."""
        n_req = len(requests)
        counts = np.array([len(r.candidates) for r in requests], np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        pair_req = np.repeat(np.arange(n_req), counts)
        item_rows = self.items.rows([c for r in requests for c in r.candidates])
        user_rows = self.users.rows([r.user_id for r in requests])
        # the recent window's category histogram per request: (R, C)
        recent = [list(r.recent_items)[-self.recent_window:] if self.recent_window else [] for r in requests]
        recent_rows = self.items.rows([i for items in recent for i in items])
        recent_req = np.repeat(np.arange(n_req), [len(items) for items in recent])
        known = recent_rows >= 0
        n_cat = max(self.n_categories, 1)
        hist = np.bincount(recent_req[known] * n_cat + self.item_categories[recent_rows[known]],
                           minlength=n_req * n_cat).reshape(n_req, n_cat)
        window = hist.sum(axis=1)
        same = np.where(item_rows >= 0, hist[pair_req, _lookup(self.item_categories, item_rows)], 0)
        hours = np.array([r.hour for r in requests], np.int64)[pair_req]
        feeds = ctr_inputs(user_rows[pair_req], item_rows, hours, same, window[pair_req],
                           self.item_categories, self.item_popularity_bucket)
        return feeds, offsets

    def score(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """(P,) click probabilities: one session call per `max_pairs` pairs."""
        parts = []
        for start in range(0, len(feeds["user"]), self.max_pairs):
            chunk = {name: column[start:start + self.max_pairs] for name, column in feeds.items()}
            (part,) = self.model.session.run(chunk, [self.output]).values()
            parts.append(np.asarray(part, np.float32).reshape(-1))
        probs = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        if not np.isfinite(probs).all():
            raise FloatingPointError(f"{self.ref} produced non-finite scores for {int((~np.isfinite(probs)).sum())} pairs")
        return probs

    def rank(self, requests: Sequence[RankRequest], k: int | None = None) -> list[Ranking]:
        """Every request's candidates sorted by score (ties: candidate order), top k."""
        k = self.k if k is None else k
        feeds, offsets = self.preprocess(requests)
        if offsets[-1] == 0:
            return [Ranking(r.user_id, [], [], [], self.ref) for r in requests]
        probs = self.score(feeds)
        scores = self.ranking_scores(requests, probs)
        pair_req = np.repeat(np.arange(len(requests)), np.diff(offsets))
        order = np.lexsort((np.arange(len(probs)), -scores, pair_req))  # by request, best first, stable
        results = []
        for n, req in enumerate(requests):
            rows = order[offsets[n]:offsets[n + 1]][:k]
            results.append(Ranking(req.user_id, [req.candidates[i] for i in (rows - offsets[n]).tolist()],
                                   scores[rows].tolist(), probs[rows].tolist(), self.ref))
        return results

    def ranking_scores(self, requests: Sequence[RankRequest], probs: np.ndarray) -> np.ndarray:
        """(P,) log click probability + retrieval_weight * retrieval score (where the request has them)."""
        scores = np.log(np.maximum(probs.astype(np.float64), 1e-12))
        if self.retrieval_weight:
            prior = np.concatenate([np.asarray(r.retrieval_scores if r.retrieval_scores is not None else np.zeros(len(r.candidates)),
                                               np.float64) for r in requests])
            scores = scores + self.retrieval_weight * prior
        return scores
