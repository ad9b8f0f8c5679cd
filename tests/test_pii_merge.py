"""The merge of NER entities with the validated recognizers (operators/ner.py), the model config that
turns it on, and the policy's redaction option (operators/policy.py)."""

from __future__ import annotations

import pytest
from test_ner import BIO, BIO_TABLE, _table
from tiny_text_models import tiny_token_classifier, write_text_model

from operators.model_repository import ModelConfigError, ModelRepository
from operators.ner import Entity, TokenClassifier, merge_entities
from operators.pii_patterns import PatternMatch
from operators.policy import Policy, PolicyError, verdict_fields


def ent(kind, start, end, score):
    return Entity(kind, "x" * (end - start), start, end, score)


def match(kind, start, end, score=1.0, validated=True):
    return PatternMatch(kind, "", start, end, score, validated, "test")


def test_a_validated_pattern_beats_an_overlapping_ner_entity_whatever_its_score():
    ner = [ent("PHONE", 5, 14, 0.999), ent("ID", 15, 24, 0.99)]
    merged = merge_entities(ner, [match("CARD", 5, 24, score=0.5)])
    assert [(e.type, e.source, e.validated) for e in merged] == [("CARD", "pattern", True)]


def test_an_unvalidated_pattern_and_a_ner_entity_are_ranked_by_score_then_length():
    assert [e.source for e in merge_entities([ent("PERSON", 0, 5, 0.95)], [match("PASSPORT", 3, 9, 0.8, False)])] == ["ner"]
    assert [e.source for e in merge_entities([ent("ID", 0, 5, 0.7)], [match("PASSPORT", 3, 9, 0.8, False)])] == ["pattern"]
    assert [e.type for e in merge_entities([ent("ID", 0, 5, 0.8)], [match("PASSPORT", 3, 12, 0.8, False)])] == ["PASSPORT"]


def test_disjoint_entities_of_both_sources_are_all_kept_in_text_order():
    merged = merge_entities([ent("PERSON", 20, 25, 0.9)], [match("EMAIL", 30, 40), match("IBAN", 0, 10)])
    assert [(e.type, e.start, e.source) for e in merged] == [("IBAN", 0, "pattern"), ("PERSON", 20, "ner"), ("EMAIL", 30, "pattern")]


def test_model_types_keeps_only_those_model_entities():
    ner = [ent("PERSON", 0, 5, 0.9), ent("PHONE", 10, 15, 0.9)]
    assert [e.type for e in merge_entities(ner, [], frozenset({"PERSON"}))] == ["PERSON"]


def test_a_model_entity_without_a_letter_is_dropped():
    """Years, versions and scores the model tagged ("1930", "17.4.1") cannot be names or places."""
    ner = [Entity("LOCATION", "1930", 0, 4, 0.9), Entity("ORG", "17.4.1", 10, 16, 0.8), Entity("ORG", "4", 20, 21, 0.9)]
    assert merge_entities(ner, []) == []


def test_a_one_character_model_entity_is_dropped():
    """A case mark tagged without its word leaves one capital letter, which names nothing."""
    merged = merge_entities([Entity("PERSON", "A", 0, 1, 0.9), Entity("PERSON", "Al", 5, 7, 0.9)], [])
    assert [e.text for e in merged] == ["Al"]


def test_entity_dicts_name_their_source():
    (card,) = merge_entities([], [PatternMatch("CARD", "4111", 0, 4, 1.0, True, "card_visa")])
    assert card.as_dict() == {"type": "CARD", "text": "4111", "start": 0, "end": 4, "score": 1.0, "source": "pattern"}


# ------------------------------------------------------------------------- TokenClassifier + patterns
def _classifier(tmp_path, patterns) -> TokenClassifier:
    post = {"scheme": "BIO"} if patterns is None else {"scheme": "BIO", "patterns": patterns}
    write_text_model(tmp_path / "models", "tiny-ner", "ner", lambda p: tiny_token_classifier(p, _table(BIO, BIO_TABLE)),
                     BIO, {"max_length": 64}, post)
    return TokenClassifier(ModelRepository(tmp_path / "models").load("tiny-ner", providers=("cpu",), intra_op_threads=1))


TEXT = "Zoë Müller paid with 4111 1111 1111 1111 from Kraków, IBAN DE89 3704 0044 0532 0130 00"


def test_classifier_with_patterns_returns_model_and_pattern_entities_with_their_source(tmp_path):
    (found,) = (c := _classifier(tmp_path, {"regions": ["DE"]})).run_batch([c.preprocess(TEXT)])
    got = [(e.type, e.text, e.source) for e in found]
    assert got == [("PERSON", "Zoë Müller", "ner"), ("CARD", "4111 1111 1111 1111", "pattern"),
                   ("LOCATION", "Kraków", "ner"), ("IBAN", "DE89 3704 0044 0532 0130 00", "pattern")]
    assert all(TEXT[e.start : e.end] == e.text for e in found)


def test_classifier_without_patterns_is_the_model_alone(tmp_path):
    (found,) = (c := _classifier(tmp_path, None)).run_batch([c.preprocess(TEXT)])
    assert {e.source for e in found} == {"ner"} and "CARD" not in {e.type for e in found}


def test_classifier_model_types_drop_other_model_entities(tmp_path):
    (found,) = (c := _classifier(tmp_path, {"model_types": ["LOCATION"]})).run_batch([c.preprocess(TEXT)])
    assert [e.type for e in found] == ["CARD", "LOCATION", "IBAN"]


@pytest.mark.parametrize("patterns", [{"types": ["SHOE"]}, {"model_types": ["EMAIL"]}, {"regions": ["XX"]}, ["CARD"]])
def test_bad_pattern_settings_in_the_model_config_are_a_config_error(tmp_path, patterns):
    with pytest.raises(ModelConfigError, match="patterns"):
        _classifier(tmp_path, patterns)


def test_pii_ner_config_lists_the_new_types_and_the_policy_flags_them():
    import yaml

    from operators.pii_patterns import PatternConfig

    config = yaml.safe_load(open("models/pii-ner/1/config.yaml"))
    patterns = dict(config["postprocess"]["patterns"])
    model_types = patterns.pop("model_types")
    assert {"CARD", "IBAN", "NATIONAL_ID"} <= PatternConfig.from_dict(patterns).types
    assert set(model_types) <= {"PERSON", "ORG", "LOCATION", "EMAIL", "PHONE", "ID"}
    policy = Policy.load("policies/default.yaml")
    flagged = set().union(*(c.types for c in policy.checks if c.model == "pii-ner" and c.violation))
    assert {"CARD", "IBAN", "NATIONAL_ID", "PASSPORT", "DRIVER_LICENSE", "EMAIL", "PHONE"} <= flagged


# -------------------------------------------------------------------------------------- redaction
POLICY = {"checks": {"pii": {"model": "pii-ner", "input": "text", "types": ["EMAIL", "CARD"], "above": 0.5}}}
ENTITIES = [{"type": "EMAIL", "text": "ann@example.org", "start": 5, "end": 20, "score": 1.0, "source": "pattern"},
            {"type": "CARD", "text": "4111111111111111", "start": 26, "end": 42, "score": 1.0, "source": "pattern"}]
POST = "mail ann@example.org card 4111111111111111 ok"


def test_redaction_is_off_by_default():
    assert Policy.from_dict(POLICY).redacted(POST, ENTITIES) is None


def test_redaction_replaces_the_verdicts_entities_by_their_type():
    policy = Policy.from_dict({**POLICY, "redact": True})
    fields = verdict_fields([(policy.checks[0], "ner", ENTITIES)])
    assert policy.redacted(POST, fields["entities"]) == "mail [EMAIL] card [CARD] ok"
    assert policy.redacted(None, fields["entities"]) is None


def test_redaction_can_be_limited_to_types():
    policy = Policy.from_dict({**POLICY, "redact": {"types": ["CARD"]}})
    assert policy.redacted(POST, ENTITIES) == "mail ann@example.org card [CARD] ok"


@pytest.mark.parametrize("spec", ["yes", {"types": "CARD"}, {"kinds": ["CARD"]}])
def test_bad_redaction_settings_are_refused(spec):
    with pytest.raises(PolicyError, match="redact"):
        Policy.from_dict({**POLICY, "redact": spec})


def test_default_policy_does_not_redact():
    assert Policy.load("policies/default.yaml").redaction is None


def test_merge_trims_punctuation_the_model_tagged_at_entity_edges():
    (e,) = merge_entities([Entity("LOCATION", "Market St,", 9, 19, 0.9)], [])
    assert (e.text, e.start, e.end) == ("Market St", 9, 18)
    assert merge_entities([Entity("ORG", "(", 0, 1, 0.9)], []) == []
    assert merge_entities([Entity("PERSON", "O'Brien", 0, 7, 0.9)], [])[0].text == "O'Brien"


@pytest.mark.parametrize("text,name", [("Frau Schulze", "Schulze"), ("Dr. Ann Lee", "Ann Lee"), ("Mrs Patel", "Patel"),
                                       ("Sra. López", "López"), ("Dr Herr Weber", "Weber")])
def test_a_leading_title_is_outside_the_person_span(text, name):
    """The annotation convention: titles (Mr, Dr, Frau) are not part of a PERSON."""
    (e,) = merge_entities([Entity("PERSON", text, 10, 10 + len(text), 0.9)], [])
    assert (e.text, e.start, e.end) == (name, 10 + text.index(name), 10 + len(text))


@pytest.mark.parametrize("title", ["Frau", "Herr", "Mr.", "Dr", "Madame"])
def test_a_title_alone_is_not_a_person(title):
    assert merge_entities([Entity("PERSON", title, 0, len(title), 0.9)], []) == []


@pytest.mark.parametrize("name", ["Drew", "Herrmann", "Mrázek", "Srinivasan", "Frauke"])
def test_a_name_that_begins_like_a_title_is_kept_whole(name):
    assert [e.text for e in merge_entities([Entity("PERSON", name, 0, len(name), 0.9)], [])] == [name]


@pytest.mark.parametrize("kind,text", [("ORG", "amex"), ("ORG", "Visa"), ("ORG", "DOB"), ("ORG", "PIN"),
                                       ("LOCATION", "DL"), ("LOCATION", "ET"), ("ORG", "IBAN")])
def test_card_networks_form_abbreviations_and_time_zones_are_not_entities(kind, text):
    """Closed classes the conventions never annotate, whatever the model reads in them."""
    assert merge_entities([Entity(kind, text, 0, len(text), 0.99)], []) == []


def test_a_title_is_kept_inside_an_organisation_name():
    assert [e.text for e in merge_entities([Entity("ORG", "Dr. Oetker", 0, 10, 0.9)], [])] == ["Dr. Oetker"]
