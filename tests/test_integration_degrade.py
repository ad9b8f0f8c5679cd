"""The degradation ladder through the real broker and a real worker: a backlog steps the model down to
its cheaper version, and once the backlog is gone it steps back up to full quality."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import image_policy, wait_until
from kafka_helpers import collect, frame_image, frame_record, ids, send_records

from streams.schemas import FRAMES, VERDICTS

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent / "models"


def two_versions(root: Path) -> Path:
    """efficientnet-lite0@2 serving (a copy of @1: a stand-in for a dearer version) with a ladder down to
    @1; the real model, so a few thousand frames make a backlog on this machine."""
    source = REPO / "efficientnet-lite0" / "1"
    config = yaml.safe_load((source / "config.yaml").read_text())
    config["runtime"] = {**config.get("runtime", {}), "providers": ["cpu"]}
    for version in ("1", "2"):
        directory = root / "efficientnet-lite0" / version
        directory.mkdir(parents=True)
        for name in ("model.onnx", "labels.json"):
            (directory / name).symlink_to(source / name)
        ladder = {"degrade": {"lag_records": 100, "for_s": 1, "recover_below": 20, "rungs": [{"version": "1"}]}}
        (directory / "config.yaml").write_text(yaml.safe_dump({**config, **(ladder if version == "2" else {})}))
    return root


def level(port: int) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith('inferstream_degradation_level{model="efficientnet-lite0"}'):
                return float(line.split()[-1])
    return None


def test_a_backlog_steps_down_to_the_cheaper_version_and_back_up_after_it(settings, start_worker, run, tmp_path):
    settings = settings.replace(model_dir=str(two_versions(tmp_path / "models")),
                                policy=image_policy(tmp_path, "efficientnet-lite0", labels=("missile",)))
    n = 3000
    run(send_records(settings, FRAMES, [frame_record("cam", i, frame_image(i)) for i in range(n)]))
    worker = start_worker(settings)

    verdicts = collect(settings, VERDICTS, lambda rs: len(ids(rs)) >= n, timeout_s=180)
    assert ids(verdicts) == {f"cam:{i}" for i in range(n)}  # degraded, not lossy: every frame judged
    by_index = sorted((r["value"] for r in verdicts), key=lambda v: v["frame_index"])
    first, levels = by_index[0], {v["degradation"]["level"] for v in by_index}
    assert first["degradation"]["level"] == 0 and first["models"]["objects"]["version"] == "2"
    assert levels == {0, 1}  # the backlog stepped it down
    for v in by_index:  # each verdict names what judged it
        degraded = v["degradation"]["level"] == 1
        assert v["models"]["objects"]["version"] == ("1" if degraded else "2")
        assert v["models"]["objects"]["arm"] == ("degraded" if degraded else "serving")

    # the backlog is gone: after `for_s` below `recover_below` the model is back at full quality
    assert wait_until(lambda: level(worker.settings.web_port) == 0, 30)
    run(send_records(settings, FRAMES, [frame_record("cam", i, frame_image(i)) for i in range(n, n + 10)]))
    later = collect(settings, VERDICTS, lambda rs: len(ids(rs)) >= n + 10, timeout_s=60)
    for v in (r["value"] for r in later if r["value"]["frame_index"] >= n):
        assert v["degradation"]["level"] == 0 and v["models"]["objects"]["version"] == "2"
