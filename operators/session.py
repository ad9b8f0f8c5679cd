"""ONNX Runtime session: provider choice (TensorRT -> CUDA -> CPU), threads, graph optimisation,
input/output introspection and, on a GPU, IO binding.

The providers a session *asks* for are not the ones it *gets*: onnxruntime-gpu lists CUDA even on a
machine without a GPU and silently falls back to CPU. `OnnxSession.providers` reports what the
session really runs on (`InferenceSession.get_providers()` after creation).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Short names used in model configs and settings -> ONNX Runtime provider names.
PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
GPU_PROVIDERS = {"TensorrtExecutionProvider", "CUDAExecutionProvider"}

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.object_,
}


def _import_ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "ONNX Runtime is not installed: pip install 'inferstream[cpu]' (or 'inferstream[gpu]' on a CUDA machine)"
        ) from exc
    return onnxruntime


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, numpy dtype and shape (None or a name for dynamic axes)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    @property
    def dynamic_batch(self) -> bool:
        return bool(self.shape) and not isinstance(self.shape[0], int)


def choose_providers(
    preferences: Sequence[str],
    available: Sequence[str],
    device_id: int = 0,
    trt_cache_dir: str | None = None,
    trt_fp16: bool = False,
) -> list[tuple[str, dict[str, Any]]]:
    """Ordered (provider, options) list: the preferred providers this ONNX Runtime build has, CPU last.
    TensorRT brings CUDA right after it (when the build has CUDA) for the nodes TensorRT cannot run.

    >>> choose_providers(["cuda", "cpu"], ["CPUExecutionProvider"])
    [('CPUExecutionProvider', {})]
    """
    chosen: list[tuple[str, dict[str, Any]]] = []
    for short in preferences:
        name = PROVIDER_NAMES.get(short.lower())
        if name is None:
            raise ValueError(f"unknown execution provider {short!r}; known: {', '.join(PROVIDER_NAMES)}")
        if name not in available or any(name == c for c, _ in chosen):
            continue
        options: dict[str, Any] = {}
        if name == "CUDAExecutionProvider":
            options = {"device_id": device_id}
        elif name == "TensorrtExecutionProvider":
            options = {"device_id": device_id, "trt_fp16_enable": trt_fp16}
            if trt_cache_dir:
                options.update(trt_engine_cache_enable=True, trt_engine_cache_path=trt_cache_dir)
        chosen.append((name, options))
        if name == "TensorrtExecutionProvider" and "CUDAExecutionProvider" in available and not any(
            PROVIDER_NAMES.get(p.lower()) == "CUDAExecutionProvider" for p in preferences
        ):
            # what TensorRT cannot take runs on CUDA, not on CPU (ONNX Runtime's recommended order)
            chosen.append(("CUDAExecutionProvider", {"device_id": device_id}))
    if not any(name == "CPUExecutionProvider" for name, _ in chosen):
        chosen.append(("CPUExecutionProvider", {}))  # always a working fallback
    return chosen


_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


_INTRA_OP_SPINNING = True  # ONNX Runtime's default; a worker that shares its cores turns it off


def set_intra_op_spinning(allowed: bool) -> None:
    """Whether sessions created from now on let their intra-op threads spin (busy-wait) between
    operators: faster for a model alone on its cores, a waste of cores other threads need."""
    global _INTRA_OP_SPINNING
    _INTRA_OP_SPINNING = bool(allowed)


class OnnxSession:
    """A loaded ONNX model. `run` takes and returns numpy arrays keyed by tensor name.

    Thread-safe for concurrent `run` calls (ONNX Runtime releases the GIL while it computes), so
    callers may run it in an executor and keep their event loop free.
    """

    def __init__(
        self,
        path: str | Path,
        providers: Sequence[str] = ("cuda", "cpu"),
        device_id: int = 0,
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
        graph_optimization: str = "all",
        io_binding: bool | None = None,
        trt_cache_dir: str | None = None,
        trt_fp16: bool = False,
        memory_pattern: bool = False,
    ) -> None:
        ort = _import_ort()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"model file not found: {self.path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads  # 0 = ONNX Runtime's default (one per core)
        options.inter_op_num_threads = inter_op_threads
        # ONNX Runtime plans one block per input shape by default; a batch of a shape not seen before can
        # fit nowhere in the arena and extend it, so resident memory grew with every new batch size (soak:
        # steps at each backlog). Off, the arena stays at its warm-up size; same speed measured.
        options.enable_mem_pattern = memory_pattern
        if not _INTRA_OP_SPINNING:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if graph_optimization not in _OPT_LEVELS:
            raise ValueError(f"graph_optimization must be one of {sorted(_OPT_LEVELS)}, not {graph_optimization!r}")
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[graph_optimization])
        available = ort.get_available_providers()
        requested = choose_providers(providers, available, device_id, trt_cache_dir, trt_fp16)
        if trt_cache_dir and any(name == "TensorrtExecutionProvider" for name, _ in requested):
            Path(trt_cache_dir).mkdir(parents=True, exist_ok=True)
        self._ort = ort
        self._session = ort.InferenceSession(
            str(self.path),
            sess_options=options,
            providers=[name for name, _ in requested],
            provider_options=[opts for _, opts in requested],
        )
        # What the session really runs on: a GPU build lists CUDA even where CUDA cannot start.
        self.providers: list[str] = self._session.get_providers()
        self.requested_providers = [name for name, _ in requested]
        self.device_id = device_id
        self.on_gpu = self.providers[0] in GPU_PROVIDERS
        self.fallback = _fallback_reason(providers, available, self.providers)
        if self.fallback:
            log.warning("%s: %s", self.path.name, self.fallback)
        # IO binding avoids host<->device copies on a GPU; on CPU it only adds overhead, so default off there.
        self.io_binding = self.on_gpu if io_binding is None else io_binding
        self.inputs = [self._spec(i) for i in self._session.get_inputs()]
        self.outputs = [self._spec(o) for o in self._session.get_outputs()]
        self.metadata: dict[str, str] = dict(self._session.get_modelmeta().custom_metadata_map)

    @staticmethod
    def _spec(node) -> TensorSpec:
        shape = tuple(d if isinstance(d, int) else (d or None) for d in (node.shape or ()))
        return TensorSpec(node.name, np.dtype(_ORT_TYPES.get(node.type, np.float32)), shape)

    @property
    def provider(self) -> str:
        """The provider that runs the model (first in ONNX Runtime's list)."""
        return self.providers[0]

    def run(self, feeds: Mapping[str, Any], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """numpy arrays in (or, with IO binding, `OrtValue`s already on the device), numpy arrays out."""
        names = list(output_names) if output_names else [o.name for o in self.outputs]
        if self.io_binding:
            binding = self._run_bound(feeds, names)
            return dict(zip(names, binding.copy_outputs_to_cpu(), strict=True))
        return dict(zip(names, self._session.run(names, dict(feeds)), strict=True))

    def run_on_device(self, feeds: Mapping[str, Any], output_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Like `run`, but the outputs stay where the model computed them, as `OrtValue`s (on the GPU
        when `on_gpu`): for chaining models or GPU post-processing without a round trip to the host.
        `OrtValue.numpy()` copies one to the host."""
        names = list(output_names) if output_names else [o.name for o in self.outputs]
        return dict(zip(names, self._run_bound(feeds, names).get_outputs(), strict=True))

    def _run_bound(self, feeds: Mapping[str, Any], names: Sequence[str]):
        binding = self._session.io_binding()
        device, device_id = ("cuda", self.device_id) if self.on_gpu else ("cpu", 0)
        for name, value in feeds.items():
            if isinstance(value, self._ort.OrtValue):
                binding.bind_ortvalue_input(name, value)  # already on the device: no copy
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))  # one host->device copy by ORT
        for name in names:
            binding.bind_output(name, device, device_id)  # ORT allocates on the device, sized per run
        binding.synchronize_inputs()
        self._session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return binding

    def describe(self) -> dict[str, Any]:
        """Introspection for logs, /models and `inferstream models list`."""
        fmt = lambda specs: [{"name": s.name, "dtype": str(s.dtype), "shape": list(s.shape)} for s in specs]  # noqa: E731
        return {"backend": "onnx", "path": str(self.path), "providers": self.providers,
                "requested_providers": self.requested_providers, "fallback": self.fallback,
                "device_id": self.device_id if self.on_gpu else None, "io_binding": self.io_binding,
                "inputs": fmt(self.inputs), "outputs": fmt(self.outputs)}


def _fallback_reason(preferences: Sequence[str], available: Sequence[str], in_use: Sequence[str]) -> str | None:
    """Why the session does not run on the first GPU provider it was asked for, or None if it does
    (or no GPU was asked for)."""
    wanted = [PROVIDER_NAMES[p.lower()] for p in preferences if PROVIDER_NAMES[p.lower()] in GPU_PROVIDERS]
    if not wanted or in_use[0] == wanted[0]:
        return None
    first = wanted[0]
    if first not in available:
        why = f"{first} is not in this onnxruntime build (install 'inferstream[gpu]' on a CUDA machine)"
    else:
        why = (f"{first} is in this onnxruntime build but could not start (no GPU, driver, or CUDA/cuDNN/TensorRT "
               "libraries; onnxruntime's log says which)")
    return f"{why}; running on {in_use[0]}"
