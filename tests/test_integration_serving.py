"""Model serving on a real worker through the real broker: hot reload under load, A/B split and shadow
verdicts, and the REST and gRPC APIs of a running worker (tiny generated models throughout)."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kafka_helpers import collect, frame_image, frame_record, ids, send_records
from test_integration_metrics import scrape, value
from test_registry import add_version
from tiny_models import tiny_logits

from operators.classify import ImagePreprocess, preprocess_image, softmax
from operators.routing import Shadow, choose_arm, in_shadow_sample, normalised_split
from operators.serving_state import STATE_FILE, ModelState, ServingState
from streams.broker import free_port
from streams.grpc_server import to_array, to_tensor
from streams.kafka import ensure_topics, producer
from streams.moderation import SHADOW_VERDICTS
from streams.proto import inference_pb2, inference_pb2_grpc
from streams.schemas import DEAD_LETTERS, FRAMES, VERDICTS

pytestmark = pytest.mark.integration

PRE = ImagePreprocess(height=32, width=32, resize="stretch", mean=(0, 0, 0), std=(255, 255, 255))
SEEDS = {"1": 0, "2": 1, "3": 2}  # tiny version -> the weights seed it was written with
TOKEN = "test-token"


def top3(record_id: str, version: str) -> list[int]:
    """Oracle: the tiny model of `version` on frame `cam:i`."""
    x = preprocess_image(frame_image(int(record_id.split(":")[1])), PRE)[None]
    probs = softmax(tiny_logits(x, seed=SEEDS[version]))[0]
    return np.argsort(-probs, kind="stable")[:3].tolist()


def http(port: int, path: str, body: bytes | None = None, headers: dict | None = None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=headers or {},
                                     method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return None, None


def wait_ready(worker, timeout_s: float = 60) -> None:
    assert wait_until(lambda: (http(worker.settings.web_port, "/ready")[1] or {}).get("ready") is True, timeout_s), worker.log()[-3000:]


def serving_of(worker, name: str = "tiny") -> dict:
    _, body = http(worker.settings.web_port, "/models")
    return next((m for m in (body or {}).get("models", []) if m["name"] == name), {})


class ContinuousProducer:
    """Publishes frames `cam:0, cam:1, ...` in small bursts from a thread until stopped."""

    def __init__(self, settings, burst: int = 8, pause_s: float = 0.05) -> None:
        self.settings, self.burst, self.pause_s = settings, burst, pause_s
        self.sent = 0  # frames acknowledged by the broker
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self.error: BaseException | None = None

    async def _run(self) -> None:
        await ensure_topics(self.settings)
        kafka = producer(self.settings)
        await kafka.start()
        try:
            while not self._stop.is_set():
                records = [frame_record("cam", i, frame_image(i)) for i in range(self.sent, self.sent + self.burst)]
                futures = [await kafka.send(self.settings.topic(FRAMES), v, key=k, headers=h) for k, v, h in records]
                await asyncio.gather(*futures)
                self.sent += len(records)
                await asyncio.sleep(self.pause_s)
        except BaseException as exc:
            self.error = exc
        finally:
            await kafka.stop()

    def start(self) -> ContinuousProducer:
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(30)
        assert self.error is None, self.error
        return self.sent


def test_hot_reload_under_load_drops_nothing_and_switches_every_later_record(settings, start_worker, tiny_repo):
    ServingState(poll_interval_s=0.5).save(tiny_repo / STATE_FILE)
    worker = start_worker(settings)
    wait_ready(worker)
    load = ContinuousProducer(settings).start()
    assert wait_until(lambda: load.sent >= 120, 30)

    add_version(tiny_repo, "2", seed=1)  # a new version directory appears mid-stream
    assert wait_until(lambda: serving_of(worker).get("serving_version") == "2", 30)
    switched_at = load.sent  # every frame from here on was produced after the switch was visible
    assert wait_until(lambda: load.sent >= switched_at + 120, 30)
    total = load.stop()

    verdicts = collect(settings, VERDICTS, lambda rs: len(ids(rs)) >= total, timeout_s=90)
    by_id: dict[str, list[dict]] = defaultdict(list)
    for r in verdicts:
        by_id[r["value"]["id"]].append(r["value"])
    assert set(by_id) == {f"cam:{i}" for i in range(total)}  # no record lost
    versions = {}
    for record_id, copies in by_id.items():
        seen = {(v["models"]["objects"]["version"], json.dumps(v["classifications"])) for v in copies}
        assert len(seen) == 1, (record_id, seen)  # redeliveries (at-least-once) are identical: one version each
        (version, _), = seen
        versions[record_id] = version
        # the verdict names the version that really computed it (v1 and v2 have different weights)
        assert [c["class_id"] for c in copies[0]["classifications"]] == top3(record_id, version)
    assert {versions[f"cam:{i}"] for i in range(switched_at, total)} == {"2"}  # after the switch: v2 only
    assert versions["cam:0"] == "1" and set(versions.values()) == {"1", "2"}
    assert collect(settings, DEAD_LETTERS, lambda rs: False, timeout_s=2) == []
    assert worker.alive()
    port = worker.settings.web_port
    assert wait_until(lambda: value(scrape(port), "inferstream_model_info", model="tiny", version="1", task="classify",
                                    provider="CPUExecutionProvider") is None, 10)  # v1 drained and closed
    m = scrape(port)
    assert value(m, "inferstream_model_loads_total", model="tiny", version="2", outcome="ok") == 1


def test_split_and_shadow_route_records_by_key_and_shadow_verdicts_stay_apart(settings, start_worker, tiny_repo, run):
    add_version(tiny_repo, "2", seed=1)
    add_version(tiny_repo, "3", seed=2, candidate=True)
    split = {"1": 1, "2": 1}
    ServingState({"tiny": ModelState(pin="1", split=split, shadow=Shadow("3", 0.3))}).save(tiny_repo / STATE_FILE)
    n = 120
    run(send_records(settings, FRAMES, [frame_record("cam", i, frame_image(i)) for i in range(n)]))
    start_worker(settings)

    verdicts = collect(settings, VERDICTS, lambda rs: len(ids(rs)) >= n, timeout_s=90)
    # the sample is computed here, in the test process: the worker's assignment must agree exactly
    sampled = {f"cam:{i}" for i in range(n) if in_shadow_sample(f"cam:{i}", "tiny", 0.3)}
    shadows = collect(settings, SHADOW_VERDICTS, lambda rs: ids(rs) >= sampled, timeout_s=30)

    assert ids(verdicts) == {f"cam:{i}" for i in range(n)}
    for r in verdicts:
        v = r["value"]
        expected = choose_arm(v["id"], "tiny", normalised_split(split))
        assert v["models"]["objects"] | {"provider": None} == {"name": "tiny", "version": expected, "arm": "split", "provider": None}
        assert [c["class_id"] for c in v["classifications"]] == top3(v["id"], expected)
        assert "shadow" not in v
    assert {r["value"]["models"]["objects"]["version"] for r in verdicts} == {"1", "2"}
    assert ids(shadows) == sampled and 15 < len(sampled) < 60
    for r in shadows:
        v = r["value"]
        assert r["key"] == v["id"] and v["models"]["objects"]["version"] == "3" and v["models"]["objects"]["arm"] == "shadow"
        assert [c["class_id"] for c in v["classifications"]] == top3(v["id"], "3")
        assert v["shadow"]["live_models"]["objects"]["version"] == choose_arm(v["id"], "tiny", normalised_split(split))


def test_a_running_worker_serves_rest_and_grpc_and_survives_a_bad_model(settings, start_worker, tiny_repo, run):
    ServingState(poll_interval_s=0.5).save(tiny_repo / STATE_FILE)
    worker = start_worker(settings.replace(grpc_port=free_port(), api_token=TOKEN))
    wait_ready(worker)
    port, grpc_port = worker.settings.web_port, worker.settings.grpc_port

    # REST: the model list, a synchronous prediction, admin with and without the token
    assert serving_of(worker)["serving_version"] == "1"
    x = np.random.default_rng(1).random((2, 3, 32, 32), dtype=np.float32) * 0.9
    status, body = http(port, "/predict/tiny", json.dumps({"inputs": {"input": x.tolist()}}).encode(),
                        {"Content-Type": "application/json"})
    assert status == 200 and body["version"] == "1"
    np.testing.assert_allclose(np.array(body["outputs"]["logits"]["data"]), tiny_logits(x), rtol=1e-5, atol=1e-5)
    assert http(port, "/admin/reload", b"{}")[0] == 401
    assert http(port, "/admin/reload", b"{}", {"Authorization": f"Bearer {TOKEN}"})[0] == 200

    # gRPC on grpc_port: health and Predict, equal to the oracle
    async def rpc():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            healthy = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            reply = await inference_pb2_grpc.InferenceStub(channel).Predict(
                inference_pb2.PredictRequest(model="tiny", inputs=[to_tensor("input", x)]))
            return healthy.status, reply

    status, reply = asyncio.run(rpc())
    assert status == health_pb2.HealthCheckResponse.SERVING and reply.version == "1"
    np.testing.assert_allclose(to_array(reply.outputs[0]), tiny_logits(x), rtol=1e-5, atol=1e-5)

    # a broken version appears: reported, and version 1 keeps serving the stream
    add_version(tiny_repo, "2", broken=True)
    assert wait_until(lambda: "load_error" in (serving_of(worker).get("versions") or [{}, {}])[-1], 30)
    assert value(scrape(port), "inferstream_model_loads_total", model="tiny", version="2", outcome="error") >= 1
    run(send_records(settings, FRAMES, [frame_record("cam", i, frame_image(i)) for i in range(10)]))
    verdicts = collect(settings, VERDICTS, lambda rs: len(ids(rs)) >= 10, timeout_s=60)
    assert {r["value"]["models"]["objects"]["version"] for r in verdicts} == {"1"}
    assert worker.alive() and serving_of(worker)["serving_version"] == "1"
    assert Path(tiny_repo / "tiny" / "2").is_dir()
