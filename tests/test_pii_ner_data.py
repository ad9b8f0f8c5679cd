"""PII NER data, without training: the hand-written posts in tests/data/pii_posts.jsonl and the recipe's
generated posts (models/recipes/pii_ner.py), their character spans and the BIO labels derived from them."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
POSTS = REPO / "tests" / "data" / "pii_posts.jsonl"
TYPES = {"PERSON", "ORG", "LOCATION", "EMAIL", "PHONE", "ID"}
# BERT's pre-tokenizer, written independently: whitespace, then every punctuation character alone.
# Checked only on the words both agree on (BERT keeps symbols such as € and emoji inside a word).
_WORD = re.compile(r"[^\W_]+|[^\w\s]|_")


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("pii_ner_recipe", REPO / "models" / "recipes" / "pii_ner.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def posts() -> list[dict]:
    return [json.loads(line) for line in POSTS.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def generated(recipe) -> list[dict]:
    return recipe.generate(300, seed=5)


def _check_spans(post: dict) -> None:
    text, previous_end = post["text"], 0
    for ent in post["entities"]:
        assert set(ent) == {"type", "start", "end"}, ent
        assert ent["type"] in TYPES, ent
        assert previous_end <= ent["start"] < ent["end"] <= len(text), (text, ent)
        span = text[ent["start"]:ent["end"]]
        assert span == span.strip(), (text, span)
        previous_end = ent["end"]


def test_handwritten_set_has_at_least_50_posts(posts):
    assert len(posts) >= 50


def test_handwritten_spans_are_in_bounds_ordered_trimmed_and_typed(posts):
    for post in posts:
        _check_spans(post)


def test_handwritten_spans_start_and_end_on_word_boundaries(posts):
    for post in posts:
        text = post["text"]
        for ent in post["entities"]:
            before = text[ent["start"] - 1] if ent["start"] else " "
            after = text[ent["end"]] if ent["end"] < len(text) else " "
            assert not before.isalnum() and not after.isalnum(), (text, text[ent["start"]:ent["end"]])


def test_handwritten_set_covers_every_type_and_posts_without_pii(posts):
    assert {e["type"] for p in posts for e in p["entities"]} == TYPES
    assert sum(not p["entities"] for p in posts) >= 5


def test_labels_are_o_then_bio_over_the_six_types(recipe):
    assert recipe.LABELS[0] == "O" and len(recipe.LABELS) == 13
    assert set(recipe.LABELS[1:]) == {f"{p}-{t}" for t in TYPES for p in "BI"}


def test_generator_is_deterministic_for_a_seed(recipe, generated):
    assert recipe.generate(300, seed=5) == generated
    assert recipe.generate(300, seed=6) != generated


def test_generated_spans_are_in_bounds_ordered_trimmed_and_typed(generated):
    for post in generated:
        _check_spans(post)


def test_generated_set_has_every_type_and_about_15_percent_without_entities(generated):
    assert {e["type"] for p in generated for e in p["entities"]} == TYPES
    assert 0.08 <= sum(not p["entities"] for p in generated) / len(generated) <= 0.22


def test_word_tags_of_a_known_sentence(recipe):
    text = "Call Priya Raman on 415-555-0187, not Barclays"
    entities = [{"type": "PERSON", "start": 5, "end": 16}, {"type": "PHONE", "start": 20, "end": 32},
                {"type": "ORG", "start": 38, "end": 46}]
    enc = recipe.load_tokenizer().encode(text)
    words = recipe.word_spans(enc)
    assert [text[s:e] for s, e in words] == ["Call", "Priya", "Raman", "on", "415", "-", "555", "-", "0187", ",",
                                             "not", "Barclays"]
    assert recipe.bio_tags(words, entities) == ["O", "B-PERSON", "I-PERSON", "O", "B-PHONE", "I-PHONE", "I-PHONE",
                                                "I-PHONE", "I-PHONE", "O", "O", "B-ORG"]


def test_generated_word_tags_agree_with_an_independent_word_split(recipe, generated):
    tok = recipe.load_tokenizer()
    checked = 0
    for post in generated:
        words = recipe.word_spans(tok.encode(post["text"]))
        tags = dict(zip(words, recipe.bio_tags(words, post["entities"]), strict=True))
        for m in _WORD.finditer(post["text"]):
            if m.span() not in tags:
                continue
            expected = "O"
            for ent in post["entities"]:
                if ent["start"] <= m.start() and m.end() <= ent["end"]:
                    first = next(w for w in _WORD.finditer(post["text"], ent["start"]))
                    expected = ("B-" if first.start() == m.start() else "I-") + ent["type"]
            assert tags[m.span()] == expected, (post["text"], m.group(), post["entities"])
            checked += 1
    assert checked > 3000


def test_training_labels_sit_on_first_subtokens_only(recipe, generated):
    tok = recipe.load_tokenizer()
    for post in generated[:50]:
        enc = tok.encode(post["text"])
        labels = recipe.token_labels(enc, post["entities"])
        tags = recipe.bio_tags(recipe.word_spans(enc), post["entities"])
        seen = set()
        for label, word in zip(labels, enc.word_ids, strict=True):
            if word is None or word in seen:
                assert label == -100
            else:
                assert recipe.LABELS[label] == tags[word]
                seen.add(word)
        assert seen == set(range(len(tags)))


def test_case_mark_is_a_word_of_its_own_before_each_capitalised_word(recipe):
    enc = recipe.model_tokenizer().encode("Anna from Köln bought McDonald's on her iPhone")
    assert enc.tokens[1:-1] == ["§", "anna", "from", "§", "koln", "bought", "§", "mcdonald", "'", "s", "on", "her",
                                "iphone"]
    marks = [w for w, t in zip(enc.word_ids, enc.tokens, strict=True) if t == "§"]
    assert len(set(marks)) == len(marks) == 3


def test_case_mark_sits_on_the_capital_and_leaves_word_spans_unchanged(recipe):
    text = "Écrivez à Lucía Pérez, DE89 3704 o'Brien"
    marked, plain = recipe.model_tokenizer().encode(text), recipe.load_tokenizer().encode(text)
    marks = [text[s:e] for (s, e), t in zip(marked.offsets, marked.tokens, strict=True) if t == "§"]
    assert marks == ["É", "L", "P", "D"]
    expected = []
    for s, e in recipe.word_spans(plain):
        if text[s].isupper() and (s == 0 or not (text[s - 1].isalnum() or text[s - 1] == "'")):
            expected.append((s, s + 1))
        expected.append((s, e))
    assert recipe.word_spans(marked) == expected


def test_case_mark_takes_the_tag_of_its_word(recipe):
    text = "ask Priya Raman"
    enc = recipe.model_tokenizer().encode(text)
    tags = recipe.bio_tags(recipe.word_spans(enc), [{"type": "PERSON", "start": 4, "end": 15}])
    assert tags == ["O", "B-PERSON", "I-PERSON", "I-PERSON", "I-PERSON"]


def test_generated_posts_hold_hard_negatives_without_entities(recipe, generated):
    """App, card-network, product and place words appear in posts and are never inside an entity.
    (Words that are also names or organisations, such as Lydia or Revolut, are left out of this check.)"""
    negatives = {"whatsapp", "venmo", "zelle", "slack", "mastercard", "amex", "ios", "minecraft", "iphone",
                 "station", "lake", "gas station", "city centre", "platform", "intercom", "dob", "sku"}
    for word in negatives:
        assert any(word == w.lower() for w in [*recipe.APPS, *recipe.CARD_NETWORKS, *recipe.PRODUCTS,
                                               *recipe.PLACE_NOUNS["en"], *recipe.ABBREVIATIONS]), word
    seen = 0
    for post in generated:
        for ent in post["entities"]:
            assert post["text"][ent["start"]:ent["end"]].lower() not in negatives, post
        seen += any(w in post["text"].lower() for w in negatives)
    assert seen >= 10
