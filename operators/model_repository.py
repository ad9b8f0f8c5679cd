"""Model repository: `<root>/<name>/<version>/config.yaml` + the model file it names (Triton-style).

A model is data plus a declaration: adding one needs no code change. Configs are validated at load
with errors that name the file and the problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from operators.session import OnnxSession

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
    providers: tuple[str, ...] = ("cuda", "cpu")
    device_id: int = 0
    intra_op_threads: int = 0
    graph_optimization: str = "all"
    source: dict[str, Any] = field(default_factory=dict)

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
        cfg = cls(
            name=directory.parent.name,
            version=directory.name,
            task=task,
            directory=directory,
            file=raw.get("file", "model.onnx"),
            preprocess=raw.get("preprocess", {}) or {},
            postprocess=raw.get("postprocess", {}) or {},
            labels_file=raw.get("labels"),
            max_batch_size=int(batching.get("max_batch_size", 16)),
            max_wait_ms=float(batching.get("max_wait_ms", 5.0)),
            providers=tuple(runtime.get("providers", ("cuda", "cpu"))),
            device_id=int(runtime.get("device_id", 0)),
            intra_op_threads=int(runtime.get("intra_op_threads", 0)),
            graph_optimization=str(runtime.get("graph_optimization", "all")),
            source=raw.get("source", {}) or {},
        )
        if cfg.max_batch_size < 1 or cfg.max_wait_ms < 0:
            raise ModelConfigError(f"{path}: batching needs max_batch_size >= 1 and max_wait_ms >= 0")
        if not cfg.model_path.is_file():
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
    """A config, its labels and a live session: what an operator needs to serve the model."""

    config: ModelConfig
    session: OnnxSession
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

    def config(self, ref: str) -> ModelConfig:
        """`name` (newest version) or `name@version` -> its validated config."""
        name, _, version = ref.partition("@")
        versions = self.versions(name)
        if not versions:
            raise ModelConfigError(f"unknown model {name!r} in {self.root} (known: {', '.join(self.names()) or 'none'})")
        version = version or versions[-1]
        if version not in versions:
            raise ModelConfigError(f"model {name!r} has no version {version!r} (have {', '.join(versions)})")
        return ModelConfig.load(self.root / name / version)

    def load(self, ref: str, providers: tuple[str, ...] | None = None, intra_op_threads: int | None = None) -> LoadedModel:
        cfg = self.config(ref)
        session = OnnxSession(
            cfg.model_path,
            providers=providers or cfg.providers,
            device_id=cfg.device_id,
            intra_op_threads=cfg.intra_op_threads if intra_op_threads is None else intra_op_threads,
            graph_optimization=cfg.graph_optimization,
        )
        labels = cfg.labels()
        out = session.outputs[0].shape
        if labels and len(out) >= 2 and isinstance(out[-1], int) and out[-1] != len(labels) and cfg.task == "classify":
            raise ModelConfigError(f"{cfg.ref}: {len(labels)} labels but the model outputs {out[-1]} classes")
        return LoadedModel(cfg, session, labels)
