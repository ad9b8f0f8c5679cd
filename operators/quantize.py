"""Quantize a repository model into a new candidate version, and report what it cost and what it gained.

    report = quantize("models", Plan("efficientnet-lite0@1", to="int8"))
    python -m operators.quantize models efficientnet-lite0 --to int8

Four stages: `plan` (check the source version, choose the method, load it), `convert` (write the new
graph), `evaluate` (accuracy by task against the FP32 version, operators/evaluation.py, and
throughput), `add_candidate` (the repository's next version, flagged `candidate`).

INT8 method, chosen from the graph (measured on this CPU, shared/notes/models-offline.md):
- a graph with convolutions gets **static** QDQ quantization, per-channel weights, activations
  calibrated on real inputs (2.3x faster for EfficientNet-Lite0). Dynamic quantization would turn
  each Conv into ConvInteger, 13x *slower*.
- anything else (transformers, MLPs) gets **dynamic** quantization of MatMul/Gather/Attention
  weights; activations are quantized per batch at run time, so no calibration data is needed.
FP16 (`to="fp16"`) keeps float32 inputs and outputs and repairs what the converter gets wrong. It is
for GPUs: on a CPU it is never faster.

Calibration and held-out samples and the accuracy measure come from the model's task entry
(operators/tasks.py -> operators/evaluation.py). A graph the quantizer cannot change (string inputs,
e.g. a scikit-learn TF-IDF pipeline) is refused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import onnx
import yaml
from onnx import TensorProto

from operators import tasks
from operators.evaluation import Feeds, Samples, batches, fit_batch, with_session
from operators.model_repository import LoadedModel, ModelConfig, ModelRef, ModelRepository
from operators.session import OnnxSession

log = logging.getLogger(__name__)

TARGETS = ("int8", "fp16")
METHODS = ("auto", "static", "dynamic")
# Static: the ops whose QDQ form ONNX Runtime fuses into integer kernels. Dynamic: never Conv (ConvInteger is slow).
_DYNAMIC_OPS = ["MatMul", "Attention", "LSTM", "Gather", "EmbedLayerNormalization"]
_CONV_OPS = {"Conv", "ConvTranspose"}
_QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                  "QLinearConv", "QLinearMatMul", "DynamicQuantizeMatMul"}


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


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Plan:
    """What to make of which version, and how to judge it. `ref`: `name` (newest non-candidate) or
    `name@version`; `max_accuracy_drop` bounds the report's `accuracy.drop` (`promote_ok`); a version
    over the bound is kept (as a candidate) unless `keep_rejected` is False. `held_out_count` None: the
    task's default. `providers`/`intra_op_threads` None: the model's config."""

    ref: str
    to: str = "int8"
    method: str = "auto"
    max_accuracy_drop: float = 0.01
    keep_rejected: bool = True
    calibration_count: int = 32
    held_out_count: int | None = None
    bench_seconds: float = 3.0
    providers: tuple[str, ...] | None = None
    intra_op_threads: int | None = None

    def __post_init__(self) -> None:
        if self.to not in TARGETS:
            raise ValueError(f"to must be one of {TARGETS}, not {self.to!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {self.method!r}")


@dataclass(frozen=True)
class Source:
    """The planned conversion: the FP32 version loaded as served, the method, the batch and the task's evaluation."""

    config: ModelConfig
    model: LoadedModel
    method: str
    batch: int
    threads: int
    providers: tuple[str, ...]
    evaluation: Any  # operators/evaluation.py OutputEvaluation (or a task's own)


def plan(repo: ModelRepository, p: Plan) -> Source:
    """Check that `p.ref` can be quantized (ONNX, not yet quantized, float weights) and load it."""
    cfg = repo.config(p.ref)
    if cfg.backend != "onnx":
        raise ValueError(f"{cfg.ref}: quantization works on ONNX models, this one is {cfg.backend}")
    graph = onnx.load(str(cfg.model_path))
    if is_quantized(graph):
        raise ValueError(f"{cfg.ref} is already quantized; quantize its FP32 version")
    strings = [i.name for i in graph.graph.input if i.type.tensor_type.elem_type == TensorProto.STRING]
    if strings:
        raise ValueError(f"{cfg.ref}: quantization does not apply: the model reads strings ({', '.join(strings)}); "
                         "a converted pipeline like TF-IDF + linear model has no float MatMul/Conv weights to quantize")
    method = "fp16" if p.to == "fp16" else (choose_method(graph) if p.method == "auto" else p.method)
    threads = cfg.intra_op_threads if p.intra_op_threads is None else p.intra_op_threads
    providers = tuple(p.providers or cfg.providers)
    fp32 = repo.load(cfg.ref, providers=providers, intra_op_threads=threads)
    first = fp32.session.inputs[0].shape[0] if fp32.session.inputs else None
    batch = first if isinstance(first, int) else cfg.max_batch_size
    return Source(cfg, fp32, method, batch, threads, providers, tasks.get(cfg.task).evaluation_for(fp32))


# -------------------------------------------------------------------------------------- convert
def convert(source: Source, out_path: Path, calibration: Samples | None) -> dict[str, Any]:
    """Write the converted graph to `out_path`; refuses a graph the quantizer left unchanged."""
    src = source.config.model_path
    if source.method == "static":
        details = quantize_static_qdq(src, out_path, batches(calibration.feeds, source.batch))
    elif source.method == "dynamic":
        details = quantize_dynamic_int8(src, out_path)
    else:
        details = convert_fp16(src, out_path)
    if not is_quantized(onnx.load(str(out_path))):
        raise ValueError(f"{source.config.ref}: quantization does not apply: the {source.method} quantizer left the graph "
                         f"unchanged (no weights of {_DYNAMIC_OPS if source.method == 'dynamic' else 'Conv/MatMul'} ops); "
                         "no version written")
    return details


# ------------------------------------------------------------------------------------- evaluate
def evaluate(source: Source, out_path: Path, held: Samples, bench_seconds: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """(accuracy by the task's evaluation, throughput block) of the converted graph against the source."""
    cfg = source.config
    quantized = OnnxSession(out_path, providers=source.providers, intra_op_threads=source.threads,
                            graph_optimization=cfg.graph_optimization, memory_pattern=cfg.memory_pattern)
    accuracy = source.evaluation.accuracy(with_session(source.model, quantized), held, source.batch)
    accuracy["inputs"] = held.source
    speed = measure_throughput({"before": source.model.session, "after": quantized}, fit_batch(held.feeds, source.batch),
                               bench_seconds)
    throughput = {"batch": source.batch, "providers": quantized.providers, "intra_op_threads": source.threads,
                  "before_per_s": round(speed["before"], 1), "after_per_s": round(speed["after"], 1),
                  "speedup": round(speed["after"] / speed["before"], 3), "seconds": bench_seconds}
    return accuracy, throughput


# ------------------------------------------------------------------------------------- quantize
def quantize(repo_root: str | Path, p: Plan, calibration: Any = None, held_out: Any = None) -> dict[str, Any]:
    """Quantize `p.ref` of the repository at `repo_root` into a new candidate version.

    `calibration` / `held_out`: None (the task's own samples, operators/evaluation.py), one array
    (single-input models), a `{input: array}` dict, or a sequence of such feeds; for a detection model
    `held_out` is a list of RGB images, for a NER model a list of texts.
    Returns a JSON-able report, also written as `quantization.json` in the new version.
    """
    repo = ModelRepository(repo_root)
    source = plan(repo, p)
    cfg = source.config
    held = source.evaluation.held_out(held_out, p.held_out_count, source.batch)
    calib = source.evaluation.calibration(calibration, p.calibration_count) if source.method == "static" else None
    staging = Path(tempfile.mkdtemp(prefix=f".quantize-{p.to}-", dir=cfg.directory.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; a version directory is not
    try:
        for entry in cfg.directory.iterdir():  # labels, tokenizer files, ...: everything but the model and config
            if entry.name.startswith(".") or entry.name in (cfg.file, "config.yaml"):
                continue
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, staging / entry.name)
        out_file = f"{Path(cfg.file).stem}.{p.to}.onnx"
        details = convert(source, staging / out_file, calib)
        accuracy, throughput = evaluate(source, staging / out_file, held, p.bench_seconds)
        before, after = cfg.model_path.stat().st_size, (staging / out_file).stat().st_size
        tool = "onnxconverter-common" if source.method == "fp16" else "onnxruntime"
        report: dict[str, Any] = {
            "source": cfg.ref, "to": p.to, "method": source.method, "details": details,
            "calibration": {"source": calib.source, "count": calib.count} if calib else None,
            "tool": f"{tool} {_package_version(tool)}",
            "size": {"before_bytes": before, "after_bytes": after, "ratio": round(before / after, 3)},
            "throughput": throughput, "accuracy": accuracy, "max_accuracy_drop": p.max_accuracy_drop,
            "promote_ok": accuracy["drop"] <= p.max_accuracy_drop,
        }
        if not report["promote_ok"] and not p.keep_rejected:
            shutil.rmtree(staging)
            return {**report, "target": None, "directory": None, "file": None}
        report = add_candidate(repo, cfg, staging, out_file, report)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("%s -> %s (%s %s): %.1fx smaller, %.2fx speed, drop %.4f, promote_ok=%s", cfg.ref, report["target"],
             p.to, source.method, report["size"]["ratio"], throughput["speedup"], accuracy["drop"], report["promote_ok"])
    return report


def add_candidate(repo: ModelRepository, cfg: ModelConfig, staging: Path, out_file: str,
                  report: dict[str, Any]) -> dict[str, Any]:
    """The staging directory becomes the repository's next version of the model, a candidate, with
    the report (naming that version) kept beside it as quantization.json."""
    final: dict[str, Any] = {}

    def notes(ref: ModelRef) -> dict[str, str]:
        final.update(report, target=ref, directory=str(repo.root / ref.name / ref.version), file=out_file)
        return {"quantization.json": json.dumps(final, indent=2)}

    repo.add_version(cfg.name, staging, _quantized_config(cfg, out_file, report), notes, candidate=True)
    return final


def _quantized_config(cfg: ModelConfig, out_file: str, report: Mapping[str, Any]) -> str:
    """The source config with the new file and the quantization recorded under `source`."""
    raw = yaml.safe_load((cfg.directory / "config.yaml").read_text()) or {}
    raw["file"] = out_file
    source = dict(raw.get("source") or {})
    source["quantized_from"] = cfg.ref
    source["quantization"] = {"to": report["to"], "method": report["method"], "tool": report["tool"],
                              "report": "quantization.json", "promote_ok": report["promote_ok"]}
    raw["source"] = source
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
    report = quantize(args.repo_root, Plan(
        ModelRef.of(args.name, args.version), to=args.to, method=args.method, max_accuracy_drop=args.max_accuracy_drop,
        calibration_count=args.calibration_count, bench_seconds=args.bench_seconds, intra_op_threads=args.threads,
        providers=tuple(args.providers.split(",")) if args.providers else None, keep_rejected=not args.drop_rejected))
    print(json.dumps(report, indent=2))
    return 0 if report["promote_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
