"""gRPC inference API: `inferstream.v1.Inference` (Predict, BatchPredict over generic tensors, any model
of the repository by name and optional version) and the standard `grpc.health.v1.Health` service, on
one port. The worker serves it when `grpc_port` is set (sharing the worker's loaded models, routes and
batch threads); `inferstream serve-grpc` runs it alone, without Kafka.

Generated code: `streams/proto/inference_pb2*.py` are checked in, generated from
`streams/proto/inference.proto` by `regenerate()` (grpc_tools' protoc). Checked in rather than
generated at import time because then the runtime needs only `grpcio` and `protobuf` — not
`grpcio-tools` (protoc, a build tool) — and nothing writes code into a cache directory at start-up
(read-only containers, several workers starting at once). tests/test_grpc.py regenerates into a
temporary directory and fails if the checked-in files differ, so they cannot drift from the .proto.

Tensors travel as raw little-endian bytes in row-major order (`Tensor.raw`) with a numpy dtype name
and a shape; string tensors as UTF-8 `Tensor.strings`. Errors map to status codes: NOT_FOUND (unknown
model or version), INVALID_ARGUMENT (dtype, shape, input names), FAILED_PRECONDITION (a version that
exists but is not loaded), RESOURCE_EXHAUSTED (a message over max_message_bytes, either way, or the
model's synchronous calls at sync_max_in_flight: trailing metadata `retry-after` in seconds),
DEADLINE_EXCEEDED (the client's deadline, capped by sync_timeout_s), INTERNAL (the model failed).
Clients should open their channels with `channel_options(max_message_bytes)`, the server's limits.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from operators.model_repository import ModelConfigError
from operators.registry import ModelRegistry, NotLoaded
from operators.stages import Lease
from operators.tensors import TensorError, check_feeds, run_requests
from streams import metrics
from streams.admission import Admission, DeadlineExceeded, Refused
from streams.config import Settings
from streams.proto import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = "inferstream.v1.Inference"
PROTO = Path(__file__).parent / "proto" / "inference.proto"
GENERATED_HEADER = "# ruff: noqa\n# Generated from streams/proto/inference.proto by streams.grpc_server.regenerate().\n"
NUMERIC_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64",
                  "uint8", "uint16", "uint32", "uint64", "bool")


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """gRPC message size limits (both directions) of a server, or of a client channel talking to one."""
    return [("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes)]


# ----------------------------------------------------------------------------------- tensors
def to_array(tensor: inference_pb2.Tensor) -> np.ndarray:
    """A wire tensor -> numpy array (raises TensorError naming the tensor and the problem)."""
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise TensorError(f"tensor {tensor.name!r}: negative dimension in shape {list(shape)}")
    count = math.prod(shape)
    if tensor.dtype == "string":
        if len(tensor.strings) != count:
            raise TensorError(f"tensor {tensor.name!r}: shape {list(shape)} needs {count} strings, got {len(tensor.strings)}")
        try:
            values = [s.decode("utf-8") for s in tensor.strings]
        except UnicodeDecodeError as exc:
            raise TensorError(f"tensor {tensor.name!r}: strings must be UTF-8 ({exc})") from exc
        return np.array(values, dtype=object).reshape(shape)
    if tensor.dtype not in NUMERIC_DTYPES:
        raise TensorError(f"tensor {tensor.name!r}: unknown dtype {tensor.dtype!r} "
                          f"(one of {', '.join(NUMERIC_DTYPES)}, string)")
    wire = np.dtype(tensor.dtype).newbyteorder("<")
    if len(tensor.raw) != count * wire.itemsize:
        raise TensorError(f"tensor {tensor.name!r}: {tensor.dtype} {list(shape)} needs {count * wire.itemsize} bytes, "
                          f"got {len(tensor.raw)}")
    return np.frombuffer(tensor.raw, dtype=wire).reshape(shape).astype(np.dtype(tensor.dtype))


def to_tensor(name: str, array: np.ndarray) -> inference_pb2.Tensor:
    """numpy array -> wire tensor (little-endian raw bytes, or UTF-8 strings)."""
    array = np.asarray(array)
    if array.dtype.kind in "OUS":
        strings = [v if isinstance(v, bytes) else str(v).encode() for v in array.ravel().tolist()]
        return inference_pb2.Tensor(name=name, dtype="string", shape=array.shape, strings=strings)
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return inference_pb2.Tensor(name=name, dtype=array.dtype.name, shape=array.shape, raw=little.tobytes())


# ------------------------------------------------------------------------------------ service
class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, trailing_metadata: tuple = ()) -> None:
        super().__init__(message)
        self.code = code
        self.trailing_metadata = trailing_metadata


def _expired(context) -> bool:
    remaining = context.time_remaining() if context is not None else None
    return remaining is not None and remaining <= 0


class InferenceService(inference_pb2_grpc.InferenceServicer):
    def __init__(self, registry: ModelRegistry, admission: Admission | None = None,
                 max_message_bytes: int | None = None) -> None:
        self.registry = registry
        self.admission = admission or Admission.shared(registry)
        self.max_message_bytes = max_message_bytes or self.admission.settings.max_message_bytes

    async def Predict(self, request, context):
        async def call():
            (response,) = await self.run([request], context)
            return response
        return await self._answer(call, context)

    async def BatchPredict(self, request, context):
        async def call():
            responses = await self.run(list(request.requests), context, batch=True)
            return inference_pb2.BatchPredictResponse(responses=responses)
        return await self._answer(call, context)

    async def _answer(self, call, context):
        """Run the call; _Abort -> its status; every answer counted by status name."""
        try:
            response = await call()
        except _Abort as exc:
            metrics.API_RESPONSES.labels("grpc", exc.code.name).inc()
            await context.abort(exc.code, str(exc), exc.trailing_metadata)
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed before ours fired
            metrics.API_RESPONSES.labels("grpc", "DEADLINE_EXCEEDED" if _expired(context) else "CANCELLED").inc()
            raise
        if response.ByteSize() > self.max_message_bytes:  # say why, rather than grpc's bare send failure
            metrics.API_RESPONSES.labels("grpc", "RESOURCE_EXHAUSTED").inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"the response is {response.ByteSize()} bytes, over max_message_bytes "
                                f"({self.max_message_bytes}): ask for fewer outputs or rows")
        metrics.API_RESPONSES.labels("grpc", "OK").inc()
        return response

    async def run(self, requests: Sequence[inference_pb2.PredictRequest], context=None, batch: bool = False) -> list:
        """Validate every request, admit the call (one slot per model named), then run the requests
        grouped by model version (stacked where possible) within the deadline (the client's, from
        `context`, capped by sync_timeout_s)."""
        leases: list[Lease] = []
        try:
            prepared = []
            for i, request in enumerate(requests):
                where = f"request {i}: " if batch else ""
                try:
                    lease = await self.registry.acquire(request.model, request.version or None, request.key or None)
                except ModelConfigError as exc:
                    raise _Abort(grpc.StatusCode.NOT_FOUND, f"{where}{exc}") from exc
                except NotLoaded as exc:
                    raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, f"{where}{exc}") from exc
                leases.append(lease)
                try:
                    feeds = {t.name: to_array(t) for t in request.inputs}
                    if len(feeds) != len(request.inputs):
                        raise TensorError("an input name appears twice")
                    feeds = check_feeds(lease.stage.model.session, feeds, list(request.outputs))
                except TensorError as exc:
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{where}{request.model}: {exc}") from exc
                prepared.append((lease.stage, feeds, tuple(request.outputs)))
            models = [r.model for r in requests]
            try:
                with self.admission.admit(models, "grpc"):
                    timeout_s = self.admission.timeout_s(context.time_remaining() if context is not None else None)
                    try:
                        async with self.admission.deadline(timeout_s, models, "grpc"):
                            results = await self._run_groups(prepared)
                    except asyncio.CancelledError:
                        if _expired(context):  # grpc's own deadline fired before ours: count it all the same
                            self.admission.count_deadline(models, "grpc")
                        raise
            except Refused as exc:
                raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc),
                             (("retry-after", str(exc.retry_after_s)),)) from exc
            except DeadlineExceeded as exc:
                raise _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)) from exc
            return [self._response(prepared[i][0], results[i]) for i in range(len(prepared))]
        finally:
            for lease in leases:
                lease.release()

    async def _run_groups(self, prepared: list) -> dict[int, dict[str, np.ndarray]]:
        groups: dict[tuple, list[int]] = {}
        for i, (stage, _, outputs) in enumerate(prepared):
            groups.setdefault((id(stage), outputs), []).append(i)
        results: dict[int, dict[str, np.ndarray]] = {}
        loop = asyncio.get_running_loop()
        for indices in groups.values():
            stage, _, outputs = prepared[indices[0]]
            feeds = [prepared[i][1] for i in indices]
            try:
                outs = await loop.run_in_executor(None, run_requests, stage.model.session, feeds, list(outputs) or None)
            except Exception as exc:  # the model failed on these inputs: the caller's problem or ours, say which
                log.warning("grpc predict on %s failed: %s", stage.ref, exc)
                raise _Abort(grpc.StatusCode.INTERNAL, f"{stage.ref} failed: {type(exc).__name__}: {exc}") from exc
            results.update(zip(indices, outs, strict=True))
        return results

    @staticmethod
    def _response(stage, outputs: dict[str, np.ndarray]) -> inference_pb2.PredictResponse:
        info = stage.info
        return inference_pb2.PredictResponse(model=info["name"], version=info["version"], provider=info["provider"],
                                             outputs=[to_tensor(n, a) for n, a in outputs.items()])


class GrpcServer:
    """The Inference and Health services on `host:port` (port 0: any free port; `port` says which).

    `settings`: message size and admission limits; without them, those the worker's REST API was built
    with (one Admission per registry), else the environment's (Settings.load())."""

    def __init__(self, registry: ModelRegistry, host: str = "127.0.0.1", port: int = 0,
                 settings: Settings | None = None) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.admission = Admission.shared(registry, settings)
        self.max_message_bytes = (settings or self.admission.settings).max_message_bytes
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None

    async def start(self) -> GrpcServer:
        # a request over the limit is refused by grpc itself: RESOURCE_EXHAUSTED, "larger than max"
        server = grpc.aio.server(options=channel_options(self.max_message_bytes))
        inference_pb2_grpc.add_InferenceServicer_to_server(
            InferenceService(self.registry, self.admission, self.max_message_bytes), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.port = server.add_insecure_port(f"{self.host}:{self.port}")
        if not self.port:
            raise OSError(f"gRPC: cannot bind {self.host}:{self.port}")
        await server.start()
        for service in ("", SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        log.info("gRPC Inference and Health on %s:%d", self.host, self.port)
        return self

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()  # NOT_SERVING first: balancers stop sending
        await self._server.stop(grace_s)
        self._server = None

    async def serve_forever(self) -> None:
        """Start, serve until cancelled, then stop gracefully (for the worker's task and the CLI)."""
        await self.start()
        try:
            await self._server.wait_for_termination()
        finally:
            await asyncio.shield(self.stop())


def regenerate(out_dir: str | Path | None = None) -> list[Path]:
    """Write inference_pb2.py and inference_pb2_grpc.py from the .proto (needs grpcio-tools, a dev
    dependency). Run `python -m streams.grpc_server` after changing the .proto."""
    import tempfile

    from grpc_tools import protoc

    root = PROTO.parent.parent.parent  # imports in the generated code are `from streams.proto import ...`
    out = Path(out_dir) if out_dir else PROTO.parent
    with tempfile.TemporaryDirectory() as tmp:
        code = protoc.main(["protoc", f"-I{root}", f"--python_out={tmp}", f"--grpc_python_out={tmp}",
                            str(PROTO.relative_to(root))])
        if code != 0:
            raise RuntimeError(f"protoc failed with exit code {code}")
        written = []
        for name in ("inference_pb2.py", "inference_pb2_grpc.py"):
            text = (Path(tmp) / "streams" / "proto" / name).read_text()
            (out / name).write_text(GENERATED_HEADER + text)
            written.append(out / name)
    return written


if __name__ == "__main__":
    for path in regenerate():
        print(path)
