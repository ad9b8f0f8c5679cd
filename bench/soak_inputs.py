"""What the soak produces: frames, posts and events numbered by a per-kind sequence, and the poison.

Record `seq` of a kind is poison when `seq % poison_every == poison_every - 1`, cycling through the
kind's malformed variants (bad JSON, undecodable or lying image bytes, wrong types, missing or bad
headers); each names the dead-letter reason the worker should give it. Ids are derived from the
sequence, so the books can check that a verdict names the input it claims to answer.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import numpy as np

from bench.frames_throughput import sample_frames
from operators.images import encode_image
from streams.schemas import EVENT_SCHEMA, POST_SCHEMA, FrameMeta

Record = tuple[bytes, bytes, list[tuple[str, bytes]] | None]  # key, value, headers
STREAMS = 8
USERS = 6000  # the catalogue's users (cf-retrieval), so most get collaborative lists
ITEMS = 3000  # the catalogue's items: none is unknown (an unknown item is skipped, with no output to count)
KINDS_OF_EVENT = (("view", 0.80), ("click", 0.12), ("like", 0.06), ("purchase", 0.02))


def record_id(kind: str, seq: int) -> str | None:
    """The verdict id of input `seq` (events have none)."""
    if kind == "frames":
        return f"soak-cam-{seq % STREAMS}:{seq}"
    if kind == "posts":
        return f"soak-p-{seq}"
    return None


class Inputs:
    def __init__(self, frame_size: tuple[int, int], texts: list[str], poison_every: int = 1000, seed: int = 0) -> None:
        self.jpegs = [encode_image(f, "jpeg") for f in sample_frames(STREAMS, frame_size)]
        self.size = frame_size
        self.texts = texts
        self.small_jpeg = base64.b64encode(encode_image(sample_frames(1, (160, 120))[0], "jpeg")).decode()
        self.poison_every = poison_every
        self.rng = np.random.default_rng(seed)
        self.kind_p = np.array([p for _, p in KINDS_OF_EVENT])
        self.poison: dict[str, list[tuple[str, str, Callable[[int], Record]]]] = {
            "frames": [
                ("frame: not an image", "image_decode_failed", lambda s: self._frame(s, value=b"this is not a jpeg")),
                ("frame: empty value", "empty_image", lambda s: self._frame(s, value=b"")),
                ("frame: truncated jpeg", "image_decode_failed", lambda s: self._frame(s, value=self.jpegs[0][:200])),
                ("frame: no frame_index header", "missing_header",
                 lambda s: self._frame(s, drop="frame_index")),
                ("frame: frame_index not a number", "bad_header", lambda s: self._frame(s, set_={"frame_index": b"seven"})),
                ("frame: raw size mismatch", "size_mismatch",
                 lambda s: self._frame(s, value=b"\x00" * 100, set_={"encoding": b"raw", "pixel_format": b"rgb24"})),
                ("frame: unknown encoding", "unknown_encoding", lambda s: self._frame(s, set_={"encoding": b"gif"})),
                ("frame: huge dimensions", "image_too_large",
                 lambda s: self._frame(s, set_={"width": b"100000000", "height": b"100000000"})),
            ],
            "posts": [
                ("post: bad JSON", "malformed_json", lambda s: (f"soak-p-{s}".encode(), b'{"id": "soak-p-', None)),
                ("post: text is a number", "wrong_schema", lambda s: self._post(s, text=12345)),
                ("post: id is a list", "wrong_schema", lambda s: self._post(s, id=["soak-p", s])),
                ("post: image not base64", "wrong_schema",
                 lambda s: self._post(s, text=None, image={"encoding": "jpeg", "data": "%%% not base64 %%%"})),
                ("post: image bytes not an image", "image_decode_failed",
                 lambda s: self._post(s, text=None, image={"encoding": "jpeg", "data": base64.b64encode(b"nope").decode()})),
                ("post: unknown schema", "unknown_schema", lambda s: self._post(s, schema="inferstream.post.v99")),
                ("post: text too long", "text_too_long", lambda s: self._post(s, text="a" * 20001)),
            ],
            "events": [
                ("event: bad JSON", "malformed_json", lambda s: (b"u0001", b"{nope", None)),
                ("event: unknown kind", "unknown_event_kind", lambda s: self._event(s, kind="teleport")),
                ("event: user_id is a list", "wrong_schema", lambda s: self._event(s, user_id=["u0001"])),
                ("event: kind is a number", "unknown_event_kind", lambda s: self._event(s, kind=3)),
                ("event: no item_id", "wrong_schema", lambda s: self._event(s, item_id=None)),
                ("event: ts far in the future", "timestamp_in_future",
                 lambda s: self._event(s, ts=(datetime.now(UTC) + timedelta(days=365)).isoformat())),
            ],
        }

    def names(self) -> dict[str, list[str]]:
        return {kind: [name for name, _, _ in variants] for kind, variants in self.poison.items()}

    def expected_reasons(self) -> dict[str, str]:
        return {name: reason for variants in self.poison.values() for name, reason, _ in variants}

    def make(self, kind: str, seq: int) -> tuple[Record, int]:
        """(record, variant): variant -1 for a good record, else the index of its poison variant."""
        if seq % self.poison_every == self.poison_every - 1:
            variants = self.poison[kind]
            variant = (seq // self.poison_every) % len(variants)
            return variants[variant][2](seq), variant
        return {"frames": self._frame, "posts": self._post, "events": self._event}[kind](seq), -1

    # ------------------------------------------------------------------------------------- records
    def _frame(self, seq: int, value: bytes | None = None, drop: str | None = None,
               set_: dict[str, bytes] | None = None) -> Record:
        stream = f"soak-cam-{seq % STREAMS}"
        headers = dict(FrameMeta(stream, seq, seq / 30, "jpeg", *self.size).headers())
        if drop:
            headers.pop(drop)
        headers.update(set_ or {})
        return stream.encode(), self.jpegs[seq % STREAMS] if value is None else value, list(headers.items())

    def _post(self, seq: int, **fields) -> Record:
        body = {"schema": POST_SCHEMA, "id": f"soak-p-{seq}", "user_id": f"u{seq % USERS:04d}",
                "text": self.texts[seq % len(self.texts)] + f" #{seq}", "created_at": datetime.now(UTC).isoformat()}
        if seq % 20 == 0:  # one post in 20 has a photo: the image checks on posts too
            body["image"] = {"encoding": "jpeg", "data": self.small_jpeg}
        body.update(fields)
        body = {k: v for k, v in body.items() if v is not None}
        return f"soak-p-{seq}".encode(), json.dumps(body).encode(), None

    def _event(self, seq: int, **fields) -> Record:
        user = f"u{int(self.rng.integers(USERS)):04d}"
        body = {"schema": EVENT_SCHEMA, "user_id": user, "item_id": f"i{int(self.rng.integers(ITEMS)):04d}",
                "kind": KINDS_OF_EVENT[int(self.rng.choice(len(KINDS_OF_EVENT), p=self.kind_p))][0],
                "ts": datetime.now(UTC).isoformat()}
        body.update(fields)
        body = {k: v for k, v in body.items() if v is not None}
        return user.encode(), json.dumps(body).encode(), None
