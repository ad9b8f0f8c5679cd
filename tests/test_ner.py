"""NER decoding against seqeval, sub-word aggregation and character offsets on real MiniLM tokenizer
output (accents, combining marks, non-Latin scripts, emoji), and TokenClassifier end to end on a tiny
generated ONNX model whose token -> tag table the tests choose."""

from __future__ import annotations

import re

import numpy as np
import pytest
from seqeval.metrics.sequence_labeling import get_entities
from tiny_text_models import MINILM_TOKENIZER, MINILM_VOCAB, tiny_token_classifier, write_text_model
from tokenizers import Tokenizer

from operators.errors import BadInput
from operators.model_repository import ModelConfigError, ModelRepository
from operators.ner import (
    Entities,
    Entity,
    TokenClassifier,
    aggregate_words,
    check_tags,
    decode_tags,
    entities_from_words,
)
from operators.tokens import TextTokenizer

TYPES = ("PERSON", "LOCATION", "ORG")
BIO = ["O"] + [f"{p}-{t}" for t in TYPES for p in "BI"]
BIOES = ["O"] + [f"{p}-{t}" for t in TYPES for p in "BIES"]
SENTENCE = "Zoë Müller flew from Kraków to 東京 with Jose\u0301 🎉 and Schwarzenegger, née O'Brien."
# token -> (tag, logit) of the tiny model; every other token is O with logit 2
BIO_TABLE = {
    "zoe": ("B-PERSON", 4.0), "muller": ("I-PERSON", 3.0), "krakow": ("B-LOCATION", 5.0),
    "東": ("B-LOCATION", 4.0), "京": ("I-LOCATION", 3.5), "jose": ("B-PERSON", 2.5),
    "schwarz": ("B-PERSON", 3.0), "##ene": ("B-ORG", 9.0), "##gger": ("I-ORG", 9.0),  # non-first sub-tokens: ignored
    "o": ("B-PERSON", 4.5), "'": ("I-PERSON", 2.0), "brien": ("I-PERSON", 4.0),
    "[CLS]": ("B-ORG", 9.0), "[SEP]": ("I-ORG", 9.0),  # special tokens: ignored
}
BIOES_TABLE = {
    **BIO_TABLE, "muller": ("E-PERSON", 3.0), "krakow": ("S-LOCATION", 5.0), "京": ("E-LOCATION", 3.5),
    "jose": ("S-PERSON", 2.5), "schwarz": ("S-PERSON", 3.0), "brien": ("E-PERSON", 4.0),
}
# entity text -> (type, logits of its words' first sub-tokens), found in SENTENCE with str.index
EXPECTED = {"Zoë Müller": ("PERSON", [4.0, 3.0]), "Kraków": ("LOCATION", [5.0]), "東京": ("LOCATION", [4.0, 3.5]),
            "Jose\u0301": ("PERSON", [2.5]), "Schwarzenegger": ("PERSON", [3.0]), "O'Brien": ("PERSON", [4.5, 2.0, 4.0])}


def _tokenizer() -> Tokenizer:
    tok = Tokenizer.from_file(str(MINILM_TOKENIZER))
    tok.no_padding()
    tok.no_truncation()
    return tok


def _table(tags: list[str], entries: dict[str, tuple[str, float]]) -> np.ndarray:
    table = np.zeros((MINILM_VOCAB, len(tags)), np.float32)
    table[:, tags.index("O")] = 2.0
    tok = _tokenizer()
    for token, (tag, logit) in entries.items():
        row = tok.token_to_id(token)
        table[row] = 0.0
        table[row, tags.index(tag)] = logit
    return table


def _prob(logit: float, num_tags: int) -> float:
    """Softmax probability of a row that has `logit` at one tag and 0 elsewhere."""
    return float(np.exp(logit) / (np.exp(logit) + num_tags - 1))


def _token_classifier(tmp_path, tags: list[str], table: np.ndarray, scheme: str, labels_key: bool = True,
                      **preprocess) -> TokenClassifier:
    write_text_model(tmp_path / "models", "tiny-ner", "ner", lambda p: tiny_token_classifier(p, table), tags,
                     {"max_length": 64, **preprocess}, {"scheme": scheme}, labels_key=labels_key)
    return TokenClassifier(ModelRepository(tmp_path / "models").load("tiny-ner", providers=("cpu",), intra_op_threads=1))


def _random_tags(rng: np.random.Generator, alphabet: list[str], n: int) -> list[list[str]]:
    return [[alphabet[k] for k in rng.integers(0, len(alphabet), size=int(rng.integers(0, 14)))] for _ in range(n)]


# -------------------------------------------------------------------------------- decoding vs seqeval
@pytest.mark.parametrize("alphabet", [BIO, BIOES], ids=["BIO", "BIOES"])
def test_decoding_equals_seqeval_on_random_tag_sequences(alphabet):
    """Random sequences are mostly invalid (I- without B-, E- after O, type changes mid-entity)."""
    for tags in _random_tags(np.random.default_rng(0), alphabet, 3000):
        expected = [(kind, first, last + 1) for kind, first, last in get_entities(list(tags))]
        assert decode_tags(tags) == expected, tags


@pytest.mark.parametrize("alphabet", [BIO, BIOES], ids=["BIO", "BIOES"])
def test_decoding_equals_seqeval_on_valid_sequences_with_long_entities(alphabet):
    rng = np.random.default_rng(1)
    for _ in range(500):
        tags: list[str] = []
        while len(tags) < 20:
            kind, size = TYPES[rng.integers(0, 3)], int(rng.integers(0, 5))
            if size == 0:
                tags.append("O")
            elif size == 1 and "S-PERSON" in alphabet:
                tags.append(f"S-{kind}")
            else:
                last = "E" if "S-PERSON" in alphabet else "I"
                tags += [f"B-{kind}"] + [f"I-{kind}"] * (size - 2) + [f"{last}-{kind}"] * (size > 1)
        expected = [(kind, first, last + 1) for kind, first, last in get_entities(tags)]
        assert decode_tags(tags) == expected


def test_tags_outside_the_scheme_are_rejected():
    with pytest.raises(ValueError, match="E-PERSON"):
        check_tags(["O", "B-PERSON", "E-PERSON"], "BIO")
    check_tags(BIOES, "BIOES")


# -------------------------------------------------------------------------------- aggregation, offsets
def test_words_take_their_first_sub_token_label():
    enc = TextTokenizer(MINILM_TOKENIZER).encode(SENTENCE)
    rng = np.random.default_rng(2)
    labels, probs = rng.integers(0, 7, size=len(enc)), rng.random(len(enc))
    word_labels, word_probs, _ = aggregate_words(enc.word_ids, enc.offsets, labels, probs)
    first: dict[int, int] = {}
    for t, w in enumerate(_tokenizer().encode(SENTENCE).word_ids):
        if w is not None:
            first.setdefault(w, t)
    assert word_labels.tolist() == [labels[first[w]] for w in sorted(first)]
    assert word_probs.tolist() == [probs[first[w]] for w in sorted(first)]


def test_word_spans_are_the_words_of_the_original_string():
    """No punctuation or CJK here, so the BERT pre-tokenizer's words are the whitespace-separated ones."""
    text = "Zoë  Müller Ærøskøbing Привет Ελλάδα 👍🏽 naïve façade İstanbul straße Schwarzenegger 👨‍👩‍👧 Łódź"
    enc = TextTokenizer(MINILM_TOKENIZER).encode(text)
    _, _, spans = aggregate_words(enc.word_ids, enc.offsets, np.zeros(len(enc), np.int64), np.ones(len(enc)))
    assert [tuple(s) for s in spans.tolist()] == [m.span() for m in re.finditer(r"\S+", text)]


@pytest.mark.parametrize("word", ["Jose\u0301", "नमस्ते", "❤️", "Zoë", "👍🏽", "東"])
def test_entity_keeps_trailing_combining_marks(word):
    """The tokenizer strips accents and vowel signs, so its last offset can stop before them."""
    text = f"hi {word} there"
    enc = TextTokenizer(MINILM_TOKENIZER).encode(text)
    _, probs, spans = aggregate_words(enc.word_ids, enc.offsets, np.zeros(len(enc), np.int64), np.ones(len(enc)))
    tags = ["O", "S-X", "O"]
    (entity,) = entities_from_words(text, tags, probs, spans)
    assert (entity.text, entity.start, entity.end) == (word, 3, 3 + len(word))


def test_entity_score_is_the_mean_of_its_word_probabilities():
    spans = np.array([[0, 3], [4, 9], [10, 12]])
    (entity,) = entities_from_words("Ann Smith ok", ["B-PERSON", "I-PERSON", "O"], np.array([0.9, 0.6, 0.99]), spans)
    assert entity == Entity("PERSON", "Ann Smith", 0, 9, pytest.approx(0.75))


# -------------------------------------------------------------------------------- TokenClassifier
@pytest.mark.parametrize(("tags", "table", "scheme"), [(BIO, BIO_TABLE, "BIO"), (BIOES, BIOES_TABLE, "BIOES")],
                         ids=["BIO", "BIOES"])
def test_token_classifier_finds_expected_entities_and_offsets(tmp_path, tags, table, scheme):
    classifier = _token_classifier(tmp_path, tags, _table(tags, table), scheme)
    (found,) = classifier.run_batch([classifier.preprocess(SENTENCE)])
    expected = [Entity(kind, text, SENTENCE.index(text), SENTENCE.index(text) + len(text),
                       pytest.approx(np.mean([_prob(x, len(tags)) for x in logits]), abs=1e-6))
                for text, (kind, logits) in EXPECTED.items()]
    assert list(found) == expected
    assert all(SENTENCE[e.start : e.end] == e.text for e in found)


def test_token_classifier_results_do_not_depend_on_batch_neighbours(tmp_path):
    classifier = _token_classifier(tmp_path, BIO, _table(BIO, BIO_TABLE), "BIO", call_cost_tokens=0)
    alone = classifier.run_batch([classifier.preprocess(SENTENCE)])[0]
    texts = ["Zoë", SENTENCE, "krakow " * 40, "", SENTENCE.upper()]
    batch = classifier.run_batch([classifier.preprocess(t) for t in texts])
    assert batch[1] == alone
    assert [e.text for e in batch[0]] == ["Zoë"]
    assert len(batch[2]) == 40 and batch[2].truncated is False
    assert list(batch[3]) == []
    assert [e.text for e in batch[4]] == [t.upper() for t in EXPECTED]


def test_entity_offsets_index_the_original_string_for_any_text(tmp_path):
    """Random tags from a random table on random Unicode text: entities are ordered, disjoint spans."""
    rng = np.random.default_rng(3)
    classifier = _token_classifier(tmp_path, BIO, rng.normal(size=(MINILM_VOCAB, len(BIO))) * 3, "BIO")
    pieces = ["Zoë", "Müller", "東京", "🎉", "👍🏽", "Jose\u0301", "नमस्ते", "مرحبا", "O'Brien", "bob@x.com", ",", "  ", "\n", "İ"]
    texts = ["".join(rng.choice(pieces, size=int(rng.integers(0, 12)))) for _ in range(200)]
    for text, found in zip(texts, classifier.run_batch([classifier.preprocess(t) for t in texts]), strict=True):
        for e in found:
            assert 0 <= e.start < e.end <= len(text) and text[e.start : e.end] == e.text
        ends = [0] + [x for e in found for x in (e.start, e.end)]
        assert ends == sorted(ends)


def test_as_dict_lists_entities_as_policy_reads_them():
    found = Entities((Entity("PERSON", "Zoë", 0, 3, 0.98765432),))
    assert found.as_dict() == [{"type": "PERSON", "text": "Zoë", "start": 0, "end": 3, "score": 0.987654, "source": "ner"}]


def test_labels_json_is_read_from_the_model_dir_when_the_config_names_none(tmp_path):
    classifier = _token_classifier(tmp_path, BIOES, _table(BIOES, BIOES_TABLE), "BIOES", labels_key=False)
    assert classifier.tags == BIOES


def test_tags_outside_the_configured_scheme_are_a_config_error(tmp_path):
    with pytest.raises(ModelConfigError, match="BIO scheme"):
        _token_classifier(tmp_path, BIOES, _table(BIOES, BIOES_TABLE), "BIO")


def test_label_count_must_match_the_model_output(tmp_path):
    with pytest.raises(ModelConfigError, match="labels.json"):
        write_text_model(tmp_path / "models", "tiny-ner", "ner", lambda p: tiny_token_classifier(p, _table(BIOES, {})),
                         BIO, {}, {"scheme": "BIO"})
        TokenClassifier(ModelRepository(tmp_path / "models").load("tiny-ner", providers=("cpu",), intra_op_threads=1))


@pytest.mark.parametrize("value", [None, 3.5, b"Zo\xc3\xab", "x" * 10_001])
def test_token_classifier_rejects_non_strings_and_long_text(tmp_path, value):
    classifier = _token_classifier(tmp_path, BIO, _table(BIO, {}), "BIO")
    with pytest.raises(BadInput):
        classifier.preprocess(value)
