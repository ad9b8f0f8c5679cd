"""CF retrieval: chunked top-K by dot product against a brute-force full sort, exclusions, ties,
and the cold-start fallback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from operators.retrieval import CFRetriever, IdIndex, Retrieval, UserHistory, top_k_dot

REPO = Path(__file__).resolve().parent.parent


def brute_force(queries: np.ndarray, items: np.ndarray, k: int, exclude=None) -> tuple[np.ndarray, np.ndarray]:
    """Every score, excluded ones -inf, one stable sort per query (ties: lower row first)."""
    scores = queries @ np.asarray(items).T
    for q, rows in enumerate(exclude or []):
        scores[q, rows] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(scores, order, axis=1)
    order[np.isneginf(top)] = -1
    if order.shape[1] < k:
        order = np.pad(order, ((0, 0), (0, k - order.shape[1])), constant_values=-1)
        top = np.pad(top, ((0, 0), (0, k - top.shape[1])), constant_values=-np.inf)
    return order, top


def random_exclusions(rng, n_queries: int, n_items: int, most: int) -> list[np.ndarray]:
    return [rng.choice(n_items, rng.integers(0, most), replace=False) for _ in range(n_queries)]


@pytest.fixture(scope="module")
def tied_catalogue():
    """100,000 items with small integer coordinates: exact float products and many tied scores."""
    rng = np.random.default_rng(0)
    items = rng.integers(-2, 3, (100_000, 8)).astype(np.float32)
    queries = rng.integers(-2, 3, (48, 8)).astype(np.float32)
    return items, queries, random_exclusions(rng, len(queries), len(items), 400)


def test_equals_brute_force_on_100k_items_with_ties_and_exclusions(tied_catalogue):
    items, queries, exclude = tied_catalogue
    rows, scores = top_k_dot(queries, items, 50, exclude, chunk_items=16_384)
    want_rows, want_scores = brute_force(queries, items, 50, exclude)
    assert (np.diff(want_scores[:, :2], axis=1) == 0).any()  # the test really has ties at the top
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(scores, want_scores)


def test_equals_brute_force_on_random_float_embeddings():
    rng = np.random.default_rng(1)
    items = rng.normal(size=(100_000, 16)).astype(np.float32)
    queries = rng.normal(size=(32, 16)).astype(np.float32)
    exclude = random_exclusions(rng, len(queries), len(items), 300)
    rows, scores = top_k_dot(queries, items, 50, exclude)
    want_rows, want_scores = brute_force(queries, items, 50, exclude)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 7, 50, 999, 2_000, 10**6])
def test_chunk_size_does_not_change_the_result(chunk):
    rng = np.random.default_rng(2)
    items = rng.integers(-1, 2, (2_000, 4)).astype(np.float32)
    queries = rng.integers(-1, 2, (9, 4)).astype(np.float32)
    exclude = random_exclusions(rng, len(queries), len(items), 100)
    rows, scores = top_k_dot(queries, items, 25, exclude, chunk_items=chunk)
    want_rows, want_scores = brute_force(queries, items, 25, exclude)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(scores, want_scores)


def test_large_catalogue_results_do_not_depend_on_the_chunk(tied_catalogue):
    items, queries, exclude = tied_catalogue
    a = top_k_dot(queries, items, 30, exclude, chunk_items=4_096)
    b = top_k_dot(queries, items, 30, exclude, chunk_items=65_536)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_ties_go_to_the_lower_item_row():
    items = np.array([[1, 0], [3, 0], [2, 0], [3, 0], [3, 0]], np.float32)
    rows, scores = top_k_dot(np.array([[1, 0]], np.float32), items, k=3, chunk_items=2)
    assert rows.tolist() == [[1, 3, 4]]
    assert scores.tolist() == [[3, 3, 3]]


def test_exhausted_catalogue_pads_with_minus_one():
    items = np.eye(3, dtype=np.float32)
    rows, scores = top_k_dot(np.ones((2, 3), np.float32), items, k=5, exclude=[np.array([0, 2]), np.array([], int)])
    assert rows.tolist() == [[1, -1, -1, -1, -1], [0, 1, 2, -1, -1]]
    assert np.isneginf(scores[0, 1:]).all() and np.isneginf(scores[1, 3:]).all()


def test_memory_mapped_item_matrix_gives_the_same_result(tmp_path, tied_catalogue):
    items, queries, exclude = tied_catalogue
    np.save(tmp_path / "items.npy", items)
    mapped = np.load(tmp_path / "items.npy", mmap_mode="r")
    np.testing.assert_array_equal(top_k_dot(queries, mapped, 10, exclude)[0], top_k_dot(queries, items, 10, exclude)[0])


def test_nan_queries_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        top_k_dot(np.array([[np.nan, 0]], np.float32), np.ones((4, 2), np.float32), 2)


def test_id_index_maps_many_ids_at_once():
    index = IdIndex(np.array(["i2", "i0", "i1"]))
    assert index.rows(["i1", "nope", "i2", "i0"]).tolist() == [2, -1, 0, 1]
    assert index.rows([]).tolist() == []
    with pytest.raises(ValueError, match="unique"):
        IdIndex(np.array(["a", "a"]))


# ------------------------------------------------------------------------------------ retriever
@pytest.fixture
def retriever() -> CFRetriever:
    """6 items in 2 categories (0: i0-i2, 1: i3-i5), popularity i1 > i4 > i0 > i5 > i2 > i3; user u0
    likes category 0, u1 category 1."""
    items = np.array([[1, 0], [2, 0], [3, 0], [0, 1], [0, 2], [0, 3]], np.float32)
    users = np.array([[1, 0], [0, 1]], np.float32)
    return CFRetriever(items, np.array([f"i{i}" for i in range(6)]), np.array([0, 0, 0, 1, 1, 1]),
                       np.array([30, 50, 10, 5, 40, 20]), users, np.array(["u0", "u1"]), k=3, min_events=2)


def test_known_users_get_top_k_by_dot_product_without_seen_items(retriever):
    got = retriever.retrieve([UserHistory("u0", {"i2", "i9"}, n_events=5), UserHistory("u1", (), n_events=2)])
    assert got[0] == Retrieval("u0", ["i1", "i0", "i3"], [2.0, 1.0, 0.0], "cf")
    assert got[1].item_ids == ["i5", "i4", "i3"] and got[1].source == "cf"


def test_unknown_user_gets_popular_items_of_recent_categories_then_global(retriever):
    (got,) = retriever.retrieve([UserHistory("new", seen_items={"i5"}, recent_items=["i3", "unknown-item"], n_events=9)])
    assert got.source == "popular"
    assert got.item_ids == ["i4", "i3", "i1"]  # category 1 by popularity (i5 seen), then the most popular
    assert got.scores == [40.0, 5.0, 50.0]


def test_user_with_too_few_events_gets_the_fallback(retriever):
    (got,) = retriever.retrieve([UserHistory("u0", seen_items={"i1"}, recent_items=["i1"])])  # 1 event < 2
    assert got.source == "popular" and got.item_ids == ["i0", "i2", "i4"]


def test_user_without_history_gets_globally_popular_items(retriever):
    (got,) = retriever.retrieve([UserHistory("nobody")], k=4)
    assert got.item_ids == ["i1", "i4", "i0", "i5"]


def test_fallback_returns_fewer_items_when_everything_was_seen(retriever):
    seen = {f"i{i}" for i in range(5)}
    (got,) = retriever.retrieve([UserHistory("nobody", seen, ["i0"], n_events=1)])
    assert got.item_ids == ["i5"]


def test_batch_keeps_input_order_and_mixes_cf_and_fallback(retriever):
    got = retriever.retrieve([UserHistory("x"), UserHistory("u1", n_events=3), UserHistory("u0", n_events=3)])
    assert [r.user_id for r in got] == ["x", "u1", "u0"]
    assert [r.source for r in got] == ["popular", "cf", "cf"]


def test_result_as_dict_is_json(retriever):
    (got,) = retriever.retrieve([UserHistory("u0", n_events=3)])
    assert json.loads(json.dumps(got.as_dict())) == {"user_id": "u0", "source": "cf", "item_ids": ["i2", "i1", "i0"],
                                                     "scores": [3.0, 2.0, 1.0]}


def test_loads_a_model_directory_with_the_committed_config(tmp_path, retriever):
    directory = tmp_path / "cf-retrieval" / "1"
    directory.mkdir(parents=True)
    shutil.copy(REPO / "models" / "cf-retrieval" / "1" / "config.yaml", directory)
    rng = np.random.default_rng(0)
    arrays = {"item_embeddings": rng.normal(size=(20, 32)).astype(np.float32), "item_ids": np.array([f"i{i}" for i in range(20)]),
              "item_categories": np.arange(20) % 3, "categories": np.array(["a", "b", "c"]), "item_popularity": np.arange(20),
              "user_embeddings": rng.normal(size=(4, 32)).astype(np.float32), "user_ids": np.array(["a", "b", "c", "d"])}
    for name, array in arrays.items():
        np.save(directory / f"{name}.npy", array)
    loaded = CFRetriever.from_directory(directory)
    assert isinstance(loaded.items, np.memmap)
    (got,) = loaded.retrieve([UserHistory("b", n_events=5)], k=5)
    want, _ = brute_force(arrays["user_embeddings"][1:2], arrays["item_embeddings"], 5)
    assert got.item_ids == [f"i{i}" for i in want[0]]
