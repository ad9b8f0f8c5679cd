"""Record contracts: a JSON Schema (draft 2020-12) per record kind, and `asyncapi.yaml` for the topics.

The worker's own parsers (streams/schemas.py) stay hand-written for speed; these files are what a
consumer or producer in any language may rely on, and what producers and the tests check records
against (tests/test_contracts.py proves the parsers and the schemas agree).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from operators.errors import BadInput

NAMES = ("post", "event", "recommendation_request", "frame_headers", "verdict", "dead_letter", "recommendations",
         "user_state", "alert", "alert_state")
# the `schema` field of a record -> its contract
BY_SCHEMA_FIELD = {
    "inferstream.post.v1": "post", "inferstream.event.v1": "event",
    "inferstream.recommendation_request.v1": "recommendation_request", "inferstream.verdict.v1": "verdict",
    "inferstream.dead_letter.v1": "dead_letter", "inferstream.recommendations.v1": "recommendations",
    "inferstream.alert.v1": "alert",
}


def load(name: str) -> dict[str, Any]:
    """The JSON Schema of contract `name` (one of NAMES)."""
    return json.loads(resources.files(__package__).joinpath(f"{name}.json").read_text(encoding="utf-8"))


@cache
def validator(name: str):
    # imported here: only producers and tests validate, never the worker's hot path
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource

    # contracts refer to each other by file name, resolved against their $id (never fetched)
    registry = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in map(load, NAMES))
    return Draft202012Validator(load(name), registry=registry)


def check(name: str, record: Any) -> None:
    """Raise BadInput("wrong_schema") naming the first place where `record` breaks contract `name`."""
    error = next(iter(validator(name).iter_errors(record)), None)
    if error is not None:
        where = "/".join(map(str, error.absolute_path)) or "the record"
        raise BadInput("wrong_schema", f"{where}: {error.message[:300]} (contract {name}.json)")
