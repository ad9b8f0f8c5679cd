"""Worker HTTP endpoints on Faust's own web server (one port per worker, no second server to run).

- GET /metrics: Prometheus exposition (streams/metrics.py).
- GET /health: the process serves requests (liveness).
- GET /ready: models loaded, the worker has completed a group join, no rebalance in progress, and
  every agent is running (readiness; 503 with the failing checks otherwise).
- The serving API (`install_api`, documented in streams/openapi.json, served at GET /openapi.json):
  GET /models, POST /predict/{model}, POST /moderate, and the admin routes POST
  /admin/models/{name}/{load,promote,rollback,split,shadow,reload} and POST /admin/reload.
  Every error is `{"error", "detail"}` with a 4xx for the client's mistakes (aiohttp's own 404, 405
  and 413 included), 5xx only for the server's side; bodies are limited to max_message_bytes,
  `X-Request-Timeout-Ms` sets a call's deadline, and streams/admission.py limits the calls in flight.

Why on the worker's own web server rather than a separate REST service: the worker already holds the
loaded model versions, their batchers and their routes, so a synchronous prediction is batched with
the stream's records and served by exactly the version the stream uses, and an admin change (pin,
split, shadow, reload) acts on the very process that serves traffic, with no second copy of every
model in memory and no second port to deploy, secure and scrape. Faust's server is aiohttp; views are
thin: parse the request, call streams/serving_api.py, answer JSON.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faust
from aiohttp import web as aiohttp_web
from aiohttp.web_exceptions import HTTPException, HTTPRequestEntityTooLarge
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from streams import diagnostics, metrics
from streams.admission import MODERATE
from streams.serving_api import ADMIN_ACTIONS, ApiError, ServingAPI

log = logging.getLogger(__name__)

OPENAPI = Path(__file__).parent / "openapi.json"
TIMEOUT_HEADER = "X-Request-Timeout-Ms"


class WorkerState:
    """What readiness needs to know, updated by Faust's rebalance signals. `models` is a mapping, or a
    callable returning one (the current versions, which change on hot reloads)."""

    def __init__(self, models: dict[str, Any] | Callable[[], dict[str, Any]]) -> None:
        self._models = models  # role -> {"name", "version", "provider"}
        self.joined = False
        self.assigned_partitions = 0

    @property
    def models(self) -> dict[str, Any]:
        return self._models() if callable(self._models) else self._models


def install(app: faust.App, state: WorkerState) -> None:
    """/metrics, /health, /ready, and what the worker is waiting on (/debug/state, SIGUSR1)."""
    diagnostics.install(app)

    @app.on_partitions_assigned.connect
    async def _assigned(sender, assigned, **kwargs) -> None:
        state.joined = True
        state.assigned_partitions = len(assigned)

    @app.page("/metrics")
    class Metrics(View):
        async def get(self, request: Request) -> Response:
            return self.bytes(generate_latest(metrics.REGISTRY), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/health")
    class Health(View):
        async def get(self, request: Request) -> Response:
            return self.json({"status": "ok"})

    @app.page("/ready")
    class Ready(View):
        async def get(self, request: Request) -> Response:
            agents = {name: _agent_running(agent) for name, agent in app.agents.items()}
            models = state.models
            checks = {"models_loaded": bool(models), "group_joined": state.joined,
                      "not_rebalancing": not app.rebalancing, "agents_running": all(agents.values())}
            body = {"ready": all(checks.values()), "checks": checks, "agents": agents, "models": models,
                    "assigned_partitions": state.assigned_partitions}
            return self.json(body, status=200 if body["ready"] else 503)


def _agent_running(agent) -> bool:
    """An agent is running when at least one of its actors has a live task (Faust restarts crashed
    actors; a dead one leaves a finished task behind)."""
    tasks = [actor.actor_task for actor in list(agent._actors)]
    return any(t is not None and not t.done() for t in tasks)


def _json_response(view: View, body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    response = view.bytes(_dumps(body), content_type="application/json", status=status)
    response.headers.update(headers or {})
    return response


def _dumps(body: Any) -> bytes:
    """JSON of `body`; a non-finite float (a model's NaN or overflow) becomes "NaN", "Infinity" or
    "-Infinity", as in protobuf's JSON mapping, rather than invalid JSON or a 500."""
    try:
        return json.dumps(body, allow_nan=False).encode()
    except ValueError:
        return json.dumps(_finite(body), allow_nan=False).encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _http_error(exc: HTTPException) -> ApiError:
    """aiohttp's own refusals (body over client_max_size, no such route, method not allowed) as API errors."""
    if isinstance(exc, HTTPRequestEntityTooLarge):
        return ApiError(413, "payload_too_large", exc.text or "the body is too large")
    error = (exc.reason or "error").lower().replace(" ", "_").replace("-", "_")
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
    return ApiError(exc.status, error, exc.reason if not exc.text or exc.text.startswith(f"{exc.status}:") else exc.text,
                    headers)


@aiohttp_web.middleware
async def _json_errors(request: aiohttp_web.Request, handler) -> aiohttp_web.StreamResponse:
    """Every answer counted by status; aiohttp's HTTP errors raised outside a view (unknown route, wrong
    method) answered with the `{"error", "detail"}` body like the views' own errors."""
    try:
        response = await handler(request)
    except HTTPException as exc:
        if exc.status < 400:
            raise
        error = _http_error(exc)
        if exc.status in (404, 405):
            error.detail = f"no route {request.method} {request.path}" + (
                f" (allowed: {error.headers['Allow']})" if "Allow" in error.headers else "")
        response = aiohttp_web.json_response(error.body(), status=error.status, headers=error.headers)
    metrics.API_RESPONSES.labels("rest", str(response.status)).inc()
    return response


async def _answer(view: View, call) -> Response:
    """Run an API call; ApiError -> its status, headers and `{"error", "detail"}`; aiohttp's HTTP errors
    (413 for a body over client_max_size) likewise; anything else -> 500, logged."""
    try:
        return _json_response(view, await call())
    except ApiError as exc:
        return _json_response(view, exc.body(), exc.status, exc.headers)
    except HTTPException as exc:
        if exc.status < 400:
            raise
        error = _http_error(exc)
        return _json_response(view, error.body(), error.status, error.headers)
    except Exception as exc:
        log.exception("%s failed", type(view).__name__)
        return _json_response(view, {"error": "internal_error", "detail": f"{type(exc).__name__}: {exc}"}, 500)


async def _body(request: Request, limit: int) -> bytes:
    """The request body, or 413 when it is over `limit` bytes (max_message_bytes: no body larger than a
    record the streams take), refused from Content-Length before reading where the client sent one."""
    too_large = ApiError(413, "payload_too_large", f"the body is over {limit} bytes (max_message_bytes)")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    try:
        body = await request.read()
    except HTTPRequestEntityTooLarge as exc:  # a chunked body over aiohttp's client_max_size
        raise too_large from exc
    if len(body) > limit:
        raise too_large
    return body


def _timeout_s(request: Request) -> float | None:
    """The client's deadline from the `X-Request-Timeout-Ms` header (milliseconds, > 0), in seconds."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        ms = float(raw)
    except ValueError:
        ms = math.nan
    if not (math.isfinite(ms) and ms > 0):
        raise ApiError(400, "bad_timeout", f"{TIMEOUT_HEADER} must be a positive number of milliseconds, not {raw!r}")
    return ms / 1000


def install_api(app: faust.App, api: ServingAPI) -> None:
    """The serving API's routes (streams/openapi.json documents every one of them)."""
    app.web.web_app.middlewares.append(_json_errors)
    limit = api.settings.max_message_bytes

    @app.page("/openapi.json")
    class OpenAPI(View):
        async def get(self, request: Request) -> Response:
            if not OPENAPI.is_file():  # a wheel built without its package data
                return _json_response(self, {"error": "not_found", "detail": f"{OPENAPI} is not installed"}, 404)
            return self.bytes(OPENAPI.read_bytes(), content_type="application/json")

    @app.page("/models")
    class Models(View):
        async def get(self, request: Request) -> Response:
            async def call():
                return api.models()
            return await _answer(self, call)

    @app.page("/predict/{model}")
    class Predict(View):
        async def post(self, request: Request, model: str) -> Response:
            async def call():
                timeout_s = _timeout_s(request)
                api.refuse_if_busy(model)
                body = await _body(request, limit)
                return await api.predict(model, body, request.headers.get("Content-Type"),
                                         request.query.get("version") or None, request.query.get("key") or None,
                                         timeout_s)
            return await _answer(self, call)

    @app.page("/moderate")
    class Moderate(View):
        async def post(self, request: Request) -> Response:
            async def call():
                timeout_s = _timeout_s(request)
                api.refuse_if_busy(MODERATE)
                return await api.moderate(await _body(request, limit), request.headers.get("Content-Type"), timeout_s)
            return await _answer(self, call)

    for action in ADMIN_ACTIONS:
        app.page(f"/admin/models/{{name}}/{action}", name=f"admin_{action}")(_admin_view(api, action, limit))

    @app.page("/admin/reload")
    class AdminReload(View):
        async def post(self, request: Request) -> Response:
            async def call():
                api.authorize(request.headers.get("Authorization"))
                return await api.reload_all()
            return await _answer(self, call)


def _admin_view(api: ServingAPI, action: str, limit: int) -> type[View]:
    class AdminAction(View):
        async def post(self, request: Request, name: str) -> Response:
            async def call():
                api.authorize(request.headers.get("Authorization"))
                return await api.admin(action, name, await _body(request, limit), request.headers.get("Content-Type"))
            return await _answer(self, call)

    AdminAction.__name__ = AdminAction.__qualname__ = f"Admin{action.title()}"
    return AdminAction
