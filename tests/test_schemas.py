"""Wire schemas: frame headers, posts, events, dead letters, JSON encoding."""

from __future__ import annotations

import base64
import json
import math
from datetime import UTC, datetime, timedelta

import pytest

from operators.errors import BadInput
from streams.schemas import (
    DEAD_LETTER_SCHEMA,
    EVENT_KINDS,
    FRAME_SCHEMA,
    MAX_TEXT_CHARS,
    POST_SCHEMA,
    FrameMeta,
    SourceRecord,
    dead_letter,
    decode_headers,
    dumps,
    finite,
    parse_event,
    parse_post,
)


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


def _frame_headers(**overrides) -> list[tuple[str, bytes]]:
    base = {"schema": FRAME_SCHEMA, "stream_id": "cam-1", "frame_index": "7", "pts": "0.700000",
            "encoding": "jpeg", "width": "640", "height": "480"}
    base.update(overrides)
    return [(k, v.encode()) for k, v in base.items() if v is not None]


# ----------------------------------------------------------------------------------------- frames
@pytest.mark.parametrize("encoding", ["jpeg", "png", "raw"])
def test_frame_meta_headers_round_trip(encoding):
    meta = FrameMeta("cam-7", 1234, 41.125, encoding, 1920, 1080)
    headers = meta.headers()
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in headers)
    assert FrameMeta.from_headers(headers, key=None) == meta
    assert meta.record_id == "cam-7:1234"
    assert (dict(headers).get("pixel_format") == b"rgb24") == (encoding == "raw")


def test_frame_meta_accepts_headers_as_a_mapping():
    meta = FrameMeta("s", 0, 0.0, "png", 2, 2)
    assert FrameMeta.from_headers(dict(meta.headers()), key=None) == meta


@pytest.mark.parametrize("missing", ["frame_index", "encoding", "stream_id"])
def test_missing_frame_headers_raise_missing_header(missing):
    with pytest.raises(BadInput) as excinfo:
        FrameMeta.from_headers(_frame_headers(**{missing: None}), key=None)
    assert excinfo.value.reason == "missing_header"
    assert missing in excinfo.value.detail


@pytest.mark.parametrize("header", ["frame_index", "pts", "width", "height"])
def test_non_numeric_frame_header_raises_bad_header(header):
    with pytest.raises(BadInput) as excinfo:
        FrameMeta.from_headers(_frame_headers(**{header: "twelve"}), key=b"cam-1")
    assert excinfo.value.reason == "bad_header"


def test_negative_frame_index_raises_bad_header():
    with pytest.raises(BadInput) as excinfo:
        FrameMeta.from_headers(_frame_headers(frame_index="-1"), key=None)
    assert excinfo.value.reason == "bad_header"


def test_unknown_frame_schema_is_refused():
    with pytest.raises(BadInput) as excinfo:
        FrameMeta.from_headers(_frame_headers(schema="inferstream.frame.v9"), key=None)
    assert excinfo.value.reason == "unknown_schema"


def test_stream_id_comes_from_the_key_when_the_header_is_absent():
    meta = FrameMeta.from_headers(_frame_headers(stream_id=None), key=b"door-cam")
    assert meta.stream_id == "door-cam"
    assert meta.record_id == "door-cam:7"


def test_stream_id_header_wins_over_the_key():
    assert FrameMeta.from_headers(_frame_headers(), key=b"other").stream_id == "cam-1"


def test_absent_pts_and_dimensions_default_to_nan_and_zero():
    meta = FrameMeta.from_headers(_frame_headers(pts=None, width=None, height=None), key=None)
    assert math.isnan(meta.pts)
    assert (meta.width, meta.height) == (0, 0)
    assert finite(meta.pts) is None
    assert finite(1.5) == 1.5


def test_decode_headers_replaces_bad_utf8():
    assert decode_headers([("k", b"\xffok"), ("n", None)]) == {"k": "\ufffdok", "n": ""}


# ------------------------------------------------------------------------------------------ posts
def test_valid_post_is_normalised():
    post = parse_post(_json({"id": 42, "user_id": "u1", "text": "hello", "created_at": "2024-05-01T12:00:00Z"}))
    assert post == {"schema": POST_SCHEMA, "id": "42", "user_id": "u1", "text": "hello",
                    "created_at": datetime(2024, 5, 1, 12, tzinfo=UTC).isoformat()}


def test_post_without_id_is_refused():
    with pytest.raises(BadInput) as excinfo:
        parse_post(_json({"user_id": "u1", "text": "hi"}))
    assert excinfo.value.reason == "wrong_schema"
    assert "'id'" in excinfo.value.detail


@pytest.mark.parametrize("bad_id", ["", True, None, 1.5, "x" * 257])
def test_post_with_invalid_id_is_refused(bad_id):
    with pytest.raises(BadInput) as excinfo:
        parse_post(_json({"id": bad_id, "user_id": "u1", "text": "hi"}))
    assert excinfo.value.reason == "wrong_schema"


@pytest.mark.parametrize("value", [[1, 2], "a string", 3, None])
def test_post_that_is_not_a_json_object_is_refused(value):
    with pytest.raises(BadInput) as excinfo:
        parse_post(_json(value))
    assert excinfo.value.reason == "wrong_schema"


@pytest.mark.parametrize("value", [b"{not json", b'{"id": 1,', b"\xff\xfe\x00garbage"])
def test_malformed_json_is_refused(value):
    with pytest.raises(BadInput) as excinfo:
        parse_post(value)
    assert excinfo.value.reason == "malformed_json"


@pytest.mark.parametrize("value", [b"", None])
def test_empty_record_is_refused(value):
    with pytest.raises(BadInput) as excinfo:
        parse_post(value)
    assert excinfo.value.reason == "empty_record"


def test_post_with_unknown_schema_is_refused():
    with pytest.raises(BadInput) as excinfo:
        parse_post(_json({"schema": "inferstream.post.v2", "id": "p", "user_id": "u", "text": "t"}))
    assert excinfo.value.reason == "unknown_schema"


def test_post_text_at_the_limit_is_accepted_and_over_it_refused():
    ok = parse_post(_json({"id": "p", "user_id": "u", "text": "a" * MAX_TEXT_CHARS}))
    assert len(ok["text"]) == MAX_TEXT_CHARS
    with pytest.raises(BadInput) as excinfo:
        parse_post(_json({"id": "p", "user_id": "u", "text": "a" * (MAX_TEXT_CHARS + 1)}))
    assert excinfo.value.reason == "text_too_long"


def test_post_image_is_decoded_from_base64():
    payload = bytes(range(256)) * 3
    post = parse_post(_json({"id": "p", "user_id": "u", "image": {"encoding": "png",
                                                                  "data": base64.b64encode(payload).decode()}}))
    assert post["image"] == {"encoding": "png", "data": payload}
    assert post["text"] == ""


def test_post_image_encoding_defaults_to_jpeg():
    post = parse_post(_json({"id": "p", "user_id": "u", "image": {"data": base64.b64encode(b"xyz").decode()}}))
    assert post["image"]["encoding"] == "jpeg"


@pytest.mark.parametrize("image", [{"encoding": "png", "data": "not base64 !!"}, {"encoding": "png"}, "abc"])
def test_post_with_bad_image_is_refused(image):
    with pytest.raises(BadInput) as excinfo:
        parse_post(_json({"id": "p", "user_id": "u", "image": image}))
    assert excinfo.value.reason == "wrong_schema"


def test_post_with_neither_text_nor_image_is_refused():
    with pytest.raises(BadInput) as excinfo:
        parse_post(_json({"id": "p", "user_id": "u", "text": ""}))
    assert excinfo.value.reason == "wrong_schema"
    assert "text" in excinfo.value.detail and "image" in excinfo.value.detail


# ----------------------------------------------------------------------------------------- events
@pytest.mark.parametrize("kind", EVENT_KINDS)
def test_event_kinds_are_accepted(kind):
    event = parse_event(_json({"user_id": "u", "item_id": 9, "kind": kind, "ts": "2024-05-01T12:00:00+02:00"}))
    assert event["kind"] == kind
    assert event["item_id"] == "9"
    assert datetime.fromisoformat(event["ts"]) == datetime(2024, 5, 1, 10, tzinfo=UTC)
    assert datetime.fromisoformat(event["ts"]).utcoffset() == timedelta(hours=2)


@pytest.mark.parametrize("kind", ["share", None, "VIEW"])
def test_unknown_event_kind_is_refused(kind):
    with pytest.raises(BadInput) as excinfo:
        parse_event(_json({"user_id": "u", "item_id": "i", "kind": kind, "ts": "2024-05-01T12:00:00Z"}))
    assert excinfo.value.reason == "unknown_event_kind"


def test_event_timestamp_without_timezone_is_refused():
    with pytest.raises(BadInput) as excinfo:
        parse_event(_json({"user_id": "u", "item_id": "i", "kind": "view", "ts": "2024-05-01T12:00:00"}))
    assert excinfo.value.reason == "wrong_schema"
    assert "timezone" in excinfo.value.detail


@pytest.mark.parametrize("ts", [None, "yesterday"])
def test_event_without_a_valid_timestamp_is_refused(ts):
    with pytest.raises(BadInput) as excinfo:
        parse_event(_json({"user_id": "u", "item_id": "i", "kind": "view", "ts": ts}))
    assert excinfo.value.reason == "wrong_schema"


def test_event_z_suffix_equals_utc_offset():
    a = parse_event(_json({"user_id": "u", "item_id": "i", "kind": "click", "ts": "2024-05-01T12:00:00Z"}))
    b = parse_event(_json({"user_id": "u", "item_id": "i", "kind": "click", "ts": "2024-05-01T12:00:00+00:00"}))
    assert a["ts"] == b["ts"]
    assert datetime.fromisoformat(a["ts"]) == datetime(2024, 5, 1, 12, tzinfo=UTC)


# ----------------------------------------------------------------------------------- dead letters
def _source(key: bytes | None, value: bytes | None = b'{"broken":') -> SourceRecord:
    return SourceRecord(topic="t-posts", partition=3, offset=1017, timestamp_ms=1_700_000_000_000, key=key,
                        headers={"h": "v"}, value=value)


def test_dead_letter_keeps_source_coordinates_and_reason():
    record = dead_letter(_source(b"post-1"), "malformed_json", "Expecting value", stage="decode")
    assert record["schema"] == DEAD_LETTER_SCHEMA
    assert record["source"] == {"topic": "t-posts", "partition": 3, "offset": 1017, "timestamp_ms": 1_700_000_000_000}
    assert (record["reason"], record["detail"], record["stage"]) == ("malformed_json", "Expecting value", "decode")
    assert record["headers"] == {"h": "v"}
    assert isinstance(record["failed_at_ms"], int)
    assert json.loads(dumps(record)) == record  # serialisable as is


def test_dead_letter_utf8_key_is_kept_as_text():
    record = dead_letter(_source("clé-1".encode()), "r", "d", "s")
    assert (record["key"], record["key_encoding"]) == ("clé-1", "utf-8")


def test_dead_letter_binary_key_is_base64():
    key = b"\xff\x00\xfe binary"
    record = dead_letter(_source(key), "r", "d", "s")
    assert record["key_encoding"] == "base64"
    assert base64.b64decode(record["key"]) == key


def test_dead_letter_missing_key_is_null():
    record = dead_letter(_source(None), "r", "d", "s")
    assert (record["key"], record["key_encoding"]) == (None, None)


def test_dead_letter_value_b64_round_trips():
    value = bytes(range(256)) + b"\x00tail"
    record = dead_letter(_source(b"k", value), "r", "d", "s")
    assert base64.b64decode(record["value_b64"]) == value
    assert record["value_bytes"] == len(value)


def test_dead_letter_omits_oversized_values_but_keeps_their_size():
    value = b"x" * (256 * 1024 + 1)
    record = dead_letter(_source(b"k", value), "r", "d" * 5000, "s")
    assert "value_b64" not in record
    assert record["value_bytes"] == len(value)
    assert len(record["detail"]) == 2000


# ------------------------------------------------------------------------------------------- dumps
@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_dumps_refuses_non_finite_numbers(number):
    with pytest.raises(ValueError):
        dumps({"score": number})


def test_dumps_is_compact_utf8():
    out = dumps({"a": 1, "label": "café"})
    assert out == '{"a":1,"label":"café"}'.encode()
