"""Topic names and the wire schemas of every record inferstream reads or writes.

Everything on the wire is JSON (UTF-8) or, for frames, image bytes with string headers: any Kafka
client (kcat, Java, Go) can produce and read them. Each record names its schema version
(`schema` field, or the `schema` header on frames); unknown versions are refused on the way in.
"""

from __future__ import annotations

import base64
import json
import math
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from operators.errors import BadInput

# Logical topic names; the real name is Settings.topic_prefix + name.
FRAMES, POSTS, EVENTS = "frames", "posts", "events"
VERDICTS, RECOMMENDATIONS, DEAD_LETTERS = "verdicts", "recommendations", "dead-letters"
RECOMMENDATION_REQUESTS = "recommendation-requests"
USER_STATE = "user-state"  # internal: per-user state snapshots, the recommendation agent's changelog
SHADOW_VERDICTS = "shadow-verdicts"  # verdicts of shadow model versions (never in `verdicts`)
ALERTS = "alerts"  # stream-level alert episodes (start/end) from frame verdicts
ALERT_STATE = "alert-state"  # internal: per-stream alert state snapshots, the alert agent's changelog
ALL_TOPICS = (FRAMES, POSTS, EVENTS, VERDICTS, RECOMMENDATIONS, DEAD_LETTERS, RECOMMENDATION_REQUESTS, USER_STATE,
              SHADOW_VERDICTS, ALERTS, ALERT_STATE)
CHANGELOG_TOPICS = (USER_STATE, ALERT_STATE)  # compacted, kept forever: the last snapshot per key is the state

FRAME_SCHEMA = "inferstream.frame.v1"
POST_SCHEMA = "inferstream.post.v1"
EVENT_SCHEMA = "inferstream.event.v1"
VERDICT_SCHEMA = "inferstream.verdict.v1"
DEAD_LETTER_SCHEMA = "inferstream.dead_letter.v1"
RECOMMENDATION_REQUEST_SCHEMA = "inferstream.recommendation_request.v1"

EVENT_KINDS = ("view", "click", "like", "purchase")
MAX_TEXT_CHARS = 20_000
MAX_ID_CHARS = 256
MAX_FRAME_INDEX = 2**63 - 1


def dumps(record: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON (orjson: ~10x the stdlib on verdicts); NaN/Infinity are not JSON and are
    refused. orjson writes them as null, so a record with a null is checked again by the stdlib."""
    out = orjson.dumps(record, option=orjson.OPT_NON_STR_KEYS)
    if b"null" in out:
        json.dumps(record, allow_nan=False)  # raises ValueError on NaN/Infinity
    return out


def now_ms() -> int:
    return int(time.time() * 1000)


# ----------------------------------------------------------------------------------------- frames
@dataclass(frozen=True)
class FrameMeta:
    """Frame metadata carried in Kafka headers (all values UTF-8 strings). Key = stream id."""

    stream_id: str
    frame_index: int
    pts: float  # presentation time in seconds from the start of the stream
    encoding: str  # jpeg | png | raw (rgb24, row-major)
    width: int
    height: int
    # Live cameras: the connection a frame came from (`<ingester run>-<n>`); a new value means the
    # source was reopened (a reconnect), a gap within one value is a stall. None: header absent.
    session: str | None = None

    @property
    def record_id(self) -> str:
        return f"{self.stream_id}:{self.frame_index}"

    def headers(self) -> list[tuple[str, bytes]]:
        pairs = {
            "schema": FRAME_SCHEMA, "stream_id": self.stream_id, "frame_index": str(self.frame_index),
            "pts": f"{self.pts:.6f}", "encoding": self.encoding, "width": str(self.width), "height": str(self.height),
        }
        if self.encoding == "raw":
            pairs["pixel_format"] = "rgb24"
        if self.session is not None:
            pairs["session"] = self.session
        return [(k, v.encode()) for k, v in pairs.items()]

    @classmethod
    def from_headers(cls, headers: Any, key: bytes | None) -> FrameMeta:
        h = decode_headers(headers)
        schema = h.get("schema", FRAME_SCHEMA)
        if schema != FRAME_SCHEMA:
            raise BadInput("unknown_schema", f"frame schema {schema!r} is not {FRAME_SCHEMA!r}")
        missing = [k for k in ("frame_index", "encoding") if k not in h]
        stream_id = h.get("stream_id") or (key.decode("utf-8", "replace") if key else "")
        if not stream_id:
            missing.insert(0, "stream_id")
        if missing:
            raise BadInput("missing_header", f"frame headers lack {', '.join(missing)}")
        try:
            frame_index = int(h["frame_index"])
            pts = float(h.get("pts", "nan"))
            width = int(h["width"]) if "width" in h else 0
            height = int(h["height"]) if "height" in h else 0
        except ValueError as exc:
            raise BadInput("bad_header", f"frame header is not a number: {exc}") from exc
        if not 0 <= frame_index <= MAX_FRAME_INDEX:  # the verdict carries it as a JSON int64
            raise BadInput("bad_header", f"frame_index must be in 0..{MAX_FRAME_INDEX}, got {frame_index}")
        return cls(stream_id, frame_index, pts, h["encoding"], width, height, h.get("session"))


def decode_headers(headers: Any) -> dict[str, str]:
    """Kafka headers (list of pairs or mapping, bytes values) -> str dict; bad UTF-8 is replaced."""
    items = headers.items() if isinstance(headers, dict) else (headers or [])
    return {str(k): (v.decode("utf-8", "replace") if isinstance(v, bytes | bytearray) else str(v or "")) for k, v in items}


# -------------------------------------------------------------------------------- posts and events
def _load_json_object(value: bytes | None, expected_schema: str) -> dict[str, Any]:
    if not value:
        raise BadInput("empty_record", "the record value is empty")
    try:
        record = orjson.loads(value)
    except orjson.JSONDecodeError as exc:  # also invalid UTF-8, lone surrogates, NaN literals
        raise BadInput("malformed_json", str(exc)) from exc
    if not isinstance(record, dict):
        raise BadInput("wrong_schema", f"expected a JSON object, got {type(record).__name__}")
    schema = record.get("schema", expected_schema)
    if schema != expected_schema:
        raise BadInput("unknown_schema", f"schema {schema!r} is not {expected_schema!r}")
    return record


def _require_id(record: dict[str, Any], field: str) -> str:
    value = record.get(field)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        raise BadInput("wrong_schema", f"{field!r} must be a non-empty string of at most {MAX_ID_CHARS} chars")
    return value


def _timestamp(record: dict[str, Any], field: str, required: bool) -> str | None:
    value = record.get(field)
    if value is None:
        if required:
            raise BadInput("wrong_schema", f"{field!r} is required (ISO-8601 with timezone)")
        return None
    try:
        parsed = datetime.fromisoformat(value if isinstance(value, str) else str(value))  # "Z" included (3.11)
    except ValueError as exc:
        raise BadInput("wrong_schema", f"{field!r} is not an ISO-8601 timestamp: {value!r}") from exc
    if parsed.tzinfo is None:
        raise BadInput("wrong_schema", f"{field!r} needs a timezone (e.g. ...Z): {value!r}")
    return parsed.isoformat()


def parse_post(value: bytes | None) -> dict[str, Any]:
    """Validate a `posts` record. Returns it normalised (image decoded from base64 to bytes)."""
    record = _load_json_object(value, POST_SCHEMA)
    post = {"schema": POST_SCHEMA, "id": _require_id(record, "id"), "user_id": _require_id(record, "user_id")}
    text = record.get("text", "")
    if not isinstance(text, str):
        raise BadInput("wrong_schema", "'text' must be a string")
    if len(text) > MAX_TEXT_CHARS:
        raise BadInput("text_too_long", f"text has {len(text)} characters, limit {MAX_TEXT_CHARS}")
    post["text"] = text
    image = record.get("image")
    if image is not None:
        if not isinstance(image, dict) or not isinstance(image.get("data"), str):
            raise BadInput("wrong_schema", "'image' must be {\"encoding\": \"jpeg|png\", \"data\": \"<base64>\"}")
        try:
            data = base64.b64decode(image["data"], validate=True)
        except ValueError as exc:
            raise BadInput("wrong_schema", f"image data is not base64: {exc}") from exc
        post["image"] = {"encoding": image.get("encoding", "jpeg"), "data": data}
    if not text and image is None:
        raise BadInput("wrong_schema", "a post needs 'text', 'image' or both")
    post["created_at"] = _timestamp(record, "created_at", required=False)
    return post


def parse_event(value: bytes | None) -> dict[str, Any]:
    """Validate an `events` record (a user interacting with an item)."""
    record = _load_json_object(value, EVENT_SCHEMA)
    kind = record.get("kind")
    if kind not in EVENT_KINDS:
        raise BadInput("unknown_event_kind", f"kind {kind!r} is not one of {', '.join(EVENT_KINDS)}")
    return {
        "schema": EVENT_SCHEMA, "user_id": _require_id(record, "user_id"), "item_id": _require_id(record, "item_id"),
        "kind": kind, "ts": _timestamp(record, "ts", required=True),
    }


def parse_recommendation_request(value: bytes | None) -> dict[str, Any]:
    """Validate a `recommendation-requests` record: {"user_id", optional "request_id", optional "k"}."""
    record = _load_json_object(value, RECOMMENDATION_REQUEST_SCHEMA)
    k = record.get("k", 10)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 200:
        raise BadInput("wrong_schema", "'k' must be an integer between 1 and 200")
    request_id = record.get("request_id")
    if request_id is not None and (not isinstance(request_id, str | int) or isinstance(request_id, bool)):
        # orjson reads integers beyond 64 bits as floats: echoing one would not give it back
        raise BadInput("wrong_schema", "'request_id' must be a string or a 64-bit integer")
    return {"user_id": _require_id(record, "user_id"), "request_id": None if request_id is None else str(request_id), "k": k}


# ---------------------------------------------------------------------------------------- outputs
@dataclass(frozen=True)
class SourceRecord:
    """Where an input record came from: enough to find it again, and to measure latency."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    key: bytes | None
    headers: dict[str, str]
    value: bytes | None

    def coordinates(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset, "timestamp_ms": self.timestamp_ms}


def _key_field(key: bytes | None) -> dict[str, Any]:
    if key is None:
        return {"key": None, "key_encoding": None}
    try:
        return {"key": key.decode("utf-8"), "key_encoding": "utf-8"}
    except UnicodeDecodeError:
        return {"key": base64.b64encode(key).decode(), "key_encoding": "base64"}


MAX_DEAD_LETTER_VALUE = 256 * 1024  # larger originals are referenced by offset only


def dead_letter(source: SourceRecord, reason: str, detail: str, stage: str) -> dict[str, Any]:
    """A `dead-letters` record: why the input could not be processed, and the input itself."""
    value = source.value or b""
    record: dict[str, Any] = {
        "schema": DEAD_LETTER_SCHEMA, "reason": reason, "detail": detail[:2000], "stage": stage,
        "source": source.coordinates(), **_key_field(source.key), "headers": source.headers,
        "value_bytes": len(value), "failed_at_ms": now_ms(),
    }
    if len(value) <= MAX_DEAD_LETTER_VALUE:
        record["value_b64"] = base64.b64encode(value).decode()
    return record


def finite(x: float) -> float | None:
    """JSON has no NaN: missing numbers (e.g. an unknown pts) become null."""
    return x if math.isfinite(x) else None
