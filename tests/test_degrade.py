"""The degradation ladder: sustained lag steps a model down to cheaper rungs and back up with
hysteresis (simulated clock), a degraded rung's version serves every record, and a frame stride skips
frames of each stream while the verdicts say what is in force."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import yaml
from kafka_helpers import frame_image
from tiny_models import write_tiny_repository

from operators.degrade import DegradationLadder, LadderConfig, LadderConfigError, Rung
from operators.images import encode_image
from operators.model_repository import ModelConfigError, ModelRepository
from operators.moderation import Moderator
from operators.policy import Policy
from streams.config import Settings
from streams.moderation import ModerationPipeline
from streams.schemas import FrameMeta, SourceRecord, decode_headers

LADDER = {"lag_records": 100, "for_s": 10, "recover_below": 20,
          "rungs": [{"version": "1"}, {"version": "1", "frame_stride": 2}, {"frame_stride": 4}]}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ladder() -> tuple[DegradationLadder, Clock]:
    clock = Clock()
    return DegradationLadder(LadderConfig.from_config(LADDER, "test"), clock), clock


def feed(ladder: DegradationLadder, clock: Clock, lag: int, seconds: float, step: float = 1.0) -> list[int]:
    levels = []
    end = clock.now + seconds
    while clock.now < end:
        levels.append(ladder.observe(lag))
        clock.now += step
    return levels


def test_config_rungs_and_defaults():
    config = LadderConfig.from_config({"rungs": [{"version": 1}, {"frame_stride": 3}]}, "m@2")
    assert config.rungs == (Rung("1", 1), Rung(None, 3))
    assert (config.lag_records, config.for_s, config.recover_below) == (1000, 10.0, 100)
    assert LadderConfig.from_config(None, "m@1") is None


@pytest.mark.parametrize("raw", [{"rungs": []}, {"rungs": [{"frame_stride": 0}]}, {"rungs": [{"speed": 2}]},
                                 {"rungs": [{"version": "2"}], "lag_records": 10, "recover_below": 10},
                                 {"rungs": [{"version": "2"}], "after": 3}])
def test_invalid_ladders_are_refused(raw):
    with pytest.raises(LadderConfigError):
        LadderConfig.from_config(raw, "m@1")


def test_a_model_config_with_an_invalid_ladder_does_not_load(tmp_path):
    directory = write_tiny_repository(tmp_path, "tiny", "1")
    config = yaml.safe_load((directory / "config.yaml").read_text())
    (directory / "config.yaml").write_text(yaml.safe_dump({**config, "degrade": {"rungs": [{"frame_stride": -1}]}}))
    with pytest.raises(ModelConfigError, match="frame_stride"):
        ModelRepository(tmp_path).config("tiny")


def test_sustained_lag_steps_down_one_rung_per_window_and_no_further_than_the_last():
    steps, clock = ladder()
    assert feed(steps, clock, 50, 30) == [0] * 30  # under the threshold: nothing happens
    levels = feed(steps, clock, 500, 45)
    assert levels[:10] == [0] * 10 and levels[10] == 1  # a full window above it, then one rung
    assert levels[20] == 2 and levels[30] == 3 and levels[-1] == 3  # one rung per window, three rungs
    assert steps.rung == Rung(None, 4) and steps.frame_stride == 4


def test_a_short_spike_does_not_degrade():
    steps, clock = ladder()
    feed(steps, clock, 500, 9)
    assert feed(steps, clock, 50, 5) == [0] * 5
    assert feed(steps, clock, 500, 9) == [0] * 9  # the window starts again after the lag fell


def test_recovery_waits_below_the_lower_threshold_then_steps_up_one_rung_per_window():
    steps, clock = ladder()
    feed(steps, clock, 500, 25)
    assert steps.level == 2
    assert feed(steps, clock, 60, 30) == [2] * 30  # between the thresholds: hold (hysteresis)
    levels = feed(steps, clock, 5, 25)
    assert levels[:10] == [2] * 10 and levels[10] == 1 and levels[20] == 0


@pytest.fixture
def two_versions(tmp_path):
    """tiny@2 serving (the newest), with a ladder down to tiny@1 (the same tiny network: a stand-in for a
    cheaper version)."""
    write_tiny_repository(tmp_path, "tiny", "1")
    v2 = write_tiny_repository(tmp_path, "tiny", "2")
    config = yaml.safe_load((v2 / "config.yaml").read_text())
    (v2 / "config.yaml").write_text(yaml.safe_dump({**config, "degrade": LADDER}))
    policy = Policy.from_dict({"checks": {"objects": {"model": "tiny", "input": "image", "labels": ["class-0"]}}})
    return Moderator(ModelRepository(tmp_path), policy, providers=("cpu",))


def step_to(moderator: Moderator, level: int) -> None:
    clock = Clock()
    ladder = moderator.ladders["tiny"]
    ladder.clock = clock
    while ladder.level < level:
        ladder.observe(10_000)
        clock.now += 10


def test_a_degraded_rung_serves_every_record_with_its_version(two_versions):
    moderator = two_versions
    assert moderator.assign("p-1", lease=False).stages["objects"].ref == "tiny@2"
    assert moderator.degradation() == {"level": 0, "frame_stride": 1, "models": {"tiny": 0}}
    step_to(moderator, 1)
    assignment = moderator.assign("p-1", lease=False)
    assert assignment.stages["objects"].ref == "tiny@1" and assignment.arms["objects"] == "degraded"
    assert moderator.frame_stride == 1
    step_to(moderator, 2)
    assert moderator.frame_stride == 2
    assert moderator.degradation() == {"level": 2, "frame_stride": 2, "models": {"tiny": 2}}
    asyncio.run(moderator.close())


def _frames(n: int) -> list[SourceRecord]:
    out = []
    for i in range(n):
        image = np.ascontiguousarray(frame_image(i))
        meta = FrameMeta("cam-1", i, i / 10, "png", image.shape[1], image.shape[0])
        value = encode_image(image, "png")
        out.append(SourceRecord("frames", 0, i, 1_000 + i, b"cam-1", decode_headers(meta.headers()), value))
    return out


def test_a_frame_stride_skips_frames_and_the_judged_ones_say_what_is_in_force(two_versions):
    import orjson

    moderator = two_versions
    step_to(moderator, 2)  # tiny@1, every 2nd frame
    pipeline = ModerationPipeline(Settings(), moderator)

    async def run():
        try:
            return await pipeline.handle_frames(_frames(6))
        finally:
            await pipeline.close()

    outputs = asyncio.run(run())
    assert [len(o) for o in outputs] == [1, 0, 1, 0, 1, 0]  # odd frames skipped, not dead-lettered
    for i in (0, 2, 4):
        verdict = orjson.loads(outputs[i][0].value)
        assert verdict["frame_index"] == i
        assert verdict["degradation"] == {"level": 2, "frame_stride": 2, "models": {"tiny": 2}}
        assert verdict["models"]["objects"]["version"] == "1" and verdict["models"]["objects"]["arm"] == "degraded"
