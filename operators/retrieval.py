"""Candidate retrieval by collaborative filtering: user embedding -> top-K items by dot product.

Three stages, like every operator: user ids -> query vectors (the user embedding table), top-K over
the item matrix excluding what each user has seen (`top_k_dot`), ids and scores back
(`Retrieval`). Users the model cannot serve (no embedding, or fewer than `min_events` events) get
popular items of their recent categories, then globally popular items: never an error.

Arrays, named where they are declared:
- item matrix `(N, d) float32`, row r = item `item_ids[r]`; may be a read-only memory map, read
  `chunk_items` rows at a time: a batch of U queries holds about 16 bytes per (query, item) of one
  chunk (scores, argpartition's indices, masks), e.g. 256 x 32,768 -> ~130 MB, whatever N is;
- user matrix `(U_all, d) float32`, row r = user `user_ids[r]`.
Ordering everywhere: score descending, ties broken by the lower item row.

    >>> q = np.array([[1.0, 0.0]], np.float32); items = np.array([[1, 0], [2, 0], [2, 0], [0, 5]], np.float32)
    >>> top_k_dot(q, items, k=2)
    (array([[1, 2]]), array([[2., 2.]], dtype=float32))
    >>> top_k_dot(q, items, k=2, exclude=[np.array([1])])
    (array([[2, 0]]), array([[2., 1.]], dtype=float32))
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from operators.model_repository import ModelConfigError, ModelRef, ModelRepository

DEFAULT_CHUNK_ITEMS = 32_768
DEFAULT_QUERY_BATCH = 256  # users per top_k_dot call in CFRetriever.retrieve (bounds memory with chunk_items)


# ---------------------------------------------------------------------------------------- top-K
def _flatten_exclusions(exclude: Sequence[np.ndarray] | None, n_queries: int, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-query item rows -> (query, item) pairs sorted by item; rows outside [0, n_items) are dropped."""
    if exclude is None:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    if len(exclude) != n_queries:
        raise ValueError(f"exclude has {len(exclude)} entries for {n_queries} queries")
    rows = [np.asarray(e, np.int64).ravel() for e in exclude]
    q = np.repeat(np.arange(n_queries), [len(r) for r in rows])
    i = np.concatenate(rows) if rows else np.empty(0, np.int64)
    valid = (i >= 0) & (i < n_items)
    q, i = q[valid], i[valid]
    order = np.argsort(i, kind="stable")
    return q[order], i[order]


def _block_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Columns of the k best of each row of (U, C) `scores` (C > k), ties to the lower column; (U, k), unsorted."""
    n_cols = scores.shape[1]
    part = np.argpartition(scores, n_cols - k, axis=1)[:, n_cols - k:]
    kth = np.take_along_axis(scores, part, axis=1).min(axis=1, keepdims=True)  # the k-th best value
    above = scores > kth
    tied = scores == kth
    wanted = k - above.sum(axis=1)  # how many of the tied columns each row takes
    keep = above | tied
    ambiguous = np.flatnonzero(tied.sum(axis=1) > wanted)  # more ties than room: keep the lowest columns
    if len(ambiguous):
        first = np.cumsum(tied[ambiguous], axis=1, dtype=np.int32) <= wanted[ambiguous, None]
        keep[ambiguous] = above[ambiguous] | (tied[ambiguous] & first)
    return np.nonzero(keep)[1].reshape(len(scores), k)


def top_k_dot(
    queries: np.ndarray,
    items: np.ndarray,
    k: int,
    exclude: Sequence[np.ndarray] | None = None,
    chunk_items: int = DEFAULT_CHUNK_ITEMS,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k items by dot product for each query, over the catalogue `chunk_items` rows at a time.

    queries: (U, d) float32; items: (N, d) float32 (a memory map is read chunk by chunk);
    exclude: None or U arrays of item rows never to return for that query (e.g. seen items).
    Returns (rows (U, k) int64, scores (U, k) float32), best first, ties to the lower row; where a
    query has fewer than k eligible items the tail is row -1, score -inf. Equal to a full stable
    sort of every score, whatever `chunk_items` is.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or items.ndim != 2 or queries.shape[1] != items.shape[1]:
        raise ValueError(f"expected queries (U, d) and items (N, d), got {queries.shape} and {items.shape}")
    if k < 1 or chunk_items < 1:
        raise ValueError("k and chunk_items must be >= 1")
    if not np.isfinite(queries).all():
        raise ValueError("queries contain NaN or infinity")
    n_queries, n_items = len(queries), len(items)
    ex_q, ex_i = _flatten_exclusions(exclude, n_queries, n_items)
    best_rows = np.empty((n_queries, 0), np.int64)
    best_scores = np.empty((n_queries, 0), np.float32)
    for start in range(0, n_items, chunk_items):
        stop = min(start + chunk_items, n_items)
        scores = queries @ np.asarray(items[start:stop], dtype=np.float32).T  # (U, C)
        lo, hi = np.searchsorted(ex_i, [start, stop])
        scores[ex_q[lo:hi], ex_i[lo:hi] - start] = -np.inf
        if stop - start > k:
            cols = _block_top_k(scores, k)
            scores = np.take_along_axis(scores, cols, axis=1)
        else:
            cols = np.broadcast_to(np.arange(stop - start), scores.shape)
        rows = np.concatenate([best_rows, cols + start], axis=1)
        merged = np.concatenate([best_scores, scores], axis=1)
        order = np.lexsort((rows, -merged), axis=1)[:, :k]  # score descending, then lower row
        best_rows = np.take_along_axis(rows, order, axis=1)
        best_scores = np.take_along_axis(merged, order, axis=1)
    if best_rows.shape[1] < k:  # fewer items than k
        pad = k - best_rows.shape[1]
        best_rows = np.pad(best_rows, ((0, 0), (0, pad)), constant_values=-1)
        best_scores = np.pad(best_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    best_rows[np.isneginf(best_scores)] = -1  # excluded items only fill rows that ran out
    return best_rows, best_scores


# ------------------------------------------------------------------------------------------- ids
class IdIndex:
    """String ids <-> rows, looked up for many ids at once (binary search over the sorted ids).

    >>> IdIndex(np.array(["b", "a", "c"])).rows(["c", "x", "b"])
    array([ 2, -1,  0])
    """

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = np.asarray(ids)
        if self.ids.dtype.kind not in "US":
            self.ids = self.ids.astype(str)
        self._order = np.argsort(self.ids, kind="stable")
        self._sorted = self.ids[self._order]
        if len(self._sorted) > 1 and (self._sorted[1:] == self._sorted[:-1]).any():
            raise ValueError("ids are not unique")

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """(M,) ids -> (M,) int64 rows, -1 for unknown ids."""
        query = np.asarray(ids, dtype=str)
        if len(self._sorted) == 0 or len(query) == 0:
            return np.full(len(query), -1, np.int64)
        pos = np.minimum(np.searchsorted(self._sorted, query), len(self._sorted) - 1)
        return np.where(self._sorted[pos] == query, self._order[pos], -1).astype(np.int64)


# ---------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class UserHistory:
    """What the stream knows about a user: items seen (never recommended again), the most recent
    items (most recent last; their categories drive the cold-start fallback), and the event count
    (`None`: the number of distinct seen items)."""

    user_id: str
    seen_items: Collection[str] = ()
    recent_items: Sequence[str] = ()
    n_events: int | None = None

    @property
    def event_count(self) -> int:
        return len(set(self.seen_items)) if self.n_events is None else self.n_events


@dataclass(frozen=True)
class Retrieval:
    """Candidates for one user, best first. `source` says what the scores are: `cf` = dot product of
    user and item embeddings; `popular` = the cold-start fallback, scores are item popularity counts."""

    user_id: str
    item_ids: list[str]
    scores: list[float]
    source: str

    def as_dict(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "source": self.source, "item_ids": list(self.item_ids),
                "scores": [float(s) for s in self.scores]}


# -------------------------------------------------------------------------------------- retriever
class CFRetriever:
    """Top-K retrieval over a collaborative-filtering model (see models/cf-retrieval/1/config.yaml).

    item_embeddings: (N, d) float32; item_ids: (N,) str; item_categories: (N,) int; item_popularity:
    (N,) counts; user_embeddings: (U, d) float32; user_ids: (U,) str.
    """

    def __init__(
        self,
        item_embeddings: np.ndarray,
        item_ids: np.ndarray,
        item_categories: np.ndarray,
        item_popularity: np.ndarray,
        user_embeddings: np.ndarray,
        user_ids: np.ndarray,
        *,
        k: int = 50,
        min_events: int = 3,
        recent_window: int = 10,
        chunk_items: int = DEFAULT_CHUNK_ITEMS,
        ref: str = "cf-retrieval",
    ) -> None:
        n_items, dim = item_embeddings.shape
        if user_embeddings.ndim != 2 or user_embeddings.shape[1] != dim:
            raise ValueError(f"user embeddings {user_embeddings.shape} do not match item embeddings {item_embeddings.shape}")
        if not (len(item_ids) == len(item_categories) == len(item_popularity) == n_items) or len(user_ids) != len(user_embeddings):
            raise ValueError("ids, categories and popularity must have one entry per embedding row")
        self.items = item_embeddings
        self.users = user_embeddings
        self.item_index = IdIndex(item_ids)
        self.user_index = IdIndex(user_ids)
        self.item_categories = np.asarray(item_categories, np.int64)
        self.item_popularity = np.asarray(item_popularity, np.float64)
        self.k, self.min_events, self.recent_window, self.chunk_items = k, min_events, recent_window, chunk_items
        self.ref = ref
        rows = np.arange(n_items)
        self._popular = np.lexsort((rows, -self.item_popularity))  # most popular first, ties to lower row
        self._by_category = np.lexsort((rows, -self.item_popularity, self.item_categories))  # runs per category
        cats, starts, counts = np.unique(self.item_categories[self._by_category], return_index=True, return_counts=True)
        self._category_run = {c: (s, s + n) for c, s, n in zip(cats.tolist(), starts.tolist(), counts.tolist(), strict=True)}

    @classmethod
    def from_directory(cls, directory: str | Path, mmap: bool = True) -> CFRetriever:
        """Load a `task: retrieve` model directory (config.yaml + .npy files): `file` is the item
        matrix (memory-mapped), `preprocess` names the user side, `postprocess` the item metadata and
        top-K settings. Read here rather than by ModelConfig.load, which only knows model runtimes."""
        directory = Path(directory)
        path = directory / "config.yaml"
        ref = ModelRef.of(directory.parent.name, directory.name)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ModelConfigError(f"{path}: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("task") != "retrieve":
            raise ModelConfigError(f"{path}: not a `task: retrieve` model")
        pre, post = raw.get("preprocess") or {}, raw.get("postprocess") or {}

        def load(section: dict[str, Any], key: str, mapped: bool = False) -> np.ndarray:
            if key not in section:
                raise ModelConfigError(f"{path}: lacks {key!r}")
            file = directory / section[key]
            if not file.is_file():
                raise ModelConfigError(f"{ref}: {file} is missing (run `make models`)")
            return np.load(file, mmap_mode="r" if mapped else None, allow_pickle=False)

        items = load(raw, "file", mapped=mmap)
        users = load(pre, "user_embeddings")
        if items.dtype != np.float32 or users.dtype != np.float32 or items.ndim != 2:
            raise ModelConfigError(f"{ref}: embeddings must be 2-D float32, got {items.dtype} and {users.dtype}")
        dim = pre.get("dim")
        if dim is not None and items.shape[1] != int(dim):
            raise ModelConfigError(f"{ref}: config says dim {dim}, the item matrix has {items.shape[1]}")
        if not np.isfinite(users).all():
            raise ModelConfigError(f"{ref}: user embeddings contain NaN or infinity")
        return cls(
            items, load(post, "item_ids"), load(post, "item_categories"), load(post, "item_popularity"),
            users, load(pre, "user_ids"),
            k=int(post.get("k", 50)), min_events=int(pre.get("min_events", 3)),
            recent_window=int(pre.get("recent_window", 10)),
            chunk_items=int(post.get("chunk_items", DEFAULT_CHUNK_ITEMS)), ref=ref,
        )

    @classmethod
    def from_repository(cls, repo: ModelRepository, ref: str = "cf-retrieval", mmap: bool = True) -> CFRetriever:
        """`name` (the serving version) or `name@version` in a model repository."""
        return cls.from_directory(repo.directory(ref), mmap=mmap)

    # ------------------------------------------------------------------------------------------
    def retrieve(self, histories: Sequence[UserHistory], k: int | None = None) -> list[Retrieval]:
        """Top-k candidates for every user, in input order: one pass over the item matrix per 256 users
        the model can serve, the popularity fallback for the others."""
        k = self.k if k is None else k
        user_rows = self.user_index.rows([h.user_id for h in histories])
        seen = self._rows_per_user([list(h.seen_items) for h in histories])
        warm = np.flatnonzero((user_rows >= 0) & (np.array([h.event_count for h in histories]) >= self.min_events))
        results: list[Retrieval | None] = [None] * len(histories)
        for start in range(0, len(warm), DEFAULT_QUERY_BATCH):
            batch = warm[start:start + DEFAULT_QUERY_BATCH]
            queries = np.asarray(self.users[user_rows[batch]], np.float32)
            rows, scores = top_k_dot(queries, self.items, k, [seen[i] for i in batch], self.chunk_items)
            for n, i in enumerate(batch):
                valid = rows[n] >= 0
                results[i] = Retrieval(histories[i].user_id, self.item_index.ids[rows[n][valid]].tolist(),
                                       scores[n][valid].tolist(), "cf")
        cold = [i for i in range(len(histories)) if results[i] is None]
        recent = self._rows_per_user([list(histories[i].recent_items)[-self.recent_window:] for i in cold])
        for i, recent_rows in zip(cold, recent, strict=True):
            rows = self.popular_fallback(recent_rows, seen[i], k)
            results[i] = Retrieval(histories[i].user_id, self.item_index.ids[rows].tolist(),
                                   self.item_popularity[rows].tolist(), "popular")
        return results  # type: ignore[return-value]

    def popular_fallback(self, recent_rows: np.ndarray, seen_rows: np.ndarray, k: int) -> np.ndarray:
        """(<= k,) item rows: the most popular unseen items of the recent items' categories, then the
        most popular unseen items overall (popularity descending, ties to the lower row)."""
        cats = np.unique(self.item_categories[recent_rows[recent_rows >= 0]])
        budget = k + len(seen_rows)  # enough of each ranked list to survive removing the seen items
        pool = [self._by_category[start: min(stop, start + budget)]
                for start, stop in (self._category_run[c] for c in cats.tolist())]
        picks = np.concatenate(pool) if pool else np.empty(0, np.int64)
        picks = picks[np.lexsort((picks, -self.item_popularity[picks]))]
        picks = picks[~np.isin(picks, seen_rows)][:k]
        if len(picks) < k:
            more = self._popular[: budget + len(picks)]
            more = more[~np.isin(more, seen_rows) & ~np.isin(more, picks)]
            picks = np.concatenate([picks, more[: k - len(picks)]])
        return picks.astype(np.int64)

    def _rows_per_user(self, id_lists: list[list[str]]) -> list[np.ndarray]:
        """Item ids per user -> item rows per user (unknown ids dropped), one lookup for all users."""
        counts = [len(ids) for ids in id_lists]
        flat = self.item_index.rows([i for ids in id_lists for i in ids])
        return [r[r >= 0] for r in np.split(flat, np.cumsum(counts)[:-1])] if id_lists else []
