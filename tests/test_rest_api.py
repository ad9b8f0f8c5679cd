"""The REST serving API on the worker's Faust web server (aiohttp), exercised in-process with aiohttp's
test client against the real views, registry and moderation pipeline (no broker needed); the
integration tests check the same routes on a running worker."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import image_policy
from test_registry import add_version
from tiny_models import tiny_logits

from operators.classify import ImagePreprocess, preprocess_image, softmax
from operators.images import encode_image
from operators.model_repository import ModelRepository
from operators.moderation import Moderator
from operators.policy import Policy
from operators.registry import ModelRegistry
from operators.serving_state import STATE_FILE, ServingState
from streams import web
from streams.app import create_app
from streams.config import REPO_MODELS, Settings
from streams.moderation import ModerationPipeline
from streams.serving_api import ServingAPI

PRE = ImagePreprocess(height=32, width=32, resize="stretch", mean=(0, 0, 0), std=(255, 255, 255))
TOKEN = "s3cret-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def build(settings: Settings):
    app = create_app(settings)
    registry = ModelRegistry(ModelRepository(settings.model_dir))
    moderator = Moderator(registry.repo, Policy.load(settings.policy), registry=registry)
    web.install_api(app, ServingAPI(registry, settings, ModerationPipeline(settings, moderator)))
    return app, registry


@pytest.fixture
def api_settings(tiny_repo, tmp_path) -> Settings:
    return Settings(model_dir=str(tiny_repo), policy=image_policy(tmp_path, "tiny"), data_dir=str(tmp_path / "data"),
                    api_token=TOKEN, intra_op_threads=1)


def call(settings: Settings, requests):
    """Run `requests(client, registry)` against the API served by a fresh app."""
    app, registry = build(settings)

    async def run():
        async with TestClient(TestServer(app.web.web_app)) as client:
            try:
                return await requests(client, registry)
            finally:
                await registry.close()

    return asyncio.run(run())


def png(seed: int) -> tuple[np.ndarray, bytes]:
    rgb = np.random.default_rng(seed).integers(0, 220, size=(20, 28, 3), dtype=np.uint8)
    return rgb, encode_image(rgb, "png")


def top3(rgb: np.ndarray, seed: int = 0) -> list[int]:
    probs = softmax(tiny_logits(preprocess_image(rgb, PRE)[None], seed=seed))[0]
    return np.argsort(-probs, kind="stable")[:3].tolist()


def test_models_lists_versions_roles_candidates_and_providers(api_settings):
    add_version(Path(api_settings.model_dir), "2", seed=1, candidate=True)

    async def requests(client, registry):
        r = await client.get("/models")
        return r.status, await r.json()

    status, body = call(api_settings, requests)
    assert status == 200
    tiny = next(m for m in body["models"] if m["name"] == "tiny")
    assert tiny["serving_version"] == "1" and tiny["routed"] and tiny["split"] is None and tiny["shadow"] is None
    v1, v2 = tiny["versions"]
    assert v1 | {"in_flight": 0} == {"version": "1", "candidate": False, "loaded": True, "roles": ["serving"], "task": "classify",
                                     "providers": ["cpu"], "provider": "CPUExecutionProvider", "in_flight": 0}
    assert v2["candidate"] is True and v2["loaded"] is False and v2["roles"] == []
    poisoned = next(m for m in body["models"] if m["name"] == "poisoned")
    assert poisoned["routed"] is False and poisoned["serving_version"] == "1"  # listed, not loaded: no policy uses it


def test_predict_an_image_returns_the_operator_result_and_the_version(api_settings):
    rgb, data = png(3)

    async def requests(client, registry):
        r = await client.post("/predict/tiny", data=data, headers={"Content-Type": "image/png"})
        ok = (r.status, await r.json())
        r = await client.post("/predict/poisoned", data=data, headers={"Content-Type": "image/png"})  # loaded on demand
        on_demand = (r.status, await r.json())
        r = await client.post("/predict/tiny", data=b"not a png", headers={"Content-Type": "image/png"})
        bad = (r.status, await r.json())
        r = await client.post("/predict/tiny", data=data, headers={"Content-Type": "image/webp"})
        webp = r.status
        r = await client.post("/predict/nope", data=data, headers={"Content-Type": "image/png"})
        unknown = r.status
        r = await client.post("/predict/tiny", json={"text": "hello"})
        wrong = (r.status, await r.json())
        return ok, on_demand, bad, webp, unknown, wrong

    ok, on_demand, bad, webp, unknown, wrong = call(api_settings, requests)
    status, body = ok
    assert status == 200 and body["model"] == "tiny" and body["version"] == "1" and body["task"] == "classify"
    assert [c["class_id"] for c in body["result"]] == top3(rgb)
    assert on_demand[0] == 200 and [c["class_id"] for c in on_demand[1]["result"]] == top3(rgb)
    assert bad == (400, {"error": "image_decode_failed", "detail": bad[1]["detail"]})
    assert webp == 415 and unknown == 404
    assert wrong[0] == 400 and wrong[1]["error"] == "wrong_input"


def test_predict_raw_tensors_matches_the_numpy_oracle(api_settings):
    x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)

    async def requests(client, registry):
        r = await client.post("/predict/tiny", json={"inputs": {"input": x.tolist()}})
        nested = (r.status, await r.json())
        r = await client.post("/predict/tiny", json={"inputs": {"input": {"dtype": "float32", "shape": list(x.shape),
                                                                            "data": x.ravel().tolist()}}})
        flat = (r.status, await r.json())
        r = await client.post("/predict/tiny", json={"inputs": {"input": {"dtype": "float64", "data": x.tolist()}}})
        wrong_dtype = (r.status, await r.json())
        r = await client.post("/predict/tiny", json={"inputs": {"pixels": x.tolist()}})
        wrong_name = r.status
        return nested, flat, wrong_dtype, wrong_name

    nested, flat, wrong_dtype, wrong_name = call(api_settings, requests)
    for status, body in (nested, flat):
        assert status == 200 and body["version"] == "1"
        out = body["outputs"]["logits"]
        assert out["dtype"] == "float32" and out["shape"] == [2, 4]
        np.testing.assert_allclose(np.array(out["data"]), tiny_logits(x), rtol=1e-5, atol=1e-5)
    assert wrong_dtype[0] == 400 and "float64" in wrong_dtype[1]["detail"] and wrong_name == 400


def test_predict_text_with_the_toxicity_model_matches_profanity_check(api_settings):
    if not (REPO_MODELS / "toxicity" / "1" / "model.onnx").is_file():
        pytest.skip("toxicity model not built (make models)")
    from profanity_check import predict_prob

    shutil.copytree(REPO_MODELS / "toxicity", Path(api_settings.model_dir) / "toxicity")
    texts = ["What a lovely morning", "you are a fucking idiot"]

    async def requests(client, registry):
        return [await (await client.post("/predict/toxicity", json={"text": t})).json() for t in texts]

    for text, body in zip(texts, call(api_settings, requests), strict=True):
        assert body["task"] == "text-classify" and body["version"] == "1"
        assert body["result"]["toxic"] == pytest.approx(float(predict_prob([text])[0]), abs=1e-5)


def test_moderate_answers_the_verdict_fields_without_producing(api_settings):
    rgb, data = png(9)
    post = {"id": "p-1", "user_id": "u-1", "text": "", "image": {"encoding": "png", "data": base64.b64encode(data).decode()}}

    async def requests(client, registry):
        r = await client.post("/moderate", data=json.dumps(post))
        ok = (r.status, await r.json())
        r = await client.post("/moderate", data=json.dumps({"id": "p-2", "user_id": "u", "text": "x" * 20_001}))
        return ok, (r.status, await r.json())

    (status, verdict), (bad_status, bad) = call(api_settings, requests)
    assert status == 200 and verdict["id"] == "p-1" and verdict["kind"] == "post"
    assert [c["class_id"] for c in verdict["classifications"]] == top3(rgb)
    assert verdict["models"] == {"objects": {"name": "tiny", "version": "1", "provider": "CPUExecutionProvider", "arm": "serving"}}
    assert verdict["safe"] is (not verdict["violations"]) and "source" not in verdict
    assert bad_status == 400 and bad["error"] == "text_too_long"


def test_admin_needs_the_bearer_token_and_is_off_without_one(api_settings):
    async def requests(client, registry):
        return [(await client.post("/admin/models/tiny/reload", headers=h)).status
                for h in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, ADMIN)]

    assert call(api_settings, requests) == [401, 401, 401, 200]

    async def disabled(client, registry):
        r = await client.post("/admin/reload", headers=ADMIN)
        return r.status, await r.json()

    status, body = call(api_settings.replace(api_token=""), disabled)
    assert status == 403 and "INFERSTREAM_API_TOKEN" in body["detail"]


def test_admin_load_split_shadow_promote_rollback(api_settings):
    root = Path(api_settings.model_dir)
    add_version(root, "2", seed=1, candidate=True)
    rgb, data = png(4)

    async def requests(client, registry):
        async def admin(action, body=None):
            r = await client.post(f"/admin/models/tiny/{action}", json=body or {}, headers=ADMIN)
            return r.status, await r.json()

        out = {"load": await admin("load", {"version": "2"})}
        r = await client.post("/predict/tiny", data=data, headers={"Content-Type": "image/png"})
        out["predict_v2"] = await r.json()
        out["load_default"] = await admin("load", {})
        out["split"] = await admin("split", {"1": 1, "2": 3})
        out["bad_split"] = await admin("split", {"1": "lots"})
        out["shadow"] = await admin("shadow", {"version": "2", "sample_rate": 0.25})
        r = await client.post("/predict/tiny?version=2", data=data, headers={"Content-Type": "image/png"})
        out["predict_pinned_version"] = await r.json()
        out["promote"] = await admin("promote", {"version": "2"})
        out["rollback"] = await admin("rollback")
        out["rollback_again"] = await admin("rollback")
        out["unknown_version"] = await admin("load", {"version": "7"})
        out["unknown_model"] = (await client.post("/admin/models/nope/rollback", headers=ADMIN)).status
        r = await client.post("/admin/reload", headers=ADMIN)
        out["reload_all"] = (r.status, await r.json())
        return out

    out = call(api_settings, requests)
    assert out["load"][0] == 200 and out["load"][1]["serving_version"] == "2" and out["load"][1]["pin"] == "2"
    assert out["predict_v2"]["version"] == "2" and [c["class_id"] for c in out["predict_v2"]["result"]] == top3(rgb, seed=1)
    assert out["load_default"][1]["serving_version"] == "1" and out["load_default"][1]["pin"] is None  # v2 is a candidate
    assert out["split"][1]["split"] == {"1": 0.25, "2": 0.75}
    assert out["bad_split"][0] == 400
    assert out["shadow"][1]["shadow"] == {"version": "2", "sample_rate": 0.25}
    assert out["predict_pinned_version"]["version"] == "2"
    promoted = out["promote"][1]
    assert promoted["serving_version"] == "2" and promoted["split"] is None and promoted["shadow"] is None
    assert promoted["versions"][1]["candidate"] is False
    # rollback goes to the previous serving version (1), and again to the one before that (2)
    assert out["rollback"][1]["serving_version"] == "1" and out["rollback_again"][1]["serving_version"] == "2"
    assert out["unknown_version"][0] == 404 and out["unknown_model"] == 404
    assert out["reload_all"][0] == 200 and out["reload_all"][1]["failed"] == {}
    saved = ServingState.load(root / STATE_FILE).model("tiny")
    assert saved.pin == "2" and saved.history == ["1"]


def test_a_version_that_fails_to_load_answers_422_and_changes_nothing(api_settings):
    add_version(Path(api_settings.model_dir), "2", broken=True)

    async def requests(client, registry):
        r = await client.post("/admin/models/tiny/load", json={"version": "2"}, headers=ADMIN)
        return r.status, await r.json(), registry.route("tiny").serving

    status, body, serving = call(api_settings, requests)
    assert status == 422 and body["error"] == "load_failed" and "keeps serving" in body["detail"]
    assert serving == "1"


def test_openapi_document_and_routes_agree(api_settings):
    app, registry = build(api_settings)
    web.install(app, web.WorkerState({}))
    routes = {(r.method, r.resource.canonical) for r in app.web.web_app.router.routes() if r.method not in ("HEAD", "OPTIONS")}
    doc = json.loads(web.OPENAPI.read_text())
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    assert doc["openapi"].startswith("3.")
    assert routes == documented
    # every $ref resolves, every path parameter is declared
    text = json.dumps(doc)
    for ref in {part.split('"')[0] for part in text.split('"$ref": "#/components/schemas/')[1:]}:
        assert ref in doc["components"]["schemas"], ref
    for path, ops in doc["paths"].items():
        for op in ops.values():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == {seg[1:-1] for seg in path.split("/") if seg.startswith("{")}, path

    async def served():
        async with TestClient(TestServer(app.web.web_app)) as client:
            r = await client.get("/openapi.json")
            return r.status, await r.json()

    assert asyncio.run(served()) == (200, doc)
