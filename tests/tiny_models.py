"""Tiny ONNX models generated with onnx.helper for fast tests, plus their numpy oracles.

`tiny_classifier`: logits = mean_over_pixels(x) @ W + b, so a test can compute the expected output
with numpy. With `poison=True` the graph also gathers from a one-row table at index
`max(x) > 0.999`: any batch containing a pure-white pixel fails inside ONNX Runtime (index out of
range), a real model failure mid-batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

SIZE = 32


def tiny_weights(num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(3, num_classes)).astype(np.float32) * 4, rng.normal(size=num_classes).astype(np.float32)


def tiny_classifier(path: Path, num_classes: int = 4, poison: bool = False, seed: int = 0) -> Path:
    w, b = tiny_weights(num_classes, seed)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "B"], ["logits" if not poison else "clean"]),
    ]
    if poison:
        inits += [numpy_helper.from_array(np.zeros((1, num_classes), np.float32), "table"),
                  numpy_helper.from_array(np.array(0.999, np.float32), "white")]
        nodes += [
            helper.make_node("ReduceMax", ["input"], ["mx"], keepdims=0),
            helper.make_node("Greater", ["mx", "white"], ["is_white"]),
            helper.make_node("Cast", ["is_white"], ["idx"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "idx"], ["row"], axis=0),
            helper.make_node("Add", ["clean", "row"], ["logits"]),
        ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])],
        inits,
    )
    return save_model(graph, path)


def save_model(graph: onnx.GraphProto, path: Path) -> Path:
    """A checked opset-17 model of `graph` written to `path` (the one writer of every tiny test model)."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def tiny_logits(tensors: np.ndarray, num_classes: int = 4, seed: int = 0) -> np.ndarray:
    """Numpy oracle of tiny_classifier on `(N, 3, H, W)` inputs."""
    w, b = tiny_weights(num_classes, seed)
    return tensors.mean(axis=(2, 3)) @ w + b


def write_tiny_repository(root: Path, name: str = "tiny", version: str = "1", num_classes: int = 4,
                          poison: bool = False, max_batch_size: int = 8, max_wait_ms: float = 5) -> Path:
    """A model repository entry `<root>/<name>/<version>/` serving tiny_classifier."""
    directory = root / name / version
    tiny_classifier(directory / "model.onnx", num_classes, poison)
    (directory / "labels.json").write_text(json.dumps([f"class-{i}" for i in range(num_classes)]))
    config = {
        "task": "classify", "file": "model.onnx", "labels": "labels.json",
        "preprocess": {"size": SIZE, "resize": "stretch", "mean": [0, 0, 0], "std": [255, 255, 255]},
        "postprocess": {"softmax": True, "top_k": 3},
        "batching": {"max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms},
        "runtime": {"providers": ["cpu"], "intra_op_threads": 1},
    }
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    return directory
