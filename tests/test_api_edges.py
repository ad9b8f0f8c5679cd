"""The synchronous API at its edges, through the real aiohttp server (REST) and a real grpc channel:
every client error a 4xx with the `{"error", "detail"}` body, bodies over max_message_bytes 413, the
per-model limit on calls in flight (429 + Retry-After, shared by REST and gRPC), and deadlines (504).
A model is made slow on demand by holding its session's `run` at a gate (the server is never stubbed)."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import image_policy
from test_registry import add_version
from test_rest_api import TOKEN, build, png

from streams import metrics
from streams.admission import Admission
from streams.config import Settings
from streams.grpc_server import GrpcServer, to_tensor
from streams.proto import inference_pb2, inference_pb2_grpc

ADMIN = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def api_settings(tiny_repo, tmp_path) -> Settings:
    return Settings(model_dir=str(tiny_repo), policy=image_policy(tmp_path, "tiny"), data_dir=str(tmp_path / "data"),
                    api_token=TOKEN, intra_op_threads=1)


def serve(settings, requests, grpc_too: bool = False):
    """Run `requests(client, registry, stub)` against the REST API (and the gRPC server when asked)
    of one fresh app, both on the same registry as in a worker."""
    app, registry = build(settings)

    async def run():
        server = await GrpcServer(registry, "127.0.0.1", 0, settings=settings).start() if grpc_too else None
        try:
            async with TestClient(TestServer(app.web.web_app)) as client:
                if server is None:
                    return await requests(client, registry, None)
                async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                    return await requests(client, registry, inference_pb2_grpc.InferenceStub(channel))
        finally:
            if server is not None:
                await server.stop(0)
            await registry.close()

    return asyncio.run(run())


class Gate:
    """Holds every run of a stage's session until `open()`: a slow model, on demand."""

    def __init__(self, stage) -> None:
        self._entered = threading.Semaphore(0)
        self._open = threading.Event()
        original = stage.model.session.run

        def run(feeds, names=None):
            self._entered.release()
            self._open.wait(60)
            return original(feeds, names)

        stage.model.session.run = run

    async def entered(self, runs: int = 1) -> None:
        for _ in range(runs):
            assert await asyncio.to_thread(self._entered.acquire, True, 30), "the model was never called"

    def open(self) -> None:
        self._open.set()


def sample(name: str, labels: dict[str, str]) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def tensors(n: int = 1) -> dict:
    return {"inputs": {"input": np.zeros((n, 3, 32, 32), np.float32).tolist()}}


async def answer(response) -> tuple[int, dict]:
    return response.status, await response.json()


# ---------------------------------------------------------------------------------------- 413
def test_a_body_over_max_message_bytes_is_413_with_or_without_content_length(api_settings):
    settings = api_settings.replace(max_message_bytes=100_000)
    big = b"\xff" * 3_000_000  # the 3 MB image

    async def chunks(data: bytes, size: int = 65_536):
        for i in range(0, len(data), size):
            yield data[i:i + size]

    async def requests(client, registry, stub):
        image = {"Content-Type": "image/jpeg"}
        return {
            "predict, Content-Length": await answer(await client.post("/predict/tiny", data=big, headers=image)),
            # chunked: no Content-Length, aiohttp's own HTTPRequestEntityTooLarge (formerly a 500)
            "predict, chunked": await answer(await client.post("/predict/tiny", data=chunks(big), headers=image)),
            # between the limit and aiohttp's client_max_size (the limit + 64 KiB)
            "predict, just over": await answer(await client.post("/predict/tiny", data=chunks(b" " * 100_001), headers=JSON)),
            "moderate": await answer(await client.post("/moderate", data=big, headers=JSON)),
            "admin": await answer(await client.post("/admin/models/tiny/split", data=big, headers={**ADMIN, **JSON})),
        }

    answers = serve(settings, requests)
    for what, (status, body) in answers.items():
        assert status == 413 and body["error"] == "payload_too_large", what
    assert "100000" in answers["predict, Content-Length"][1]["detail"]


def test_a_body_at_the_limit_is_served(api_settings):
    _, data = png(1)
    settings = api_settings.replace(max_message_bytes=len(data))

    async def requests(client, registry, stub):
        return await answer(await client.post("/predict/tiny", data=data, headers={"Content-Type": "image/png"}))

    status, body = serve(settings, requests)
    assert status == 200 and body["model"] == "tiny"


# ---------------------------------------------------------------------------------------- 415
def test_a_content_type_the_route_does_not_take_is_415(api_settings):
    _, data = png(2)
    post = json.dumps({"id": "p", "user_id": "u", "text": "hello"}).encode()

    async def requests(client, registry, stub):
        return {
            "webp to predict": await answer(await client.post("/predict/tiny", data=data, headers={"Content-Type": "image/webp"})),
            "xml to predict": await answer(await client.post("/predict/tiny", data=b"<x/>", headers={"Content-Type": "application/xml"})),
            "octet-stream to predict": await answer(await client.post(
                "/predict/tiny", data=data, headers={"Content-Type": "application/octet-stream"})),
            "png to moderate": await answer(await client.post("/moderate", data=data, headers={"Content-Type": "image/png"})),
            "multipart to admin": await answer(await client.post(
                "/admin/models/tiny/split", data=b'{"1": 1}', headers={**ADMIN, "Content-Type": "multipart/form-data"})),
        }, [  # what curl -d, urllib and a typed client send are all taken as JSON
            (await client.post("/moderate", data=post, headers={"Content-Type": t})).status
            for t in ("application/json", "application/json; charset=utf-8", "text/plain", "application/x-www-form-urlencoded",
                      "application/vnd.inferstream+json")]

    refused, taken = serve(api_settings, requests)
    for what, (status, body) in refused.items():
        assert status == 415 and body["error"] == "unsupported_media_type", what
    assert taken == [200] * 5


# ---------------------------------------------------------------------------------------- 400
def test_malformed_json_is_400(api_settings):
    bodies = {"truncated": b'{"text": "hi"', "not utf-8": b'{"text": "\xff"}', "NaN": b'{"inputs": {"input": NaN}}',
              "Infinity": b'{"text": Infinity}', "nested too deep": b"[" * 200_000 + b"]" * 200_000}

    async def requests(client, registry, stub):
        out = {}
        for what, body in bodies.items():
            out[f"predict, {what}"] = await answer(await client.post("/predict/tiny", data=body, headers=JSON))
        out["admin"] = await answer(await client.post("/admin/models/tiny/split", data=b"{1: 2}", headers={**ADMIN, **JSON}))
        return out

    for what, (status, body) in serve(api_settings, requests).items():
        assert status == 400 and body["error"] == "malformed_json", what


def test_wrong_input_names_dtypes_shapes_and_outputs_are_400(api_settings):
    x = np.zeros((1, 3, 32, 32), np.float32)
    cases = {
        "unknown input name": {"inputs": {"pixels": x.tolist()}},
        "missing input": {"inputs": {}},
        "wrong dtype": {"inputs": {"input": {"dtype": "float64", "data": x.tolist()}}},
        "unknown dtype": {"inputs": {"input": {"dtype": "complex-ish", "data": x.tolist()}}},
        "strings for numbers": {"inputs": {"input": {"dtype": "string", "data": [["a"]]}}},
        "wrong rank": {"inputs": {"input": x[0].tolist()}},
        "wrong side": {"inputs": {"input": np.zeros((1, 3, 16, 32), np.float32).tolist()}},
        "shape that does not fit the data": {"inputs": {"input": {"shape": [2, 3, 32, 32], "data": x.ravel().tolist()}}},
        "ragged data": {"inputs": {"input": [[1.0, 2.0], [3.0]]}},
        "int64 overflow": {"inputs": {"input": {"dtype": "int64", "data": [10 ** 30]}}},
        "unknown output": {"inputs": {"input": x.tolist()}, "outputs": ["probabilities"]},
        "outputs not a list": {"inputs": {"input": x.tolist()}, "outputs": 3},
        "inputs not an object": {"inputs": [1, 2]},
        "neither text nor inputs": {"image": "..."},
        "text not a string": {"text": 5},
        "text to an image model": {"text": "hello"},
    }

    async def requests(client, registry, stub):
        return {what: await answer(await client.post("/predict/tiny", json=body)) for what, body in cases.items()}

    for what, (status, body) in serve(api_settings, requests).items():
        assert status == 400 and set(body) == {"error", "detail"} and body["detail"], what


def test_an_image_that_does_not_decode_is_400(api_settings):
    async def requests(client, registry, stub):
        return await answer(await client.post("/predict/tiny", data=b"\x89PNG but no", headers={"Content-Type": "image/png"}))

    status, body = serve(api_settings, requests)
    assert status == 400 and body["error"] == "image_decode_failed"


def test_a_bad_timeout_header_is_400(api_settings):
    async def requests(client, registry, stub):
        return [await answer(await client.post("/predict/tiny", json=tensors(), headers={"X-Request-Timeout-Ms": v}))
                for v in ("soon", "0", "-5", "nan", "inf")]

    for status, body in serve(api_settings, requests):
        assert status == 400 and body["error"] == "bad_timeout"


# ------------------------------------------------------------------------------- 404, 405, 409
def test_unknown_model_version_and_route_are_404_and_a_version_not_loaded_409(api_settings):
    add_version(Path(api_settings.model_dir), "2", seed=1, candidate=True)

    async def requests(client, registry, stub):
        return {
            "unknown model": await answer(await client.post("/predict/nope", json=tensors())),
            "unknown version": await answer(await client.post("/predict/tiny?version=9", json=tensors())),
            "traversal": await answer(await client.post("/predict/..%2F..%2Fetc", json=tensors())),
            "unknown route": await answer(await client.get("/predictions")),
            "admin, unknown model": await answer(await client.post("/admin/models/nope/reload", headers=ADMIN)),
            "not loaded": await answer(await client.post("/predict/tiny?version=2", json=tensors())),
            "wrong method": await answer(await client.get("/predict/tiny")),
        }, (await client.get("/predict/tiny")).headers.get("Allow")

    answers, allow = serve(api_settings, requests)
    not_loaded, wrong_method = answers.pop("not loaded"), answers.pop("wrong method")
    for what, (status, body) in answers.items():
        assert status == 404 and set(body) == {"error", "detail"}, what
    assert not_loaded[0] == 409 and not_loaded[1]["error"] == "not_loaded"
    assert wrong_method[0] == 405 and wrong_method[1]["error"] == "method_not_allowed" and "POST" in allow


def test_client_errors_are_counted_by_status(api_settings):
    before = {code: sample("inferstream_api_responses_total", {"api": "rest", "code": code}) for code in ("200", "404", "415")}

    async def requests(client, registry, stub):
        await client.post("/predict/tiny", json=tensors())
        await client.post("/predict/nope", json=tensors())
        await client.post("/predict/tiny", data=b"x", headers={"Content-Type": "image/gif"})

    serve(api_settings, requests)
    after = {code: sample("inferstream_api_responses_total", {"api": "rest", "code": code}) for code in before}
    assert {code: after[code] - before[code] for code in before} == {"200": 1, "404": 1, "415": 1}


# ------------------------------------------------------------------------ non-finite outputs
def test_non_finite_outputs_are_answered_as_strings_not_a_500(api_settings):
    x = np.full((1, 3, 32, 32), 3e38, np.float32)  # the mean overflows to inf in float32

    async def requests(client, registry, stub):
        return await answer(await client.post("/predict/tiny", json={"inputs": {"input": x.tolist()}}))

    status, body = serve(api_settings, requests)
    logits = body["outputs"]["logits"]["data"][0]
    assert status == 200 and {v for v in logits if isinstance(v, str)} <= {"NaN", "Infinity", "-Infinity"}
    assert any(isinstance(v, str) for v in logits)


# --------------------------------------------------------------------------- admission: 429
def test_calls_over_the_in_flight_limit_are_refused_at_once_with_retry_after(api_settings):
    settings = api_settings.replace(sync_max_in_flight=2, sync_retry_after_s=3)
    labels = {"api": "rest", "model": "tiny", "reason": "in_flight_limit"}
    before = sample("inferstream_sync_rejected_total", labels)

    async def requests(client, registry, stub):
        gate = Gate(registry.stage("tiny@1"))
        held = [asyncio.ensure_future(client.post("/predict/tiny", json=tensors())) for _ in range(2)]
        await gate.entered(2)
        in_flight = Admission.shared(registry).in_flight("tiny")
        gauge = sample("inferstream_sync_in_flight_requests", {"model": "tiny"})
        refused = await client.post("/predict/tiny", json=tensors())
        refused = (refused.status, await refused.json(), refused.headers.get("Retry-After"))
        gate.open()
        served = [(await r).status for r in held]
        again = (await client.post("/predict/tiny", json=tensors())).status
        return in_flight, gauge, refused, served, again, Admission.shared(registry).in_flight("tiny")

    in_flight, gauge, refused, served, again, in_flight_after = serve(settings, requests)
    assert in_flight == 2 and gauge == 2
    assert refused[0] == 429 and refused[1]["error"] == "too_many_requests" and refused[2] == "3"
    assert served == [200, 200] and again == 200 and in_flight_after == 0
    assert sample("inferstream_sync_rejected_total", labels) - before == 1


def test_a_model_at_its_limit_refuses_before_reading_the_body(api_settings):
    settings = api_settings.replace(sync_max_in_flight=1, sync_retry_after_s=1)
    labels = {"api": "rest", "model": "tiny", "reason": "in_flight_limit"}
    before = sample("inferstream_sync_rejected_total", labels)

    async def requests(client, registry, stub):
        gate = Gate(registry.stage("tiny@1"))
        held = asyncio.ensure_future(client.post("/predict/tiny", json=tensors()))
        await gate.entered()
        # a body that would be a 400 if it were read: the refusal comes first
        refused = await client.post("/predict/tiny", data=b"{not json", headers={"Content-Type": "application/json"})
        refused = (refused.status, (await refused.json())["error"])
        gate.open()
        return refused, (await held).status

    refused, held = serve(settings, requests)
    assert refused == (429, "too_many_requests") and held == 200
    assert sample("inferstream_sync_rejected_total", labels) - before == 1


def test_the_limit_is_per_model(api_settings):
    settings = api_settings.replace(sync_max_in_flight=1)

    async def requests(client, registry, stub):
        gate = Gate(registry.stage("tiny@1"))
        held = asyncio.ensure_future(client.post("/predict/tiny", json=tensors()))
        await gate.entered()
        other = (await client.post("/predict/poisoned", json=tensors())).status
        same = (await client.post("/predict/tiny", json=tensors())).status
        gate.open()
        return other, same, (await held).status

    assert serve(settings, requests) == (200, 429, 200)


def test_rest_and_grpc_share_the_in_flight_limit(api_settings):
    settings = api_settings.replace(sync_max_in_flight=1, sync_retry_after_s=2)
    x = np.zeros((1, 3, 32, 32), np.float32)

    async def requests(client, registry, stub):
        gate = Gate(registry.stage("tiny@1"))
        held = asyncio.ensure_future(stub.Predict(inference_pb2.PredictRequest(model="tiny", inputs=[to_tensor("input", x)])))
        await gate.entered()
        rest = await client.post("/predict/tiny", json=tensors())
        rest = (rest.status, rest.headers.get("Retry-After"))
        gate.open()
        await held
        held = asyncio.ensure_future(client.post("/predict/tiny", json=tensors()))  # the other way round
        gate = Gate(registry.stage("tiny@1"))
        await gate.entered()
        call = stub.Predict(inference_pb2.PredictRequest(model="tiny", inputs=[to_tensor("input", x)]))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        gate.open()
        return rest, err.value.code(), dict(await call.trailing_metadata()).get("retry-after"), (await held).status

    rest, code, retry_after, last = serve(settings, requests, grpc_too=True)
    assert rest == (429, "2") and code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after == "2" and last == 200


def test_moderate_has_its_own_limit(api_settings):
    settings = api_settings.replace(sync_max_in_flight=1)
    _, data = png(5)
    post = json.dumps({"id": "p", "user_id": "u", "image": {"encoding": "png", "data": base64.b64encode(data).decode()}})

    async def requests(client, registry, stub):
        gate = Gate(registry.stage("tiny@1"))
        held = asyncio.ensure_future(client.post("/moderate", data=post, headers=JSON))
        await gate.entered()
        second = await answer(await client.post("/moderate", data=post, headers=JSON))
        gate.open()
        return second, (await held).status

    (status, body), first = serve(settings, requests)
    assert status == 429 and "moderate" in body["detail"] and first == 200


# -------------------------------------------------------------------------- deadlines: 504
def test_the_timeout_header_cuts_a_slow_call_short_and_frees_its_slot(api_settings):
    labels = {"api": "rest", "model": "tiny", "reason": "deadline_exceeded"}
    before = sample("inferstream_sync_rejected_total", labels)

    async def requests(client, registry, stub):
        gate = Gate(registry.stage("tiny@1"))
        late = await answer(await client.post("/predict/tiny", json=tensors(), headers={"X-Request-Timeout-Ms": "200"}))
        in_flight = Admission.shared(registry).in_flight("tiny")
        gate.open()
        # through the batcher too: the caller stops waiting, the batch finishes without it
        gate = Gate(registry.stage("tiny@1"))
        _, data = png(6)
        image = await answer(await client.post("/predict/tiny", data=data,
                                               headers={"Content-Type": "image/png", "X-Request-Timeout-Ms": "200"}))
        gate.open()
        fine = (await client.post("/predict/tiny", json=tensors(), headers={"X-Request-Timeout-Ms": "30000"})).status
        return late, in_flight, image, fine

    late, in_flight, image, fine = serve(api_settings, requests)
    assert late[0] == 504 and late[1]["error"] == "deadline_exceeded" and in_flight == 0
    assert image[0] == 504 and fine == 200
    assert sample("inferstream_sync_rejected_total", labels) - before == 2


def test_sync_timeout_s_caps_every_call(api_settings):
    settings = api_settings.replace(sync_timeout_s=0.2)

    async def requests(client, registry, stub):
        gate = Gate(registry.stage("tiny@1"))
        try:
            return [(await client.post("/predict/tiny", json=tensors(), headers=h)).status
                    for h in ({}, {"X-Request-Timeout-Ms": "60000"})]
        finally:
            gate.open()

    assert serve(settings, requests) == [504, 504]


def test_a_shadow_sample_rate_outside_0_1_is_400_even_when_unshadowing(api_settings):
    async def requests(client, registry, stub):
        return [await answer(await client.post("/admin/models/tiny/shadow", json=body, headers=ADMIN))
                for body in ({"sample_rate": -1}, {"version": "1", "sample_rate": 1.5})]

    for status, body in serve(api_settings, requests):
        assert status == 400 and "sample_rate" in body["detail"]


def test_a_workers_grpc_server_takes_the_limits_of_its_rest_api(api_settings):
    """The worker builds GrpcServer(registry, host, port) after the REST API: same admission, same sizes."""
    settings = api_settings.replace(sync_max_in_flight=5, max_message_bytes=123_456)
    app, registry = build(settings)
    server = GrpcServer(registry, "127.0.0.1", 0)
    assert server.admission is Admission.shared(registry) and server.admission.max_in_flight == 5
    assert server.max_message_bytes == 123_456
    asyncio.run(registry.close())
