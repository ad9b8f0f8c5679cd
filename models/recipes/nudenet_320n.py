"""NudeNet 320n NSFW body-part detector (YOLOv8n, 18 classes) from the installed `nudenet` package.

The ONNX file ships inside the PyPI wheel (`nudenet/320n.onnx`); it is copied into the gitignored
model directory at build time and never into git. Labels come from the package's own label list.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import shutil
from pathlib import Path

PACKAGE = "nudenet"
MODEL_FILE = "320n.onnx"


def package_labels(source: str) -> list[str]:
    """The `__labels = [...]` list in nudenet/nudenet.py, read without importing (name mangling aside)."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__labels" for t in node.targets):
            return [str(x) for x in ast.literal_eval(node.value)]
    raise RuntimeError("nudenet/nudenet.py has no __labels list")


def build(out_dir: Path) -> dict:
    import onnx

    dist = importlib.metadata.distribution(PACKAGE)
    package_dir = Path(str(dist.locate_file(PACKAGE)))
    src = package_dir / MODEL_FILE
    if not src.is_file():
        raise RuntimeError(f"{src} is missing: is {PACKAGE} {dist.version} installed?")
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "model.onnx"
    shutil.copyfile(src, onnx_path)

    labels = package_labels((package_dir / "nudenet.py").read_text())
    # the ONNX metadata (written by the ultralytics export) must name the same classes in the same order
    meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    names = ast.literal_eval(meta["names"]) if "names" in meta else {}
    if names and [names[i] for i in range(len(names))] != labels:
        raise RuntimeError(f"{PACKAGE} labels and the ONNX metadata names disagree: {labels} vs {names}")
    (out_dir / "labels.json").write_text(json.dumps(labels))
    return {
        "package": f"{PACKAGE} {dist.version}",
        "package_licence": dist.metadata.get("License"),
        "onnx_licence": meta.get("license"),
        "classes": len(labels),
        "bytes": onnx_path.stat().st_size,
        "sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
    }
