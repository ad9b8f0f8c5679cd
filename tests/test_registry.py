"""Model registry: deterministic A/B assignment and shadow sampling, the serving state file, hot reload
(load the new version, switch, drain the old), failing versions, and the admin changes."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from tiny_models import tiny_classifier, tiny_logits, write_tiny_repository

from operators.classify import ImagePreprocess, preprocess_image, softmax
from operators.model_repository import ModelConfigError, ModelRepository
from operators.moderation import Moderator
from operators.policy import Policy
from operators.registry import ModelRegistry
from operators.routing import Route, Shadow, bucket, choose_arm, in_shadow_sample, normalised_split
from operators.serving_state import STATE_FILE, Conflict, ModelState, ServingState, ServingStateError
from operators.stages import LoadFailed, RegistryHooks

REPO = Path(__file__).resolve().parent.parent
PRE = ImagePreprocess(height=32, width=32, resize="stretch", mean=(0, 0, 0), std=(255, 255, 255))
KEYS = [f"p-{i}" for i in range(20_000)]


def add_version(root: Path, version: str, seed: int | None = None, candidate: bool = False, broken: bool = False) -> Path:
    """A new version directory of `tiny`, made aside and renamed into place (as an operator should)."""
    staging = root / ".staging" / "tiny"
    directory = write_tiny_repository(staging.parent, "tiny", version)
    if seed is not None:
        tiny_classifier(directory / "model.onnx", seed=seed)  # other weights: its outputs differ from v1's
    if broken:
        (directory / "model.onnx").write_bytes(b"this is not an onnx model")
    if candidate:
        with open(directory / "config.yaml", "a") as f:
            f.write("candidate: true\n")
    target = root / "tiny" / version
    target.parent.mkdir(parents=True, exist_ok=True)
    directory.rename(target)
    return target


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "models"
    write_tiny_repository(root, "tiny", "1")
    return root


class Recorder(RegistryHooks):
    def __init__(self) -> None:
        self.loaded, self.failed, self.retired = [], [], []
        super().__init__(on_loaded=lambda s: self.loaded.append(s.ref),
                         on_failed=lambda n, v, d: self.failed.append((f"{n}@{v}", d)),
                         on_retired=lambda s: self.retired.append(s.ref))


def policy() -> Policy:
    return Policy.from_dict({"checks": {"objects": {"model": "tiny", "input": "image", "labels": ["class-0"], "top_k": 3}}})


def oracle_top(image: np.ndarray, seed: int) -> list[int]:
    probs = softmax(tiny_logits(preprocess_image(image, PRE)[None], seed=seed))[0]
    return np.argsort(-probs, kind="stable")[:3].tolist()


# ------------------------------------------------------------------------------------ assignment
def test_split_proportions_match_the_weights_within_binomial_tolerance():
    split = normalised_split({"1": 70, "2": 20, "3": 10})
    arms = [choose_arm(k, "tiny", split) for k in KEYS]
    n = len(KEYS)
    for version, p in split:
        count = arms.count(version)
        assert abs(count - n * p) < 4.5 * math.sqrt(n * p * (1 - p)), (version, count, n * p)


def test_the_same_key_always_gets_the_same_arm_whatever_the_order_of_the_weights():
    a = Route("tiny", "1", normalised_split({"1": 1, "2": 1}))
    b = Route("tiny", "1", normalised_split({"2": 1, "1": 1}))
    assert all(a.arm(k) == a.arm(k) == b.arm(k) for k in KEYS[:2000])
    assert {a.arm(k)[1] for k in KEYS[:10]} == {"split"}
    assert Route("tiny", "1").arm("p-1") == ("1", "serving")  # no split: the serving version


def test_assignment_is_stable_across_processes():
    """A different process (another hash seed) assigns every key the same arm: restarts and replays agree."""
    keys = KEYS[:500]
    split = {"1": 50, "2": 30, "3": 20}
    code = ("import json, sys; from operators.routing import choose_arm, normalised_split; "
            f"print(json.dumps([choose_arm(k, 'tiny', normalised_split({split!r})) for k in {keys!r}]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert json.loads(out.stdout) == [choose_arm(k, "tiny", normalised_split(split)) for k in keys]


def test_models_get_independent_assignments():
    split = normalised_split({"1": 1, "2": 1})
    same = sum(choose_arm(k, "tiny", split) == choose_arm(k, "other", split) for k in KEYS)
    assert abs(same - len(KEYS) / 2) < 4.5 * math.sqrt(len(KEYS) / 4)


def test_shadow_sample_rate_and_independence_from_the_arm():
    rate, n = 0.1, len(KEYS)
    sampled = [k for k in KEYS if in_shadow_sample(k, "tiny", rate)]
    assert abs(len(sampled) - n * rate) < 4.5 * math.sqrt(n * rate * (1 - rate))
    split = normalised_split({"1": 1, "2": 1})
    in_arm_1 = sum(choose_arm(k, "tiny", split) == "1" for k in sampled)
    assert abs(in_arm_1 - len(sampled) / 2) < 4.5 * math.sqrt(len(sampled) / 4)
    assert not any(in_shadow_sample(k, "tiny", 0.0) for k in KEYS[:1000])
    assert all(in_shadow_sample(k, "tiny", 1.0) for k in KEYS[:1000])


def test_a_shadow_never_shadows_its_own_version():
    route = Route("tiny", "1", normalised_split({"1": 1, "2": 1}), Shadow("2", 1.0))
    for key in KEYS[:200]:
        version, _ = route.arm(key)
        assert route.shadow_version(key, version) == (None if version == "2" else "2")


def test_bucket_is_uniform_in_unit_interval():
    values = np.array([bucket(k, "x") for k in KEYS])
    assert values.min() >= 0 and values.max() < 1
    counts, _ = np.histogram(values, bins=10, range=(0, 1))
    assert np.all(np.abs(counts - len(KEYS) / 10) < 4.5 * math.sqrt(len(KEYS) * 0.09))


# ------------------------------------------------------------------------------------ state file
def test_state_file_round_trips_and_rejects_nonsense(tmp_path):
    state = ServingState({"tiny": ModelState(pin="1", split={"1": 90.0, "2": 10.0}, shadow=Shadow("3", 0.1),
                                             history=["2"])}, poll_interval_s=2)
    path = tmp_path / STATE_FILE
    state.save(path)
    assert ServingState.load(path) == state
    assert ServingState.load(tmp_path / "absent.yaml") == ServingState()
    path.write_text(yaml.safe_dump({"models": {"tiny": {"pin": 1, "split": {1: 3, 2: 1}}}}))
    assert ServingState.load(path).model("tiny") == ModelState(pin="1", split={"1": 3.0, "2": 1.0})  # YAML numbers -> strings
    for bad in ({"models": {"tiny": {"split": {"1": -1}}}}, {"models": {"tiny": {"split": {"1": 0}}}},
                {"models": {"tiny": {"shadow": {"version": "2", "sample_rate": 2}}}},
                {"models": {"tiny": {"pinned": "1"}}}, {"poll": 3}):
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(ServingStateError):
            ServingState.load(path)


# ------------------------------------------------------------------------------------ hot reload
def test_a_new_version_directory_is_loaded_then_switched_to_and_the_old_one_drains(root):
    hooks = Recorder()
    registry = ModelRegistry(ModelRepository(root), hooks=hooks)
    registry.route_sync("tiny")

    async def run():
        old_stage, _, _ = registry.assign("tiny", "p-1")
        held = registry.lease([old_stage])  # a record that started before the switch
        add_version(root, "2", seed=1)
        report = await registry.refresh()
        assert report == {"switched": ["tiny"], "failed": {}}
        assert registry.route("tiny").serving == "2" and registry.assign("tiny", "p-1")[0].ref == "tiny@2"
        assert old_stage.retiring and not old_stage.closed  # still in use: not closed under the record
        image = np.full((16, 16, 3), 90, np.uint8)
        result = await old_stage.batcher.submit(old_stage.operator.preprocess(image))  # it finishes on v1
        assert [c["class_id"] for c in result.as_dict()] == oracle_top(image, seed=0)
        held.release()
        await asyncio.sleep(0.05)
        assert old_stage.closed and hooks.retired == ["tiny@1"]
        assert await registry.refresh() == {"switched": [], "failed": {}}  # nothing new: no reload
        await registry.close()

    asyncio.run(run())
    assert hooks.loaded == ["tiny@1", "tiny@2"]


def test_a_failing_new_version_is_reported_and_the_old_one_keeps_serving(root):
    hooks = Recorder()
    registry = ModelRegistry(ModelRepository(root), hooks=hooks)
    registry.route_sync("tiny")

    async def run():
        add_version(root, "2", broken=True)
        assert list((await registry.refresh())["failed"]) == ["tiny"]
        assert registry.route("tiny").serving == "1"
        assert [ref for ref, _ in hooks.failed] == ["tiny@2"] and "tiny@2" in registry.errors
        assert (await registry.refresh())["failed"] == {}  # unchanged directory: not retried every poll
        assert len(hooks.failed) == 1
        tiny_classifier(root / "tiny" / "2" / "model.onnx", seed=1)  # the copy completes / gets fixed
        assert (await registry.refresh())["switched"] == ["tiny"]
        assert registry.route("tiny").serving == "2" and "tiny@2" not in registry.errors
        await registry.close()

    asyncio.run(run())


def test_start_up_falls_back_to_an_older_version_when_the_newest_fails(root):
    add_version(root, "2", broken=True)
    hooks = Recorder()
    registry = ModelRegistry(ModelRepository(root), hooks=hooks)
    assert registry.route_sync("tiny").serving == "1"
    assert [ref for ref, _ in hooks.failed] == ["tiny@2"]


def test_a_candidate_version_is_not_served_until_named(root):
    registry = ModelRegistry(ModelRepository(root))
    registry.route_sync("tiny")

    async def run():
        add_version(root, "2", candidate=True)
        assert (await registry.refresh())["switched"] == []
        assert registry.route("tiny").serving == "1" and "tiny@2" not in registry.stages
        await registry.close()

    asyncio.run(run())


def test_records_in_flight_during_a_switch_are_each_served_by_exactly_one_version(root):
    """Many records judged concurrently while v2 appears: none fails, each result matches the oracle
    of the version its assignment names, the late ones use v2."""
    moderator = Moderator(ModelRepository(root), policy(), providers=("cpu",))
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 220, size=(24, 24, 3), dtype=np.uint8) for _ in range(120)]

    async def one(i: int):
        with moderator.assign(f"k{i}") as a:
            items = moderator.prepare(image=images[i], assignment=a)
            await asyncio.sleep(0.001 * (i % 7))
            results = await moderator.judge(items, a)
            return a.models()["objects"]["version"], results[a.stages["objects"].ref]

    async def run():
        first = [asyncio.ensure_future(one(i)) for i in range(60)]
        await asyncio.sleep(0)
        add_version(root, "2", seed=1)
        await moderator.registry.refresh()
        second = [asyncio.ensure_future(one(i)) for i in range(60, 120)]
        out = await asyncio.gather(*first, *second)
        await asyncio.sleep(0.05)
        draining = moderator.registry.draining
        await moderator.close()
        return out, draining

    out, draining = asyncio.run(run())
    assert draining == []  # v1 closed once its last record was done
    for i, (version, classes) in enumerate(out):
        assert classes.class_ids == oracle_top(images[i], seed=0 if version == "1" else 1)
    assert {v for v, _ in out[:60]} == {"1"} and {v for v, _ in out[60:]} == {"2"}


# ----------------------------------------------------------------------------------------- admin
def test_pin_rollback_and_promote_persist_in_the_state_file(root):
    add_version(root, "2", seed=1)
    add_version(root, "3", seed=2, candidate=True)

    async def run():
        registry = ModelRegistry(ModelRepository(root))
        assert registry.route_sync("tiny").serving == "2"
        assert (await registry.pin("tiny", "1")).serving == "1"
        saved = ServingState.load(root / STATE_FILE).model("tiny")
        assert saved.pin == "1" and saved.history == ["2"]
        assert (await registry.rollback("tiny")).serving == "2"  # the previous serving version
        assert (await registry.promote("tiny", "3")).serving == "3"
        assert not registry.repo.is_candidate("tiny", "3") and ServingState.load(root / STATE_FILE).model("tiny").pin is None
        assert (await registry.rollback("tiny")).serving == "2"
        assert (await registry.rollback("tiny")).serving == "1"  # history empty: the next older version
        with pytest.raises(Conflict):
            await registry.rollback("tiny")
        with pytest.raises(ModelConfigError):
            await registry.pin("tiny", "9")
        await registry.close()
        restarted = ModelRegistry(ModelRepository(root))  # a restart follows the file
        assert restarted.route_sync("tiny").serving == "1"

    asyncio.run(run())


def test_split_and_shadow_load_every_version_before_switching(root):
    add_version(root, "2", seed=1)
    add_version(root, "3", broken=True)

    async def run():
        registry = ModelRegistry(ModelRepository(root))
        registry.route_sync("tiny")
        await registry.pin("tiny", "1")
        route = await registry.set_split("tiny", {"1": 3, "2": 1})
        assert route.split == (("1", 0.75), ("2", 0.25))
        with pytest.raises(LoadFailed):
            await registry.set_shadow("tiny", "3", 0.5)  # does not load: nothing changes
        assert registry.route("tiny").shadow is None and ServingState.load(root / STATE_FILE).model("tiny").shadow is None
        with pytest.raises(ServingStateError):
            await registry.set_split("tiny", {"1": -1})
        await registry.set_split("tiny", {})
        assert registry.route("tiny").split == ()
        await registry.close()

    asyncio.run(run())


def test_state_file_changes_by_another_worker_are_picked_up_by_the_poll(root):
    add_version(root, "2", seed=1)

    async def run():
        registry = ModelRegistry(ModelRepository(root))
        registry.route_sync("tiny")
        ServingState({"tiny": ModelState(split={"1": 1, "2": 1}, shadow=None)}).save(root / STATE_FILE)
        assert (await registry.refresh())["switched"] == ["tiny"]
        assert dict(registry.route("tiny").split) == {"1": 0.5, "2": 0.5}
        (root / STATE_FILE).write_text("models: [not, a, mapping")  # a typo: logged, the current state stays
        assert (await registry.refresh())["switched"] == []
        assert dict(registry.route("tiny").split) == {"1": 0.5, "2": 0.5}
        await registry.close()

    asyncio.run(run())


def test_shadow_results_never_fail_the_record_and_judgement_uses_the_assigned_versions(root):
    add_version(root, "2", seed=1, broken=False)
    ServingState({"tiny": ModelState(pin="1", shadow=Shadow("2", 1.0))}).save(root / STATE_FILE)
    moderator = Moderator(ModelRepository(root), policy(), providers=("cpu",))
    image = np.full((16, 16, 3), 120, np.uint8)

    async def run():
        with moderator.assign("p-7") as a:
            assert a.arms == {"objects": "serving"} and a.shadows["objects"].ref == "tiny@2"
            results = await moderator.judge(moderator.prepare(image=image, assignment=a), a)
            live, shadow = moderator.judgement(results, a), moderator.judgement(results, a.shadowed())
            assert [c["class_id"] for c in live["classifications"]] == oracle_top(image, 0)
            assert [c["class_id"] for c in shadow["classifications"]] == oracle_top(image, 1)
            assert a.shadowed().models()["objects"]["arm"] == "shadow"
            # a shadow whose batch fails is left out; the live result stands
            a.shadows["objects"].batcher.run_batch = lambda items: 1 / 0
            results = await moderator.judge(moderator.prepare(image=image, assignment=a), a)
            assert list(results) == ["tiny@1"]
        await moderator.close()

    asyncio.run(run())
