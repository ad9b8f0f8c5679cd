"""Model repository: `<root>/<name>/<version>/config.yaml` + the model file it names (Triton-style).

A model is data plus a declaration: adding one needs no code change. Configs are validated at load
with errors that name the file and the problem. The model may be ONNX, TensorFlow Lite, TorchScript or
a SavedModel directory (`backend:`, default from the file's extension; operators/backends.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from operators import tasks
from operators.backends import Backend, backend_for, open_backend
from operators.degrade import LadderConfig, LadderConfigError

CANDIDATE = "candidate"  # config key: a version served only when named explicitly


class ModelConfigError(ValueError):
    """A model directory that cannot be served, and why."""


class ModelRef(str):
    """`name` or `name@version`, parsed once. A str, so it keys dicts and reads in verdicts and logs as the
    text it is; `ModelRef.of(name, version)` builds one.

    >>> ref = ModelRef("tiny@2"); (ref.name, ref.version, ref == "tiny@2")
    ('tiny', '2', True)
    >>> ModelRef("tiny").version is None
    True
    """

    __slots__ = ()

    @classmethod
    def of(cls, name: str, version: str | None = None) -> ModelRef:
        return cls(f"{name}@{version}" if version else name)

    @property
    def name(self) -> str:
        return self.partition("@")[0]

    @property
    def version(self) -> str | None:
        return self.partition("@")[2] or None


yaml.SafeDumper.add_representer(ModelRef, lambda dumper, ref: dumper.represent_str(str(ref)))  # YAML as plain text


def version_key(version: str) -> tuple:
    """Repository order: numeric versions by number, then the others by name."""
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


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
    max_pairs: int | None = None  # batching.max_pairs: (user, candidate) rows per session call of a ranker (ctr)
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
    memory_pattern: bool = False  # runtime.memory_pattern: ONNX Runtime's per-shape memory plans (operators/session.py)
    cache_dir: str | None = None  # where a SavedModel's ONNX conversion is cached
    inputs: tuple[dict[str, Any], ...] = ()  # declared tensors; TorchScript records none of its own
    outputs: tuple[dict[str, Any], ...] = ()
    degrade: dict[str, Any] = field(default_factory=dict)  # the ladder under lag (operators/degrade.py)

    @property
    def model_path(self) -> Path:
        return self.directory / self.file

    @property
    def ref(self) -> ModelRef:
        return ModelRef.of(self.name, self.version)

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
        if task not in tasks.names():
            raise ModelConfigError(f"{path}: unknown task {task!r}; expected one of {', '.join(tasks.names())}")
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
            max_pairs=None if batching.get("max_pairs") is None else int(batching["max_pairs"]),
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
            memory_pattern=bool(runtime.get("memory_pattern", False)),
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
        if cfg.max_pairs is not None and cfg.max_pairs < 1:
            raise ModelConfigError(f"{path}: batching.max_pairs must be >= 1")
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


def _with_candidate(config_text: str, candidate: bool) -> str:
    kept = "".join(line for line in config_text.splitlines(keepends=True) if line.strip() != f"{CANDIDATE}: true")
    return kept.rstrip("\n") + f"\n{CANDIDATE}: true\n" if candidate else kept


class ModelRepository:
    """Owns the directory layout: version numbering, the candidate flag, and new versions appearing whole."""

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
        return sorted(found, key=version_key)

    def _config_path(self, name: str, version: str) -> Path:
        path = self.root / name / version / "config.yaml"
        if not path.is_file():
            raise ModelConfigError(f"model {name!r} has no version {version!r}")
        return path

    def is_candidate(self, name: str, version: str) -> bool:
        """A candidate version (e.g. fresh from `models quantize`) is served only when named explicitly."""
        raw = yaml.safe_load(self._config_path(name, version).read_text()) or {}
        return isinstance(raw, dict) and bool(raw.get(CANDIDATE, False))

    def set_candidate(self, name: str, version: str, candidate: bool) -> None:
        """Set or drop a version's `candidate: true` line; the rest of its config (and comments) is kept."""
        path = self._config_path(name, version)
        path.write_text(_with_candidate(path.read_text(), candidate))

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
        self.set_candidate(name, version, False)

    def next_version(self, name: str) -> str:
        """One past the highest numeric version directory (with a config or not: never reuse a number)."""
        base = self.root / name
        numbers = [int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()] if base.is_dir() else []
        return str(max(numbers, default=0) + 1)

    def add_version(self, name: str, staging: Path, config_text: str,
                    notes: Callable[[ModelRef], Mapping[str, str]] | None = None, candidate: bool = True) -> ModelRef:
        """A finished staging directory (next to the versions of `name`) becomes the next free version:
        renamed into place, given the files `notes(new ref)` names (e.g. a report that names the
        version), and only then its config.yaml, so a worker scanning versions never sees half of one.
        A `candidate` is never served by the bare name until promoted."""
        for _ in range(5):
            target = self.root / name / self.next_version(name)
            try:
                staging.rename(target)  # atomic; fails if another writer took the number meanwhile
            except OSError:
                continue
            ref = ModelRef.of(name, target.name)
            for file, text in (notes(ref) if notes else {}).items():
                (target / file).write_text(text)
            pending = target / "config.yaml.pending"
            pending.write_text(_with_candidate(config_text, candidate))
            pending.rename(target / "config.yaml")  # last: the version now exists
            return ref
        raise RuntimeError(f"could not claim a new version directory in {self.root / name}")

    def signature(self, ref: str) -> tuple:
        """Changes when any file of a version directory changes (a model being copied in, a fixed config)."""
        directory = self.root / ModelRef(ref).name / (ModelRef(ref).version or "")
        try:
            return tuple(sorted((str(p.relative_to(directory)), p.stat().st_mtime_ns, p.stat().st_size)
                                for p in directory.rglob("*") if p.is_file()))
        except OSError:
            return (time.time(),)  # vanished while listing: differs from any recorded signature

    def directory(self, ref: str) -> Path:
        """`name` (newest non-candidate version) or `name@version` -> that version's directory."""
        ref = ModelRef(ref)
        name = ref.name
        versions = self.versions(name)
        if not versions:
            raise ModelConfigError(f"unknown model {name!r} in {self.root} (known: {', '.join(self.names()) or 'none'})")
        version = ref.version or self.serving_version(name)
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
            memory_pattern=cfg.memory_pattern,
            cache_dir=cfg.cache_dir,
            inputs=cfg.inputs,
            outputs=cfg.outputs,
        )
        labels = cfg.labels()
        out = session.outputs[0].shape
        if (labels and len(out) >= 2 and isinstance(out[-1], int) and out[-1] != len(labels)
                and tasks.get(cfg.task).labels_are_classes):
            raise ModelConfigError(f"{cfg.ref}: {len(labels)} labels but the model outputs {out[-1]} classes")
        return LoadedModel(cfg, session, labels)
