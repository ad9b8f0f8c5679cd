"""DeepFM click-through-rate model for ranking retrieval candidates -> ONNX in models/deepfm-ctr/1/.

Model (Guo et al. 2017, "DeepFM"): six categorical fields (operators.ranking.FIELDS: user, item,
category, hour of day, recent-category match, popularity bucket), each with an embedding and a
first-order weight; logit = bias + first-order terms + factorisation machine (pairwise dot products
of the field embeddings) + MLP over the concatenated embeddings; output = sigmoid(logit), inside
the graph.

Training data: the impressions (`view` events) of the training split of the synthetic log, label 1
when the user clicked the item. Features come from operators.ranking.ctr_inputs, the function the
serving operator uses, so training and serving cannot drift apart. The recent-category feature
uses the user's last `recent_window` events before the session of the impression (a session ends
after `session_gap_s` without events). A share `unknown_id_rate` of rows has its user or item id
replaced by the unknown id 0, so unknown users and items get a trained embedding.

Evaluation (quality.json): AUC on held-out impressions; recall@K / NDCG@K of popularity, CF
retrieval (models/cf-retrieval/1, built first) and CF top-`candidates` reranked by this model
through operators.ranking.CandidateRanker (one ONNX session call per batch of users), with the
request hour taken from the user's first held-out event. The reranking score is log P(click) +
retrieval_weight * CF score: P(click | shown) alone ranks held-out clicks worse than CF (it ignores
whether the user would ever reach the item), which the report shows as
`cf+deepfm_click_probability_only`.
"""

import dataclasses
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import collab_filter, interactions, recsys_quality


@dataclass(frozen=True)
class DeepFMConfig:
    embed_dim: int = 16
    hidden: tuple = (128, 64)
    dropout: float = 0.1
    epochs: int = 3
    batch_size: int = 4096
    lr: float = 3e-3
    weight_decay: float = 1e-5
    unknown_id_rate: float = 0.05
    unexposed_negatives: int = 0  # per click: random catalogue items in the click's context, label 0
    retrieval_weight: float = 10.0  # ranking score = log p + weight * CF score (postprocess.retrieval_weight)
    popularity_buckets: int = 12
    recent_window: int = 10
    session_gap_s: int = 1800
    candidates: int = 200  # CF candidates reranked in the quality report
    top_k: int = 50
    seed: int = 0
    # At most 2 (the cores are shared). For this small model 1 thread is as fast as 2 on idle cores
    # and ~6x faster while another process keeps them busy (measured: 12 vs 80 ms per step).
    torch_threads: int = 1


# ------------------------------------------------------------------------------------------ data
@dataclass
class Impressions:
    """Views of a log with their context, in (user, time) order; M rows."""

    user: np.ndarray  # (M,) int64 user row
    item: np.ndarray  # (M,) int64 item row
    hour: np.ndarray  # (M,) int64 hour of day (UTC)
    recent: np.ndarray  # (M, C) int32 categories of the user's last events before the view's session
    clicked: np.ndarray  # (M,) bool
    heldout: np.ndarray  # (M,) bool


def impressions(data, cfg: DeepFMConfig) -> Impressions:
    """Every view of `data` with its context: hour, and the category histogram of the user's last
    `recent_window` events before the session of the view (sessions end after `session_gap_s`)."""
    order = np.lexsort((data.kind, data.ts, data.user))  # by user, then time
    user, item, kind, ts = data.user[order], data.item[order], data.kind[order], data.ts[order]
    n = len(user)
    new_user = np.r_[True, user[1:] != user[:-1]]
    new_session = new_user | np.r_[True, np.diff(ts) > cfg.session_gap_s]
    idx = np.arange(n)
    session_start = np.maximum.accumulate(np.where(new_session, idx, 0))
    user_start = np.maximum.accumulate(np.where(new_user, idx, 0))
    views = kind == interactions.VIEW
    hi = session_start[views]  # window = events [lo, hi) of the same user
    lo = np.maximum(user_start[views], hi - cfg.recent_window)
    cats = data.item_category[item]
    n_cat = int(data.item_category.max()) + 1
    recent = np.empty((len(hi), n_cat), np.int32)
    for c in range(n_cat):  # one category at a time: memory O(events)
        cum = np.r_[0, np.cumsum(cats == c)]
        recent[:, c] = cum[hi] - cum[lo]
    key = user.astype(np.int64) * data.n_items + item
    clicked = np.isin(key[views], key[kind == interactions.CLICK])
    return Impressions(user[views].astype(np.int64), item[views].astype(np.int64), (ts[views] // 3600) % 24,
                       recent, clicked, data.heldout[order][views])


def features(imp: Impressions, rows: np.ndarray, items: np.ndarray, item_category: np.ndarray,
             popularity_bucket: np.ndarray) -> dict[str, np.ndarray]:
    """operators.ranking.ctr_inputs for impression rows `rows` paired with `items` (their own item or another)."""
    from operators.ranking import ctr_inputs

    same = imp.recent[rows, item_category[items]]
    return ctr_inputs(imp.user[rows], items, imp.hour[rows], same, imp.recent[rows].sum(axis=1),
                      item_category, popularity_bucket)


def training_set(imp: Impressions, n_items: int, item_category: np.ndarray, popularity_bucket: np.ndarray,
                 cfg: DeepFMConfig, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Views labelled clicked / not, plus `unexposed_negatives` per click: the click's context with an
    item drawn uniformly from the catalogue, labelled 0 (the ranker scores items never shown)."""
    clicks = np.flatnonzero(imp.clicked)
    extra = np.repeat(clicks, cfg.unexposed_negatives)
    rows = np.concatenate([np.arange(len(imp.user)), extra])
    items = np.concatenate([imp.item, rng.integers(0, n_items, len(extra))])
    labels = np.concatenate([imp.clicked, np.zeros(len(extra), bool)]).astype(np.float32)
    return features(imp, rows, items, item_category, popularity_bucket), labels


# ----------------------------------------------------------------------------------------- model
def make_model(cardinalities: list[int], cfg: DeepFMConfig):
    import torch
    from torch import nn

    from operators.ranking import FIELDS

    class DeepFM(nn.Module):
        """Inputs: one (B,) int64 tensor per field, in FIELDS order. Output: (B,) click probability."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.ModuleList(nn.Embedding(n, cfg.embed_dim) for n in cardinalities)
            self.first = nn.ModuleList(nn.Embedding(n, 1) for n in cardinalities)
            for table in (*self.embed, *self.first):
                nn.init.normal_(table.weight, std=0.01)
            layers, width = [], len(cardinalities) * cfg.embed_dim
            for h in cfg.hidden:
                layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(cfg.dropout)]
                width = h
            self.mlp = nn.Sequential(*layers, nn.Linear(width, 1))
            self.bias = nn.Parameter(torch.zeros(1))

        def logit(self, *fields):
            e = torch.stack([emb(x) for emb, x in zip(self.embed, fields, strict=True)], dim=1)  # (B, F, d)
            first = torch.cat([w(x) for w, x in zip(self.first, fields, strict=True)], dim=1).sum(dim=1)
            fm = 0.5 * (e.sum(dim=1).pow(2) - e.pow(2).sum(dim=1)).sum(dim=1)  # sum of pairwise <e_i, e_j>
            return self.bias + first + fm + self.mlp(e.flatten(1)).squeeze(1)

        def forward(self, user, item, category, hour, recent, popularity):
            return torch.sigmoid(self.logit(user, item, category, hour, recent, popularity))

    assert len(cardinalities) == len(FIELDS)
    return DeepFM()


def train_model(feeds: dict[str, np.ndarray], labels: np.ndarray, cardinalities: list[int], cfg: DeepFMConfig):
    import torch

    from operators.ranking import FIELDS

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = make_model(cardinalities, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    x = torch.from_numpy(np.stack([feeds[f] for f in FIELDS], axis=1))
    y = torch.from_numpy(labels)
    losses = []
    for _ in range(cfg.epochs):
        model.train()
        perm = torch.from_numpy(rng.permutation(len(y)))
        total = 0.0
        for start in range(0, len(y), cfg.batch_size):
            batch = perm[start:start + cfg.batch_size]
            xb = x[batch].clone()
            for col in (0, 1):  # user, item -> unknown (0) for a share of rows
                drop = torch.from_numpy(rng.random(len(batch)) < cfg.unknown_id_rate)
                xb[drop, col] = 0
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model.logit(*xb.unbind(1)), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(batch)
        losses.append(total / len(y))
    return model.eval(), losses


def export_onnx(model, feeds: dict[str, np.ndarray], path: Path, n_check: int = 4096) -> float:
    """Write the ONNX graph (dynamic batch axis) and return max |p_onnx - p_torch| on real rows."""
    import onnxruntime as ort
    import torch

    from operators.ranking import FIELDS

    sample = tuple(torch.from_numpy(feeds[f][:n_check].copy()) for f in FIELDS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, sample, str(path), input_names=list(FIELDS), output_names=["probability"],
            dynamic_axes={**{f: {0: "batch"} for f in FIELDS}, "probability": {0: "batch"}},
            opset_version=17, dynamo=False,
        )
    with torch.no_grad():
        expected = model(*sample).numpy()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(["probability"], {f: feeds[f][:n_check] for f in FIELDS})[0]
    one = session.run(["probability"], {f: feeds[f][:1] for f in FIELDS})[0]  # the batch axis is dynamic
    return float(max(np.abs(got - expected).max(), abs(float(one[0]) - float(expected[0]))))


# ------------------------------------------------------------------------------------ evaluation
def heldout_auc(model, data, popularity_bucket: np.ndarray, cfg: DeepFMConfig, cf_retriever=None) -> dict:
    """AUC of click prediction on the held-out impressions (context from the whole log, so each
    impression sees the sessions before it), for this model and, when given, the CF dot product."""
    import torch
    from sklearn.metrics import roc_auc_score

    from operators.ranking import FIELDS

    imp = impressions(data, cfg)
    rows = np.flatnonzero(imp.heldout)
    feeds = features(imp, rows, imp.item[rows], data.item_category, popularity_bucket)
    labels = imp.clicked[rows]
    with torch.no_grad():
        probs = np.concatenate([model(*(torch.from_numpy(feeds[f][s:s + 65536]) for f in FIELDS)).numpy()
                                for s in range(0, len(rows), 65536)])
    out = {"impressions": len(rows), "ctr": float(labels.mean()), "deepfm": float(roc_auc_score(labels, probs))}
    if cf_retriever is not None:
        cf_score = np.einsum("ij,ij->i", np.asarray(cf_retriever.users)[imp.user[rows]], np.asarray(cf_retriever.items)[imp.item[rows]])
        out["cf_dot_product"] = float(roc_auc_score(labels, cf_score))
    return out


def evaluate_ranking(data, retriever, ranker, cfg: DeepFMConfig, batch_users: int = 256) -> dict:
    """Quality table: popularity, CF and CF top-`candidates` reranked by `ranker`, on held-out clicks."""
    from operators.ranking import RankRequest

    cf, quality = collab_filter, recsys_quality
    users, targets = quality.heldout_targets(data)
    histories = cf.train_histories(data, users, cfg.recent_window)
    test = data.test()
    first_held = np.zeros(data.n_users, np.int64)
    held_users, first = np.unique(test.user, return_index=True)  # events are in time order
    first_held[held_users] = test.ts[first]  # the request time: the user's first held-out event
    hours = (first_held[users] // 3600) % 24
    index = retriever.item_index
    seen = [index.rows(sorted(h.seen_items)) for h in histories]
    popular = np.stack([retriever.popular_fallback(np.empty(0, np.int64), s, cfg.top_k) for s in seen])
    by_category = np.stack([retriever.popular_fallback(index.rows(h.recent_items), s, cfg.top_k)
                            for h, s in zip(histories, seen, strict=True)])
    candidates = retriever.retrieve(histories, k=cfg.candidates)
    reranked = []
    for start in range(0, len(histories), batch_users):
        batch = zip(candidates[start:start + batch_users], hours[start:start + batch_users], histories[start:start + batch_users], strict=True)
        reranked += ranker.rank([RankRequest.from_retrieval(r, int(h), hist.recent_items) for r, h, hist in batch], k=cfg.candidates)
    ctr_only = [dataclasses.replace(r, item_ids=[r.item_ids[i] for i in np.argsort(-np.array(r.click_probabilities), kind="stable")])
                for r in reranked]
    lists = {"popularity": popular, "popularity_recent_categories": by_category,
             "cf": cf.ranked_rows(candidates, index, cfg.top_k), "cf+deepfm": cf.ranked_rows(reranked, index, cfg.top_k),
             "cf+deepfm_click_probability_only": cf.ranked_rows(ctr_only, index, cfg.top_k)}
    table = quality.quality_table(lists, targets)
    cand = cf.ranked_rows(candidates, index, cfg.candidates)
    table[f"cf_candidate_recall@{cfg.candidates}"] = float(quality.recall_ndcg(cand, targets, cfg.candidates)[0].mean())
    base = table["metrics"]["cf"]
    table["ratio_cf+deepfm_to_cf"] = {m: v / base[m] for m, v in table["metrics"]["cf+deepfm"].items()}
    table["sources"] = {s: sum(r.source == s for r in candidates) for s in ("cf", "popular")}
    table["retrieval_weight"] = ranker.retrieval_weight
    return table


# ----------------------------------------------------------------------------------------- build
def write_vocabularies(out_dir: Path, data, popularity_bucket: np.ndarray) -> list[str]:
    arrays = {"user_ids.npy": data.user_ids, "item_ids.npy": data.item_ids,
              "item_categories.npy": data.item_category.astype(np.int32),
              "item_popularity_bucket.npy": popularity_bucket.astype(np.int32)}
    for name, array in arrays.items():
        np.save(out_dir / name, np.ascontiguousarray(array), allow_pickle=False)
    return list(arrays)


def build(out_dir: Path, data=None, cf_dir: Path | None = None, cfg: DeepFMConfig | None = None) -> dict:
    """Train on the default synthetic log (or `data`), export model.onnx, write the feature tables
    and quality.json. Needs the CF model built from the same log in `cf_dir` (default: the sibling
    model directory cf-retrieval/1)."""
    import torch

    from operators.model_repository import LoadedModel, ModelConfig
    from operators.ranking import RECENT_BUCKETS, CandidateRanker, popularity_bucket
    from operators.retrieval import CFRetriever
    from operators.session import OnnxSession

    cfg = cfg or DeepFMConfig()
    torch.set_num_threads(cfg.torch_threads)
    started = time.perf_counter()
    cf_dir = cf_dir or out_dir.parent.parent / "cf-retrieval" / "1"
    if not (cf_dir / "item_embeddings.npy").is_file():
        raise RuntimeError(f"{cf_dir} has no item_embeddings.npy: build cf-retrieval/1 first")
    if data is None:
        data = interactions.generate()
    cf = collab_filter
    train = data.train()
    buckets = popularity_bucket(cf.item_popularity(train), cfg.popularity_buckets)
    retriever = CFRetriever.from_directory(cf_dir)
    if not np.array_equal(np.asarray(retriever.item_index.ids), data.item_ids):
        raise RuntimeError(f"{cf_dir} was built from another catalogue than this data")

    rng = np.random.default_rng(cfg.seed)
    feeds, labels = training_set(impressions(train, cfg), data.n_items, data.item_category, buckets, cfg, rng)
    n_cat = int(data.item_category.max()) + 1
    cardinalities = [data.n_users + 1, data.n_items + 1, n_cat + 1, 24, RECENT_BUCKETS, cfg.popularity_buckets]
    model, losses = train_model(feeds, labels, cardinalities, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "model.onnx"
    diff = export_onnx(model, feeds, onnx_path)
    if diff > 1e-5:
        raise RuntimeError(f"ONNX export differs from torch by {diff}")
    files = ["model.onnx", *write_vocabularies(out_dir, data, buckets)]
    train_s = time.perf_counter() - started

    auc = heldout_auc(model, data, buckets, cfg, retriever)
    config_path = out_dir / "config.yaml"
    if config_path.is_file():
        config = ModelConfig.load(out_dir)
    else:  # a scratch directory (tests): the fields the ranker reads
        config = ModelConfig(name=out_dir.parent.name, version=out_dir.name, task="ctr", directory=out_dir, preprocess={
            "user_ids": "user_ids.npy", "item_ids": "item_ids.npy", "item_categories": "item_categories.npy",
            "item_popularity_bucket": "item_popularity_bucket.npy", "recent_window": cfg.recent_window},
            postprocess={"retrieval_weight": cfg.retrieval_weight, "top_k": cfg.top_k})
    session = OnnxSession(onnx_path, providers=("cpu",), intra_op_threads=1)
    ranker = CandidateRanker(LoadedModel(config, session, []))
    table = evaluate_ranking(data, retriever, ranker, cfg)
    report = {"model": "deepfm-ctr", "deepfm": dataclasses.asdict(cfg), "train_impressions": len(labels),
              "train_ctr": float(labels.mean()), "epoch_losses": losses, "onnx_max_abs_diff_vs_torch": diff,
              "train_seconds": round(train_s, 2), "heldout_auc": auc, "cardinalities": cardinalities,
              "generator": data.config, "quality": table}
    (out_dir / "quality.json").write_text(json.dumps(report, indent=2))
    return {"files": [*files, "quality.json"], "onnx_max_abs_diff_vs_torch": diff, "train_seconds": report["train_seconds"],
            "heldout_auc": auc, "quality": table, "bytes": onnx_path.stat().st_size}
