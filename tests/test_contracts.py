"""Record contracts (streams/contracts): every JSON Schema is a valid draft 2020-12 schema, agrees with
the worker's hand-written parsers on hypothesis-generated records, accepts what the product writes and
refuses what breaks it; producers check records against them; the AsyncAPI document is well formed and
names every topic."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from test_fuzz_parsers import (
    FUZZ,
    _encode,
    frame_headers,
    mutated,
    valid_events,
    valid_posts,
    valid_requests,
)

from operators.errors import BadInput
from operators.user_state import UserState
from streams import contracts
from streams.produce import ProduceError, jsonl_records
from streams.schemas import (
    ALL_TOPICS,
    FrameMeta,
    SourceRecord,
    dead_letter,
    decode_headers,
    parse_event,
    parse_post,
    parse_recommendation_request,
)

CONTRACTS = Path(contracts.__file__).parent


def valid(name: str, record) -> bool:
    return contracts.validator(name).is_valid(record)


@pytest.mark.parametrize("name", contracts.NAMES)
def test_contract_is_a_valid_draft_2020_12_schema_named_by_its_file(name):
    schema = contracts.load(name)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].endswith(f"/{name}.json")


def test_every_contract_file_is_listed():
    assert sorted(p.stem for p in CONTRACTS.glob("*.json")) == sorted(contracts.NAMES)


# ------------------------------------------------------------- schemas and parsers agree (inputs)
# JSON Schema cannot tell 1.0 from 1 (both are "integer"); orjson, and so the parsers, can: generated
# records hold integral numbers as ints only.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False).filter(
        lambda f: not f.is_integer()) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def parser_accepts(parse, record) -> bool:
    try:
        parse(_encode(record))
    except BadInput:
        return False
    return True


@FUZZ
@given(valid_posts().flatmap(lambda r: st.just(r) | mutated(r, json_values)))
def test_post_contract_agrees_with_parse_post(record):
    image = record.get("image") if isinstance(record, dict) else None
    # the image's encoding is checked where it is decoded (unknown_encoding); the contract checks it up front
    decodable = not isinstance(image, dict) or image.get("encoding", "jpeg") in ("jpeg", "png")
    assert valid("post", record) == (parser_accepts(parse_post, record) and decodable)


@FUZZ
@given(valid_events().flatmap(lambda r: st.just(r) | mutated(r, json_values)))
def test_event_contract_agrees_with_parse_event(record):
    assert valid("event", record) == parser_accepts(parse_event, record)


@FUZZ
@given(valid_requests().flatmap(lambda r: st.just(r) | mutated(r, json_values)))
def test_recommendation_request_contract_agrees_with_its_parser(record):
    assert valid("recommendation_request", record) == parser_accepts(parse_recommendation_request, record)


@FUZZ
@given(frame_headers(), st.binary(min_size=1, max_size=8))
def test_frame_headers_valid_under_the_contract_are_accepted_by_the_worker(headers, key):
    if valid("frame_headers", decode_headers(headers)):
        FrameMeta.from_headers(headers, key)


def test_headers_the_producer_writes_meet_the_frame_contract():
    for encoding in ("jpeg", "png", "raw"):
        headers = {k: v.decode() for k, v in FrameMeta("cam-7", 42, 1.4, encoding, 640, 480).headers()}
        contracts.check("frame_headers", headers)
    assert not valid("frame_headers", {"encoding": "raw", "frame_index": "1"})  # raw needs width and height
    assert not valid("frame_headers", {"encoding": "gif", "frame_index": "1"})


# ------------------------------------------------------------------------------------ outputs
POST_VERDICT = {
    "schema": "inferstream.verdict.v1", "id": "p-1003", "kind": "post", "user_id": "u-42",
    "created_at": "2026-11-25T10:02:00+00:00", "safe": False,
    "violations": [{"check": "toxicity", "model": "toxicity", "score": 1.0, "label": "toxic"},
                   {"check": "pii", "model": "pii-ner", "score": 0.9, "types": ["EMAIL"]}],
    "scores": {"toxicity": {"clean": 0.0, "toxic": 1.0}},
    "entities": [{"type": "EMAIL", "text": "a@b.co", "start": 3, "end": 9, "score": 0.9, "source": "pattern"}],
    "detections": [], "classifications": [],
    "models": {"toxicity": {"name": "toxicity", "version": "1", "provider": "CPUExecutionProvider", "arm": "live"}},
    "latency_ms": {"end_to_end": 55, "inference": 11.9},
    "source": {"topic": "posts", "partition": 1, "offset": 0, "timestamp_ms": 1795603467164},
    "worker": "host/5552", "produced_at_ms": 1795603467219,
}
FRAME_VERDICT = {
    **{k: v for k, v in POST_VERDICT.items() if k not in ("user_id", "created_at")},
    "id": "demo-cam:15", "kind": "frame", "stream_id": "demo-cam", "frame_index": 15, "pts": None,
    "detections": [{"label": "FACE_FEMALE", "class_id": 1, "score": 0.74, "box": [173.1, 82.4, 275.0, 180.9]}],
    "classifications": [{"class_id": 657, "label": "missile", "score": 0.43}],
}


@pytest.mark.parametrize("extra", [{}, {"redacted_text": "hi [EMAIL]"},
                                   {"shadow": {"checks": ["toxicity"], "live_safe": True, "live_models": {}}},
                                   {"replay": {"run": "ab12", "policy": "policy.yaml"}}])
@pytest.mark.parametrize("verdict", [POST_VERDICT, FRAME_VERDICT], ids=["post", "frame"])
def test_documented_verdicts_meet_the_contract(verdict, extra):
    contracts.check("verdict", {**verdict, **extra})


@pytest.mark.parametrize("change", [
    {"safe": "no"}, {"kind": "video"}, {"entities": [{**POST_VERDICT["entities"][0], "source": "guess"}]},
    {"detections": [{"label": "x", "score": 0.5, "box": [1, 2, 3]}]}, {"redacted_text": None},
    {"shadow": {"checks": []}}, {"replay": {"policy": "p.yaml"}}, {"user_id": None},
], ids=lambda c: next(iter(c)))
def test_broken_verdicts_are_refused(change):
    assert not valid("verdict", {**POST_VERDICT, **change})


@pytest.mark.parametrize("missing", ["safe", "models", "source", "created_at"])
def test_verdict_without_a_required_field_is_refused(missing):
    assert not valid("verdict", {k: v for k, v in POST_VERDICT.items() if k != missing})


@pytest.mark.parametrize("key", [b"cam-9", b"\xff\xfe", None])
@pytest.mark.parametrize("value", [b"not a jpeg", b"", None, b"x" * (256 * 1024 + 1)])
def test_dead_letters_meet_the_contract(key, value):
    source = SourceRecord("frames", 0, 7, None, key, {"stream_id": "cam-9"}, value)
    contracts.check("dead_letter", dead_letter(source, "image_decode_failed", "x" * 5000, "decode"))


def test_user_state_snapshots_meet_the_contract():
    state = UserState("u-1")
    contracts.check("user_state", state.to_dict())
    for offset, (item, kind) in enumerate([("i1", "click"), ("i2", "view"), ("i1", "purchase")]):
        state.apply({"item_id": item, "kind": kind, "ts": f"2026-11-25T10:00:0{offset}+00:00"}, offset, "7")
    contracts.check("user_state", json.loads(json.dumps(state.to_dict())))


def test_recommendation_lists_meet_the_contract_and_broken_ones_do_not():
    good = {"schema": "inferstream.recommendations.v1", "user_id": "u1000", "source": "cf",
            "items": [{"rank": 1, "item_id": "i1453", "score": 6.8, "click_probability": 0.48},
                      {"rank": 2, "item_id": "i2170", "score": 6.6, "click_probability": None}],
            "reason": "event:click", "request_id": None, "based_on_events": 11,
            "models": {"retrieval": "cf-retrieval@1", "ranking": "deepfm-ctr@1"},
            "generated_at": "2026-11-25T11:06:21.121463+00:00"}
    contracts.check("recommendations", good)
    contracts.check("recommendations", {**good, "reason": "replay", "generated_at": None, "replay": {"run": "r1"}})
    assert not valid("recommendations", {**good, "source": "magic"})
    assert not valid("recommendations", {**good, "items": [{"rank": 0, "item_id": "i", "score": 1, "click_probability": None}]})


# -------------------------------------------------------------------------------- producers
def test_producer_refuses_a_post_that_breaks_the_contract(tmp_path):
    """The worker would only find the bad encoding when decoding (a dead letter); the producer says so
    before anything is sent."""
    path = tmp_path / "posts.jsonl"
    post = {"id": "p1", "user_id": "u1", "image": {"encoding": "gif", "data": base64.b64encode(b"GIF89a").decode()}}
    path.write_text(json.dumps(post) + "\n")
    with pytest.raises(ProduceError, match=r"wrong_schema: image.*contract post\.json"):
        list(jsonl_records("posts", path))
    report_refusals: list[str] = []
    assert list(jsonl_records("posts", path, skip_invalid=True, warn=report_refusals.append)) == []
    assert len(report_refusals) == 1


def test_producer_sends_records_that_meet_the_contract(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps({"user_id": "u1", "item_id": "i1", "kind": "click", "ts": "2026-11-25T10:00:03Z"}) + "\n")
    assert [key for key, *_ in jsonl_records("events", path)] == [b"u1"]


# -------------------------------------------------------------------------------------- AsyncAPI
# The required structure of an AsyncAPI 3.0 document (no AsyncAPI 3 validator is on PyPI for this
# stack): the fields the specification marks REQUIRED, for the objects this document uses.
REF = {"type": "object", "required": ["$ref"], "properties": {"$ref": {"type": "string"}}}
ASYNCAPI_3 = {
    "type": "object", "required": ["asyncapi", "info", "channels", "operations", "components"],
    "properties": {
        "asyncapi": {"const": "3.0.0"},
        "info": {"type": "object", "required": ["title", "version"]},
        "servers": {"type": "object", "additionalProperties": {"type": "object", "required": ["host", "protocol"]}},
        "channels": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["address", "messages"],
            "properties": {"address": {"type": "string"}, "messages": {"type": "object", "additionalProperties": REF}}}},
        "operations": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["action", "channel"],
            "properties": {"action": {"enum": ["send", "receive"]}, "channel": REF}}},
        "components": {"type": "object", "properties": {"messages": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["payload"],
            "properties": {"payload": {"type": "object"}, "headers": {"type": "object"},
                           "bindings": {"type": "object", "properties": {"kafka": {"type": "object", "required": ["key"]}}}}}}}},
    },
}


@pytest.fixture(scope="module")
def asyncapi() -> dict:
    return yaml.safe_load((CONTRACTS / "asyncapi.yaml").read_text())


def _refs(node):
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_asyncapi_document_has_the_required_structure(asyncapi):
    Draft202012Validator(ASYNCAPI_3).validate(asyncapi)


def test_asyncapi_references_resolve_and_cover_every_contract(asyncapi):
    files = set()
    for ref in _refs(asyncapi):
        if ref.startswith("#/"):
            node = asyncapi
            for part in ref[2:].split("/"):
                node = node[part]  # KeyError: a dangling reference
        else:
            assert (CONTRACTS / ref).is_file(), ref
            files.add(Path(ref).stem)
    assert files == set(contracts.NAMES)


def test_asyncapi_names_every_topic_with_the_prefix_parameter(asyncapi):
    addresses = {channel["address"] for channel in asyncapi["channels"].values()}
    assert addresses == {"{prefix}" + topic for topic in ALL_TOPICS}
    inputs = {op["channel"]["$ref"] for op in asyncapi["operations"].values() if op["action"] == "receive"}
    assert inputs == {f"#/channels/{c}" for c in ("frames", "posts", "events", "recommendationRequests", "verdicts")}


def test_alerts_and_alert_state_snapshots_meet_their_contracts():
    from operators.alerts import AlertRule, JudgedFrame, StreamAlerts

    state, rule, alerts = StreamAlerts("cam-7"), AlertRule(k=2, n=3, m=2), []
    for i, present in enumerate([True, True, True, False, False]):
        hits = (("forbidden_objects", "missile", 0.4 + i / 10),) if present else ()
        alerts += state.apply(JudgedFrame("cam-7", i, f"cam-7:{i}", 0, 10 + i, 1_700_000_000_000 + i, i / 5, hits), rule)
        snapshot = {"state": state.to_dict(), "recent": [{"from": 0, "alert": a} for a in alerts], "alerts_from": 0}
        contracts.check("alert_state", json.loads(json.dumps(snapshot)))
    assert [a["event"] for a in alerts] == ["start", "end"]
    for alert in alerts:
        contracts.check("alert", json.loads(json.dumps(alert)))
