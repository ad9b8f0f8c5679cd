"""Synthetic implicit-feedback logs for the recommendation models: `events` records (schema
`inferstream.event.v1`) drawn from a latent-factor model with popularity skew.

The world the generator simulates (every knob is a `GeneratorConfig` field):

- A catalogue of `n_items` items in `n_categories` categories. Category sizes follow a Zipf law
  (`category_size_exponent`); each item's exposure weight follows a Zipf law over a random
  popularity rank (`item_popularity_exponent`: weight of rank r is r^-s), so a few items get most of
  the traffic. Items have a latent vector (its category's centroid plus noise, `item_noise`) and a
  quality offset (`item_quality_sigma`).
- `n_users` users with a taste over categories (Dirichlet, `user_category_concentration`: small means
  a few favourite categories) and a latent vector (taste-weighted centroids plus noise, `user_noise`).
  Activity is skewed: a user's expected number of sessions is log-normal around `mean_sessions` with
  log-scale spread `activity_sigma`; a user has a preferred time of day (evening, lunch or morning
  people) and each session starts near it.
- A session happens on a random day of `days` and has a category drawn from the user's taste,
  re-weighted by the hour (`hour_amplitude`: each category has a peak hour). The feed shows about
  `mean_impressions` items, each drawn with probability proportional to
  exposure weight * exp(feed_affinity_weight * standardised <user, item>) (the platform's current
  feed follows taste as well as popularity), a share `session_category_share` of them within the
  session's category. The feed never shows a user an item twice: a slot takes the first of
  `FEED_TRIES` draws the user has not been shown (heavy users exhaust their favourite items).
- Each shown item is a `view`. The user clicks it with probability
  sigmoid(base_click_logit + affinity_weight * standardised <user, item>
          + session_match_weight * [item in the session's category]
          + hour_amplitude * cos(2 pi (hour - peak hour of the item's category) / 24) + item quality).
  A click may be followed by a `like` (about `like_rate`) and a `purchase` (about `purchase_rate`),
  both more likely for items the user has a high affinity with.
- Train / held-out split by time per user: the last `heldout_fraction` of each user's sessions (at
  least one when the user has two or more) is held out; everything from the first held-out session on
  is held out. Users with one session are training-only.

Everything is drawn from one `numpy.random.Generator(seed)`: the same config gives the same events.
Timestamps are UTC, ISO-8601 with `Z`.

CLI (writes train.jsonl, heldout.jsonl, items.jsonl and manifest.json):
    .venv/bin/python models/recipes/interactions.py --out .cache/recsys --users 6000 --items 3000 --seed 0
"""


import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

EVENT_SCHEMA = "inferstream.event.v1"  # streams.schemas.EVENT_SCHEMA (recipes stay independent of streams/)
EVENT_KINDS = ("view", "click", "like", "purchase")
VIEW, CLICK, LIKE, PURCHASE = range(4)
FEED_TRIES = 4  # draws per feed slot before the slot stays empty (the user has seen them all)


@dataclass(frozen=True)
class GeneratorConfig:
    n_users: int = 6000
    n_items: int = 3000
    n_categories: int = 20
    latent_dim: int = 16
    item_popularity_exponent: float = 1.0  # Zipf s of exposure weight over popularity rank
    category_size_exponent: float = 0.7  # Zipf s of the number of items per category
    item_noise: float = 0.6  # item latent = category centroid + item_noise * N(0, I/d)
    item_quality_sigma: float = 0.5  # per-item click-logit offset
    user_category_concentration: float = 0.3  # Dirichlet alpha of category taste
    user_noise: float = 0.6  # user latent = taste-weighted centroids + user_noise * N(0, I/d)
    mean_sessions: float = 8.0  # expected sessions of an average user
    activity_sigma: float = 1.0  # log-normal sigma of user activity (0: everyone equally active)
    mean_impressions: float = 10.0  # items shown per session (1 + Poisson)
    session_category_share: float = 0.6  # share of a session's feed from the session's category
    feed_affinity_weight: float = 1.5  # how much the feed follows the user's taste (0: popularity only)
    hour_amplitude: float = 0.8  # 0..1: how much a category's appeal depends on the hour of day
    base_click_logit: float = -4.2
    affinity_weight: float = 1.5  # click logit per standard deviation of <user, item>
    session_match_weight: float = 1.0  # click logit bonus for items in the session's category
    like_rate: float = 0.15  # P(like | click) at average affinity
    purchase_rate: float = 0.05  # P(purchase | click) at average affinity and quality
    days: int = 60
    start: str = "2024-01-01T00:00:00+00:00"
    heldout_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_users < 1 or self.n_items < self.n_categories or self.n_categories < 1:
            raise ValueError("need n_users >= 1 and n_items >= n_categories >= 1")
        if not 0 <= self.heldout_fraction < 1 or not 0 <= self.session_category_share <= 1:
            raise ValueError("heldout_fraction must be in [0, 1) and session_category_share in [0, 1]")
        if not 0 <= self.hour_amplitude <= 1 or self.days < 1:
            raise ValueError("hour_amplitude must be in [0, 1] and days >= 1")


@dataclass
class Interactions:
    """An event log in columns, with its catalogue. Row `e` is one event: user `user_ids[user[e]]`
    did `EVENT_KINDS[kind[e]]` on item `item_ids[item[e]]` at unix second `ts[e]` (non-decreasing)."""

    user_ids: np.ndarray  # (U,) str
    item_ids: np.ndarray  # (N,) str
    item_category: np.ndarray  # (N,) int32, index into category_names
    category_names: np.ndarray  # (C,) str
    user: np.ndarray  # (E,) int32
    item: np.ndarray  # (E,) int32
    kind: np.ndarray  # (E,) int8, index into EVENT_KINDS
    ts: np.ndarray  # (E,) int64 unix seconds
    heldout: np.ndarray  # (E,) bool: in the user's held-out (later) period
    config: dict = field(default_factory=dict)
    truth: dict = field(default_factory=dict)  # the hidden world (latent vectors, ...), for diagnostics only

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def __len__(self) -> int:
        return len(self.user)

    def subset(self, mask: np.ndarray) -> "Interactions":
        """The events where `mask` is true, same users and catalogue."""
        cols = {k: getattr(self, k)[mask] for k in ("user", "item", "kind", "ts", "heldout")}
        return dataclasses.replace(self, **cols)

    def train(self) -> "Interactions":
        return self.subset(~self.heldout)

    def test(self) -> "Interactions":
        return self.subset(self.heldout)

    def records(self) -> list[dict]:
        """The events as `events` records (dicts), in time order."""
        stamps = np.datetime_as_string(self.ts.astype("datetime64[s]"), unit="s", timezone="UTC")
        kinds = np.asarray(EVENT_KINDS)[self.kind]
        return [
            {"schema": EVENT_SCHEMA, "user_id": u, "item_id": i, "kind": k, "ts": t}
            for u, i, k, t in zip(self.user_ids[self.user].tolist(), self.item_ids[self.item].tolist(),
                                  kinds.tolist(), stamps.tolist(), strict=True)
        ]


# ------------------------------------------------------------------------------------ generation
def _zipf_weights(n: int, s: float, rng: np.random.Generator) -> np.ndarray:
    """(n,) weights r^-s over a random permutation of ranks 1..n, normalised to sum 1."""
    ranks = rng.permutation(n) + 1
    w = ranks.astype(np.float64) ** -s
    return w / w.sum()


def _categorical_rows(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row of (R, C) probabilities (rows sum to 1) -> (R,) int."""
    u = rng.random(len(p))[:, None]
    return np.minimum((np.cumsum(p, axis=1) < u).sum(axis=1), p.shape[1] - 1)


def _draw_feed(user_vec: np.ndarray, item_vec: np.ndarray, item_cat: np.ndarray, exposure: np.ndarray, weight: float,
               aff_stats: tuple[float, float], imp_user: np.ndarray, imp_cat: np.ndarray, from_cat: np.ndarray,
               u: np.ndarray, chunk: int = 512) -> np.ndarray:
    """(M,) item of each impression. Impression m of user imp_user[m] draws from
    p(i) ~ exposure[i] * exp(weight * standardised <user, item>), within category imp_cat[m] where
    from_cat[m]; u: (M,) uniforms in [0, 1). Inverse-CDF sampling, many users per matrix product: the
    per-user cumulative weights, offset by the user's row (and category), form one sorted array."""
    n_i, n_c = len(item_vec), int(item_cat.max()) + 1
    by_cat = np.lexsort((np.arange(n_i), item_cat))  # items grouped by category
    cats = item_cat[by_cat]
    counts = np.bincount(item_cat, minlength=n_c)
    first, last = np.cumsum(counts) - counts, np.cumsum(counts) - 1
    out = np.empty(len(imp_user), np.int64)
    order = np.argsort(imp_user, kind="stable")
    for start in range(0, len(user_vec), chunk):
        stop = min(start + chunk, len(user_vec))
        idx = order[slice(*np.searchsorted(imp_user[order], [start, stop]))]
        affinity = (user_vec[start:stop] @ item_vec[by_cat].T - aff_stats[0]) / aff_stats[1]
        w = exposure[by_cat] * np.exp(weight * affinity)  # (users, N)
        cum = np.cumsum(w, axis=1)
        whole = cum / cum[:, -1:]
        whole[:, -1] = 1.0
        before = cum[:, first] - w[:, first]  # (users, C) weight before each category's run
        within = np.minimum((cum - before[:, cats]) / (cum[:, last] - before)[:, cats], 1.0)
        within[:, last] = 1.0
        rows = np.arange(stop - start)[:, None]
        r = imp_user[idx] - start
        in_whole = np.searchsorted((rows + whole).ravel(), r + u[idx], side="right")
        in_cat = np.searchsorted((rows * n_c + cats + within).ravel(), r * n_c + imp_cat[idx] + u[idx], side="right")
        out[idx] = by_cat[np.clip(np.where(from_cat[idx], in_cat, in_whole) - r * n_i, 0, n_i - 1)]
    return out


def _first_unseen(user: np.ndarray, drawn: np.ndarray, order: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Walk the slots in `order` (time order); each shows its first drawn item the user has not been
    shown before, or nothing when all its draws were shown. Returns (slots that show something, in
    that order; their items). user: (M,) int; drawn: (M, tries) int."""
    shown: set[int] = set()
    slots, items = [], []
    base = user.astype(np.int64) * n_items
    for m, b, row in zip(order.tolist(), base[order].tolist(), drawn[order].tolist(), strict=True):
        for item in row:
            if b + item not in shown:
                shown.add(b + item)
                slots.append(m)
                items.append(item)
                break
    return np.array(slots, np.int64), np.array(items, np.int64)


def generate(config: GeneratorConfig | None = None, **overrides) -> Interactions:
    """Draw a log from `config` (defaults, with `overrides` applied). Deterministic in `config.seed`."""
    cfg = dataclasses.replace(config or GeneratorConfig(), **overrides)
    rng = np.random.default_rng(cfg.seed)
    n_u, n_i, n_c, d = cfg.n_users, cfg.n_items, cfg.n_categories, cfg.latent_dim

    # catalogue: Zipf category sizes (every category non-empty), Zipf exposure weights
    cat_p = _zipf_weights(n_c, cfg.category_size_exponent, rng)
    item_cat = np.concatenate([np.arange(n_c), rng.choice(n_c, n_i - n_c, p=cat_p)]).astype(np.int32)
    rng.shuffle(item_cat)
    exposure = _zipf_weights(n_i, cfg.item_popularity_exponent, rng)
    centroids = rng.normal(size=(n_c, d)) / np.sqrt(d) * 1.5
    item_vec = centroids[item_cat] + cfg.item_noise * rng.normal(size=(n_i, d)) / np.sqrt(d)
    quality = cfg.item_quality_sigma * rng.normal(size=n_i)
    peak_hour = rng.uniform(0, 24, n_c)

    # users: category taste, latent vector, activity and preferred hour
    taste = rng.dirichlet(np.full(n_c, cfg.user_category_concentration), n_u)
    user_vec = taste @ centroids + cfg.user_noise * rng.normal(size=(n_u, d)) / np.sqrt(d)
    activity = cfg.mean_sessions * np.exp(cfg.activity_sigma * rng.normal(size=n_u) - cfg.activity_sigma**2 / 2)
    n_sessions = np.maximum(1, rng.poisson(activity))
    habit = rng.choice(3, n_u, p=[0.6, 0.25, 0.15])  # evening, lunch, morning people
    user_hour = np.array([20.0, 12.5, 8.0])[habit] + rng.normal(0, 1.5, n_u)

    # sessions: user, hour, category (taste x hour-of-day appeal), start second
    s_user = np.repeat(np.arange(n_u), n_sessions)
    n_s = len(s_user)
    s_hour = np.floor(user_hour[s_user] + rng.normal(0, 2.5, n_s)).astype(np.int64) % 24
    appeal = 1 + cfg.hour_amplitude * np.cos(2 * np.pi * (s_hour[:, None] - peak_hour[None, :]) / 24)
    p_cat = taste[s_user] * appeal + 1e-12
    s_cat = _categorical_rows(p_cat / p_cat.sum(axis=1, keepdims=True), rng)
    t0 = int(datetime.fromisoformat(cfg.start).timestamp())
    s_start = t0 + rng.integers(0, cfg.days, n_s) * 86400 + s_hour * 3600 + rng.integers(0, 3600, n_s)

    # feed: impressions from p(item | user) ~ exposure * exp(feed_affinity_weight * affinity), restricted
    # to the session's category for a share of them
    pairs = rng.integers(0, [n_u, n_i], size=(100_000, 2))
    raw_sample = np.einsum("ij,ij->i", user_vec[pairs[:, 0]], item_vec[pairs[:, 1]])
    aff_mean, aff_std = raw_sample.mean(), raw_sample.std() + 1e-12
    s_len = 1 + rng.poisson(max(cfg.mean_impressions - 1, 0), n_s)
    imp_s = np.repeat(np.arange(n_s), s_len)
    pos = np.arange(len(imp_s)) - np.repeat(np.cumsum(s_len) - s_len, s_len)
    tries = np.repeat(imp_s, FEED_TRIES)  # a few draws per slot: the feed shows the first one not yet shown
    drawn = _draw_feed(user_vec, item_vec, item_cat, exposure, cfg.feed_affinity_weight, (aff_mean, aff_std),
                       s_user[tries], s_cat[tries], rng.random(len(tries)) < cfg.session_category_share,
                       rng.random(len(tries))).reshape(-1, FEED_TRIES)
    imp_user = s_user[imp_s]
    imp_ts = s_start[imp_s] + pos * 20 + rng.integers(0, 20, len(imp_s))
    keep, imp_item = _first_unseen(imp_user, drawn, np.lexsort((pos, imp_ts, imp_user)), n_i)
    imp_s, imp_user, imp_item, imp_ts = imp_s[keep], imp_user[keep], imp_item, imp_ts[keep]

    # clicks, likes, purchases
    affinity = (np.einsum("ij,ij->i", user_vec[imp_user], item_vec[imp_item]) - aff_mean) / aff_std
    hour_fit = np.cos(2 * np.pi * (s_hour[imp_s] - peak_hour[item_cat[imp_item]]) / 24)
    logit = (cfg.base_click_logit + cfg.affinity_weight * affinity + quality[imp_item] + cfg.hour_amplitude * hour_fit
             + cfg.session_match_weight * (item_cat[imp_item] == s_cat[imp_s]))
    clicked = rng.random(len(logit)) < 1 / (1 + np.exp(-logit))
    liked = clicked & (rng.random(len(logit)) < np.clip(cfg.like_rate * np.exp(0.5 * affinity), 0, 1))
    bought = clicked & (rng.random(len(logit)) < np.clip(cfg.purchase_rate * np.exp(0.5 * affinity + quality[imp_item]), 0, 1))
    click_ts = imp_ts + rng.integers(2, 12, len(imp_ts))
    parts = [(np.ones_like(clicked), VIEW, imp_ts), (clicked, CLICK, click_ts),
             (liked, LIKE, click_ts + rng.integers(5, 60, len(imp_ts))),
             (bought, PURCHASE, click_ts + rng.integers(30, 300, len(imp_ts)))]
    user = np.concatenate([imp_user[m] for m, _, _ in parts]).astype(np.int32)
    item = np.concatenate([imp_item[m] for m, _, _ in parts]).astype(np.int32)
    kind = np.concatenate([np.full(int(m.sum()), k, np.int8) for m, k, _ in parts])
    ts = np.concatenate([t[m] for m, _, t in parts]).astype(np.int64)
    order = np.lexsort((kind, item, user, ts))
    user, item, kind, ts = user[order], item[order], kind[order], ts[order]

    # held-out: from the start of each user's first held-out session on
    n_held = np.where(n_sessions >= 2, np.clip(np.floor(cfg.heldout_fraction * n_sessions + 0.5), 1, n_sessions - 1), 0)
    by_start = np.lexsort((s_start, s_user))
    session_rank = np.arange(n_s) - np.repeat(np.cumsum(n_sessions) - n_sessions, n_sessions)
    cutoff = np.full(n_u, np.iinfo(np.int64).max)
    first_held = session_rank == (n_sessions - n_held)[s_user[by_start]]
    cutoff[s_user[by_start][first_held]] = s_start[by_start][first_held]
    heldout = ts >= cutoff[user]

    width_u, width_i = len(str(n_u - 1)), len(str(n_i - 1))
    return Interactions(
        user_ids=np.array([f"u{i:0{width_u}d}" for i in range(n_u)]),
        item_ids=np.array([f"i{i:0{width_i}d}" for i in range(n_i)]),
        item_category=item_cat,
        category_names=np.array([f"c{i:02d}" for i in range(n_c)]),
        user=user, item=item, kind=kind, ts=ts, heldout=heldout, config=dataclasses.asdict(cfg),
        truth={"user_vec": user_vec, "item_vec": item_vec, "exposure": exposure, "quality": quality, "taste": taste,
               "peak_hour": peak_hour, "affinity_mean_std": (aff_mean, aff_std)},
    )


# ------------------------------------------------------------------------------------------- files
def write_jsonl(data: Interactions, out_dir: Path) -> dict[str, Path]:
    """train.jsonl / heldout.jsonl (events, time order), items.jsonl (catalogue), manifest.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"train": out_dir / "train.jsonl", "heldout": out_dir / "heldout.jsonl",
             "items": out_dir / "items.jsonl", "manifest": out_dir / "manifest.json"}
    for name, part in (("train", data.train()), ("heldout", data.test())):
        with paths[name].open("w") as f:
            f.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in part.records())
    cats = data.category_names[data.item_category].tolist()
    with paths["items"].open("w") as f:
        f.writelines(json.dumps({"item_id": i, "category": c}, separators=(",", ":")) + "\n"
                     for i, c in zip(data.item_ids.tolist(), cats, strict=True))
    manifest = {"config": data.config, "events": len(data), "heldout_events": int(data.heldout.sum()),
                "users": data.n_users, "items": data.n_items, "categories": len(data.category_names)}
    paths["manifest"].write_text(json.dumps(manifest, indent=2))
    return paths


def _unix_seconds(stamps: list[str]) -> np.ndarray:
    return np.array([int(datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()) for s in stamps], np.int64)


def read_jsonl(directory: Path) -> Interactions:
    """Read back what `write_jsonl` wrote (or any events + catalogue in the same layout)."""
    items = [json.loads(line) for line in (directory / "items.jsonl").read_text().splitlines() if line]
    item_ids = np.array([r["item_id"] for r in items])
    category_names, item_category = np.unique(np.array([r["category"] for r in items]), return_inverse=True)
    events, held = [], []
    for name, flag in (("train.jsonl", False), ("heldout.jsonl", True)):
        rows = [json.loads(line) for line in (directory / name).read_text().splitlines() if line]
        events += rows
        held += [flag] * len(rows)
    user_ids, user = np.unique(np.array([e["user_id"] for e in events]), return_inverse=True)
    item_pos = {i: n for n, i in enumerate(item_ids.tolist())}
    item = np.array([item_pos[e["item_id"]] for e in events], np.int32)
    kind = np.array([EVENT_KINDS.index(e["kind"]) for e in events], np.int8)
    ts = _unix_seconds([e["ts"] for e in events])
    order = np.lexsort((kind, item, user, ts))
    manifest = directory / "manifest.json"
    config = json.loads(manifest.read_text())["config"] if manifest.is_file() else {}
    return Interactions(user_ids=user_ids, item_ids=item_ids, item_category=item_category.astype(np.int32),
                        category_names=category_names, user=user[order].astype(np.int32), item=item[order],
                        kind=kind[order], ts=ts[order], heldout=np.array(held)[order], config=config)


def summary(data: Interactions) -> dict:
    """Counts and skew statistics of a log (what the tests and the build report check)."""
    views = np.bincount(data.item[data.kind == VIEW], minlength=data.n_items)
    per_user = np.bincount(data.user, minlength=data.n_users)
    top = np.sort(views)[::-1]
    clicks = int((data.kind == CLICK).sum())
    return {
        "events": len(data), "users": data.n_users, "items": data.n_items,
        "by_kind": {k: int((data.kind == i).sum()) for i, k in enumerate(EVENT_KINDS)},
        "ctr": clicks / max(1, int((data.kind == VIEW).sum())),
        "top_1pct_items_view_share": float(top[: max(1, data.n_items // 100)].sum() / max(1, top.sum())),
        "top_10pct_users_event_share": float(np.sort(per_user)[::-1][: max(1, data.n_users // 10)].sum() / max(1, len(data))),
        "heldout_events": int(data.heldout.sum()),
        "users_with_heldout": int(len(np.unique(data.user[data.heldout]))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a synthetic events log (train/heldout JSONL + catalogue).")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--users", type=int, default=GeneratorConfig.n_users)
    parser.add_argument("--items", type=int, default=GeneratorConfig.n_items)
    parser.add_argument("--categories", type=int, default=GeneratorConfig.n_categories)
    parser.add_argument("--sessions", type=float, default=GeneratorConfig.mean_sessions, help="mean sessions per user")
    parser.add_argument("--days", type=int, default=GeneratorConfig.days)
    parser.add_argument("--seed", type=int, default=GeneratorConfig.seed)
    args = parser.parse_args(argv)
    data = generate(n_users=args.users, n_items=args.items, n_categories=args.categories,
                    mean_sessions=args.sessions, days=args.days, seed=args.seed)
    paths = write_jsonl(data, args.out)
    print(json.dumps({"written": {k: str(p) for k, p in paths.items()}, **summary(data)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
