"""Property tests (hypothesis) for every parser of outside input: posts, events, recommendation
requests, frame headers, image bytes (crafted PNG/JPEG dimension headers included) and the replay
range arguments. Two properties each: only the documented error escapes (BadInput with one of the
parser's reason codes; ReplayError for `--from/--to`), and a valid input round-trips. Bounded and
repeatable: derandomized, a fixed number of examples per property (the file runs in seconds).

Crashes found by these properties are pinned as named regression tests at the end of the file."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from datetime import UTC, datetime, timedelta, timezone
from unittest import mock

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from operators.errors import BadInput
from operators.images import ENCODINGS, ImageLimits, decode_image, decode_source, encode_image
from streams.replay_range import Bound, ReplayError, parse_bound
from streams.schemas import (
    EVENT_KINDS,
    FRAME_SCHEMA,
    FrameMeta,
    decode_headers,
    dumps,
    finite,
    parse_event,
    parse_post,
    parse_recommendation_request,
)

FUZZ = settings(max_examples=300, deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(FUZZ, max_examples=100)  # image properties: each example runs a real decoder

# The reason codes each parser documents (README "Topics and schemas", dead letters).
JSON_REASONS = {"empty_record", "malformed_json", "wrong_schema", "unknown_schema"}
POST_REASONS = JSON_REASONS | {"text_too_long"}
EVENT_REASONS = JSON_REASONS | {"unknown_event_kind"}
FRAME_REASONS = {"unknown_schema", "missing_header", "bad_header"}
IMAGE_REASONS = {"empty_image", "unknown_encoding", "bad_dimensions", "image_too_large", "missing_header",
                 "size_mismatch", "image_decode_failed", "image_truncated"}


def refused_with(reasons: set[str], parse, *args):
    """parse(*args), or None when it refused with BadInput of a documented reason; anything else escapes."""
    try:
        return parse(*args)
    except BadInput as exc:
        assert exc.reason in reasons, f"undocumented reason {exc.reason!r}: {exc.detail}"
        return None


# ------------------------------------------------------------------------------------ strategies
def _encode(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")  # lone surrogates kept


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
ids = st.text(min_size=1, max_size=40) | st.integers(0, 2**63 - 1)
zones = st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m)))
aware_times = st.datetimes(min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31), timezones=zones)
iso_times = aware_times.map(datetime.isoformat) | aware_times.map(lambda t: t.astimezone(UTC).isoformat().replace("+00:00", "Z"))


@st.composite
def mutated(draw, valid: dict, values: st.SearchStrategy = json_values) -> dict:
    """A valid record with each field kept, dropped or replaced by any JSON value, plus stray fields."""
    out = {}
    for key, value in valid.items():
        action = draw(st.sampled_from(["keep", "keep", "drop", "replace"]))
        if action == "keep":
            out[key] = value
        elif action == "replace":
            out[key] = draw(values)
    out.update(draw(st.dictionaries(st.text(max_size=8), values, max_size=2)))
    return out


@st.composite
def valid_posts(draw) -> dict:
    post = {"id": draw(ids), "user_id": draw(ids)}
    if draw(st.booleans()):
        post["schema"] = "inferstream.post.v1"
    text = draw(st.text(max_size=200))
    image = draw(st.none() | st.fixed_dictionaries({"encoding": st.sampled_from(["jpeg", "png"]),
                                                    "data": st.binary(min_size=1, max_size=64)}))
    if not text and image is None:
        text = "x"
    post["text"] = text
    if image is not None:
        post["image"] = {"encoding": image["encoding"], "data": base64.b64encode(image["data"]).decode()}
    if draw(st.booleans()):
        post["created_at"] = draw(iso_times)
    return post


@st.composite
def valid_events(draw) -> dict:
    event = {"user_id": draw(ids), "item_id": draw(ids), "kind": draw(st.sampled_from(EVENT_KINDS)), "ts": draw(iso_times)}
    if draw(st.booleans()):
        event["schema"] = "inferstream.event.v1"
    return event


@st.composite
def valid_requests(draw) -> dict:
    request = {"user_id": draw(ids)}
    if draw(st.booleans()):
        request["k"] = draw(st.integers(1, 200))
    if draw(st.booleans()):
        request["request_id"] = draw(st.text(max_size=20) | st.integers(-(2**63), 2**64 - 1))
    return request


def hostile(valid_records) -> st.SearchStrategy[bytes]:
    """Bytes a producer could send: anything, any JSON, or a near-valid record of the kind."""
    return st.one_of(st.binary(max_size=200), json_values.map(_encode), valid_records.flatmap(mutated).map(_encode),
                     valid_records.map(_encode).map(lambda b: b[: len(b) // 2]))


# ------------------------------------------------------------------------------ posts and events
@FUZZ
@given(hostile(valid_posts()))
def test_parse_post_raises_only_documented_bad_input(value):
    post = refused_with(POST_REASONS, parse_post, value)
    if post is not None:
        assert post["text"] or post.get("image") is not None
        dumps({k: v for k, v in post.items() if k != "image"})  # what a verdict copies from it is JSON


@FUZZ
@given(valid_posts())
def test_valid_post_round_trips(record):
    post = parse_post(_encode(record))
    assert (post["id"], post["user_id"], post["text"]) == (str(record["id"]), str(record["user_id"]), record["text"])
    if "image" in record:
        assert post["image"] == {"encoding": record["image"]["encoding"], "data": base64.b64decode(record["image"]["data"])}
    if "created_at" in record:
        assert datetime.fromisoformat(post["created_at"]) == datetime.fromisoformat(record["created_at"])
    else:
        assert post["created_at"] is None


@FUZZ
@given(hostile(valid_events()))
def test_parse_event_raises_only_documented_bad_input(value):
    event = refused_with(EVENT_REASONS, parse_event, value)
    if event is not None:
        assert event["kind"] in EVENT_KINDS
        dumps(event)


@FUZZ
@given(valid_events())
def test_valid_event_round_trips(record):
    event = parse_event(_encode(record))
    assert (event["user_id"], event["item_id"], event["kind"]) == (str(record["user_id"]), str(record["item_id"]), record["kind"])
    assert datetime.fromisoformat(event["ts"]) == datetime.fromisoformat(record["ts"])


@FUZZ
@given(hostile(valid_requests()))
def test_parse_recommendation_request_raises_only_documented_bad_input(value):
    request = refused_with(JSON_REASONS, parse_recommendation_request, value)
    if request is not None:
        assert 1 <= request["k"] <= 200
        dumps(request)


@FUZZ
@given(valid_requests())
def test_valid_recommendation_request_round_trips(record):
    request = parse_recommendation_request(_encode(record))
    assert request["user_id"] == str(record["user_id"])
    assert request["k"] == record.get("k", 10)
    assert request["request_id"] == (None if "request_id" not in record else str(record["request_id"]))


# ------------------------------------------------------------------------------------ frame headers
header_text = st.one_of(
    st.text(max_size=12), st.integers(-(2**70), 2**70).map(str), st.integers(2**63 - 2, 2**66).map(str), st.floats().map(repr),
    st.sampled_from(["", " 7 ", "1e3", "0x10", "٣", "²", "nan", "-0", "inf"]),
)
header_value = st.one_of(header_text.map(str.encode), st.binary(max_size=12), st.none())


@st.composite
def frame_headers(draw) -> list[tuple[str, bytes | None]]:
    valid = {"schema": FRAME_SCHEMA.encode(), "stream_id": b"cam-1", "frame_index": b"7", "pts": b"0.7",
             "encoding": b"jpeg", "width": b"640", "height": b"480"}
    pairs = []
    for key, value in valid.items():
        action = draw(st.sampled_from(["keep", "drop", "replace"]))
        if action != "drop":
            pairs.append((key, value if action == "keep" else draw(header_value)))
    pairs += draw(st.lists(st.tuples(st.text(max_size=8), header_value), max_size=2))
    return pairs


@FUZZ
@given(frame_headers(), st.none() | st.binary(max_size=12), st.booleans())
def test_frame_meta_from_headers_raises_only_documented_bad_input(headers, key, as_mapping):
    meta = refused_with(FRAME_REASONS, FrameMeta.from_headers, dict(headers) if as_mapping else headers, key)
    if meta is not None:
        assert meta.stream_id and meta.frame_index >= 0
        # what the worker writes from it (the verdict's fields and key) must be encodable
        dumps({"id": meta.record_id, "stream_id": meta.stream_id, "frame_index": meta.frame_index, "pts": finite(meta.pts)})
        meta.record_id.encode()


@FUZZ
@given(st.integers(-(2**80), 2**80), st.integers(-(2**80), 2**80), st.integers(-(2**80), 2**80), header_text)
def test_numeric_frame_headers_of_any_size_raise_only_documented_bad_input(index, width, height, pts):
    headers = {"stream_id": b"cam-1", "encoding": b"jpeg", "frame_index": str(index).encode(),
               "width": str(width).encode(), "height": str(height).encode(), "pts": pts.encode()}
    meta = refused_with(FRAME_REASONS, FrameMeta.from_headers, headers, None)
    if meta is not None:
        dumps({"id": meta.record_id, "frame_index": meta.frame_index, "pts": finite(meta.pts)})


@FUZZ
@given(st.text(min_size=1, max_size=30).filter(lambda s: s.encode("utf-8", "ignore").decode() == s),
       st.integers(0, 2**63 - 1), st.floats(-1e9, 1e9), st.sampled_from(ENCODINGS),
       st.integers(0, 100_000), st.integers(0, 100_000))
def test_frame_meta_round_trips_through_its_headers(stream_id, index, pts, encoding, width, height):
    meta = FrameMeta(stream_id, index, pts, encoding, width, height)
    back = FrameMeta.from_headers(meta.headers(), stream_id.encode())
    assert back == FrameMeta(stream_id, index, float(f"{pts:.6f}"), encoding, width, height)


@FUZZ
@given(st.lists(st.tuples(st.text(max_size=8) | st.binary(max_size=8), st.binary(max_size=8) | st.text(max_size=8) | st.none())),
       st.booleans())
def test_decode_headers_accepts_any_header_list(pairs, as_mapping):
    decoded = decode_headers(dict(pairs) if as_mapping else pairs)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in decoded.items())


# ------------------------------------------------------------------------------------------ images
LIMITS = ImageLimits(max_side=48, max_pixels=1500)  # small, so real images can exceed them cheaply


def _within(width: int, height: int, limits: ImageLimits = LIMITS) -> bool:
    return 0 < width <= limits.max_side and 0 < height <= limits.max_side and width * height <= limits.max_pixels


class DecodeGuard:
    """Wraps cv2.imdecode: fails the test when pixels beyond the limits are ever decoded (a bomb)."""

    def __init__(self, limits: ImageLimits = LIMITS) -> None:
        self.limits, self.real, self.calls = limits, cv2.imdecode, 0

    def __call__(self, buf, flags):
        self.calls += 1
        out = self.real(buf, flags)
        if out is not None:
            h, w = out.shape[:2]
            assert _within(w, h, self.limits), f"decoded {w}x{h}: over the limits, a bomb got through"
        return out

    def __enter__(self):
        self._patch = mock.patch.object(cv2, "imdecode", self)
        self._patch.start()
        return self

    def __exit__(self, *exc):
        self._patch.stop()


def _image(width: int, height: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_declaring(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + 3 * min(width, 16)))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _with_fill_bytes(jpeg: bytes, n: int) -> bytes:
    """The JPEG with `n` 0xFF fill bytes before its second marker (legal, ISO 10918-1 B.1.1.2)."""
    return jpeg[:2] + b"\xff" * n + jpeg[2:]


def _with_segment(jpeg: bytes, marker: int, payload: bytes) -> bytes:
    """The JPEG with an extra APPn/COM segment right after SOI."""
    return jpeg[:2] + bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


@st.composite
def crafted_images(draw) -> tuple[bytes, str, int, int]:
    """(bytes, declared encoding, true width, true height): real images in legal but unusual shapes,
    sometimes sent under the wrong encoding or in another format the decoder also reads."""
    width, height = draw(st.integers(1, 90)), draw(st.integers(1, 90))
    rgb = _image(width, height, draw(st.integers(0, 2**16)))
    form = draw(st.sampled_from(["jpeg", "png", "jpeg+fill", "jpeg+segments", "jpeg as png", "png as jpeg",
                                 "bmp", "tiff", "webp", "pgm"]))
    if form.startswith("jpeg"):
        data = encode_image(rgb, "jpeg")
        if form == "jpeg+fill":
            data = _with_fill_bytes(data, draw(st.integers(1, 4)))
        elif form == "jpeg+segments":
            data = _with_segment(data, draw(st.sampled_from([0xE1, 0xEE, 0xFE])), draw(st.binary(max_size=30)))
        return data, "png" if form == "jpeg as png" else "jpeg", width, height
    if form.startswith("png"):
        return encode_image(rgb, "png"), "jpeg" if form == "png as jpeg" else "png", width, height
    ok, buf = cv2.imencode("." + form, rgb[:, :, 0] if form == "pgm" else rgb)
    assert ok
    return buf.tobytes(), draw(st.sampled_from(["jpeg", "png"])), width, height


@FEW
@given(crafted_images())
def test_images_over_the_limits_are_refused_before_decoding(image):
    data, encoding, width, height = image
    with DecodeGuard():
        out = refused_with(IMAGE_REASONS, decode_image, data, encoding, None, None, LIMITS)
    if out is not None:
        assert out.shape == (height, width, 3)


@FEW
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.sampled_from(["png", "jpeg"]))
def test_crafted_dimension_headers_are_refused_before_decoding(width, height, encoding):
    if encoding == "png":
        width, height = width % 2**31, height % 2**31  # IHDR holds 31-bit sizes
        data = _png_declaring(width, height)
    else:  # a real 8x8 JPEG whose frame header is rewritten to declare width x height
        width, height = width % 2**16, height % 2**16
        data = bytearray(encode_image(_image(8, 8, 0), "jpeg"))
        sof = next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC1, 0xC2))
        data[sof + 5: sof + 9] = struct.pack(">HH", height, width)
        data = bytes(data)
    with DecodeGuard(LIMITS):
        out = refused_with(IMAGE_REASONS, decode_image, data, encoding, None, None, LIMITS)
    if not _within(width, height):
        assert out is None


@FEW
@given(st.integers(1, 40), st.integers(1, 40), st.sampled_from(["jpeg", "png"]), st.data())
def test_corrupted_images_raise_only_documented_bad_input(width, height, encoding, data):
    raw = bytearray(encode_image(_image(width, height, width * 41 + height), encoding))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        edit = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if edit == "flip":
            raw[at] ^= data.draw(st.integers(1, 255))
        elif edit == "cut":
            del raw[at:at + data.draw(st.integers(1, 64))]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        if not raw:
            break
    with DecodeGuard(ImageLimits(max_side=40, max_pixels=1600)):
        refused_with(IMAGE_REASONS, decode_source, bytes(raw), encoding, None, None, ImageLimits(max_side=40, max_pixels=1600))


@FUZZ
@given(st.binary(max_size=300), st.sampled_from([*ENCODINGS, "gif", ""]),
       st.none() | st.integers(-5, 10**7), st.none() | st.integers(-5, 10**7))
def test_decode_source_of_any_bytes_raises_only_documented_bad_input(data, encoding, width, height):
    with DecodeGuard(ImageLimits()):
        refused_with(IMAGE_REASONS, decode_source, data, encoding, width, height)


@FEW
@given(st.integers(1, 48), st.integers(1, 30), st.sampled_from(ENCODINGS))
def test_valid_images_round_trip(width, height, encoding):
    rgb = _image(width, height, width + 100 * height)
    out = decode_image(encode_image(rgb, encoding), encoding, width, height, LIMITS)
    assert out.shape == rgb.shape
    if encoding != "jpeg":  # lossless
        np.testing.assert_array_equal(out, rgb)


# ------------------------------------------------------------------------------ replay --from/--to
bound_texts = st.one_of(
    st.text(max_size=30),
    st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=6),
    st.integers(0, 2**70).map(str),
    st.lists(st.tuples(st.integers(0, 99), st.integers(0, 10**12)), min_size=1, max_size=4).map(
        lambda pairs: ",".join(f"{p}:{o}" for p, o in pairs)),
    iso_times,
    st.datetimes().map(datetime.isoformat),  # no timezone
    st.sampled_from(["earliest", " LATEST ", "", "0:", ":1", "1:2,", "1:-2", "-1", "+5", "1e3"]),
)


@FUZZ
@given(bound_texts)
def test_parse_bound_raises_only_replay_error(text):
    try:
        bound = parse_bound(text)
    except ReplayError:
        return
    assert isinstance(bound, Bound)
    bound.describe()  # the replay summary describes both ends


@FUZZ
@given(st.integers(0, 2**63 - 1), st.dictionaries(st.integers(0, 999), st.integers(0, 2**63 - 1), min_size=1, max_size=5),
       st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9998, 1, 1), timezones=zones))
def test_valid_bounds_round_trip(offset, offsets, moment):
    assert parse_bound(str(offset)) == Bound(every_partition=offset)
    assert parse_bound(",".join(f"{p}:{o}" for p, o in offsets.items())) == Bound(offsets=offsets)
    assert parse_bound(moment.isoformat()) == Bound(timestamp_ms=int(moment.timestamp() * 1000))
    assert parse_bound(None) == parse_bound(" earliest ") == parse_bound("latest") == Bound()


# ------------------------------------------------------------------- regressions (found by fuzzing)
def test_png_sent_as_jpeg_is_refused_before_decoding():
    """Found: OpenCV picks the decoder from the bytes, not from the `encoding` header, so a PNG (or BMP,
    TIFF, WebP...) declared as jpeg skipped the size check and was decoded at any size."""
    png = encode_image(_image(60, 8, 1), "png")  # 60 > max_side 48
    with DecodeGuard(), pytest.raises(BadInput) as excinfo:
        decode_image(png, "jpeg", limits=LIMITS)
    assert excinfo.value.reason == "image_decode_failed"


def test_jpeg_sent_as_png_is_refused_before_decoding():
    jpeg = encode_image(_image(8, 60, 2), "jpeg")
    with DecodeGuard(), pytest.raises(BadInput) as excinfo:
        decode_image(jpeg, "png", limits=LIMITS)
    assert excinfo.value.reason == "image_decode_failed"


@pytest.mark.parametrize("form", ["bmp", "tiff", "webp"])
def test_other_formats_are_refused_before_decoding(form):
    ok, buf = cv2.imencode("." + form, _image(60, 60, 3))
    with DecodeGuard(), pytest.raises(BadInput) as excinfo:
        decode_image(buf.tobytes(), "jpeg", limits=LIMITS)
    assert excinfo.value.reason == "image_decode_failed"


def test_jpeg_bomb_behind_fill_bytes_is_refused_before_decoding():
    """Found: 0xFF fill bytes before a marker (legal, and skipped by libjpeg) stopped the header walk,
    and an image whose size was not read was decoded anyway."""
    bomb = _with_fill_bytes(encode_image(_image(60, 60, 4), "jpeg"), 1)
    with DecodeGuard(), pytest.raises(BadInput) as excinfo:
        decode_image(bomb, "jpeg", limits=LIMITS)
    assert excinfo.value.reason == "image_too_large"


def test_jpeg_with_fill_bytes_within_the_limits_still_decodes():
    rgb = _image(40, 30, 5)
    out = decode_image(_with_fill_bytes(encode_image(rgb, "jpeg"), 3), "jpeg", 40, 30, LIMITS)
    assert out.shape == (30, 40, 3)


def test_frame_index_beyond_64_bits_is_a_bad_header():
    """Found: frame_index 2**63 parsed, then the verdict could not be encoded (orjson: int64 only), so
    the frame was dead-lettered as internal_error instead of bad_header."""
    headers = {"stream_id": b"cam-1", "encoding": b"jpeg", "frame_index": str(2**63).encode()}
    with pytest.raises(BadInput) as excinfo:
        FrameMeta.from_headers(headers, None)
    assert excinfo.value.reason == "bad_header"
    assert FrameMeta.from_headers({**headers, "frame_index": str(2**63 - 1).encode()}, None).frame_index == 2**63 - 1


def test_request_id_beyond_64_bits_is_refused_not_mangled():
    """Found: orjson reads a JSON integer beyond 64 bits as a float, so the echoed request_id came back
    as '-9.223372036854776e+18' instead of the id the caller sent."""
    with pytest.raises(BadInput) as excinfo:
        parse_recommendation_request(b'{"user_id": "u1", "request_id": -9223372036854775809}')
    assert excinfo.value.reason == "wrong_schema"
    assert parse_recommendation_request(b'{"user_id": "u1", "request_id": 18446744073709551615}')["request_id"] == str(2**64 - 1)


@pytest.mark.parametrize("value", [1.5, True, [1], {"a": 1}])
def test_request_id_that_is_not_a_string_or_integer_is_refused(value):
    with pytest.raises(BadInput):
        parse_recommendation_request(json.dumps({"user_id": "u1", "request_id": value}).encode())


@pytest.mark.parametrize("text", ["\u00b2", "\u1369", "1\u00b2", "0:\u00b2"])
def test_replay_bound_with_non_ascii_digits_is_a_replay_error(text):
    """Found: str.isdigit() accepts superscript and Ethiopic digits that int() refuses (a ValueError
    traceback from `inferstream replay --from \u00b2` instead of a usage error)."""
    with pytest.raises(ReplayError):
        parse_bound(text)


@pytest.mark.parametrize("text", ["0001-01-01T00:00:00Z", "1969-12-31T23:59:59Z", "9999-12-31T23:59:59-23:59"])
def test_replay_bound_outside_kafka_timestamps_is_a_replay_error(text):
    """Found: a time before 1970 or at the end of year 9999 parsed, then the replay summary's
    describe() raised (year 0 / year 10000 out of range) after the replay had run."""
    with pytest.raises(ReplayError):
        parse_bound(text)


def test_replay_cli_reports_a_bad_range_as_a_usage_error():
    from click.testing import CliRunner

    from streams.cli import main

    result = CliRunner().invoke(main, ["replay", "--source", "posts", "--output", "out", "--from", "\u00b2"])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1  # click's error, no traceback
    assert "Error:" in result.output and "neither an offset" in result.output
