"""Tokenization, padding, attention masks and length bucketing against the tokenizers library's own
padding/truncation (oracle), and the transformer TextClassifier path on a tiny generated ONNX model
whose output is computed independently in numpy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from tiny_text_models import (
    MINILM_TOKENIZER,
    text_classifier_oracle,
    text_classifier_weights,
    tiny_text_classifier,
    write_text_model,
)
from tokenizers import Tokenizer

from operators.errors import BadInput
from operators.model_repository import ModelConfigError, ModelRepository
from operators.text import TextClassification, TextClassifier
from operators.tokens import TextTokenizer, check_text, length_buckets, pad_batch

TEXTS = [
    "hello world",
    "",
    "Héllo Zoë, naïve café! Привет мир 東京タワー 🎉👍🏽",
    "O'Brien emailed bob@example.com at 10:30 about order #12345.",
    "a " * 300,  # past any max_length used here
    "Jose\u0301 said नमस्ते and مرحبا بالعالم",
    "short",
    "the quick brown fox jumps over the lazy dog " * 3,
]
LABELS = ["negative", "neutral", "positive"]


def _oracle_tokenizer(max_length: int, padding: bool) -> Tokenizer:
    """The library's own pipeline: its truncation, and its padding to the longest in the batch."""
    tok = Tokenizer.from_file(str(MINILM_TOKENIZER))
    tok.enable_truncation(max_length)
    if padding:
        tok.enable_padding(pad_id=0, pad_type_id=0, pad_token="[PAD]")
    else:
        tok.no_padding()
    return tok


def _classifier(tmp_path, token_types: bool = True, **preprocess) -> tuple[TextClassifier, dict]:
    weights = text_classifier_weights(num_classes=len(LABELS))
    write_text_model(tmp_path / "models", "tiny-text", "text-classify",
                     lambda p: tiny_text_classifier(p, weights, token_types), LABELS,
                     {"input": "tokens", "max_length": 64, **preprocess}, {"softmax": True})
    model = ModelRepository(tmp_path / "models").load("tiny-text", providers=("cpu",), intra_op_threads=1)
    return TextClassifier(model), weights


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


# -------------------------------------------------------------------------------- tokenizer
def test_padding_and_attention_mask_equal_the_tokenizers_own_padding():
    ours = TextTokenizer(MINILM_TOKENIZER, max_length=48)
    batch = pad_batch([ours.encode(t) for t in TEXTS], ours.pad_id, ours.pad_type_id)
    expected = _oracle_tokenizer(48, padding=True).encode_batch(TEXTS)
    np.testing.assert_array_equal(batch.input_ids, [e.ids for e in expected])
    np.testing.assert_array_equal(batch.attention_mask, [e.attention_mask for e in expected])
    np.testing.assert_array_equal(batch.token_type_ids, [e.type_ids for e in expected])


def test_truncation_equals_the_tokenizers_own_truncation():
    ours = TextTokenizer(MINILM_TOKENIZER, max_length=16)
    oracle = _oracle_tokenizer(16, padding=False)
    for text in TEXTS:
        got, expected = ours.encode(text), oracle.encode(text)
        assert got.ids.tolist() == expected.ids
        assert got.truncated == bool(expected.overflowing)
    assert ours.encode(TEXTS[4]).ids[-1] == oracle.token_to_id("[SEP]")


def test_offsets_and_word_ids_are_the_tokenizers_own_character_spans():
    ours = TextTokenizer(MINILM_TOKENIZER, max_length=128)
    oracle = _oracle_tokenizer(128, padding=False)
    for text in TEXTS:
        got, expected = ours.encode(text), oracle.encode(text)
        assert [tuple(o) for o in got.offsets.tolist()] == expected.offsets
        assert got.word_ids.tolist() == [-1 if w is None else w for w in expected.word_ids]


def test_file_padding_to_128_is_switched_off():
    ours = TextTokenizer(MINILM_TOKENIZER)
    assert len(ours.encode("hello world")) == 4  # [CLS] hello world [SEP], not 128


def test_max_length_defaults_to_the_tokenizer_files_own():
    assert TextTokenizer(MINILM_TOKENIZER).max_length == 128


def test_pad_id_comes_from_the_tokenizer_file():
    assert TextTokenizer(MINILM_TOKENIZER).pad_id == Tokenizer.from_file(str(MINILM_TOKENIZER)).token_to_id("[PAD]")


def test_refused_truncation_makes_a_long_text_bad_input():
    ours = TextTokenizer(MINILM_TOKENIZER, max_length=16, truncation=False)
    with pytest.raises(BadInput) as err:
        ours.encode(TEXTS[4])
    assert err.value.reason == "text_too_long"


@pytest.mark.parametrize(("value", "reason"), [(b"bytes", "not_text"), (None, "not_text"), (42, "not_text"),
                                               ("x" * 101, "text_too_long"), ("bad \ud800 surrogate", "invalid_text")])
def test_check_text_rejects_what_cannot_be_tokenized(value, reason):
    with pytest.raises(BadInput) as err:
        check_text(value, max_chars=100)
    assert err.value.reason == reason


# -------------------------------------------------------------------------------- bucketing
def _cost(lengths: np.ndarray, runs: list[np.ndarray], call_cost: float) -> float:
    return sum(len(r) * lengths[r].max() + call_cost for r in runs)


def test_buckets_partition_the_batch():
    lengths = np.random.default_rng(1).integers(3, 200, size=40)
    runs = length_buckets(lengths, call_cost_tokens=32)
    assert sorted(np.concatenate(runs).tolist()) == list(range(40))


def test_bucketing_is_optimal_against_brute_force():
    """Every split of the length-sorted batch into contiguous runs, enumerated."""
    rng = np.random.default_rng(2)
    for _ in range(30):
        lengths = rng.integers(2, 80, size=int(rng.integers(1, 9)))
        order = np.argsort(lengths, kind="stable")
        best = min(
            _cost(lengths, [order[a:b] for a, b in itertools.pairwise((0, *cuts, len(order)))], 24)
            for k in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), k)
        )
        assert _cost(lengths, length_buckets(lengths, 24), 24) == pytest.approx(best)


def test_bucketing_reduces_padding_on_mixed_lengths():
    ours = TextTokenizer(MINILM_TOKENIZER, max_length=64)
    texts = [ours.encode(t) for t in TEXTS * 3]
    one_batch = pad_batch(texts, ours.pad_id).input_ids.size
    bucketed = sum(batch.input_ids.size for _, batch in ours.batches(texts, call_cost_tokens=32))
    assert bucketed < one_batch / 2


def test_huge_call_cost_keeps_one_batch():
    assert len(length_buckets([3, 100, 7, 60], call_cost_tokens=10_000)) == 1


# -------------------------------------------------------------------------------- TextClassifier (tokens)
def test_transformer_scores_equal_numpy_oracle_in_original_order(tmp_path):
    classifier, weights = _classifier(tmp_path)
    results = classifier.run_batch([classifier.preprocess(t) for t in TEXTS])
    oracle = _oracle_tokenizer(64, padding=False)
    for text, result in zip(TEXTS, results, strict=True):
        enc = oracle.encode(text)
        expected = _softmax(text_classifier_oracle(enc.ids, enc.type_ids, weights))
        np.testing.assert_allclose(result.scores, expected, atol=1e-5)
        assert result.labels == tuple(LABELS)


def test_padding_does_not_change_scores(tmp_path):
    classifier, _ = _classifier(tmp_path)
    alone = classifier.run_batch([classifier.preprocess("hello world")])[0]
    padded = classifier.run_batch([classifier.preprocess(t) for t in ("hello world", TEXTS[4], TEXTS[7])])[0]
    np.testing.assert_allclose(padded.scores, alone.scores, atol=1e-6)


def test_bucketed_and_single_batch_runs_agree(tmp_path):
    bucketed, _ = _classifier(tmp_path / "a", call_cost_tokens=0)
    single, _ = _classifier(tmp_path / "b", call_cost_tokens=1_000_000)
    a = bucketed.run_batch([bucketed.preprocess(t) for t in TEXTS])
    b = single.run_batch([single.preprocess(t) for t in TEXTS])
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x.scores, y.scores, atol=1e-6)


def test_one_session_call_per_bucket(tmp_path):
    classifier, _ = _classifier(tmp_path, call_cost_tokens=8)
    items = [classifier.preprocess(t) for t in TEXTS]
    calls = []
    run = classifier.model.session.run
    classifier.model.session.run = lambda feeds, names=None: calls.append(feeds["input_ids"].shape) or run(feeds, names)
    classifier.run_batch(items)
    assert len(calls) == len(length_buckets([len(i) for i in items], 8)) > 1


def test_model_without_token_type_ids_is_fed_only_its_inputs(tmp_path):
    classifier, weights = _classifier(tmp_path, token_types=False)
    result = classifier.run_batch([classifier.preprocess("hello world")])[0]
    enc = _oracle_tokenizer(64, padding=False).encode("hello world")
    np.testing.assert_allclose(result.scores, _softmax(text_classifier_oracle(enc.ids, enc.type_ids, weights, False)), atol=1e-5)


def test_truncated_text_is_flagged(tmp_path):
    classifier, _ = _classifier(tmp_path)
    results = classifier.run_batch([classifier.preprocess(t) for t in ("hello", TEXTS[4])])
    assert [r.truncated for r in results] == [False, True]


def test_as_dict_maps_every_label_to_its_score():
    result = TextClassification(("clean", "toxic"), (0.25, 0.75))
    assert result.as_dict() == {"clean": 0.25, "toxic": 0.75}
    assert (result.label, result.score) == ("toxic", 0.75)


@pytest.mark.parametrize("value", [None, b"hello", ["hello"], "x" * 10_001])
def test_classifier_rejects_non_strings_and_long_text(tmp_path, value):
    classifier, _ = _classifier(tmp_path)
    with pytest.raises(BadInput):
        classifier.preprocess(value)


def test_unknown_preprocess_key_is_a_config_error(tmp_path):
    with pytest.raises(ModelConfigError, match="padding"):
        _classifier(tmp_path, padding="max_length")
