"""The worked example of docs/architecture.md: a new model family is one task entry plus its operator.

The family here is `brightness`: an ONNX graph that averages a downscaled image, an operator whose typed
result scores an image `bright` or `dark`, and the policy's existing `scores` rule. Registered with one
`tasks.register(...)`, it loads through the repository, warms up and serves through the registry, is
judged by a policy check, and survives a version switch, with no other change to the code. Oracle:
a uniform image of grey level g has brightness g / 255 whatever the resizing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import cv2
import numpy as np
import pytest
import yaml
from onnx import TensorProto, helper
from tiny_models import save_model

from operators import tasks
from operators.images import pixels_of
from operators.model_repository import ModelRepository
from operators.moderation import Moderator
from operators.policy import Policy
from operators.registry import ModelRegistry


# ------------------------------------------------------------------ the new family: operator module
@dataclass(frozen=True)
class Brightness:
    """Mean brightness of one image in [0, 1]."""

    value: float

    def as_dict(self) -> dict[str, float]:
        return {"bright": round(self.value, 6), "dark": round(1.0 - self.value, 6)}


class BrightnessMeter:
    """preprocess: RGB -> `(3, 8, 8)` float32 in [0, 1]; run_batch: the session averages each image."""

    def __init__(self, model) -> None:  # model: operators.model_repository.LoadedModel
        self.model = model
        self.input_name = model.session.inputs[0].name

    def preprocess(self, image) -> np.ndarray:
        rgb = pixels_of(image)[0]
        small = cv2.resize(rgb, (8, 8), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(small.transpose(2, 0, 1).astype(np.float32) / 255)

    def run_batch(self, items: list[np.ndarray]) -> list[Brightness]:
        (means,) = self.model.session.run({self.input_name: np.stack(items)}).values()
        return [Brightness(float(m)) for m in means]


BRIGHTNESS = tasks.Task("brightness", BrightnessMeter, "image", rule="scores")


def write_brightness_model(root, version: str) -> None:
    directory = root / "brightness" / version
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["image"], ["brightness"], axes=[1, 2, 3], keepdims=0)], "brightness",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("brightness", TensorProto.FLOAT, ["batch"])])
    save_model(graph, directory / "model.onnx")
    (directory / "config.yaml").write_text(yaml.safe_dump({
        "task": "brightness", "batching": {"max_batch_size": 8, "max_wait_ms": 2},
        "runtime": {"providers": ["cpu"], "intra_op_threads": 1}}))


# ------------------------------------------------------------------------------------- the test
@pytest.fixture
def brightness_task():
    tasks.register(BRIGHTNESS)  # the one entry
    yield BRIGHTNESS
    del tasks.TASKS[BRIGHTNESS.name]


def grey(level: int, height: int = 30, width: int = 40) -> np.ndarray:
    return np.full((height, width, 3), level, np.uint8)


def test_a_new_task_is_one_entry_and_serves_end_to_end(tmp_path, brightness_task):
    write_brightness_model(tmp_path, "1")
    repo = ModelRepository(tmp_path)
    assert repo.config("brightness").task == "brightness"  # the repository accepts the new task
    policy = Policy.from_dict({"checks": {"too_dark": {"model": "brightness", "input": "image", "label": "dark",
                                                       "above": 0.8}}})
    moderator = Moderator(repo, policy, registry=ModelRegistry(repo, providers=("cpu",)))
    stage = moderator.stages["brightness@1"]
    assert stage.input_kind == "image" and isinstance(stage.operator, BrightnessMeter)

    async def judge(level: int) -> dict:
        with moderator.assign(f"img-{level}") as assignment:
            items = moderator.prepare(image=grey(level), assignment=assignment)
            return moderator.judgement(await moderator.judge(items, assignment), assignment)

    async def run():
        try:
            return await asyncio.gather(*(judge(level) for level in (10, 128, 250)))
        finally:
            await moderator.close()

    dark, mid, bright = asyncio.run(run())
    assert dark["scores"]["too_dark"]["bright"] == pytest.approx(10 / 255, abs=1e-6)
    assert dark["safe"] is False and dark["violations"][0]["check"] == "too_dark"
    assert mid["safe"] is True and mid["scores"]["too_dark"]["dark"] == pytest.approx(1 - 128 / 255, abs=1e-6)
    assert bright["safe"] is True and bright["scores"]["too_dark"]["bright"] == pytest.approx(250 / 255, abs=1e-6)


def test_a_new_version_of_the_new_task_is_loaded_warmed_up_and_switched_to(tmp_path, brightness_task):
    write_brightness_model(tmp_path, "1")
    registry = ModelRegistry(ModelRepository(tmp_path), providers=("cpu",))

    async def run():
        await registry.ensure("brightness")
        write_brightness_model(tmp_path, "2")
        report = await registry.refresh()
        with await registry.acquire("brightness") as lease:
            stage = lease.stage
            result = await stage.batcher.submit(stage.operator.preprocess(grey(51)))
        await registry.close()
        return report, stage.ref, result

    report, ref, result = asyncio.run(run())
    assert report["switched"] == ["brightness"] and ref == "brightness@2"
    assert result == Brightness(pytest.approx(51 / 255, abs=1e-6))


def test_a_task_without_a_rule_cannot_serve_a_check(tmp_path, brightness_task):
    tasks.register(tasks.Task("brightness", BrightnessMeter, "image"))  # the same family, no policy rule
    write_brightness_model(tmp_path, "1")
    policy = Policy.from_dict({"checks": {"too_dark": {"model": "brightness", "input": "image", "label": "dark"}}})
    with pytest.raises(ValueError, match="cannot serve a moderation check"):
        Moderator(ModelRepository(tmp_path), policy, providers=("cpu",))
