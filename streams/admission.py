"""Admission of synchronous API calls (REST /predict and /moderate, gRPC Predict and BatchPredict).

Contract:
- At most `sync_max_in_flight` synchronous calls per model are admitted at once, REST and gRPC
  together (a BatchPredict holds one slot on each model it names, /moderate one slot of the pseudo
  model `moderate`). A call beyond the limit is refused at once with `Refused` (429 /
  RESOURCE_EXHAUSTED, Retry-After `sync_retry_after_s`): it never queues, so a burst of calls cannot
  pile up in front of the model's batcher, where the streams' records wait too.
- A call's deadline is the client's (REST header, gRPC deadline), capped by `sync_timeout_s`.
- One Admission per model registry (`Admission.shared`): the REST API and the gRPC server of one
  worker count against the same limit because they share the same loaded models.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from streams import metrics
from streams.config import Settings

MODERATE = "moderate"  # the pseudo model of POST /moderate (the moderation pipeline, several models)

_SHARED: weakref.WeakKeyDictionary[Any, Admission] = weakref.WeakKeyDictionary()


class Refused(Exception):
    """Over the in-flight limit of a model: answered at once, the client retries after `retry_after_s`."""

    def __init__(self, model: str, limit: int, retry_after_s: int) -> None:
        super().__init__(f"{model}: {limit} synchronous calls already in flight (sync_max_in_flight); "
                         f"retry after {retry_after_s} s")
        self.model = model
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Exception):
    """The call's deadline passed before its result was ready (504 / DEADLINE_EXCEEDED)."""


class Admission:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.max_in_flight = settings.sync_max_in_flight
        self.retry_after_s = settings.sync_retry_after_s
        self._in_flight: dict[str, int] = {}
        self._idle: dict[str, asyncio.Event] = {}

    @classmethod
    def shared(cls, registry: Any, settings: Settings | None = None) -> Admission:
        """The admission of `registry`, created with `settings` by its first user (the worker builds the
        REST API with its settings before the gRPC server starts)."""
        admission = _SHARED.get(registry)
        if admission is None:
            admission = _SHARED[registry] = cls(settings if settings is not None else Settings.load())
        return admission

    def in_flight(self, model: str) -> int:
        return self._in_flight.get(model, 0)

    def check(self, models: Iterable[str], api: str) -> None:
        """Raise Refused (counted) when a model is at its limit, holding nothing: a caller may refuse
        before reading a request's body (a flood of large bodies then costs no reading)."""
        for model in sorted(set(models)):
            if self.max_in_flight and self.in_flight(model) >= self.max_in_flight:
                metrics.SYNC_REJECTED.labels(api, model, "in_flight_limit").inc()
                raise Refused(model, self.max_in_flight, self.retry_after_s)

    @contextmanager
    def admit(self, models: Iterable[str], api: str) -> Iterator[None]:
        """Hold one slot of each model for the block, or raise Refused (counted) without holding any."""
        models = sorted(set(models))
        self.check(models, api)
        for model in models:
            self._in_flight[model] = self.in_flight(model) + 1
            self._event(model).clear()
            metrics.SYNC_IN_FLIGHT.labels(model).inc()
        try:
            yield
        finally:
            for model in models:
                self._in_flight[model] -= 1
                metrics.SYNC_IN_FLIGHT.labels(model).dec()
                if not self._in_flight[model]:
                    self._event(model).set()

    async def idle(self, model: str) -> None:
        """Wait until no call of `model` is in flight (graceful stops, tests)."""
        if self.in_flight(model):
            await self._event(model).wait()

    def timeout_s(self, requested_s: float | None) -> float | None:
        """The time a call may take: the client's deadline, capped by sync_timeout_s (None: no limit)."""
        cap = self.settings.sync_timeout_s or None
        if requested_s is None or cap is None:
            return cap if requested_s is None else requested_s
        return min(requested_s, cap)

    @asynccontextmanager
    async def deadline(self, timeout_s: float | None, models: Iterable[str], api: str) -> AsyncIterator[None]:
        """Cancel the block after `timeout_s` (None: no limit) and raise DeadlineExceeded (counted); what
        it awaited is cancelled with it (a cancelled batcher item is dropped before its batch runs)."""
        scope = asyncio.timeout(timeout_s)
        try:
            async with scope:
                yield
        except TimeoutError as exc:
            if not scope.expired():
                raise
            models = sorted(set(models))
            self.count_deadline(models, api)
            raise DeadlineExceeded(f"{', '.join(models)}: no result within the deadline of {timeout_s:.3f} s") from exc

    @staticmethod
    def count_deadline(models: Iterable[str], api: str) -> None:
        for model in sorted(set(models)):
            metrics.SYNC_REJECTED.labels(api, model, "deadline_exceeded").inc()

    def _event(self, model: str) -> asyncio.Event:
        if model not in self._idle:
            self._idle[model] = asyncio.Event()
            self._idle[model].set()
        return self._idle[model]
