"""Quantization into a new repository version: method chosen from the graph, outputs close to FP32,
the new version loadable, the accuracy bound enforced, FP16 repairs. Tiny generated models (a CNN
classifier and an MLP, dynamic batch) keep it to seconds; EfficientNet-Lite0 is measured by hand."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper
from tiny_models import save_model

from operators.evaluation import (
    CALIBRATION_PHOTOS,
    HELD_OUT_PHOTOS,
    compare_click_probabilities,
    compare_detections,
    compare_entities,
    compare_outputs,
    ctr_samples,
    match_detections,
)
from operators.model_repository import ModelRepository
from operators.quantize import Plan, choose_method, quantize, repair_fp16_graph

FAST = {"bench_seconds": 0.1, "calibration_count": 12, "held_out_count": 12}


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    return save_model(graph, path)


def tiny_cnn(path: Path, seed: int = 0) -> Path:
    """input [batch, 3, 32, 32] -> Conv 3x3 (8) -> Relu -> Conv 3x3 stride 2 (16) -> Relu -> global
    average pool -> Gemm -> logits [batch, 4]."""
    rng = np.random.default_rng(seed)
    he = lambda *shape: (rng.normal(size=shape) * np.sqrt(2 / np.prod(shape[1:]))).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("W1", he(8, 3, 3, 3)), ("B1", rng.normal(size=8).astype(np.float32) * 0.1),
        ("W2", he(16, 8, 3, 3)), ("B2", rng.normal(size=16).astype(np.float32) * 0.1),
        ("W3", he(4, 16) * 4), ("B3", np.zeros(4, np.float32))]]
    nodes = [
        helper.make_node("Conv", ["input", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "W3", "B3"], ["logits"], transB=1),
    ]
    return _save(helper.make_graph(
        nodes, "tiny-cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])], inits), path)


def tiny_mlp(path: Path, seed: int = 0) -> Path:
    """features [batch, 16] -> MatMul (64) + bias -> Relu -> MatMul (8) + bias -> output [batch, 8]."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("W1", rng.normal(size=(16, 64)).astype(np.float32) / 4), ("B1", rng.normal(size=64).astype(np.float32)),
        ("W2", rng.normal(size=(64, 8)).astype(np.float32) / 8), ("B2", rng.normal(size=8).astype(np.float32))]]
    nodes = [
        helper.make_node("MatMul", ["features", "W1"], ["m1"]), helper.make_node("Add", ["m1", "B1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "W2"], ["m2"]), helper.make_node("Add", ["m2", "B2"], ["output"]),
    ]
    return _save(helper.make_graph(
        nodes, "tiny-mlp", [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 8])], inits), path)


def _write_version(root: Path, name: str, make, config: dict, version: str = "1") -> Path:
    directory = root / name / version
    make(directory / "model.onnx")
    base = {"file": "model.onnx", "batching": {"max_batch_size": 8, "max_wait_ms": 5},
            "runtime": {"providers": ["cpu"], "intra_op_threads": 1}}
    (directory / "config.yaml").write_text(yaml.safe_dump({**base, **config}))
    return directory


@pytest.fixture
def repo(tmp_path) -> Path:
    root = tmp_path / "models"
    cnn = _write_version(root, "cnn", tiny_cnn, {
        "task": "classify", "labels": "labels.json",
        "preprocess": {"size": 32, "resize": "stretch", "mean": [0, 0, 0], "std": [255, 255, 255]},
        "postprocess": {"softmax": True, "top_k": 3}})
    (cnn / "labels.json").write_text(json.dumps(["a", "b", "c", "d"]))
    _write_version(root, "mlp", tiny_mlp, {"task": "embed"})
    return root


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


# ------------------------------------------------------------------------------------------ INT8
def test_cnn_gets_static_per_channel_qdq_calibrated_on_photos(repo):
    report = quantize(repo, Plan("cnn@1", to="int8", **FAST))
    assert report["method"] == "static"
    assert report["details"]["format"] == "QDQ" and report["details"]["per_channel"] is True
    assert report["calibration"]["count"] == 12
    assert "scikit-image sample photos" in report["calibration"]["source"]
    model = onnx.load(str(Path(report["directory"]) / report["file"]))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    scales = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    conv_weight_scales = [scales[n.input[1]] for n in model.graph.node
                          if n.op_type == "DequantizeLinear" and n.input[0].startswith("W1")]
    assert conv_weight_scales and conv_weight_scales[0].shape == (8,)  # one scale per output channel


def test_cnn_int8_outputs_stay_close_to_fp32_on_held_out_photos(repo):
    accuracy = quantize(repo, Plan("cnn@1", to="int8", **FAST))["accuracy"]
    assert accuracy["metric"] == "top1_disagreement"
    assert accuracy["count"] == 12
    assert "chelsea" in accuracy["inputs"]
    assert accuracy["top1_agreement"] >= 0.9
    assert accuracy["max_prob_diff"] < 0.1


def test_calibration_and_held_out_photos_do_not_overlap():
    assert not set(CALIBRATION_PHOTOS) & set(HELD_OUT_PHOTOS)


def test_mlp_gets_dynamic_int8_and_stays_close_to_fp32(repo):
    report = quantize(repo, Plan("mlp@1", to="int8", **FAST))
    assert report["method"] == "dynamic"
    assert report["calibration"] is None
    ops = _ops(Path(report["directory"]) / report["file"])
    assert "DynamicQuantizeLinear" in ops or "DynamicQuantizeMatMul" in ops or "MatMulInteger" in ops
    assert "QuantizeLinear" not in ops
    accuracy = report["accuracy"]
    assert accuracy["metric"] == "relative_max_abs_diff"
    assert 0 < accuracy["drop"] < 0.05
    assert accuracy["max_abs_diff"] > accuracy["mean_abs_diff"] > 0


def test_method_is_chosen_from_the_graph(tmp_path):
    assert choose_method(onnx.load(str(tiny_cnn(tmp_path / "cnn.onnx")))) == "static"
    assert choose_method(onnx.load(str(tiny_mlp(tmp_path / "mlp.onnx")))) == "dynamic"


def test_new_version_has_a_config_the_repository_loads(repo):
    report = quantize(repo, Plan("cnn@1", to="int8", **FAST))
    assert report["target"] == "cnn@2"
    models = ModelRepository(repo)
    assert models.versions("cnn") == ["1", "2"]
    cfg = models.config("cnn@2")
    assert cfg.file == "model.int8.onnx"
    assert cfg.source["quantized_from"] == "cnn@1"
    assert cfg.source["quantization"]["method"] == "static"
    assert cfg.preprocess == models.config("cnn@1").preprocess
    loaded = models.load("cnn@2")
    assert loaded.labels == ["a", "b", "c", "d"]  # labels copied
    x = np.random.default_rng(0).uniform(size=(3, 3, 32, 32)).astype(np.float32)
    assert loaded.session.run({"input": x})["logits"].shape == (3, 4)
    saved = json.loads((repo / "cnn" / "2" / "quantization.json").read_text())
    assert saved == json.loads(json.dumps(report))  # the report is JSON-able and kept with the version
    assert not [p for p in (repo / "cnn").iterdir() if p.name.startswith(".")]  # no staging left behind
    umask = os.umask(0)
    os.umask(umask)
    assert (repo / "cnn" / "2").stat().st_mode & 0o777 == 0o777 & ~umask  # not private like a temp dir


def test_report_measures_size_and_throughput(repo):
    report = quantize(repo, Plan("mlp@1", to="int8", **FAST))
    size, speed = report["size"], report["throughput"]
    assert size["before_bytes"] == (repo / "mlp" / "1" / "model.onnx").stat().st_size
    assert size["after_bytes"] < size["before_bytes"]
    assert size["ratio"] == pytest.approx(size["before_bytes"] / size["after_bytes"], rel=1e-2)
    assert speed["batch"] == 8  # the model's max batch
    assert speed["before_per_s"] > 0 and speed["after_per_s"] > 0
    assert speed["speedup"] == pytest.approx(speed["after_per_s"] / speed["before_per_s"], rel=1e-2)


def test_promote_ok_is_false_when_the_bound_is_impossibly_tight(repo):
    assert quantize(repo, Plan("mlp@1", to="int8", max_accuracy_drop=0.5, **FAST))["promote_ok"] is True
    report = quantize(repo, Plan("mlp@1", to="int8", max_accuracy_drop=0.0, **FAST))
    assert report["promote_ok"] is False
    assert ModelRepository(repo).config(report["target"]).source["quantization"]["promote_ok"] is False


def test_rejected_version_can_be_dropped(repo):
    report = quantize(repo, Plan("mlp@1", to="int8", max_accuracy_drop=0.0, keep_rejected=False, **FAST))
    assert report["promote_ok"] is False and report["directory"] is None
    assert ModelRepository(repo).versions("mlp") == ["1"]


def test_next_free_version_skips_every_numbered_directory(repo):
    (repo / "mlp" / "3").mkdir()  # no config, but the number is taken
    assert ModelRepository(repo).next_version("mlp") == "4"
    assert quantize(repo, Plan("mlp@1", **FAST))["target"] == "mlp@4"


def test_quantizing_a_quantized_model_is_refused(repo):
    report = quantize(repo, Plan("mlp@1", **FAST))
    with pytest.raises(ValueError, match="already quantized"):
        quantize(repo, Plan(report["target"], **FAST))


def test_given_calibration_and_held_out_inputs_are_used(repo):
    rng = np.random.default_rng(5)
    report = quantize(repo, Plan("cnn@1", bench_seconds=0.1), calibration=rng.uniform(size=(10, 3, 32, 32)).astype(np.float32),
                      held_out={"input": rng.uniform(size=(6, 3, 32, 32)).astype(np.float32)})
    assert report["calibration"] == {"source": "given", "count": 10}
    assert report["accuracy"]["count"] == 6


# ------------------------------------------------------------------------------------------ FP16
def test_fp16_conversion_loads_and_runs_with_float32_io(repo):
    pytest.importorskip("onnxconverter_common")
    report = quantize(repo, Plan("mlp@1", to="fp16", max_accuracy_drop=0.01, **FAST))
    assert report["method"] == "fp16"
    path = Path(report["directory"]) / report["file"]
    model = onnx.load(str(path))
    assert {i.data_type for i in model.graph.initializer} == {TensorProto.FLOAT16}
    loaded = ModelRepository(repo).load(report["target"])
    assert loaded.session.inputs[0].dtype == np.float32  # keep_io_types
    x = np.random.default_rng(1).normal(size=(4, 16)).astype(np.float32)
    out = loaded.session.run({"features": x})["output"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ModelRepository(repo).load("mlp@1").session.run({"features": x})["output"],
                               rtol=1e-2, atol=1e-2)
    assert report["promote_ok"] is True
    assert report["size"]["ratio"] > 1.5


def _shape_cast_model(path: Path) -> Path:
    """x [batch, 4] / float(x.shape[1]) @ W: an input read twice and a Cast to float, the two things
    onnxconverter-common's float16 conversion breaks."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Gather", ["shape", "one"], ["n"], axis=0),
             helper.make_node("Cast", ["n"], ["n_float"], to=TensorProto.FLOAT),
             helper.make_node("Div", ["x", "n_float"], ["scaled"]), helper.make_node("MatMul", ["scaled", "W"], ["y"])]
    inits = [numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "W")]
    return _save(helper.make_graph(nodes, "shape-cast", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], inits), path)


def test_fp16_repair_fixes_duplicate_input_casts_and_mistyped_casts(tmp_path):
    float16 = pytest.importorskip("onnxconverter_common.float16")

    fp32 = onnx.load(str(_shape_cast_model(tmp_path / "m.onnx")))
    converted = float16.convert_float_to_float16(fp32, keep_io_types=True)
    with pytest.raises(Exception, match="same node name|does not match"):
        ort.InferenceSession(converted.SerializeToString())  # the converter's output as it comes
    assert repair_fp16_graph(converted) == {"duplicate_nodes_removed": 1, "casts_retyped": 1}
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    got = ort.InferenceSession(converted.SerializeToString()).run(None, {"x": x})[0]
    expected = ort.InferenceSession(fp32.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------------------------- metrics
def test_classifier_comparison_counts_top1_flips_as_the_drop():
    ref = {"logits": np.array([[5.0, 0, 0], [0, 5, 0], [1, 1.1, 0], [0, 0, 9]])}
    cand = {"logits": np.array([[5.0, 0, 0], [0, 5, 0], [1.1, 1, 0], [0, 0, 9]])}
    result = compare_outputs(ref, cand, classify=True, softmax=True)
    assert result["top1_agreement"] == 0.75
    assert result["drop"] == 0.25
    assert result["top1_agreement_confident"] == 1.0  # the flip is a near-tie
    assert result["confident_count"] == 3
    assert result["top1_in_top5"] == 1.0


def test_generic_comparison_is_relative_to_the_output_scale():
    ref = {"y": np.array([[10.0, -20.0]]), "ids": np.array([1])}
    result = compare_outputs(ref, {"y": np.array([[10.5, -20.0]]), "ids": np.array([2])}, classify=False, softmax=False)
    assert result["max_abs_diff"] == 0.5
    assert result["drop"] == pytest.approx(0.5 / 20)


def test_unknown_target_or_method_is_refused(repo):
    with pytest.raises(ValueError, match="int4"):
        quantize(repo, Plan("mlp@1", to="int4"))
    with pytest.raises(ValueError, match="method"):
        quantize(repo, Plan("mlp@1", method="qat"))


# ------------------------------------------------------------------------------ task metrics
def _dets(boxes, class_ids, scores=None):
    from operators.detect import Detections

    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.full(len(boxes), 0.9, np.float32) if scores is None else np.asarray(scores, np.float32)
    ids = np.asarray(class_ids, np.int64)
    return Detections(boxes, scores, ids, [str(i) for i in ids.tolist()])


def test_detections_match_by_iou_and_label_one_to_one():
    ref = _dets([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1], [0.9, 0.8])
    cand = _dets([[0, 0, 10, 8], [20, 20, 30, 30], [50, 50, 60, 60]], [0, 2, 0], [0.7, 0.8, 0.5])
    assert match_detections(ref, cand) == [(0, 0, pytest.approx(0.8))]  # the second pair differs in label
    result = compare_detections([ref], [cand])
    assert (result["matched"], result["reference_detections"], result["candidate_detections"]) == (1, 2, 3)
    assert result["precision"] == pytest.approx(1 / 3) and result["recall"] == 0.5
    assert result["f1"] == pytest.approx(0.4) and result["drop"] == pytest.approx(0.6)
    assert result["mean_iou"] == pytest.approx(0.8) and result["max_score_diff"] == pytest.approx(0.2)


def test_detection_matching_is_greedy_by_iou_and_thresholded_at_half():
    ref = _dets([[0, 0, 10, 10]], [0])
    assert match_detections(ref, _dets([[0, 0, 10, 9], [0, 0, 10, 10]], [0, 0])) == [(0, 1, 1.0)]  # best IoU wins, once
    assert match_detections(ref, _dets([[0, 0, 10, 5]], [0])) == [(0, 0, 0.5)]  # IoU 0.5 counts
    assert match_detections(ref, _dets([[0, 0, 10, 4]], [0])) == []


def test_identical_or_empty_detections_drop_nothing():
    frames = [_dets([[0, 0, 10, 10], [5, 5, 8, 9]], [0, 3]), _dets([], [])]
    result = compare_detections(frames, frames)
    assert result["f1"] == 1.0 and result["drop"] == 0.0 and result["max_score_diff"] == 0.0
    assert compare_detections([_dets([], [])], [_dets([], [])])["drop"] == 0.0
    assert compare_detections([_dets([], [])], [_dets([[0, 0, 1, 1]], [0])])["drop"] == 1.0  # an invented box


def test_entities_agree_only_on_exact_type_and_span():
    from operators.ner import Entity

    def ents(*spans):
        return [Entity(kind, "x", start, end, 0.9) for kind, start, end in spans]

    ref = [ents(("PERSON", 0, 5), ("ORG", 10, 15)), ents(("EMAIL", 3, 20)), ents()]
    cand = [ents(("PERSON", 0, 5), ("ORG", 10, 16)), ents(("PHONE", 3, 20)), ents()]
    result = compare_entities(ref, cand)
    assert (result["matched"], result["reference_entities"], result["candidate_entities"]) == (1, 3, 3)
    assert result["f1"] == pytest.approx(1 / 3) and result["drop"] == pytest.approx(2 / 3)
    assert result["identical_texts"] == pytest.approx(1 / 3)
    assert compare_entities(ref, ref)["drop"] == 0.0


def test_click_probabilities_compare_values_and_ranks():
    result = compare_click_probabilities(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.1, 0.25, 0.2, 0.4]))
    assert result["max_abs_diff"] == pytest.approx(0.1) and result["drop"] == pytest.approx(0.1)
    assert result["mean_abs_diff"] == pytest.approx(0.0375)
    assert result["spearman"] == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    same = compare_click_probabilities(np.array([0.3, 0.3, 0.9]), np.array([0.3, 0.3, 0.9]))
    assert same["drop"] == 0.0 and same["spearman"] == pytest.approx(1.0)


def test_ctr_samples_are_valid_rows_of_the_feature_tables():
    from types import SimpleNamespace

    categories, popularity = np.array([2, 0, 1, 2, 1]), np.array([1, 3, 11, 2, 5])
    ranker = SimpleNamespace(users=range(7), items=range(5), item_categories=categories,
                             item_popularity_bucket=popularity, recent_window=10)
    feeds = ctr_samples(ranker, 500, seed=0)
    assert {k: v.dtype for k, v in feeds.items()} == dict.fromkeys(
        ["user", "item", "category", "hour", "recent", "popularity"], np.dtype(np.int64))
    assert feeds["user"].min() >= 1 and feeds["user"].max() <= 7
    assert feeds["item"].min() >= 1 and feeds["item"].max() <= 5
    np.testing.assert_array_equal(feeds["category"], categories[feeds["item"] - 1] + 1)
    np.testing.assert_array_equal(feeds["popularity"], popularity[feeds["item"] - 1])
    assert set(feeds["hour"].tolist()) <= set(range(24)) and set(feeds["recent"].tolist()) == set(range(5))


def test_string_input_model_is_refused_without_a_new_version(tmp_path):
    root = tmp_path / "models"

    def strings(path: Path) -> Path:
        return _save(helper.make_graph(
            [helper.make_node("Identity", ["text"], ["out"])], "strings",
            [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch", 1])],
            [helper.make_tensor_value_info("out", TensorProto.STRING, ["batch", 1])]), path)

    _write_version(root, "tox", strings, {"task": "text-classify"})
    with pytest.raises(ValueError, match="does not apply.*strings"):
        quantize(root, Plan("tox@1", **FAST))
    assert ModelRepository(root).versions("tox") == ["1"]


def test_graph_the_quantizer_leaves_unchanged_is_refused(tmp_path):
    root = tmp_path / "models"

    def relu(path: Path) -> Path:
        return _save(helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])], "relu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])]), path)

    _write_version(root, "relu", relu, {"task": "embed"})
    with pytest.raises(ValueError, match="left the graph unchanged"):
        quantize(root, Plan("relu@1", **FAST))
    assert ModelRepository(root).versions("relu") == ["1"]
    assert not [p for p in (root / "relu").iterdir() if p.name.startswith(".")]


def test_output_concats_of_a_detection_head_are_kept_in_float():
    from onnx import TensorProto, helper

    from operators.quantize import output_concats

    nodes = [helper.make_node("Concat", ["a", "b"], ["mid"], axis=1, name="inner"),
             helper.make_node("Relu", ["mid"], ["boxes"], name="relu"),
             helper.make_node("Concat", ["boxes", "scores"], ["out"], axis=1, name="head")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2])
                                           for n in ("a", "b", "scores")],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 6])])
    assert output_concats(helper.make_model(graph)) == ["head"]  # only the one that yields an output


# -------------------------------------------------------------------------------- task evaluations
def test_a_ner_model_is_judged_on_hand_written_texts_through_its_own_tagger(tmp_path):
    """The NER entry's evaluation: built-in texts (no file of tests/ read), the FP32 tagger's entities as
    the reference; the same session against itself drops nothing, another one's entities count."""
    from test_ner import BIO, BIO_TABLE, _table
    from tiny_text_models import tiny_token_classifier, write_text_model

    from operators import tasks
    from operators.evaluation import NER_TEXTS, with_session

    write_text_model(tmp_path, "tiny-ner", "ner", lambda p: tiny_token_classifier(p, _table(BIO, BIO_TABLE)),
                     BIO, {"max_length": 64}, {"scheme": "BIO"})
    model = ModelRepository(tmp_path).load("tiny-ner", providers=("cpu",), intra_op_threads=1)
    evaluation = tasks.get("ner").evaluation_for(model)
    held = evaluation.held_out(None, None, batch=8)
    assert held.count == len(NER_TEXTS) and held.source == f"{len(NER_TEXTS)} hand-written texts"
    assert set(held.feeds) == {s.name for s in model.session.inputs}
    same = evaluation.accuracy(model, held, 8)
    assert same["metric"] == "entity_f1_vs_fp32" and same["drop"] == 0.0 and same["reference_entities"] > 0

    class NoEntities:  # a candidate whose tagger finds nothing: every reference entity is missed
        inputs, outputs = model.session.inputs, model.session.outputs

        def run(self, feeds, names=None):
            out = model.session.run(feeds, names)
            return {k: np.where(np.arange(v.shape[-1]) == 0, 10.0, -10.0).astype(v.dtype) * np.ones_like(v)
                    for k, v in out.items()}

    missed = evaluation.accuracy(with_session(model, NoEntities()), held, 8)
    assert missed["candidate_entities"] == 0 and missed["recall"] == 0.0 and missed["drop"] == 1.0


def test_a_detector_is_judged_on_held_out_photos_it_never_calibrated_on():
    from operators import tasks

    model = ModelRepository(Path(__file__).resolve().parent.parent / "models").load("nudenet-320n", providers=("cpu",),
                                                                                      intra_op_threads=1)
    evaluation = tasks.get("detect").evaluation_for(model)
    calibration, held = evaluation.calibration(None, 3), evaluation.held_out(None, 4, batch=4)
    assert calibration.feeds[model.session.inputs[0].name].shape == (3, 3, 320, 320)
    assert held.count == 4 and len(held.inputs) == 4 and held.feeds[model.session.inputs[0].name].shape[0] == 4
    assert "chelsea" in held.source and "chelsea" not in calibration.source
    assert evaluation.accuracy(model, held, 4)["drop"] == 0.0  # FP32 against itself
