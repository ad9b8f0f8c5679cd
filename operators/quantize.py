"""Quantize a repository model into a new version, and report what it cost and what it gained.

    report = quantize("models", "efficientnet-lite0", "1", to="int8")
    python -m operators.quantize models efficientnet-lite0 --to int8

INT8 method, chosen from the graph (measured on this CPU, shared/notes/models-offline.md):
- a graph with convolutions gets **static** QDQ quantization, per-channel weights, activations
  calibrated on real inputs (2.3x faster for EfficientNet-Lite0). Dynamic quantization would turn
  each Conv into ConvInteger, 13x *slower*.
- anything else (transformers, MLPs) gets **dynamic** quantization of MatMul/Gather/Attention
  weights; activations are quantized per batch at run time, so no calibration data is needed.
FP16 (`to="fp16"`) keeps float32 inputs and outputs and repairs what the converter gets wrong. It is
for GPUs: on a CPU it is never faster.

Calibration and held-out inputs for an image model are the scikit-image sample photos, with
deterministic augmentations, through the model's own preprocessing (the operator that serves it);
the held-out photos are never calibrated on. A CTR model gets valid feature rows from its own tables,
a NER model real texts (tests/data/pii_posts.jsonl); other models seeded random inputs shaped from the
model's inputs unless the caller passes real ones.

Accuracy is judged by what the task's operator returns, FP32 against the new version on the same inputs:
- classify: top-1 agreement (`compare_outputs`);
- detect: detections matched greedily by IoU >= 0.5 and label, F1 (`compare_detections`);
- ner: exact (type, start, end) entity agreement, F1 (`compare_entities`);
- ctr: click probabilities, max abs difference and Spearman correlation (`compare_click_probabilities`);
- anything else: max abs difference of raw outputs relative to their scale (`compare_outputs`).
A graph the quantizer cannot change (string inputs, e.g. a scikit-learn TF-IDF pipeline) is refused.

The new version is written to a hidden staging directory, renamed into place as the next free
version number, and only then gets its config.yaml: a worker scanning versions never sees half of one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto

from operators.model_repository import LoadedModel, ModelConfig, ModelRepository
from operators.session import OnnxSession, TensorSpec

log = logging.getLogger(__name__)

TARGETS = ("int8", "fp16")
METHODS = ("auto", "static", "dynamic")
# Static: the ops whose QDQ form ONNX Runtime fuses into integer kernels. Dynamic: never Conv (ConvInteger is slow).
_DYNAMIC_OPS = ["MatMul", "Attention", "LSTM", "Gather", "EmbedLayerNormalization"]
_CONV_OPS = {"Conv", "ConvTranspose"}
_QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                  "QLinearConv", "QLinearMatMul", "DynamicQuantizeMatMul"}
# Photos split once: calibration never sees a held-out photo. Grey ones are stacked to RGB.
CALIBRATION_PHOTOS = ("astronaut", "rocket", "immunohistochemistry", "hubble_deep_field", "camera", "moon",
                      "grass", "gravel", "clock", "page", "colorwheel", "cell")
HELD_OUT_PHOTOS = ("chelsea", "coffee", "coins", "brick", "text", "retina")
CTR_PAIRS = 2000  # held-out (user, item) pairs for a CTR model
_BUILTIN_TEXTS = ("Huge thanks to Priya Raman at Barclays for sorting out my mortgage today",
                  "Lost my wallet near Union Square, San Francisco. If found call 415-555-0187",
                  "email me at jon.baker@example.com or ask Maria Lopez at Acme Corp in Berlin",
                  "my passport number is X1234567, flying to Toronto with Air Canada tomorrow")

Feeds = dict[str, np.ndarray]


# ------------------------------------------------------------------------------------- inputs
def sample_photo(name: str) -> np.ndarray:
    """A scikit-image sample photo as RGB `(H, W, 3) uint8`."""
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.dtype == np.bool_:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def augment(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One deterministic variant of an RGB `(H, W, 3) uint8` photo: a random crop (50-100% of each
    side), maybe mirrored, with brightness/contrast jitter."""
    h, w = rgb.shape[:2]
    ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    out = rgb[top : top + ch, left : left + cw]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    gain, offset = rng.uniform(0.7, 1.3), rng.uniform(-30, 30)
    return np.ascontiguousarray(np.clip(out.astype(np.float32) * gain + offset, 0, 255).astype(np.uint8))


def photo_set(names: Sequence[str], count: int, seed: int) -> list[np.ndarray]:
    """`count` RGB images: each photo once, then augmented variants of them in turn (seeded)."""
    photos = [sample_photo(n) for n in names]
    rng = np.random.default_rng(seed)
    images = photos[:count]
    while len(images) < count:
        images.append(augment(photos[len(images) % len(photos)], rng))
    return images


def image_transform(model: LoadedModel) -> Callable[[np.ndarray], np.ndarray] | None:
    """RGB image -> the model's input tensor, by the operator that serves the model; None if not an image model."""
    if model.config.task == "classify":
        from operators.classify import ImageClassifier

        return ImageClassifier(model).preprocess
    if model.config.task == "detect":
        from operators.detect import ObjectDetector

        detector = ObjectDetector(model)
        return lambda rgb: detector.preprocess(rgb)[0]
    return None


def synthetic_samples(specs: Sequence[TensorSpec], n: int, seed: int, free_dim: int = 16) -> Feeds:
    """Seeded inputs shaped like `specs` (n rows; other unknown axes `free_dim`): normal floats,
    token ids in [0, 100), ones for masks. Real inputs (`held_out=`) are better for text models."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for s in specs:
        shape = (n, *(d if isinstance(d, int) else free_dim for d in s.shape[1:]))
        if np.issubdtype(s.dtype, np.floating):
            feeds[s.name] = rng.normal(size=shape).astype(s.dtype)
        elif "mask" in s.name:
            feeds[s.name] = np.ones(shape, s.dtype)
        elif np.issubdtype(s.dtype, np.integer):
            feeds[s.name] = rng.integers(0, 100, size=shape).astype(s.dtype)
        elif s.dtype == np.bool_:
            feeds[s.name] = np.ones(shape, np.bool_)
        else:
            raise ValueError(f"cannot make synthetic {s.dtype} input {s.name!r}: pass calibration= and held_out=")
    return feeds


def _as_samples(given: Any, specs: Sequence[TensorSpec]) -> Feeds:
    """An array (single-input models), a {name: array} dict, or a sequence of such dicts -> {name: (N, ...)}."""
    if isinstance(given, np.ndarray):
        if len(specs) != 1:
            raise ValueError(f"the model has {len(specs)} inputs: pass a dict of arrays, not one array")
        return {specs[0].name: given}
    if isinstance(given, Mapping):
        return {k: np.asarray(v) for k, v in given.items()}
    batches = list(given)
    return {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in batches[0]}


def _batches(samples: Feeds, batch: int) -> list[Feeds]:
    n = len(next(iter(samples.values())))
    return [{k: v[i : i + batch] for k, v in samples.items()} for i in range(0, n, batch)]


def _fit_batch(samples: Feeds, batch: int) -> Feeds:
    """Exactly `batch` rows, cycling through the samples."""
    n = len(next(iter(samples.values())))
    idx = np.arange(batch) % n
    return {k: np.ascontiguousarray(v[idx]) for k, v in samples.items()}


# ------------------------------------------------------------------------------------ methods
def _all_nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            for sub in attr.graphs:
                yield from _all_nodes(sub)


def choose_method(model: onnx.ModelProto) -> str:
    """`static` for a graph with convolutions (CNNs), `dynamic` otherwise (transformers, MLPs)."""
    return "static" if any(n.op_type in _CONV_OPS for n in _all_nodes(model.graph)) else "dynamic"


def is_quantized(model: onnx.ModelProto) -> bool:
    if any(n.op_type in _QUANTIZED_OPS for n in _all_nodes(model.graph)):
        return True
    return any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)


class _FeedReader:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: Sequence[Feeds]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> Feeds | None:
        return next(self._feeds, None)


def quantize_static_qdq(src: Path, dst: Path, calibration: Sequence[Feeds]) -> dict[str, Any]:
    """INT8 QDQ, per-channel weights (int8), activations (uint8) calibrated by min/max over `calibration`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="inferstream-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:  # shape inference + graph optimisation so more ops are quantized; optional
            quant_pre_process(str(src), str(prepared))
        except Exception as exc:  # noqa: BLE001 - fails on some graphs (incomplete symbolic shapes); skipping is fine
            log.info("quant_pre_process skipped for %s: %s", src.name, exc)
            prepared = src
        float_heads = output_concats(onnx.load(str(prepared)))
        quantize_static(str(prepared), str(dst), _FeedReader(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=float_heads)
    return {"format": "QDQ", "per_channel": True, "weights": "int8", "activations": "uint8", "calibrate": "minmax",
            "kept_float": float_heads}


def output_concats(model: onnx.ModelProto) -> list[str]:
    """Concat nodes that produce a graph output. A YOLO head concatenates box coordinates (0..640)
    and class scores (0..1) into one output; one uint8 scale for both rounds every score to 0
    (measured on NudeNet: detection F1 0), so these stay in float."""
    outputs = {o.name for o in model.graph.output}
    return [n.name for n in model.graph.node if n.op_type == "Concat" and set(n.output) & outputs]


def quantize_dynamic_int8(src: Path, dst: Path) -> dict[str, Any]:
    """INT8 weights of MatMul/Gather/Attention/LSTM; activations quantized per batch at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # DefaultTensorType: transformer graphs have tensors whose type ORT's quantizer cannot infer
    quantize_dynamic(str(src), str(dst), op_types_to_quantize=_DYNAMIC_OPS, weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": TensorProto.FLOAT})
    return {"weights": "int8", "activations": "dynamic uint8", "ops": _DYNAMIC_OPS}


def repair_fp16_graph(model: onnx.ModelProto) -> dict[str, int]:
    """Fix what onnxconverter-common's float16 conversion gets wrong, in place:
    - with keep_io_types, an input read by several nodes gets identical Cast nodes (same name and
      output): ONNX Runtime refuses the model ("two nodes with same node name"). Keep the first.
    - Cast nodes to float whose output the converter declared float16 ("Type (tensor(float16)) of
      output arg ... does not match"): cast to float16, as the declaration and the consumers expect.
    """
    graph = model.graph
    produced: dict[str, bytes] = {}
    keep, duplicates = [], 0
    for node in graph.node:
        blob = node.SerializeToString()
        if node.output and all(produced.get(o) == blob for o in node.output):
            duplicates += 1
            continue
        produced.update({o: blob for o in node.output})
        keep.append(node)
    if duplicates:
        del graph.node[:]
        graph.node.extend(keep)
    declared = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.output]}
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16}
    retyped = 0
    for node in _all_nodes(graph):
        if node.op_type != "Cast":
            continue
        to = next(a for a in node.attribute if a.name == "to")
        want = declared.get(node.output[0])
        if want in floats and to.i in floats and want != to.i:
            to.i = want
            retyped += 1
    return {"duplicate_nodes_removed": duplicates, "casts_retyped": retyped}


def convert_fp16(src: Path, dst: Path) -> dict[str, Any]:
    from onnxconverter_common import float16

    with warnings.catch_warnings(record=True) as caught:  # one warning per weight outside float16's range
        warnings.simplefilter("always", UserWarning)
        model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    repairs = repair_fp16_graph(model)
    onnx.save(model, str(dst))
    clamped = sum("truncated" in str(w.message) for w in caught)
    return {"weights": "float16", "io": "float32 (keep_io_types)", "values_clamped": clamped, **repairs}


# ------------------------------------------------------------------------------------ measuring
def measure_throughput(sessions: Mapping[str, OnnxSession], feeds: Feeds, seconds: float) -> dict[str, float]:
    """Items per second of each session on the same batch, runs interleaved so that every session
    sees the same CPU contention; `seconds` in all. Only the ratio between them is meaningful."""
    batch = len(next(iter(feeds.values())))
    for s in sessions.values():
        s.run(feeds)  # warm-up: first-run allocations and kernel selection
    spent = dict.fromkeys(sessions, 0.0)
    runs = dict.fromkeys(sessions, 0)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or min(runs.values()) < 3:
        for key, s in sessions.items():
            t0 = time.perf_counter()
            s.run(feeds)
            spent[key] += time.perf_counter() - t0
            runs[key] += 1
    return {key: runs[key] * batch / spent[key] for key in sessions}


def _detections(model: LoadedModel, images: Sequence[np.ndarray], batch: int) -> list[Any]:
    """`Detections` of each RGB image by the model's ObjectDetector, `batch` images per call."""
    from operators.detect import ObjectDetector

    detector = ObjectDetector(model)
    items = [detector.preprocess(img) for img in images]
    return [d for i in range(0, len(items), batch) for d in detector.run_batch(items[i : i + batch])]


def _ranker(model: LoadedModel) -> Any:
    from operators.ranking import CandidateRanker

    return CandidateRanker(model)


def _run_all(session: OnnxSession, samples: Feeds, batch: int) -> dict[str, np.ndarray]:
    parts = [session.run(b) for b in _batches(samples, batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def compare_outputs(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], classify: bool,
                    softmax: bool) -> dict[str, Any]:
    """Accuracy change of `candidate` against `reference` on the same inputs.

    Classifier (first output, `(N, C)` scores): top-1 agreement (overall, and where the reference is
    at least 50% sure), how often the reference top-1 stays in the top 5, max/mean probability
    difference; `drop` = the fraction of inputs whose top-1 class changed. Otherwise, over float outputs: max/mean
    absolute difference; `drop` = max absolute difference relative to the largest reference value,
    so one bound means the same for any output scale.
    """
    if classify:
        from operators.classify import softmax as softmax_fn

        name = next(iter(reference))
        ref, cand = reference[name].astype(np.float64), candidate[name].astype(np.float64)
        if softmax:
            ref, cand = softmax_fn(ref), softmax_fn(cand)
        top1 = ref.argmax(axis=1)
        same = top1 == cand.argmax(axis=1)
        confident = ref.max(axis=1) >= 0.5  # flips among these matter; the rest are near-ties
        in_top5 = (np.argsort(-cand, axis=1)[:, :5] == top1[:, None]).any(axis=1)
        diff = np.abs(ref - cand)
        return {"metric": "top1_disagreement", "count": len(ref), "top1_agreement": float(same.mean()),
                "top1_agreement_confident": float(same[confident].mean()) if confident.any() else None,
                "confident_count": int(confident.sum()), "top1_in_top5": float(in_top5.mean()),
                "max_prob_diff": float(diff.max()), "mean_prob_diff": float(diff.mean()), "drop": float(1.0 - same.mean())}
    max_diff, mean_diffs, scale = 0.0, [], 0.0
    for name, ref in reference.items():
        if not np.issubdtype(ref.dtype, np.floating):
            continue
        diff = np.abs(ref.astype(np.float64) - candidate[name].astype(np.float64))
        max_diff, scale = max(max_diff, float(diff.max())), max(scale, float(np.abs(ref).max()))
        mean_diffs.append(float(diff.mean()))
    return {"metric": "relative_max_abs_diff", "count": len(next(iter(reference.values()))),
            "max_abs_diff": max_diff, "mean_abs_diff": float(np.mean(mean_diffs)) if mean_diffs else 0.0,
            "drop": max_diff / scale if scale else max_diff}


def ner_texts() -> list[str]:
    """Real texts for a NER model: those of tests/data/pii_posts.jsonl (hand-written posts) when the
    checkout has it, else a few built-in sentences."""
    path = Path(__file__).resolve().parents[1] / "tests" / "data" / "pii_posts.jsonl"
    if path.is_file():
        return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    return list(_BUILTIN_TEXTS)


def ctr_samples(ranker: Any, count: int, seed: int) -> Feeds:
    """`count` valid (user, item) pairs from a CTR model's own feature tables (ranker:
    operators.ranking.CandidateRanker), built by `ctr_inputs` like served requests: known users and
    items, their categories and popularity buckets, hours 0..23, recent-history buckets 0..4."""
    from operators.ranking import ctr_inputs

    rng = np.random.default_rng(seed)
    window = rng.integers(0, ranker.recent_window + 1, count)
    return ctr_inputs(rng.integers(0, len(ranker.users), count), rng.integers(0, len(ranker.items), count),
                      rng.integers(0, 24, count), rng.integers(0, window + 1), window,
                      ranker.item_categories, ranker.item_popularity_bucket)


def _agreement(matched: int, n_reference: int, n_candidate: int) -> dict[str, float]:
    """Precision/recall/F1 of the candidate's results against the reference's; nothing on either side = 1."""
    return {"precision": matched / n_candidate if n_candidate else 1.0,
            "recall": matched / n_reference if n_reference else 1.0,
            "f1": 2 * matched / (n_reference + n_candidate) if n_reference + n_candidate else 1.0}


def match_detections(reference: Any, candidate: Any, iou_threshold: float = 0.5) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching of two `Detections` of one image: (reference index, candidate index,
    IoU) pairs with the same class and IoU >= `iou_threshold`, highest IoU first."""
    from operators.detect import box_iou

    if not len(reference) or not len(candidate):
        return []
    iou = box_iou(np.asarray(reference.boxes, np.float64), np.asarray(candidate.boxes, np.float64))
    iou = np.where(np.asarray(reference.class_ids)[:, None] == np.asarray(candidate.class_ids)[None, :], iou, -1.0)
    pairs = np.argwhere(iou >= iou_threshold)
    pairs = pairs[np.argsort(-iou[pairs[:, 0], pairs[:, 1]], kind="stable")]
    used_ref, used_cand, matches = set(), set(), []
    for r, c in pairs.tolist():
        if r not in used_ref and c not in used_cand:
            used_ref.add(r)
            used_cand.add(c)
            matches.append((r, c, float(iou[r, c])))
    return matches


def compare_detections(reference: Sequence[Any], candidate: Sequence[Any], iou_threshold: float = 0.5) -> dict[str, Any]:
    """Detection model: per image, the candidate's `Detections` matched to the reference's
    (`match_detections`). Precision/recall/F1 of candidate against reference detections over all images,
    mean IoU of the matches, max score difference of matched pairs; `drop` = 1 - F1."""
    matched, ious, score_diffs = 0, [], [0.0]
    for ref, cand in zip(reference, candidate, strict=True):
        for r, c, iou in match_detections(ref, cand, iou_threshold):
            matched += 1
            ious.append(iou)
            score_diffs.append(abs(float(ref.scores[r]) - float(cand.scores[c])))
    n_ref, n_cand = sum(len(d) for d in reference), sum(len(d) for d in candidate)
    scores = _agreement(matched, n_ref, n_cand)
    return {"metric": "detection_f1_vs_fp32", "count": len(reference), "iou_threshold": iou_threshold,
            "reference_detections": n_ref, "candidate_detections": n_cand, "matched": matched, **scores,
            "mean_iou": float(np.mean(ious)) if ious else None, "max_score_diff": max(score_diffs),
            "drop": 1.0 - scores["f1"]}


def compare_entities(reference: Sequence[Iterable[Any]], candidate: Sequence[Iterable[Any]]) -> dict[str, Any]:
    """NER model: per text, the candidate's entities against the reference's by exact (type, start,
    end); precision/recall/F1 over all texts, the share of texts with identical entities; `drop` = 1 - F1."""
    matched = n_ref = n_cand = same_texts = 0
    for ref, cand in zip(reference, candidate, strict=True):
        ref_spans, cand_spans = {(e.type, e.start, e.end) for e in ref}, {(e.type, e.start, e.end) for e in cand}
        matched += len(ref_spans & cand_spans)
        n_ref, n_cand = n_ref + len(ref_spans), n_cand + len(cand_spans)
        same_texts += ref_spans == cand_spans
    scores = _agreement(matched, n_ref, n_cand)
    return {"metric": "entity_f1_vs_fp32", "count": len(reference), "reference_entities": n_ref,
            "candidate_entities": n_cand, "matched": matched, **scores,
            "identical_texts": same_texts / len(reference) if len(reference) else 1.0, "drop": 1.0 - scores["f1"]}


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2)[inverse.reshape(-1)]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); 1.0 for two equal constant vectors."""
    ra, rb = _average_ranks(np.asarray(a).reshape(-1)), _average_ranks(np.asarray(b).reshape(-1))
    if ra.std() == 0 or rb.std() == 0:
        return 1.0 if np.array_equal(ra, rb) else 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def compare_click_probabilities(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """CTR model: click probabilities of the same pairs. Max/mean absolute difference and the Spearman
    rank correlation of the scores (ranking is what they are used for); `drop` = max abs difference."""
    ref, cand = np.asarray(reference, np.float64).reshape(-1), np.asarray(candidate, np.float64).reshape(-1)
    diff = np.abs(ref - cand)
    return {"metric": "max_abs_click_probability_diff", "count": len(ref), "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()), "spearman": spearman(ref, cand), "drop": float(diff.max())}


# ------------------------------------------------------------------------------------ versions
def next_free_version(model_dir: Path) -> str:
    """One past the highest numeric version directory (with a config or not: never reuse a number)."""
    numbers = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return str(max(numbers, default=0) + 1)


def _claim_version(staging: Path, model_dir: Path) -> Path:
    """Rename the finished staging directory to the next free version number."""
    for _ in range(5):
        target = model_dir / next_free_version(model_dir)
        try:
            staging.rename(target)  # atomic; fails if another writer took the number meanwhile
        except OSError:
            continue
        return target
    raise RuntimeError(f"could not claim a new version directory in {model_dir}")


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


# ------------------------------------------------------------------------------------- quantize
def quantize(
    repo_root: str | Path,
    name: str,
    version: str | None = None,
    to: str = "int8",
    calibration: Any = None,
    max_accuracy_drop: float = 0.01,
    *,
    method: str = "auto",
    held_out: Any = None,
    calibration_count: int = 32,
    held_out_count: int | None = None,
    bench_seconds: float = 3.0,
    providers: Sequence[str] | None = None,
    intra_op_threads: int | None = None,
    keep_rejected: bool = True,
) -> dict[str, Any]:
    """Quantize `name@version` (newest if None) of the repository at `repo_root` into a new version.

    `calibration` / `held_out`: None (sample photos for image models, feature-table rows for CTR
    models, real texts for NER models, seeded random inputs otherwise), one array (single-input
    models), a `{input: array}` dict, or a sequence of such feeds; for a detection model `held_out`
    is a list of RGB images, for a NER model a list of texts. `held_out_count`: None = the task's
    default (48 images, CTR_PAIRS pairs, every text).
    `max_accuracy_drop` bounds the report's `accuracy.drop`, measured per task (see the module
    docstring); `promote_ok` says whether it held. The new version is kept either way unless
    `keep_rejected=False`. A model the quantizer cannot change (string inputs) is refused.
    Returns a JSON-able report, also written as `quantization.json` in the new version.
    """
    if to not in TARGETS:
        raise ValueError(f"to must be one of {TARGETS}, not {to!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    repo = ModelRepository(repo_root)
    cfg: ModelConfig = repo.config(f"{name}@{version}" if version else name)
    if cfg.backend != "onnx":
        raise ValueError(f"{cfg.ref}: quantization works on ONNX models, this one is {cfg.backend}")
    source_model = onnx.load(str(cfg.model_path))
    if is_quantized(source_model):
        raise ValueError(f"{cfg.ref} is already quantized; quantize its FP32 version")
    strings = [i.name for i in source_model.graph.input if i.type.tensor_type.elem_type == TensorProto.STRING]
    if strings:
        raise ValueError(f"{cfg.ref}: quantization does not apply: the model reads strings ({', '.join(strings)}); "
                         "a converted pipeline like TF-IDF + linear model has no float MatMul/Conv weights to quantize")
    chosen = "fp16" if to == "fp16" else (choose_method(source_model) if method == "auto" else method)
    threads = cfg.intra_op_threads if intra_op_threads is None else intra_op_threads
    run_providers = tuple(providers or cfg.providers)
    fp32 = repo.load(cfg.ref, providers=run_providers, intra_op_threads=threads)
    specs = fp32.session.inputs
    static_batch = specs[0].shape[0] if specs and isinstance(specs[0].shape[0], int) else None
    batch = static_batch or cfg.max_batch_size
    to_tensor = image_transform(fp32)
    task = cfg.task
    ranker = _ranker(fp32) if task == "ctr" else None

    def samples(given: Any, photos: Sequence[str], count: int, seed: int) -> tuple[Feeds, str]:
        if given is not None:
            return _as_samples(given, specs), "given"
        if to_tensor is not None:
            return {specs[0].name: np.stack([to_tensor(img) for img in photo_set(photos, count, seed)])}, \
                f"scikit-image sample photos {', '.join(photos)} + augmentations (seed {seed})"
        if ranker is not None:
            return ctr_samples(ranker, count, seed), f"{count} valid (user, item) rows from the model's feature tables (seed {seed})"
        return synthetic_samples(specs, count, seed), f"seeded random inputs (seed {seed})"

    images: list[np.ndarray] = []
    tokenized: list[Any] = []
    if task == "detect":  # the detector's own outputs are compared: it needs the images, not tensors
        images = list(held_out) if held_out is not None else photo_set(HELD_OUT_PHOTOS, held_out_count or 48, seed=2)
        held = {specs[0].name: np.stack([to_tensor(img) for img in images])}
        held_source = "given images" if held_out is not None else \
            f"scikit-image sample photos {', '.join(HELD_OUT_PHOTOS)} + augmentations (seed 2)"
    elif task == "ner":
        from operators.ner import TokenClassifier
        from operators.tokens import pad_batch

        texts = list(held_out) if held_out is not None else ner_texts()[:held_out_count]
        tagger = TokenClassifier(fp32)
        tokenized = [tagger.preprocess(t) for t in texts]
        held = pad_batch(tokenized[:batch], tagger.tokenizer.pad_id, tagger.tokenizer.pad_type_id).feeds(specs)
        held_source = f"{len(texts)} " + ("given texts" if held_out is not None else "texts (tests/data/pii_posts.jsonl)")
    else:
        default_count = CTR_PAIRS if task == "ctr" else 48
        held, held_source = samples(held_out, HELD_OUT_PHOTOS, held_out_count or default_count, seed=2)
    model_dir = cfg.directory.parent
    staging = Path(tempfile.mkdtemp(prefix=f".quantize-{to}-", dir=model_dir))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; a version directory is not
    try:
        for entry in cfg.directory.iterdir():  # labels, tokenizer files, ...: everything but the model and config
            if entry.name.startswith(".") or entry.name in (cfg.file, "config.yaml"):
                continue
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, staging / entry.name)
        out_file = f"{Path(cfg.file).stem}.{to}.onnx"
        out_path = staging / out_file
        calibration_info = None
        if chosen == "static":
            calib, calib_source = samples(calibration, CALIBRATION_PHOTOS, calibration_count, seed=1)
            details = quantize_static_qdq(cfg.model_path, out_path, _batches(calib, batch))
            calibration_info = {"source": calib_source, "count": len(next(iter(calib.values())))}
        elif chosen == "dynamic":
            details = quantize_dynamic_int8(cfg.model_path, out_path)
        else:
            details = convert_fp16(cfg.model_path, out_path)
        if not is_quantized(onnx.load(str(out_path))):
            raise ValueError(f"{cfg.ref}: quantization does not apply: the {chosen} quantizer left the graph unchanged "
                             f"(no weights of {_DYNAMIC_OPS if chosen == 'dynamic' else 'Conv/MatMul'} ops); no version written")
        quantized = OnnxSession(out_path, providers=run_providers, intra_op_threads=threads,
                                graph_optimization=cfg.graph_optimization)

        candidate = replace(fp32, session=quantized)  # same config, labels, tables: the operators run it as served
        if task == "detect":
            accuracy = compare_detections(_detections(fp32, images, batch), _detections(candidate, images, batch))
        elif task == "ner":
            accuracy = compare_entities(TokenClassifier(fp32).run_batch(tokenized),
                                        TokenClassifier(candidate).run_batch(tokenized))
        elif task == "ctr":
            accuracy = compare_click_probabilities(ranker.score(held), _ranker(candidate).score(held))
        else:
            accuracy = compare_outputs(_run_all(fp32.session, held, batch), _run_all(quantized, held, batch),
                                       classify=task == "classify", softmax=bool(cfg.postprocess.get("softmax", True)))
        accuracy["inputs"] = held_source
        speed = measure_throughput({"before": fp32.session, "after": quantized}, _fit_batch(held, batch), bench_seconds)
        before, after = cfg.model_path.stat().st_size, out_path.stat().st_size
        promote_ok = accuracy["drop"] <= max_accuracy_drop
        tool = "onnxconverter-common" if chosen == "fp16" else "onnxruntime"
        report: dict[str, Any] = {
            "source": cfg.ref,
            "to": to,
            "method": chosen,
            "details": details,
            "calibration": calibration_info,
            "tool": f"{tool} {_package_version(tool)}",
            "size": {"before_bytes": before, "after_bytes": after, "ratio": round(before / after, 3)},
            "throughput": {"batch": batch, "providers": quantized.providers, "intra_op_threads": threads,
                           "before_per_s": round(speed["before"], 1), "after_per_s": round(speed["after"], 1),
                           "speedup": round(speed["after"] / speed["before"], 3), "seconds": bench_seconds},
            "accuracy": accuracy,
            "max_accuracy_drop": max_accuracy_drop,
            "promote_ok": promote_ok,
        }
        if not promote_ok and not keep_rejected:
            shutil.rmtree(staging)
            return {**report, "target": None, "directory": None, "file": None}
        (staging / "config.yaml.pending").write_text(_quantized_config(cfg, out_file, report))
        target = _claim_version(staging, model_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report = {**report, "target": f"{cfg.name}@{target.name}", "directory": str(target), "file": out_file}
    (target / "quantization.json").write_text(json.dumps(report, indent=2))
    (target / "config.yaml.pending").rename(target / "config.yaml")  # last: the version now exists
    log.info("%s -> %s (%s %s): %.1fx smaller, %.2fx speed, drop %.4f, promote_ok=%s", cfg.ref, report["target"],
             to, chosen, report["size"]["ratio"], report["throughput"]["speedup"], accuracy["drop"], promote_ok)
    return report


def _quantized_config(cfg: ModelConfig, out_file: str, report: Mapping[str, Any]) -> str:
    """The source config with the new file and the quantization recorded under `source`."""
    raw = yaml.safe_load((cfg.directory / "config.yaml").read_text()) or {}
    raw["file"] = out_file
    source = dict(raw.get("source") or {})
    source["quantized_from"] = cfg.ref
    source["quantization"] = {"to": report["to"], "method": report["method"], "tool": report["tool"],
                              "report": "quantization.json", "promote_ok": report["promote_ok"]}
    raw["source"] = source
    raw["candidate"] = True  # never served by a bare name until promoted (inferstream models promote)
    header = (f"# {cfg.name}: {report['to']} ({report['method']}) quantization of {cfg.ref}, made by operators.quantize;\n"
              f"# size {report['size']['ratio']}x smaller, throughput x{report['throughput']['speedup']}, "
              f"accuracy drop {report['accuracy']['drop']:.4g} ({report['accuracy']['metric']}). See quantization.json.\n")
    return header + yaml.safe_dump(raw, sort_keys=False)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m operators.quantize", description=quantize.__doc__.split("\n")[0])
    parser.add_argument("repo_root")
    parser.add_argument("name")
    parser.add_argument("--version")
    parser.add_argument("--to", choices=TARGETS, default="int8")
    parser.add_argument("--method", choices=METHODS, default="auto")
    parser.add_argument("--max-accuracy-drop", type=float, default=0.01)
    parser.add_argument("--calibration-count", type=int, default=32)
    parser.add_argument("--bench-seconds", type=float, default=3.0)
    parser.add_argument("--providers", help="comma-separated, e.g. cuda,cpu (default: the model's config)")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: the model's config)")
    parser.add_argument("--drop-rejected", action="store_true", help="do not keep a version that fails the bound")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("operators").setLevel(logging.INFO)
    report = quantize(args.repo_root, args.name, args.version, to=args.to, method=args.method,
                      max_accuracy_drop=args.max_accuracy_drop, calibration_count=args.calibration_count,
                      bench_seconds=args.bench_seconds, intra_op_threads=args.threads,
                      providers=tuple(args.providers.split(",")) if args.providers else None,
                      keep_rejected=not args.drop_rejected)
    print(json.dumps(report, indent=2))
    return 0 if report["promote_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
