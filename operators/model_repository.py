"""Model repository: `<root>/<name>/<version>/config.yaml` + the model file it names (Triton-style).

A model is data plus a declaration: adding one needs no code change. Configs are validated at load
with errors that name the file and the problem. The model may be ONNX, TensorFlow Lite, TorchScript or
a SavedModel directory (`backend:`, default from the file's extension; operators/backends.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from operators.backends import Backend, backend_for, open_backend
from operators.degrade import LadderConfig, LadderConfigError

TASKS = ("classify", "detect", "text-classify", "ner", "embed", "retrieve", "ctr")


class ModelConfigError(ValueError):
    """A model directory that cannot be served, and why."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    version: str
    task: str
    directory: Path
    file: str = "model.onnx"
    preprocess: dict[str, Any] = field(default_factory=dict)
    postprocess: dict[str, Any] = field(default_factory=dict)
    labels_file: str | None = None
    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    adaptive_batching: bool = True  # batching.adaptive: steer size and wait to target_p99_ms (false: the fixed limits)
    target_p99_ms: float = 100.0  # batching.target_p99_ms: time a record may spend in the batcher (queue, wait, run)
    providers: tuple[str, ...] = ("cuda", "cpu")
    device_id: int = 0
    intra_op_threads: int = 0
    graph_optimization: str = "all"
    source: dict[str, Any] = field(default_factory=dict)
    backend: str = "onnx"  # onnx | tflite | torchscript | savedmodel; default from the file extension
    inter_op_threads: int = 0
    io_binding: bool | None = None  # None: on when the model runs on a GPU
    trt_cache_dir: str | None = None  # TensorRT engine cache; relative paths are inside the version directory
    trt_fp16: bool = False
    cache_dir: str | None = None  # where a SavedModel's ONNX conversion is cached
    inputs: tuple[dict[str, Any], ...] = ()  # declared tensors; TorchScript records none of its own
    outputs: tuple[dict[str, Any], ...] = ()
    degrade: dict[str, Any] = field(default_factory=dict)  # the ladder under lag (operators/degrade.py)

    @property
    def model_path(self) -> Path:
        return self.directory / self.file

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @classmethod
    def load(cls, directory: Path) -> ModelConfig:
        path = directory / "config.yaml"
        if not path.is_file():
            raise ModelConfigError(f"{directory}: no config.yaml")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ModelConfigError(f"{path}: invalid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ModelConfigError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
        task = raw.get("task")
        if task not in TASKS:
            raise ModelConfigError(f"{path}: unknown task {task!r}; expected one of {', '.join(TASKS)}")
        batching = raw.get("batching", {}) or {}
        runtime = raw.get("runtime", {}) or {}
        tensorrt = runtime.get("tensorrt", {}) or {}
        file = raw.get("file", "model.onnx")
        try:
            backend = backend_for(directory / file, raw.get("backend"))
        except ValueError as exc:
            raise ModelConfigError(f"{path}: {exc}") from exc
        trt_cache = tensorrt.get("cache_dir")
        cfg = cls(
            name=directory.parent.name,
            version=directory.name,
            task=task,
            directory=directory,
            file=file,
            preprocess=raw.get("preprocess", {}) or {},
            postprocess=raw.get("postprocess", {}) or {},
            labels_file=raw.get("labels"),
            max_batch_size=int(batching.get("max_batch_size", 16)),
            max_wait_ms=float(batching.get("max_wait_ms", 5.0)),
            adaptive_batching=bool(batching.get("adaptive", True)),
            target_p99_ms=float(batching.get("target_p99_ms", 100.0)),
            providers=tuple(runtime.get("providers", ("cuda", "cpu"))),
            device_id=int(runtime.get("device_id", 0)),
            intra_op_threads=int(runtime.get("intra_op_threads", 0)),
            graph_optimization=str(runtime.get("graph_optimization", "all")),
            source=raw.get("source", {}) or {},
            backend=backend,
            inter_op_threads=int(runtime.get("inter_op_threads", 0)),
            io_binding=None if runtime.get("io_binding") is None else bool(runtime["io_binding"]),
            trt_cache_dir=str(directory / trt_cache) if trt_cache else None,
            trt_fp16=bool(tensorrt.get("fp16", False)),
            cache_dir=str(directory / runtime["cache_dir"]) if runtime.get("cache_dir") else None,
            inputs=tuple(raw.get("inputs") or ()),
            outputs=tuple(raw.get("outputs") or ()),
            degrade=raw.get("degrade") or {},
        )
        try:
            LadderConfig.from_config(cfg.degrade, str(path))
        except LadderConfigError as exc:
            raise ModelConfigError(str(exc)) from exc
        if cfg.max_batch_size < 1 or cfg.max_wait_ms < 0:
            raise ModelConfigError(f"{path}: batching needs max_batch_size >= 1 and max_wait_ms >= 0")
        if cfg.target_p99_ms <= 0:
            raise ModelConfigError(f"{path}: batching.target_p99_ms must be > 0")
        if not cfg.model_path.exists():  # a file, or a directory for a SavedModel
            raise ModelConfigError(f"{path}: model file {cfg.file} is missing (run `make models`)")
        return cfg

    def labels(self) -> list[str]:
        if not self.labels_file:
            return []
        path = self.directory / self.labels_file
        if not path.is_file():
            raise ModelConfigError(f"{self.ref}: labels file {path} is missing")
        text = path.read_text()
        labels = json.loads(text) if path.suffix == ".json" else text.splitlines()
        if isinstance(labels, dict):  # {"0": "tench", ...}
            labels = [labels[str(i)] for i in range(len(labels))]
        return [str(x) for x in labels]


@dataclass
class LoadedModel:
    """A config, its labels and a live session (any backend): what an operator needs to serve the model."""

    config: ModelConfig
    session: Backend
    labels: list[str]

    @property
    def ref(self) -> str:
        return self.config.ref


class ModelRepository:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and any(v.is_dir() for v in p.iterdir()))

    def versions(self, name: str) -> list[str]:
        """Versions that have a config, oldest first (numeric order when versions are numbers)."""
        base = self.root / name
        found = [p.name for p in base.iterdir() if (p / "config.yaml").is_file()] if base.is_dir() else []
        return sorted(found, key=lambda v: (0, int(v), "") if v.isdigit() else (1, 0, v))

    def is_candidate(self, name: str, version: str) -> bool:
        """A candidate version (e.g. fresh from `models quantize`) is served only when named explicitly."""
        raw = yaml.safe_load((self.root / name / version / "config.yaml").read_text()) or {}
        return isinstance(raw, dict) and bool(raw.get("candidate", False))

    def serving_version(self, name: str) -> str:
        """What a bare `name` resolves to: the newest version that is not a candidate."""
        versions = self.versions(name)
        promoted = [v for v in versions if not self.is_candidate(name, v)]
        if not promoted:
            raise ModelConfigError(f"model {name!r} has only candidate versions ({', '.join(versions)}); "
                                   f"name one as {name}@VERSION or promote it")
        return promoted[-1]

    def promote(self, name: str, version: str) -> None:
        """Make a candidate version servable by its bare name (drops its `candidate: true` line)."""
        path = self.root / name / version / "config.yaml"
        if not path.is_file():
            raise ModelConfigError(f"model {name!r} has no version {version!r}")
        kept = [line for line in path.read_text().splitlines(keepends=True) if line.strip() != "candidate: true"]
        path.write_text("".join(kept))

    def directory(self, ref: str) -> Path:
        """`name` (newest non-candidate version) or `name@version` -> that version's directory."""
        name, _, version = ref.partition("@")
        versions = self.versions(name)
        if not versions:
            raise ModelConfigError(f"unknown model {name!r} in {self.root} (known: {', '.join(self.names()) or 'none'})")
        version = version or self.serving_version(name)
        if version not in versions:
            raise ModelConfigError(f"model {name!r} has no version {version!r} (have {', '.join(versions)})")
        return self.root / name / version

    def config(self, ref: str) -> ModelConfig:
        """`name` (newest non-candidate version) or `name@version` -> its validated config."""
        return ModelConfig.load(self.directory(ref))

    def load(self, ref: str, providers: tuple[str, ...] | None = None, intra_op_threads: int | None = None) -> LoadedModel:
        cfg = self.config(ref)
        session = open_backend(
            cfg.model_path,
            cfg.backend,
            providers=providers or cfg.providers,
            device_id=cfg.device_id,
            intra_op_threads=cfg.intra_op_threads if intra_op_threads is None else intra_op_threads,
            inter_op_threads=cfg.inter_op_threads,
            graph_optimization=cfg.graph_optimization,
            io_binding=cfg.io_binding,
            trt_cache_dir=cfg.trt_cache_dir,
            trt_fp16=cfg.trt_fp16,
            cache_dir=cfg.cache_dir,
            inputs=cfg.inputs,
            outputs=cfg.outputs,
        )
        labels = cfg.labels()
        out = session.outputs[0].shape
        if labels and len(out) >= 2 and isinstance(out[-1], int) and out[-1] != len(labels) and cfg.task == "classify":
            raise ModelConfigError(f"{cfg.ref}: {len(labels)} labels but the model outputs {out[-1]} classes")
        return LoadedModel(cfg, session, labels)
