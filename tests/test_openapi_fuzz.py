"""Schemathesis against streams/openapi.json: requests generated from the document (valid ones and ones
that break it), sent over HTTP to the real worker routes; no answer may be a 5xx, and every answer's
status, content type and body must be the ones the document declares. Bounded: a fixed number of
derandomized examples per operation (the same requests on every run)."""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections import Counter

import pytest
import schemathesis
from aiohttp import web as aiohttp_web
from conftest import image_policy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from test_rest_api import TOKEN, build

from streams import web
from streams.broker import free_port
from streams.config import Settings

EXAMPLES = 25  # per operation and mode: ~15 operations x 2 modes x 25 = 750 requests, a few seconds


@schemathesis.check
def no_server_fault(ctx, response, case) -> bool | None:
    """not_a_server_error, except 504 deadline_exceeded for a deadline the request itself set under a
    second (schemathesis likes 1e-7 ms): the server kept the client's deadline, as documented."""
    try:
        deadline_ms = float((case.headers or {}).get(web.TIMEOUT_HEADER, "inf"))
    except (TypeError, ValueError):  # a malformed header is a 400, never excused
        deadline_ms = math.inf
    if response.status_code == 504 and response.json().get("error") == "deadline_exceeded" and deadline_ms < 1000:
        return None
    return not_a_server_error(ctx, response, case)


CHECKS = [no_server_fault, status_code_conformance, content_type_conformance, response_schema_conformance]


class Worker:
    """The API's aiohttp app served on a free port from a thread of its own (schemathesis calls are blocking)."""

    def __init__(self, settings: Settings) -> None:
        self.app, self.registry = build(settings)
        web.install(self.app, web.WorkerState({}))
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> Worker:
        self._thread.start()
        self._runner = aiohttp_web.AppRunner(self.app.web.web_app)
        self._run(self._runner.setup())
        self._run(aiohttp_web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        return self

    def __exit__(self, *exc) -> None:
        self._run(self._runner.cleanup())
        self._run(self.registry.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(60)


def fuzz(operation, mode: GenerationMode, checks: list, base_url: str, seen: Counter) -> None:
    """EXAMPLES generated requests of one operation against the server, each answer checked."""

    @given(case=operation.as_strategy(generation_mode=mode), known=st.sampled_from(["tiny", "poisoned", None]))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    def check(case, known):
        if known and case.path_parameters:  # reach the models too, not only the 404 of a random name
            case.path_parameters = dict.fromkeys(case.path_parameters, known)
        response = case.call(base_url=base_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        seen[operation.label, response.status_code] += 1
        case.validate_response(response, checks=checks)

    check()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_request_the_document_allows_or_breaks_gets_a_5xx(tiny_repo, tmp_path, mode):
    api = Settings(model_dir=str(tiny_repo), policy=image_policy(tmp_path, "tiny"), data_dir=str(tmp_path / "data"),
                   api_token=TOKEN, intra_op_threads=1, max_message_bytes=200_000)
    schema = schemathesis.openapi.from_dict(json.loads(web.OPENAPI.read_text()))
    checks = CHECKS + ([negative_data_rejection] if mode == GenerationMode.NEGATIVE else [])
    failures, seen = {}, Counter()
    with Worker(api) as worker:
        for result in schema.get_all_operations():
            operation = result.ok()
            # /ready's 503 is its answer (not ready: no group joined here), not a fault
            applied = [c for c in checks if not (operation.path == "/ready" and c is no_server_fault)]
            try:
                fuzz(operation, mode, applied, f"http://127.0.0.1:{worker.port}", seen)
            except Unsatisfiable:  # nothing to break: no parameters, no body
                assert mode == GenerationMode.NEGATIVE, operation.label
            except (Exception, BaseExceptionGroup) as exc:  # one report per operation, all of them at the end
                failures[operation.label] = f"{type(exc).__name__}: {exc}"[:3000]
    assert not failures, "\n\n".join(f"{label}\n{text}" for label, text in failures.items())
    if mode == GenerationMode.POSITIVE:  # the generated requests reached a model, not only its 404
        assert seen["POST /predict/{model}", 200], sorted(seen.items())
