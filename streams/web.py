"""Worker HTTP endpoints on Faust's own web server (one port per worker, no second server to run).

- GET /metrics: Prometheus exposition (streams/metrics.py).
- GET /health: the process serves requests (liveness).
- GET /ready: models loaded, the worker has completed a group join, no rebalance in progress, and
  every agent is running (readiness; 503 with the failing checks otherwise).
- The serving API (`install_api`, documented in streams/openapi.json, served at GET /openapi.json):
  GET /models, POST /predict/{model}, POST /moderate, and the admin routes POST
  /admin/models/{name}/{load,promote,rollback,split,shadow,reload} and POST /admin/reload.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faust
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from streams import metrics
from streams.serving_api import ADMIN_ACTIONS, ApiError, ServingAPI

log = logging.getLogger(__name__)

OPENAPI = Path(__file__).parent / "openapi.json"


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


def _json_response(view: View, body: Any, status: int = 200) -> Response:
    # allow_nan=False: a model's NaN must not become invalid JSON silently (it becomes a 500 instead)
    return view.bytes(json.dumps(body, allow_nan=False).encode(), content_type="application/json", status=status)


async def _answer(view: View, call) -> Response:
    """Run an API call; ApiError -> its status and `{"error", "detail"}`; anything else -> 500, logged."""
    try:
        return _json_response(view, await call())
    except ApiError as exc:
        return _json_response(view, exc.body(), exc.status)
    except Exception as exc:
        log.exception("%s failed", type(view).__name__)
        return _json_response(view, {"error": "internal_error", "detail": f"{type(exc).__name__}: {exc}"}, 500)


def install_api(app: faust.App, api: ServingAPI) -> None:
    """The serving API's routes (streams/openapi.json documents every one of them)."""

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
                body = await request.read()
                return await api.predict(model, body, request.headers.get("Content-Type", ""),
                                         request.query.get("version") or None, request.query.get("key") or None)
            return await _answer(self, call)

    @app.page("/moderate")
    class Moderate(View):
        async def post(self, request: Request) -> Response:
            async def call():
                return await api.moderate(await request.read())
            return await _answer(self, call)

    for action in ADMIN_ACTIONS:
        app.page(f"/admin/models/{{name}}/{action}", name=f"admin_{action}")(_admin_view(api, action))

    @app.page("/admin/reload")
    class AdminReload(View):
        async def post(self, request: Request) -> Response:
            async def call():
                api.authorize(request.headers.get("Authorization"))
                return await api.reload_all()
            return await _answer(self, call)


def _admin_view(api: ServingAPI, action: str) -> type[View]:
    class AdminAction(View):
        async def post(self, request: Request, name: str) -> Response:
            async def call():
                api.authorize(request.headers.get("Authorization"))
                return await api.admin(action, name, await request.read())
            return await _answer(self, call)

    AdminAction.__name__ = AdminAction.__qualname__ = f"Admin{action.title()}"
    return AdminAction
