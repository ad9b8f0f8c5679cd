"""The synthetic events log (models/recipes/interactions.py): deterministic by seed, valid `events`
records, Zipf-like item popularity, skewed user activity, and a per-user time split."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from streams.schemas import parse_event

REPO = Path(__file__).resolve().parent.parent


def load_recipe(name: str):
    """A recipe module as models/build.py loads it (the package `inferstream_recipes`)."""
    spec = importlib.util.spec_from_file_location("models_build", REPO / "models" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build.load_recipe(name)


interactions = load_recipe("interactions")
SMALL = {"n_users": 1000, "n_items": 2000, "n_categories": 10, "days": 30, "mean_sessions": 5}


@pytest.fixture(scope="module")
def log():
    return interactions.generate(seed=3, **SMALL)


def test_same_seed_gives_the_same_log(log):
    again = interactions.generate(seed=3, **SMALL)
    for column in ("user", "item", "kind", "ts", "heldout", "item_category"):
        np.testing.assert_array_equal(getattr(log, column), getattr(again, column))


def test_another_seed_gives_another_log(log):
    other = interactions.generate(seed=4, **SMALL)
    assert len(other) != len(log) or not np.array_equal(other.item, log.item)


def test_records_are_valid_events(log):
    records = log.subset(np.arange(len(log)) < 500).records()
    for record in records:
        parsed = parse_event(json.dumps(record).encode())
        assert parsed["kind"] in ("view", "click", "like", "purchase")
        assert parsed["ts"].endswith("+00:00")  # a timezone, as the schema requires


def test_events_are_in_time_order(log):
    assert (np.diff(log.ts) >= 0).all()


def test_item_popularity_is_zipf_like(log):
    views = np.sort(np.bincount(log.item[log.kind == interactions.VIEW], minlength=log.n_items))[::-1]
    top_1pct = views[: log.n_items // 100].sum() / views.sum()
    assert top_1pct > 0.08  # 8x the uniform share
    ranks = np.arange(1, log.n_items // 5 + 1)  # the head of the rank-frequency curve is a power law
    slope = np.polyfit(np.log(ranks), np.log(views[: len(ranks)]), 1)[0]
    assert slope < -0.5


def test_user_activity_is_skewed(log):
    per_user = np.sort(np.bincount(log.user, minlength=log.n_users))[::-1]
    assert per_user[: log.n_users // 10].sum() / per_user.sum() > 0.25
    assert per_user[0] > 8 * np.median(per_user)


def test_activity_sigma_controls_the_skew(log):
    flat = interactions.generate(seed=3, activity_sigma=0.0, **SMALL)
    share = lambda d: np.sort(np.bincount(d.user, minlength=d.n_users))[::-1][: d.n_users // 10].sum() / len(d)  # noqa: E731
    assert share(flat) < share(log) - 0.05


def test_clicks_are_a_minority_of_views_and_follow_a_view(log):
    views = log.user[log.kind == interactions.VIEW].astype(np.int64) * log.n_items + log.item[log.kind == interactions.VIEW]
    clicks = log.user[log.kind == interactions.CLICK].astype(np.int64) * log.n_items + log.item[log.kind == interactions.CLICK]
    assert 0.05 < len(clicks) / len(views) < 0.4
    assert np.isin(clicks, views).all()


def test_the_feed_never_shows_an_item_twice(log):
    views = log.user[log.kind == interactions.VIEW].astype(np.int64) * log.n_items + log.item[log.kind == interactions.VIEW]
    assert len(np.unique(views)) == len(views)


def test_heldout_events_come_after_every_training_event_of_the_user(log):
    last_train = np.full(log.n_users, -1, np.int64)
    np.maximum.at(last_train, log.user[~log.heldout], log.ts[~log.heldout])
    first_held = np.full(log.n_users, np.iinfo(np.int64).max)
    np.minimum.at(first_held, log.user[log.heldout], log.ts[log.heldout])
    assert (last_train < first_held).all()
    assert 0.1 < log.heldout.mean() < 0.3


def test_jsonl_round_trip(log, tmp_path):
    interactions.write_jsonl(log, tmp_path)
    back = interactions.read_jsonl(tmp_path)
    np.testing.assert_array_equal(back.user_ids[back.user], log.user_ids[log.user])
    np.testing.assert_array_equal(back.item_ids[back.item], log.item_ids[log.item])
    np.testing.assert_array_equal(back.category_names[back.item_category], log.category_names[log.item_category])
    for column in ("kind", "ts", "heldout"):
        np.testing.assert_array_equal(getattr(back, column), getattr(log, column))


def test_cli_writes_the_split_and_the_catalogue(tmp_path, capsys):
    assert interactions.main(["--out", str(tmp_path), "--users", "50", "--items", "40", "--categories", "4"]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"train.jsonl", "heldout.jsonl", "items.jsonl", "manifest.json"}
    assert json.loads(capsys.readouterr().out)["users"] == 50
