"""Recommendation lists for many users at once: one retrieval pass over the item matrix, then the
ranker over every (user, candidate) pair when a ranker is configured.

The live agent (streams/recommend.py) and the events replay (streams/replay_events.py) both compute
lists here and publish `RecommendationList.record`, so a backfill computes and writes exactly what
the live path would have.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from operators.ranking import CandidateRanker, RankRequest
from operators.retrieval import CFRetriever, UserHistory
from operators.user_state import UserState

RECORD_SCHEMA = "inferstream.recommendations.v1"  # the contract: streams/contracts/recommendations.json


@dataclass(frozen=True)
class RankedItem:
    rank: int  # 1 = best
    item_id: str
    score: float  # the ranking score; the retrieval score when there is no ranker
    click_probability: float | None  # the ranker's; None without a ranker

    def as_dict(self) -> dict[str, Any]:  # not dataclasses.asdict: it deep-copies, 3 us an item
        return {"rank": self.rank, "item_id": self.item_id, "score": self.score, "click_probability": self.click_probability}


@dataclass(frozen=True)
class RecommendationList:
    """One user's list, best first, and what it was computed from."""

    user_id: str
    source: str  # how the candidates were found: "cf" or "popular" (cold start), as operators.retrieval.Retrieval
    items: tuple[RankedItem, ...]
    based_on_events: int
    models: dict[str, str]  # role ("retrieval", "ranking") -> NAME@VERSION

    def record(self, *, reason: str, request_id: str | None, generated_at: str | None, **extra: Any) -> dict[str, Any]:
        """The `recommendations` record: the list, why it was published (`reason`, the request it
        answers) and when; `extra` adds fields (a replay's run)."""
        return {"schema": RECORD_SCHEMA, "user_id": self.user_id, "source": self.source,
                "items": [item.as_dict() for item in self.items], "reason": reason, "request_id": request_id,
                "based_on_events": self.based_on_events, "models": dict(self.models), "generated_at": generated_at,
                **extra}


class ListRecommender:
    """Users' states -> their lists: CF retrieval, then the CTR ranker over the candidates (without a
    ranker, the retrieval order)."""

    def __init__(self, retriever: CFRetriever, ranker: CandidateRanker | None = None, max_users: int | None = None) -> None:
        self.retriever = retriever
        self.ranker = ranker
        # users per retrieval and ranking pass (default: the ranker's batching.max_batch_size): a backlog
        # after a takeover makes thousands of users due at once. The ranker bounds its own session calls
        # (batching.max_pairs), which is what keeps ONNX Runtime's arena at its warm-up size.
        self.max_users = max_users or (ranker.model.config.max_batch_size if ranker is not None else None)

    @property
    def models(self) -> dict[str, str]:
        return {"retrieval": self.retriever.ref, **({"ranking": self.ranker.ref} if self.ranker else {})}

    def lists(self, states: Sequence[UserState], ks: Sequence[int]) -> list[RecommendationList]:
        """The list of each state, `ks[i]` items long for `states[i]`: one retrieval pass and one ranking
        call per `max_users` states."""
        if self.max_users and len(states) > self.max_users:
            step = self.max_users
            return [made for start in range(0, len(states), step)
                    for made in self.lists(states[start:start + step], ks[start:start + step])]
        k_max = max(ks)
        histories = [UserHistory(s.user_id, s.seen_items, s.recent_items, s.n_events) for s in states]
        retrievals = self.retriever.retrieve(histories, k=max(k_max * 5, 50) if self.ranker else k_max)
        if self.ranker is None:
            ranked = [(r.item_ids, r.scores, [None] * len(r.item_ids)) for r in retrievals]
        else:
            # context hour = the hour of the user's latest activity: deterministic, so a replay or a
            # restarted worker computes the same list as the live one did
            rankings = self.ranker.rank([RankRequest.from_retrieval(r, _activity_hour(s), s.recent_items)
                                         for r, s in zip(retrievals, states, strict=True)], k=k_max)
            ranked = [(x.item_ids, x.scores, x.click_probabilities) for x in rankings]
        models = self.models
        return [RecommendationList(state.user_id, retrieval.source,
                                   tuple(RankedItem(i + 1, item, round(float(score), 6), None if p is None else round(float(p), 6))
                                         for i, (item, score, p) in enumerate(zip(items[:k], scores[:k], probs[:k], strict=True))),
                                   state.n_events, models)
                for state, retrieval, (items, scores, probs), k in zip(states, retrievals, ranked, ks, strict=True)]


def _activity_hour(state: UserState) -> int:
    return datetime.fromisoformat(state.last_ts).astimezone(UTC).hour if state.last_ts else datetime.now(UTC).hour
