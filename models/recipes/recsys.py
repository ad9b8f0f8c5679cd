"""Build the recommendation models in order: synthetic log -> CF retrieval -> DeepFM ranking.

One log (models/recipes/interactions.py, default config, seed 0) feeds both models, so it is drawn
once; it is also written as JSONL (train.jsonl, heldout.jsonl, items.jsonl, manifest.json) for
replaying into the `events` topic. Outputs: models/cf-retrieval/1 and models/deepfm-ctr/1, each
with its quality.json.

    .venv/bin/python models/recipes/recsys.py                 # data in .cache/recsys/
    .venv/bin/python models/recipes/recsys.py --data-dir DIR --models-root models
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # models/


def build_all(models_root: Path = ROOT, data_dir: Path | None = ROOT.parent / ".cache" / "recsys") -> dict:
    """Data, then cf-retrieval/1, then deepfm-ctr/1 under `models_root`; returns each step's report and time."""
    from . import collab_filter as cf
    from . import deepfm, interactions

    started = time.perf_counter()
    data = interactions.generate()
    report: dict = {"data": interactions.summary(data)}
    if data_dir is not None:
        report["data"]["files"] = {k: str(p) for k, p in interactions.write_jsonl(data, data_dir).items()}
    report["data"]["seconds"] = round(time.perf_counter() - started, 1)
    step = time.perf_counter()
    report["cf-retrieval/1"] = cf.build(models_root / "cf-retrieval" / "1", data)
    report["cf-retrieval/1"]["seconds"] = round(time.perf_counter() - step, 1)
    step = time.perf_counter()
    report["deepfm-ctr/1"] = deepfm.build(models_root / "deepfm-ctr" / "1", data, models_root / "cf-retrieval" / "1")
    report["deepfm-ctr/1"]["seconds"] = round(time.perf_counter() - step, 1)
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def build(out_dir: Path) -> dict:
    """models/build.py entry point for `deepfm-ctr/1` when one entry should build both models."""
    return build_all(out_dir.parent.parent, data_dir=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-root", type=Path, default=ROOT)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / ".cache" / "recsys")
    args = parser.parse_args(argv)
    report = build_all(args.models_root, args.data_dir)
    from . import recsys_quality

    print(recsys_quality.format_table(report["deepfm-ctr/1"]["quality"]))
    print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":  # run as a script: through the recipes package models/build.py registers
    sys.path.insert(0, str(ROOT))
    from build import load_recipe

    sys.exit(load_recipe("recsys").main())
