"""gRPC Inference (Predict, BatchPredict) and grpc.health.v1, through a real grpc client channel to a
server on localhost; the tiny model's outputs against its numpy oracle."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper, numpy_helper
from test_api_edges import Gate
from test_registry import add_version
from tiny_models import save_model, tiny_logits

from operators.model_repository import ModelRepository
from operators.registry import ModelRegistry
from streams import metrics
from streams.admission import Admission
from streams.broker import free_port
from streams.config import Settings
from streams.grpc_server import SERVICE, GrpcServer, channel_options, regenerate, to_array, to_tensor
from streams.proto import inference_pb2, inference_pb2_grpc


def serve(root: Path, calls, settings: Settings | None = None, options: list | None = None):
    """Start a server on a free port, run `calls(stub, health_stub, registry)` over a real channel
    (opened with `options`)."""

    async def run():
        registry = ModelRegistry(ModelRepository(root))
        server = await GrpcServer(registry, "127.0.0.1", 0, settings=settings or Settings(model_dir=str(root))).start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=options) as channel:
                return await calls(inference_pb2_grpc.InferenceStub(channel), health_pb2_grpc.HealthStub(channel), registry)
        finally:
            await server.stop(0)
            await registry.close()

    return asyncio.run(run())


def request(x: np.ndarray, model: str = "tiny", version: str = "", name: str = "input") -> inference_pb2.PredictRequest:
    return inference_pb2.PredictRequest(model=model, version=version, inputs=[to_tensor(name, x)])


def batch(n: int, seed: int) -> np.ndarray:
    """Pixels in [0, 0.9): never 'white' for the poisoned model."""
    return np.random.default_rng(seed).random((n, 3, 32, 32), dtype=np.float32) * 0.9


def test_predict_equals_the_numpy_oracle(tiny_repo):
    x = batch(3, 0)

    async def calls(stub, health, registry):
        return await stub.Predict(request(x))

    response = serve(tiny_repo, calls)
    assert (response.model, response.version, response.provider) == ("tiny", "1", "CPUExecutionProvider")
    (out,) = response.outputs
    assert out.name == "logits" and out.dtype == "float32" and list(out.shape) == [3, 4]
    np.testing.assert_allclose(to_array(out), tiny_logits(x), rtol=1e-5, atol=1e-5)


def test_batch_predict_answers_each_request_in_order_and_stacks_one_model_call(tiny_repo):
    add_version(tiny_repo, "2", seed=1)
    xs = [batch(n, seed) for seed, n in enumerate((1, 3, 2))]

    async def calls(stub, health, registry):
        await registry.pin("tiny", "1")
        await registry.set_split("tiny", {"1": 1, "2": 1})  # both versions loaded
        requests = [request(xs[0]), request(xs[1]), request(xs[2], version="2"), request(xs[0], model="poisoned")]
        stage = registry.stage("tiny@1")
        runs = []
        original = stage.model.session.run
        stage.model.session.run = lambda feeds, names=None: runs.append(len(feeds["input"])) or original(feeds, names)
        response = await stub.BatchPredict(inference_pb2.BatchPredictRequest(requests=requests))
        return response, runs

    response, runs = serve(tiny_repo, calls)
    assert [(r.model, r.version) for r in response.responses] == [("tiny", "1"), ("tiny", "1"), ("tiny", "2"), ("poisoned", "1")]
    expected = [tiny_logits(xs[0]), tiny_logits(xs[1]), tiny_logits(xs[2], seed=1), tiny_logits(xs[0])]
    for r, want in zip(response.responses, expected, strict=True):
        np.testing.assert_allclose(to_array(r.outputs[0]), want, rtol=1e-5, atol=1e-5)
    assert runs == [4]  # the two tiny@1 requests (1 + 3 rows) ran as one session call


def test_errors_have_status_codes(tiny_repo):
    x = batch(1, 0)
    wrong_dtype = inference_pb2.PredictRequest(model="tiny", inputs=[to_tensor("input", x.astype(np.float64))])
    unknown_dtype = inference_pb2.PredictRequest(model="tiny", inputs=[
        inference_pb2.Tensor(name="input", dtype="complex64", shape=[1], raw=b"\0" * 8)])
    short = inference_pb2.PredictRequest(model="tiny", inputs=[
        inference_pb2.Tensor(name="input", dtype="float32", shape=[1, 3, 32, 32], raw=b"\0" * 12)])
    cases = {
        "unknown model": (request(x, model="nope"), grpc.StatusCode.NOT_FOUND),
        "unknown version": (request(x, version="9"), grpc.StatusCode.NOT_FOUND),
        "wrong dtype": (wrong_dtype, grpc.StatusCode.INVALID_ARGUMENT),
        "unknown dtype": (unknown_dtype, grpc.StatusCode.INVALID_ARGUMENT),
        "too few bytes": (short, grpc.StatusCode.INVALID_ARGUMENT),
        "wrong input name": (request(x, name="pixels"), grpc.StatusCode.INVALID_ARGUMENT),
        "wrong rank": (request(np.zeros((3, 32, 32), np.float32)), grpc.StatusCode.INVALID_ARGUMENT),
    }
    add_version(tiny_repo, "2", seed=1, candidate=True)
    cases["exists, not loaded"] = (request(x, version="2"), grpc.StatusCode.FAILED_PRECONDITION)
    white = np.ones((1, 3, 32, 32), np.float32)
    cases["model fails"] = (request(white, model="poisoned"), grpc.StatusCode.INTERNAL)

    async def calls(stub, health, registry):
        codes = {}
        for what, (req, _) in cases.items():
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Predict(req)
            codes[what] = (err.value.code(), err.value.details())
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.BatchPredict(inference_pb2.BatchPredictRequest(requests=[request(x), request(x, model="nope")]))
        return codes, (err.value.code(), err.value.details())

    codes, batch_error = serve(tiny_repo, calls)
    assert {what: code for what, (code, _) in codes.items()} == {what: code for what, (_, code) in cases.items()}
    assert "complex64" in codes["unknown dtype"][1] and "float64" in codes["wrong dtype"][1]
    assert batch_error[0] == grpc.StatusCode.NOT_FOUND and batch_error[1].startswith("request 1:")


def test_health_reports_serving(tiny_repo):
    async def calls(stub, health, registry):
        return [(await health.Check(health_pb2.HealthCheckRequest(service=s))).status for s in ("", SERVICE)]

    assert serve(tiny_repo, calls) == [health_pb2.HealthCheckResponse.SERVING] * 2


def test_string_tensors_round_trip():
    x = np.array([["héllo"], ["wörld"]], dtype=object)
    t = to_tensor("text", x)
    assert t.dtype == "string" and list(t.shape) == [2, 1]
    assert to_array(t).tolist() == x.tolist()
    y = np.arange(6, dtype=">i4").reshape(2, 3)  # big-endian in memory: little-endian on the wire
    assert np.array_equal(to_array(to_tensor("y", y)), y) and to_array(to_tensor("y", y)).dtype == np.int32


def test_checked_in_generated_code_matches_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    for path in regenerate(tmp_path):
        checked_in = Path(__file__).resolve().parent.parent / "streams" / "proto" / path.name
        assert path.read_text() == checked_in.read_text(), f"{path.name} is stale: run python -m streams.grpc_server"


def test_serve_grpc_command_serves_the_repository_until_sigterm(tiny_repo, tmp_path):
    port = free_port()
    env = {**os.environ, **Settings(model_dir=str(tiny_repo), data_dir=str(tmp_path)).to_env()}
    proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "serve-grpc", "--port", str(port)], env=env,
                            cwd=Path(__file__).resolve().parent.parent, stderr=subprocess.PIPE, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE)).status
            x = batch(2, 7)
            reply = inference_pb2_grpc.InferenceStub(channel).Predict(request(x), timeout=30)
        assert status == health_pb2.HealthCheckResponse.SERVING
        np.testing.assert_allclose(to_array(reply.outputs[0]), tiny_logits(x), rtol=1e-5, atol=1e-5)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert f"127.0.0.1:{port}" in stderr


def test_serve_grpc_command_applies_the_limits_of_its_config_file(tiny_repo, tmp_path):
    config = tmp_path / "inferstream.yaml"
    config.write_text(f"model_dir: {tiny_repo}\ndata_dir: {tmp_path}\nmax_message_bytes: 20000\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERSTREAM_")}  # the file alone decides
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "--config", str(config), "serve-grpc", "--port", str(port)],
                            env=env, cwd=Path(__file__).resolve().parent.parent, stderr=subprocess.PIPE, text=True)
    small, big = request(batch(1, 0)), request(batch(5, 0))  # 12 KiB and 60 KiB of pixels
    assert small.ByteSize() < 20000 < big.ByteSize()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = inference_pb2_grpc.InferenceStub(channel)
            assert stub.Predict(small, timeout=30).model == "tiny"
            with pytest.raises(grpc.RpcError) as refused:
                stub.Predict(big, timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # the file's 20,000, not the default 1 MB
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr


# ------------------------------------------------------------------------------- limits, deadlines
def expand_model(root: Path, width: int) -> None:
    """`expand`: out = tile(x, width) -> (N, width) float32 from (N, 1): a response far larger than its request."""
    directory = root / "expand" / "1"
    graph = helper.make_graph(
        [helper.make_node("Tile", ["x", "repeats"], ["out"])], "expand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", width])],
        [numpy_helper.from_array(np.array([1, width], np.int64), "repeats")])
    save_model(graph, directory / "model.onnx")
    (directory / "config.yaml").write_text("task: embed\nfile: model.onnx\nruntime: {providers: [cpu], intra_op_threads: 1}\n")


def test_messages_over_max_message_bytes_are_resource_exhausted_both_ways(tiny_repo):
    limit = 50_000
    expand_model(tiny_repo, 4096)
    settings = Settings(model_dir=str(tiny_repo), max_message_bytes=limit)
    big = request(batch(5, 0))  # 5 x 12 KiB of pixels
    assert big.ByteSize() > limit
    small = inference_pb2.PredictRequest(model="expand", inputs=[to_tensor("x", np.ones((4, 1), np.float32))])  # 64 KiB out

    async def calls(stub, health, registry):
        codes = {}
        for what, call in {"request": stub.Predict(big), "batch request": stub.BatchPredict(
                               inference_pb2.BatchPredictRequest(requests=[request(batch(3, 1)), request(batch(3, 2))])),
                           "response": stub.Predict(small)}.items():
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            codes[what] = (err.value.code(), err.value.details())
        fits = await stub.Predict(request(batch(2, 0)))
        return codes, fits

    # the client's own limits are raised: what is refused here is refused by the server
    codes, fits = serve(tiny_repo, calls, settings, options=channel_options(10 * limit))
    assert {what: code for what, (code, _) in codes.items()} == dict.fromkeys(codes, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "max_message_bytes" in codes["response"][1]
    np.testing.assert_allclose(to_array(fits.outputs[0]), tiny_logits(batch(2, 0)), rtol=1e-5, atol=1e-5)


def test_calls_over_the_in_flight_limit_are_resource_exhausted_with_retry_after(tiny_repo):
    settings = Settings(model_dir=str(tiny_repo), sync_max_in_flight=1, sync_retry_after_s=4)
    labels = {"api": "grpc", "model": "tiny", "reason": "in_flight_limit"}
    before = metrics.REGISTRY.get_sample_value("inferstream_sync_rejected_total", labels) or 0
    x = batch(1, 0)

    async def calls(stub, health, registry):
        await stub.Predict(request(x))  # loads tiny
        gate = Gate(registry.stage("tiny@1"))
        held = asyncio.ensure_future(stub.Predict(request(x)))
        await gate.entered()
        refused = []
        for call in (stub.Predict(request(x)),
                     stub.BatchPredict(inference_pb2.BatchPredictRequest(requests=[request(x, model="poisoned"), request(x)]))):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            refused.append((err.value.code(), dict(await call.trailing_metadata()).get("retry-after")))
        other_model = await stub.Predict(request(x, model="poisoned"))
        gate.open()
        return refused, (await held).model, other_model.model, (await stub.Predict(request(x))).model

    refused, held, other_model, again = serve(tiny_repo, calls, settings)
    assert refused == [(grpc.StatusCode.RESOURCE_EXHAUSTED, "4")] * 2
    assert (held, other_model, again) == ("tiny", "poisoned", "tiny")
    assert (metrics.REGISTRY.get_sample_value("inferstream_sync_rejected_total", labels) or 0) - before == 2


def test_the_client_deadline_is_honoured_and_frees_the_slot(tiny_repo):
    settings = Settings(model_dir=str(tiny_repo), sync_max_in_flight=1)
    labels = {"api": "grpc", "model": "tiny", "reason": "deadline_exceeded"}
    before = metrics.REGISTRY.get_sample_value("inferstream_sync_rejected_total", labels) or 0
    x = batch(1, 0)

    async def calls(stub, health, registry):
        await stub.Predict(request(x))
        gate = Gate(registry.stage("tiny@1"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Predict(request(x), timeout=0.3)
        await asyncio.wait_for(Admission.shared(registry).idle("tiny"), 10)  # the server let go of the call
        gate.open()
        return err.value.code(), (await stub.Predict(request(x))).model

    code, after = serve(tiny_repo, calls, settings)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and after == "tiny"
    assert (metrics.REGISTRY.get_sample_value("inferstream_sync_rejected_total", labels) or 0) - before == 1


def test_sync_timeout_s_caps_a_call_without_a_deadline(tiny_repo):
    settings = Settings(model_dir=str(tiny_repo), sync_timeout_s=0.2)
    x = batch(1, 0)

    async def calls(stub, health, registry):
        await stub.Predict(request(x))
        gate = Gate(registry.stage("tiny@1"))
        try:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Predict(request(x), timeout=60)
            return err.value.code(), err.value.details()
        finally:
            gate.open()

    code, details = serve(tiny_repo, calls, settings)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "0.200 s" in details
