"""What the REST endpoints do, without HTTP: model list, synchronous predict and moderate, and the
admin changes of the model registry. streams/web.py maps routes onto these methods; errors are
`ApiError(status, error, detail)`, which web.py turns into a JSON body.

Synchronous predictions go through the same stage (operator + micro-batcher) as the stream, so they
are batched together with stream traffic and served by the same version; raw tensors
(`{"inputs": ...}`) run the model's session directly, like gRPC Predict.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any

import numpy as np

from operators.batcher import SYNC, BatchFailed
from operators.errors import BadInput
from operators.images import ImageLimits, decode_image
from operators.model_repository import ModelConfigError
from operators.moderation import ModelFailed
from operators.registry import ModelRegistry, NotLoaded
from operators.serving_state import Conflict, ServingStateError
from operators.stages import LoadFailed
from operators.tensors import TensorError, check_feeds, run_requests
from streams.admission import MODERATE, Admission, DeadlineExceeded, Refused
from streams.config import Settings

ADMIN_ACTIONS = ("load", "promote", "rollback", "split", "shadow", "reload")
IMAGE_TYPES = {"image/jpeg": "jpeg", "image/jpg": "jpeg", "image/png": "png"}
JSON_TYPES = {"application/json", "text/plain", "application/x-www-form-urlencoded", ""}


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> dict[str, str]:
        return {"error": self.error, "detail": self.detail}


def _errors(exc: Exception) -> ApiError:
    """The HTTP answer for an exception of the serving layer."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ModelConfigError):
        return ApiError(404, "not_found", str(exc))
    if isinstance(exc, NotLoaded):
        return ApiError(409, "not_loaded", str(exc))
    if isinstance(exc, LoadFailed):
        return ApiError(422, "load_failed", f"{exc}; the current version keeps serving")
    if isinstance(exc, ServingStateError):
        return ApiError(409 if isinstance(exc, Conflict) else 400, "invalid_change", str(exc))
    if isinstance(exc, (TensorError, BadInput)):
        return ApiError(400, getattr(exc, "reason", "bad_tensor"), getattr(exc, "detail", str(exc)))
    if isinstance(exc, Refused):
        return ApiError(429, "too_many_requests", str(exc), {"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, DeadlineExceeded):
        return ApiError(504, "deadline_exceeded", str(exc))
    if isinstance(exc, (ModelFailed, BatchFailed)):
        return ApiError(500, "inference_failed", str(exc))
    raise exc


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check_json_type(content_type: str | None) -> None:
    media = _media_type(content_type)
    if content_type is not None and media not in JSON_TYPES and not media.endswith("+json"):
        raise ApiError(415, "unsupported_media_type", f"{media}: this route takes application/json")


def _json(body: bytes, content_type: str | None = None) -> Any:
    """The JSON value of a request body ({} when empty). Any JSON media type is taken, and so are a
    missing type, text/plain and application/x-www-form-urlencoded (what `curl -d` sends); another
    type is 415. NaN and Infinity are refused: they are not JSON."""
    if not body.strip():
        return {}
    _check_json_type(content_type)
    try:
        return json.loads(body, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ApiError(400, "malformed_json", f"the body is not JSON: {exc}") from exc


class ServingAPI:
    def __init__(self, registry: ModelRegistry, settings: Settings, pipeline: Any | None = None) -> None:
        """`pipeline`: the worker's ModerationPipeline (for /moderate); None where there is none."""
        self.registry = registry
        self.settings = settings
        self.pipeline = pipeline
        self.limits = ImageLimits(settings.max_image_side, settings.max_image_pixels)
        self.admission = Admission.shared(registry, settings)

    def authorize(self, authorization: str | None) -> None:
        """Admin endpoints need `Authorization: Bearer <api_token>`; with no token configured they are off."""
        expected = self.settings.api_token
        if not expected:
            raise ApiError(403, "admin_disabled",
                           "admin endpoints are disabled on this worker: set INFERSTREAM_API_TOKEN to enable them")
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
            raise ApiError(401, "unauthorized", "admin endpoints need the header 'Authorization: Bearer <api token>'")

    def models(self) -> dict[str, Any]:
        return self.registry.describe()

    def model(self, name: str) -> dict[str, Any]:
        return next(m for m in self.registry.describe()["models"] if m["name"] == name)

    def refuse_if_busy(self, name: str) -> None:
        """429 at once when model `name` (or `moderate`) is at its in-flight limit: checked before the
        request's body is read (measured: 16 clients posting 1.2 MB images at a full model raised a
        stream's p99 to 932 ms while their bodies were read only to be refused)."""
        try:
            self.admission.check([name], "rest")
        except Refused as exc:
            raise _errors(exc) from exc

    async def predict(self, name: str, body: bytes, content_type: str | None, version: str | None = None,
                      key: str | None = None, timeout_s: float | None = None) -> dict[str, Any]:
        """An image (raw bytes, `image/jpeg` or `image/png`), `{"text": ...}`, or `{"inputs": {...}}`
        raw tensors -> the operator's `as_dict()` result (or the output tensors) and the version used.
        Checked in the order of the answers: 415, 400 (JSON), 404/409 (model), 429 (admission), then
        400 (the input itself), 504 (`timeout_s` passed) or the result; a model already at its limit
        is refused (429) before the body is even read (`refuse_if_busy`)."""
        media = _media_type(content_type)
        request: Any = None
        if media.startswith("image/"):
            if media not in IMAGE_TYPES:
                raise ApiError(415, "unsupported_media_type", f"{media}: send image/jpeg or image/png")
        else:
            request = _json(body, content_type)
            if not isinstance(request, dict) or not ({"text", "inputs"} & set(request)):
                raise ApiError(400, "bad_request", 'send an image (image/jpeg, image/png), {"text": ...} or {"inputs": {...}}')
        try:
            lease = await self.registry.acquire(name, version, key)
            with lease, self.admission.admit([name], "rest"):
                stage = lease.stage
                answer = {"model": name, "version": stage.model.config.version, "provider": stage.model.session.provider,
                          "task": stage.model.config.task}
                async with self.admission.deadline(self.admission.timeout_s(timeout_s), [name], "rest"):
                    if request is None:
                        value = await asyncio.to_thread(decode_image, body, IMAGE_TYPES[media], limits=self.limits)
                        return {**answer, "result": await self._through_operator(stage, "image", value)}
                    if "text" in request:
                        if not isinstance(request["text"], str):
                            raise ApiError(400, "bad_request", '"text" must be a string')
                        return {**answer, "result": await self._through_operator(stage, "text", request["text"])}
                    return {**answer, "outputs": await self._tensors(stage, request["inputs"], request.get("outputs"))}
        except (ModelConfigError, NotLoaded, TensorError, BadInput, BatchFailed, Refused, DeadlineExceeded) as exc:
            raise _errors(exc) from exc

    async def _through_operator(self, stage, kind: str, value: Any) -> Any:
        if stage.input_kind != kind:
            takes = stage.input_kind or 'raw tensors ({"inputs": ...})'
            raise ApiError(400, "wrong_input", f"{stage.ref} ({stage.model.config.task}) takes {takes}, not {kind}")
        item = await asyncio.to_thread(stage.operator.preprocess, value)
        return (await stage.batcher.submit(item, SYNC)).as_dict()  # behind stream records

    async def _tensors(self, stage, inputs: Any, outputs: Any) -> dict[str, Any]:
        """`{name: nested list}` or `{name: {"dtype", "shape", "data"}}` -> the session's outputs as
        `{name: {"dtype", "shape", "data"}}`."""
        if not isinstance(inputs, dict):
            raise ApiError(400, "bad_request", '"inputs" must map input names to tensors')
        if outputs is not None and not (isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)):
            raise ApiError(400, "bad_request", '"outputs" must be a list of output names')
        declared = {s.name: s for s in stage.model.session.inputs}
        feeds = {}
        for name, value in inputs.items():
            spec = declared.get(name)
            spec_dtype = "string" if spec is not None and spec.dtype == np.dtype(object) else (spec.dtype.name if spec else "float32")
            data, dtype, shape = (value.get("data"), value.get("dtype", spec_dtype), value.get("shape")) \
                if isinstance(value, dict) else (value, spec_dtype, None)
            try:
                array = np.array(data, dtype=object if dtype == "string" else np.dtype(dtype))
                feeds[name] = array.reshape(shape) if shape is not None else array
            except (TypeError, ValueError, OverflowError) as exc:
                raise TensorError(f"input {name!r}: {exc}") from exc
        feeds = check_feeds(stage.model.session, feeds, outputs)
        (result,) = await asyncio.to_thread(run_requests, stage.model.session, [feeds], outputs or None)
        return {n: {"dtype": "string" if a.dtype == np.dtype(object) else a.dtype.name, "shape": list(a.shape),
                    "data": a.tolist()} for n, a in result.items()}

    async def moderate(self, body: bytes, content_type: str | None = None, timeout_s: float | None = None) -> dict[str, Any]:
        """A post (the `posts` schema) -> the verdict's fields, produced to no topic. The moderation
        pipeline counts as one model, `moderate`, for admission."""
        if self.pipeline is None:
            raise ApiError(404, "not_found", "this server runs no moderation pipeline")
        if body.strip():
            _check_json_type(content_type)  # the pipeline decodes the posts schema itself (400 when it cannot)
        try:
            with self.admission.admit([MODERATE], "rest"):
                async with self.admission.deadline(self.admission.timeout_s(timeout_s), [MODERATE], "rest"):
                    return await self.pipeline.moderate_post(body)
        except (BadInput, ModelFailed, Refused, DeadlineExceeded) as exc:
            raise _errors(exc) from exc

    async def admin(self, action: str, name: str, body: bytes, content_type: str | None = None) -> dict[str, Any]:
        """One admin change of model `name`; answers the model's entry of /models after the change."""
        request = _json(body, content_type)
        if not isinstance(request, dict):
            raise ApiError(400, "bad_request", "the body must be a JSON object")
        registry = self.registry
        try:
            if action == "load":
                await registry.pin(name, None if request.get("version") is None else str(request["version"]))
            elif action == "promote":
                if request.get("version") is None:
                    raise ApiError(400, "bad_request", 'promote needs {"version": ...}')
                await registry.promote(name, str(request["version"]))
            elif action == "rollback":
                await registry.rollback(name)
            elif action == "split":
                await registry.set_split(name, request["split"] if set(request) == {"split"} else request)
            elif action == "shadow":
                version, rate = request.get("version"), float(request.get("sample_rate", 1.0))
                if not 0 <= rate <= 1:  # checked here too: unshadowing (no version) ignores the rate
                    raise ApiError(400, "invalid_change", f"sample_rate must be in [0, 1], not {rate}")
                await registry.set_shadow(name, None if version is None else str(version), rate)
            elif action == "reload":
                await registry.reload(name)
            else:
                raise ApiError(404, "not_found", f"unknown admin action {action!r}")
        except (ModelConfigError, LoadFailed, ServingStateError, NotLoaded) as exc:
            raise _errors(exc) from exc
        except (TypeError, ValueError) as exc:
            raise ApiError(400, "bad_request", str(exc)) from exc
        return self.model(name)

    async def reload_all(self) -> dict[str, Any]:
        """Rescan the repository and the serving state file now (what the poll does every few seconds)."""
        report = await self.registry.refresh()
        return {**report, **self.registry.describe()}
