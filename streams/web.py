"""Worker HTTP endpoints on Faust's own web server (one port per worker, no second server to run).

- GET /metrics: Prometheus exposition (streams/metrics.py).
- GET /health: the process serves requests (liveness).
- GET /ready: models loaded, the worker has completed a group join, no rebalance in progress, and
  every agent is running (readiness; 503 with the failing checks otherwise).
"""

from __future__ import annotations

from typing import Any

import faust
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from streams import metrics


class WorkerState:
    """What readiness needs to know, updated by Faust's rebalance signals."""

    def __init__(self, models: dict[str, Any]) -> None:
        self.models = models  # role -> {"name", "version", "provider"}
        self.joined = False
        self.assigned_partitions = 0


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
            checks = {"models_loaded": bool(state.models), "group_joined": state.joined,
                      "not_rebalancing": not app.rebalancing, "agents_running": all(agents.values())}
            body = {"ready": all(checks.values()), "checks": checks, "agents": agents, "models": state.models,
                    "assigned_partitions": state.assigned_partitions}
            return self.json(body, status=200 if body["ready"] else 503)


def _agent_running(agent) -> bool:
    """An agent is running when at least one of its actors has a live task (Faust restarts crashed
    actors; a dead one leaves a finished task behind)."""
    tasks = [actor.actor_task for actor in list(agent._actors)]
    return any(t is not None and not t.done() for t in tasks)
