"""Collaborative filtering for candidate retrieval: implicit ALS on the training split of the
synthetic events log -> user and item embeddings + item metadata in models/cf-retrieval/1/.

Model (Hu, Koren and Volinsky 2008, "Collaborative Filtering for Implicit Feedback Datasets"):
every (user, item) pair with an event has preference 1 and confidence 1 + alpha * w, where w sums
the event weights (`KIND_WEIGHTS`: a view counts 1, a click 4 more, ...); every other pair has
preference 0 and confidence 1. Alternating exact least squares, all users (then all items) of a
chunk solved in one batched `numpy.linalg.solve`. Score of (user, item) = dot product.

Artefacts (next to the committed config.yaml; sizes are for the default data):
- item_embeddings.npy  (N, d) float32, memory-mapped by operators.retrieval.CFRetriever
- item_ids.npy (N,) str, item_categories.npy (N,) int32, categories.npy (C,) str,
  item_popularity.npy (N,) int64 = distinct training users who clicked the item
- user_embeddings.npy (U, d) float32, user_ids.npy (U,) str
- quality.json: recall@K / NDCG@K of popularity vs CF on the held-out split
"""


import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import interactions, recsys_quality

KIND_WEIGHTS = np.array([1.0, 4.0, 2.0, 4.0])  # view, click, like, purchase (indexed by event kind)


@dataclass(frozen=True)
class ALSConfig:
    factors: int = 32
    reg: float = 50.0  # L2 on both factor matrices
    alpha: float = 2.0  # confidence slope: c = 1 + alpha * w
    iterations: int = 8
    k: int = 50  # default list length served (config.yaml postprocess.k)
    min_events: int = 3  # users with fewer events get the popularity fallback
    recent_window: int = 10
    seed: int = 0


def interaction_weights(data) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Summed KIND_WEIGHTS per (user, item) pair of `data`: (users, items, weights), sorted by user, item."""
    key = data.user.astype(np.int64) * data.n_items + data.item
    pairs, inverse = np.unique(key, return_inverse=True)
    weights = np.bincount(inverse, KIND_WEIGHTS[data.kind])
    return pairs // data.n_items, pairs % data.n_items, weights


def _solve_side(confidence, plus_one, other: np.ndarray, reg: float, chunk: int = 2048) -> np.ndarray:
    """Exact ALS update of one side: for each row r, solve
    (Y'Y + Y' diag(c_r - 1) Y + reg I) x_r = Y' c_r  (preference 1 on observed pairs).
    confidence: (R, M) csr of c - 1; plus_one: the same pattern holding c; other: (M, f) factors."""
    f = other.shape[1]
    gram = other.T @ other + reg * np.eye(f)
    outer = (other[:, :, None] * other[:, None, :]).reshape(len(other), f * f)  # y y' per item, flattened
    out = np.empty((confidence.shape[0], f))
    for start in range(0, confidence.shape[0], chunk):
        stop = min(start + chunk, confidence.shape[0])
        a = (confidence[start:stop] @ outer).reshape(-1, f, f) + gram
        b = plus_one[start:stop] @ other
        out[start:stop] = np.linalg.solve(a, b[:, :, None])[:, :, 0]
    return out


def implicit_als(users: np.ndarray, items: np.ndarray, weights: np.ndarray, n_users: int, n_items: int,
                 cfg: ALSConfig) -> tuple[np.ndarray, np.ndarray]:
    """(user factors (U, f) float32, item factors (N, f) float32) from (user, item, weight) triples."""
    from scipy import sparse

    rng = np.random.default_rng(cfg.seed)
    conf = sparse.csr_matrix((cfg.alpha * weights, (users, items)), shape=(n_users, n_items))
    plus = conf.copy()
    plus.data = plus.data + 1.0
    conf_t, plus_t = conf.T.tocsr(), plus.T.tocsr()
    x = rng.normal(0, 0.01, (n_users, cfg.factors))
    y = rng.normal(0, 0.01, (n_items, cfg.factors))
    for _ in range(cfg.iterations):
        x = _solve_side(conf, plus, y, cfg.reg)
        y = _solve_side(conf_t, plus_t, x, cfg.reg)
    return x.astype(np.float32), y.astype(np.float32)


def item_popularity(data) -> np.ndarray:
    """(N,) int64: distinct users of `data` who clicked (or liked / bought) each item."""
    pos = data.kind >= 1
    pairs = np.unique(data.user[pos].astype(np.int64) * data.n_items + data.item[pos])
    return np.bincount(pairs % data.n_items, minlength=data.n_items).astype(np.int64)


def train_histories(data, users: np.ndarray, recent_window: int):
    """operators.retrieval.UserHistory of `users` from the training split: seen items, the last
    `recent_window` events' items (oldest first) and the event count."""
    from operators.retrieval import UserHistory

    train = data.train()
    order = np.lexsort((train.ts, train.user))  # by user, then time
    u, i = train.user[order], train.item[order]
    starts = np.searchsorted(u, users)
    stops = np.searchsorted(u, users, side="right")
    ids = data.item_ids
    return [UserHistory(str(data.user_ids[user]), frozenset(ids[i[a:b]].tolist()), ids[i[max(a, b - recent_window):b]].tolist(), int(b - a))
            for user, a, b in zip(users.tolist(), starts.tolist(), stops.tolist(), strict=True)]


def ranked_rows(results, item_index, k: int) -> np.ndarray:
    """Retrieval/Ranking results -> (M, k) item rows, -1 padded."""
    out = np.full((len(results), k), -1, np.int64)
    for n, r in enumerate(results):
        rows = item_index.rows(r.item_ids[:k])
        out[n, : len(rows)] = rows
    return out


def write_artifacts(out_dir: Path, data, user_vec: np.ndarray, item_vec: np.ndarray, popularity: np.ndarray) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = {
        "item_embeddings.npy": item_vec.astype(np.float32), "item_ids.npy": data.item_ids,
        "item_categories.npy": data.item_category.astype(np.int32), "categories.npy": data.category_names,
        "item_popularity.npy": popularity.astype(np.int64),
        "user_embeddings.npy": user_vec.astype(np.float32), "user_ids.npy": data.user_ids,
    }
    for name, array in arrays.items():
        np.save(out_dir / name, np.ascontiguousarray(array), allow_pickle=False)
    return list(arrays)


def _check_config(out_dir: Path, cfg: ALSConfig) -> None:
    """The committed config.yaml must declare the dimension the recipe trains."""
    import yaml

    path = out_dir / "config.yaml"
    if path.is_file():
        dim = (yaml.safe_load(path.read_text()).get("preprocess") or {}).get("dim")
        if dim is not None and int(dim) != cfg.factors:
            raise RuntimeError(f"{path} declares dim {dim} but the recipe trains {cfg.factors} factors")


def evaluate(data, retriever, k_max: int = 50) -> dict:
    """Popularity (global, and of the user's recent categories) vs CF retrieval on the held-out split."""
    quality = recsys_quality
    users, targets = quality.heldout_targets(data)
    histories = train_histories(data, users, retriever.recent_window)
    index = retriever.item_index
    seen = [index.rows(sorted(h.seen_items)) for h in histories]
    popular = np.stack([retriever.popular_fallback(np.empty(0, np.int64), s, k_max) for s in seen])
    recent = [index.rows(h.recent_items) for h in histories]
    by_category = np.stack([retriever.popular_fallback(r, s, k_max) for r, s in zip(recent, seen, strict=True)])
    cf = ranked_rows(retriever.retrieve(histories, k=k_max), index, k_max)
    lists = {"popularity": popular, "popularity_recent_categories": by_category, "cf": cf}
    return quality.quality_table(lists, targets)


def build(out_dir: Path, data=None, cfg: ALSConfig | None = None) -> dict:
    """Train on the default synthetic log (or `data`), write the artefacts and quality.json."""
    from operators.retrieval import CFRetriever

    cfg = cfg or ALSConfig()
    _check_config(out_dir, cfg)
    started = time.perf_counter()
    if data is None:
        data = interactions.generate()
    train = data.train()
    users, items, weights = interaction_weights(train)
    user_vec, item_vec = implicit_als(users, items, weights, data.n_users, data.n_items, cfg)
    popularity = item_popularity(train)
    files = write_artifacts(out_dir, data, user_vec, item_vec, popularity)
    trained_s = time.perf_counter() - started
    retriever = CFRetriever(item_vec, data.item_ids, data.item_category, popularity, user_vec, data.user_ids,
                            k=cfg.k, min_events=cfg.min_events, recent_window=cfg.recent_window)
    table = evaluate(data, retriever)
    report = {"model": "cf-retrieval", "als": dataclasses.asdict(cfg), "train_pairs": int(len(weights)),
              "users": data.n_users, "items": data.n_items, "train_seconds": round(trained_s, 2),
              "generator": data.config, "quality": table}
    (out_dir / "quality.json").write_text(json.dumps(report, indent=2))
    return {"files": [*files, "quality.json"], "train_seconds": report["train_seconds"], "quality": table}
