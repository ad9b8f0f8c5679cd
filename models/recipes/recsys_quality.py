"""Offline quality of recommendation lists on the held-out split: recall@K and NDCG@K.

Targets: for each user, the items they clicked (or liked / bought) in their held-out period; users
with no such item are not evaluated. A list is ranked item rows, best first, -1 for padding.
- recall@K = |top K  ∩ targets| / |targets|
- NDCG@K with binary gains: sum over hits at rank r (1-based) of 1/log2(r + 1), divided by the same
  sum for an ideal list (min(K, |targets|) hits first). Cross-checked against sklearn's `ndcg_score`.
"""

from __future__ import annotations

import numpy as np

CLICK = 1  # interactions.CLICK: kinds >= CLICK (click, like, purchase) are positive feedback


def heldout_targets(data) -> tuple[np.ndarray, list[np.ndarray]]:
    """(users (M,) int64, targets: M arrays of item rows): held-out positive items per user."""
    test = data.test()
    pos = test.kind >= CLICK
    pairs = np.unique(test.user[pos].astype(np.int64) * data.n_items + test.item[pos])
    users, starts = np.unique(pairs // data.n_items, return_index=True)
    return users, np.split(pairs % data.n_items, starts[1:])


def recall_ndcg(lists: np.ndarray, targets: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-user recall@k and NDCG@k of (M, >= k) ranked item rows against M target arrays."""
    top = lists[:, :k]
    hits = np.array([np.isin(row, t) & (row >= 0) for row, t in zip(top, targets, strict=True)], dtype=bool).reshape(len(top), k)
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    n_targets = np.array([len(t) for t in targets])
    ideal = np.cumsum(discount)[np.minimum(n_targets, k) - 1]
    return hits.sum(axis=1) / n_targets, (hits * discount).sum(axis=1) / ideal


def sklearn_ndcg(lists: np.ndarray, targets: list[np.ndarray], k: int) -> tuple[float, int]:
    """(mean NDCG@k by sklearn.metrics.ndcg_score, users checked): the oracle for `recall_ndcg`.

    Each user's row holds the listed items (scored k, k-1, ..., 1) and the missed targets (scored 0,
    so below every listed item); items that are neither have no gain and do not change NDCG@k.
    Users whose list is shorter than k are left out (their 0-score ties would straddle rank k).
    """
    from sklearn.metrics import ndcg_score

    full = np.flatnonzero((lists[:, :k] >= 0).all(axis=1))
    width = k + max((len(targets[n]) for n in full), default=0)
    y_true, y_score = np.zeros((len(full), width)), np.zeros((len(full), width))
    for row, n in enumerate(full):
        listed = lists[n, :k]
        missed = np.setdiff1d(targets[n], listed)
        y_true[row, :k] = np.isin(listed, targets[n])
        y_true[row, k:k + len(missed)] = 1
        y_score[row, :k] = np.arange(k, 0, -1)
    return (float(ndcg_score(y_true, y_score, k=k)) if len(full) else float("nan")), len(full)


def quality_table(lists: dict[str, np.ndarray], targets: list[np.ndarray],
                  ks: tuple[int, ...] = (10, 50), baseline: str = "popularity") -> dict:
    """recall@K / NDCG@K per method, ratios to `baseline`, and the sklearn cross-check."""
    table: dict = {"users": len(targets), "metrics": {}, "ratio_to_" + baseline: {},
                   "ndcg_vs_sklearn_max_abs_diff": 0.0, "ndcg_vs_sklearn_users": {}}
    for name, ranked in lists.items():
        row = {}
        for k in ks:
            recall, ndcg = recall_ndcg(ranked, targets, k)
            row[f"recall@{k}"], row[f"ndcg@{k}"] = float(recall.mean()), float(ndcg.mean())
            full = (ranked[:, :k] >= 0).all(axis=1)
            oracle, checked = sklearn_ndcg(ranked, targets, k)
            if checked:
                diff = abs(float(ndcg[full].mean()) - oracle)
                table["ndcg_vs_sklearn_max_abs_diff"] = max(table["ndcg_vs_sklearn_max_abs_diff"], diff)
            table["ndcg_vs_sklearn_users"][f"{name}@{k}"] = checked
        table["metrics"][name] = row
    base = table["metrics"][baseline]
    for name, row in table["metrics"].items():
        if name != baseline:
            table["ratio_to_" + baseline][name] = {m: (v / base[m] if base[m] else float("inf")) for m, v in row.items()}
    if table["ndcg_vs_sklearn_max_abs_diff"] > 1e-9:
        raise RuntimeError(f"NDCG disagrees with sklearn by {table['ndcg_vs_sklearn_max_abs_diff']}")
    return table


def format_table(table: dict) -> str:
    """The metrics as a Markdown table, one row per method."""
    names = list(table["metrics"])
    cols = list(table["metrics"][names[0]])
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(f"{table['metrics'][n][c]:.4f}" for c in cols) + " |" for n in names]
    return "\n".join(lines)
