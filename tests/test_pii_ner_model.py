"""The built pii-ner model (models/pii-ner/1) with its recognizers, on the classes of false positives and
misses measured on the hand-written sets: words that are not names must not come out as entities, and
names in the places people put them must. Sentences written for this file (not taken from the sets).
Classes still missed (README, PII): capitalised German nouns read as names, a name right after a Spanish
word such as "mañana". Form abbreviations, card networks and time zones the model still reads as names are
dropped at the merge (operators/ner.py, NOT_ENTITIES)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from operators.model_repository import ModelRepository
from operators.ner import TokenClassifier

MODELS = Path(os.environ.get("PII_NER_MODELS", Path(__file__).resolve().parent.parent / "models"))
MODEL_DIR = MODELS / "pii-ner" / "1"


@pytest.fixture(scope="module")
def pii() -> TokenClassifier:
    if not (MODEL_DIR / "model.onnx").is_file():
        spec = importlib.util.spec_from_file_location("pii_ner_recipe", MODELS / "recipes" / "pii_ner.py")
        recipe = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(recipe)
        recipe.build(MODEL_DIR)
    return TokenClassifier(ModelRepository(MODELS).load("pii-ner", providers=("cpu",), intra_op_threads=1))


def entities(pii: TokenClassifier, text: str) -> list[tuple[str, str]]:
    (found,) = pii.run_batch([pii.preprocess(text)])
    return [(e.type, e.text) for e in found]


@pytest.mark.parametrize("text", [
    "Telegram keeps crashing, just whatsapp me instead",
    "zelle me the 40 bucks or venmo, whatever is easier",
])
def test_apps_and_card_networks_used_as_channels_are_not_organisations(pii, text):
    assert entities(pii, text) == []


@pytest.mark.parametrize("text", [
    "waited at the station for 25 minutes, then walked to the lake",
    "the intercom in our apartment building is broken again",
    "meet me at the gas station by the bus stop at 7",
])
def test_words_for_kinds_of_place_are_not_locations(pii, text):
    assert entities(pii, text) == []


@pytest.mark.parametrize("text", [
    "Android 14.2 update killed my battery, 18% by noon",
    "Python 3.12.1 is about 9% faster on my benchmark",
])
def test_products_versions_and_abbreviations_are_not_entities(pii, text):
    assert entities(pii, text) == []


@pytest.mark.parametrize(("text", "expected"), [
    ("DOB and PIN on the same sticky note, what was I thinking", []),
    ("paid with amex, the PIN is written on the back lol", []),
    ("Dr. Patel moved the appointment to 3pm ET", [("PERSON", "Patel")]),
])
def test_form_abbreviations_card_networks_and_time_zones_are_not_entities(pii, text, expected):
    assert entities(pii, text) == expected


def test_lowercase_foreign_words_in_a_cased_post_are_not_entities(pii):
    assert entities(pii, "Handy verloren in Hamburg, bitte melden") == [("LOCATION", "Hamburg")]


@pytest.mark.parametrize(("text", "name"), [
    ("text me on 07700 900123 tonight, cheers Callum", "Callum"),
    ("bonifico fatto ieri sera, grazie mille Chiara", "Chiara"),
])
def test_a_first_name_signing_off_a_post_is_a_person(pii, text, name):
    assert ("PERSON", name) in entities(pii, text)


def test_a_spelled_out_email_is_an_email_not_an_organisation(pii):
    assert entities(pii, "write to nora [at] quietmail [dot] net for the keys") == [
        ("EMAIL", "nora [at] quietmail [dot] net")]
