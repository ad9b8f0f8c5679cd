"""Model backends: one interface over ONNX Runtime, TensorFlow Lite, TorchScript and TensorFlow SavedModel.

Every backend has what `OnnxSession` has and what operators use: `inputs` and `outputs` (lists of
`TensorSpec`), `run(feeds) -> {name: array}`, `provider`, `providers` and `describe()`. An operator
never knows which runtime serves its model.

Each optional runtime is imported only inside its backend; a model whose runtime is missing fails
with a `MissingRuntimeError` that names the extra to install.

SavedModel is served by converting it to ONNX once (tf2onnx, in a child process, cached by content
hash) and running it in ONNX Runtime: one runtime gets the GPU providers, IO binding and
quantization, and TensorFlow stays out of the serving process (it imports in seconds, holds
hundreds of MB and by default reserves all GPU memory, next to ONNX Runtime's CUDA arena).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from operators.session import OnnxSession, TensorSpec

log = logging.getLogger(__name__)

BACKENDS = ("onnx", "tflite", "torchscript", "savedmodel")
_EXTENSIONS = {".onnx": "onnx", ".tflite": "tflite", ".pt": "torchscript", ".pth": "torchscript",
               ".ts": "torchscript", ".torchscript": "torchscript", ".jit": "torchscript"}
_GPU_SHORT_NAMES = {"cuda", "tensorrt"}


@runtime_checkable
class Backend(Protocol):
    """What an operator may use of a loaded model. `OnnxSession` is the reference implementation."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    providers: list[str]

    @property
    def provider(self) -> str: ...

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]: ...

    def describe(self) -> dict[str, Any]: ...


class MissingRuntimeError(RuntimeError):
    """A model needs an optional runtime that is not installed. `extra` is the pip extra that installs it."""

    def __init__(self, what: str, module: str, extra: str) -> None:
        super().__init__(f"{what} needs the Python package {module!r}, which is not installed: "
                         f"pip install 'inferstream[{extra}]'")
        self.module = module
        self.extra = extra


def _import_runtime(module: str, extra: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingRuntimeError(what, module, extra) from exc


def _require_installed(module: str, extra: str, what: str) -> None:
    """Like `_import_runtime` without paying for the import (TensorFlow takes seconds)."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[module] is None (import blocked)
        found = False
    if not found:
        raise MissingRuntimeError(what, module, extra)


def backend_for(path: str | Path, declared: str | None = None) -> str:
    """The backend that serves `path`: the declared one, else from the file extension.

    >>> backend_for("models/x/1/model.tflite"), backend_for("m.onnx", declared="onnx")
    ('tflite', 'onnx')
    """
    if declared is not None:
        if declared not in BACKENDS:
            raise ValueError(f"unknown backend {declared!r}; expected one of {', '.join(BACKENDS)}")
        return declared
    path = Path(path)
    if path.name == "saved_model.pb" or (path / "saved_model.pb").is_file():
        return "savedmodel"
    suffix = path.suffix.lower()
    if suffix in _EXTENSIONS:
        return _EXTENSIONS[suffix]
    raise ValueError(f"cannot tell the backend of {path.name!r} from its extension "
                     f"({', '.join(sorted(_EXTENSIONS))}, or a SavedModel directory); set `backend:` in config.yaml")


def specs_from_config(declared: Sequence[Mapping[str, Any]]) -> list[TensorSpec]:
    """`[{name, dtype, shape}]` as written in config.yaml -> TensorSpecs (`string` -> object dtype)."""
    specs = []
    for item in declared:
        if "name" not in item:
            raise ValueError(f"tensor declaration without a name: {dict(item)}")
        dtype = item.get("dtype", "float32")
        shape = tuple(d if isinstance(d, int) else (str(d) if d is not None else None) for d in item.get("shape", ()))
        specs.append(TensorSpec(str(item["name"]), np.dtype(object if dtype == "string" else dtype), shape))
    return specs


def _describe_specs(specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
    return [{"name": s.name, "dtype": str(s.dtype), "shape": list(s.shape)} for s in specs]


def _output_names(outputs: Sequence[TensorSpec], wanted: Sequence[str] | None) -> list[str]:
    names = [o.name for o in outputs]
    if not wanted:
        return names
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise KeyError(f"unknown outputs {unknown}; the model has {names}")
    return list(wanted)


def _check_feeds(inputs: Sequence[TensorSpec], feeds: Mapping[str, np.ndarray]) -> None:
    expected = {s.name for s in inputs}
    if set(feeds) != expected:
        raise KeyError(f"feeds {sorted(feeds)} do not match the model inputs {sorted(expected)}")


# ----------------------------------------------------------------------------------------- TFLite
class TFLiteBackend:
    """A .tflite model in LiteRT (`ai-edge-litert`), on CPU (XNNPACK).

    Batching: a model whose batch axis is dynamic (`shape_signature[0] == -1`) is resized to each
    batch. A model built for a fixed batch is run in chunks of that batch (one sample at a time for
    batch 1): resizing its batch axis appears to succeed but returns wrong values.
    The interpreter is not thread-safe, so `run` holds a lock.
    """

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        litert = _import_runtime("ai_edge_litert.interpreter", "tflite", "a TensorFlow Lite model")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"model file not found: {self.path}")
        self.threads = threads
        self._interpreter = litert.Interpreter(model_path=str(self.path), num_threads=threads or None)
        self._interpreter.allocate_tensors()
        self._lock = threading.Lock()
        in_details, out_details = self._named_details()
        self._in_index = {name: d["index"] for name, d in in_details}
        self._out_index = {name: d["index"] for name, d in out_details}
        self.inputs = [self._spec(name, d) for name, d in in_details]
        self.outputs = [self._spec(name, d) for name, d in out_details]
        batch_dims = {int(d["shape_signature"][0]) for _, d in in_details if len(d["shape_signature"])}
        # None: dynamic batch; an int: the batch the model was built for
        self.static_batch: int | None = None if batch_dims <= {-1} else max(batch_dims)
        self.providers = ["litert:cpu"]
        self.metadata: dict[str, str] = {}

    def _named_details(self) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
        """(name, details) of inputs and outputs: a single signature's names when the model has one
        (`features`, as in the SavedModel it came from), else the tensor names."""
        signatures = self._interpreter.get_signature_list()
        if len(signatures) == 1:
            runner = self._interpreter.get_signature_runner(next(iter(signatures)))
            ins, outs = runner.get_input_details(), runner.get_output_details()
            indices = {d["index"] for d in self._interpreter.get_input_details()}
            if {d["index"] for d in ins.values()} == indices:  # the signature is the main graph
                return list(ins.items()), list(outs.items())
        return ([(d["name"], d) for d in self._interpreter.get_input_details()],
                [(d["name"], d) for d in self._interpreter.get_output_details()])

    @staticmethod
    def _spec(name: str, details: dict) -> TensorSpec:
        shape = tuple(None if int(d) == -1 else int(d) for d in details["shape_signature"])
        return TensorSpec(name, np.dtype(details["dtype"]), shape)

    @property
    def provider(self) -> str:
        return self.providers[0]

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        _check_feeds(self.inputs, feeds)
        names = _output_names(self.outputs, output_names)
        arrays = {k: np.asarray(v) for k, v in feeds.items()}
        n = len(next(iter(arrays.values())))
        if n == 0:
            raise ValueError("empty batch")
        with self._lock:
            if self.static_batch is None:
                return self._invoke(arrays, names)
            b = self.static_batch
            parts = []
            for start in range(0, n, b):
                chunk = {k: v[start : start + b] for k, v in arrays.items()}
                short = b - len(next(iter(chunk.values())))
                if short:  # pad the last chunk by repeating its last row; the padding is cut below
                    chunk = {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) for k, v in chunk.items()}
                parts.append(self._invoke(chunk, names))
        return {name: np.concatenate([p[name] for p in parts])[:n] for name in names}

    def _invoke(self, arrays: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
        it = self._interpreter
        resized = False
        for name, array in arrays.items():
            index = self._in_index[name]
            if self._current_shape(index) != array.shape:
                # strict: only axes that are -1 in shape_signature may change, anything else is an error
                it.resize_tensor_input(index, list(array.shape), strict=True)
                resized = True
        if resized:
            it.allocate_tensors()
        for name, array in arrays.items():
            it.set_tensor(self._in_index[name], np.ascontiguousarray(array))
        it.invoke()
        return {name: it.get_tensor(self._out_index[name]) for name in names}

    def _current_shape(self, index: int) -> tuple[int, ...]:
        for d in self._interpreter.get_input_details():
            if d["index"] == index:
                return tuple(int(x) for x in d["shape"])
        raise KeyError(index)

    def describe(self) -> dict[str, Any]:
        return {"backend": "tflite", "path": str(self.path), "providers": self.providers,
                "batch": "dynamic" if self.static_batch is None else self.static_batch, "threads": self.threads,
                "inputs": _describe_specs(self.inputs), "outputs": _describe_specs(self.outputs)}


# ------------------------------------------------------------------------------------ TorchScript
class TorchScriptBackend:
    """A TorchScript module (`torch.jit.save` output) run under `torch.inference_mode()`.

    Input names come from the module's `forward` signature. TorchScript records no dtypes or shapes:
    they come from the `inputs` declared in config.yaml (float32 and unknown shape otherwise); when
    every non-batch axis is declared, one batch-1 run at load finds the outputs (and warms the JIT).
    Outputs are named by the declared `outputs`, else by the keys of a returned dict, else `output`
    (`output_0`, `output_1`, ... for tuples).

    `threads` sets torch's intra-op thread count, which is global to the process.
    """

    def __init__(self, path: str | Path, providers: Sequence[str] = ("cpu",), device_id: int = 0, threads: int = 0,
                 inputs: Sequence[TensorSpec] = (), outputs: Sequence[TensorSpec] = ()) -> None:
        torch = _import_runtime("torch", "torch", "a TorchScript model")
        self._torch = torch
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"model file not found: {self.path}")
        self.threads = threads
        if threads > 0:
            torch.set_num_threads(threads)
        wants_gpu = any(p.lower() in _GPU_SHORT_NAMES for p in providers)
        on_gpu = wants_gpu and torch.cuda.is_available()
        if wants_gpu and not on_gpu:
            log.warning("%s: GPU requested but torch sees no CUDA device, running on CPU", self.path.name)
        self.device = torch.device(f"cuda:{device_id}" if on_gpu else "cpu")
        self.providers = [f"torch:{self.device}"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated in favour of torch.export
            self._module = torch.jit.load(str(self.path), map_location=self.device).eval()
        arg_names = [a.name for a in self._module.forward.schema.arguments[1:]]  # [0] is self
        declared = {s.name: s for s in inputs}
        if declared and set(declared) != set(arg_names):
            raise ValueError(f"{self.path.name}: declared inputs {sorted(declared)} but forward() takes {arg_names}")
        self.inputs = [declared.get(n, TensorSpec(n, np.dtype(np.float32), ())) for n in arg_names]
        self._declared_outputs = list(outputs)
        self.outputs = self._probe_outputs() or self._declared_outputs or [TensorSpec("output", np.dtype(np.float32), ())]
        self.metadata: dict[str, str] = {}

    def _probe_outputs(self) -> list[TensorSpec]:
        """Output specs from one batch-1 run on zeros, when every input shape is known past the batch axis."""
        if not self.inputs or not all(s.shape and all(isinstance(d, int) for d in s.shape[1:]) for s in self.inputs):
            return []
        batch = self.inputs[0].shape[0]  # a name or None (dynamic) or a fixed size
        n = batch if isinstance(batch, int) else 1
        result = self._forward({s.name: np.zeros((n, *s.shape[1:]), dtype=s.dtype) for s in self.inputs})
        return [TensorSpec(name, a.dtype, (a.shape[0] if isinstance(batch, int) else batch, *a.shape[1:]) if a.ndim else ())
                for name, a in result.items()]

    def _forward(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        args = [torch.from_numpy(np.ascontiguousarray(feeds[s.name])).to(self.device) for s in self.inputs]
        with torch.inference_mode():
            result = self._module(*args)
        if isinstance(result, Mapping):
            items = list(result.items())
        else:
            tensors = list(result) if isinstance(result, (tuple, list)) else [result]
            if self._declared_outputs:
                if len(self._declared_outputs) != len(tensors):
                    raise ValueError(f"{self.path.name}: {len(self._declared_outputs)} outputs declared, "
                                     f"the module returned {len(tensors)}")
                names = [s.name for s in self._declared_outputs]
            else:
                names = ["output"] if len(tensors) == 1 else [f"output_{i}" for i in range(len(tensors))]
            items = list(zip(names, tensors, strict=True))
        return {name: t.detach().cpu().numpy() for name, t in items}

    @property
    def provider(self) -> str:
        return self.providers[0]

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        _check_feeds(self.inputs, feeds)
        result = self._forward(feeds)
        names = list(output_names) if output_names else list(result)
        missing = [n for n in names if n not in result]
        if missing:
            raise KeyError(f"unknown outputs {missing}; the model returns {list(result)}")
        return {n: result[n] for n in names}

    def describe(self) -> dict[str, Any]:
        return {"backend": "torchscript", "path": str(self.path), "providers": self.providers,
                "threads": self._torch.get_num_threads(),
                "inputs": _describe_specs(self.inputs), "outputs": _describe_specs(self.outputs)}


# ------------------------------------------------------------------------------------- SavedModel
def _tree_digest(directory: Path, extra: str) -> str:
    digest = hashlib.sha256(extra.encode())
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def convert_savedmodel(saved_model: str | Path, output: str | Path, opset: int = 17,
                       signature: str = "serving_default", timeout_s: float = 900) -> Path:
    """Convert a SavedModel directory to one ONNX file with tf2onnx, in a child process.

    For build time (a recipe ships the ONNX file, and serving needs no TensorFlow) and for
    `SavedModelBackend`. Writes `output` atomically.
    """
    what = "converting a TensorFlow SavedModel"
    _require_installed("tensorflow", "tensorflow", what)
    _require_installed("tf2onnx", "tensorflow", what)
    saved_model, output = Path(saved_model), Path(output)
    if not (saved_model / "saved_model.pb").is_file():
        raise FileNotFoundError(f"not a SavedModel directory (no saved_model.pb): {saved_model}")
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.stem}-", suffix=".onnx", dir=output.parent)
    os.close(fd)
    # CUDA_VISIBLE_DEVICES="": a GPU build of TensorFlow would otherwise reserve the GPU to convert
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(saved_model), "--output", tmp,
           "--opset", str(opset), "--signature_def", signature]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        if done.returncode != 0 or not os.path.getsize(tmp):
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"tf2onnx could not convert {saved_model} (exit {done.returncode}):\n{tail}")
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return output


def _default_cache_dir(saved_model: Path) -> Path:
    beside = saved_model.parent / ".onnx-cache"  # inside the version directory; not a version itself
    try:
        beside.mkdir(exist_ok=True)
        if os.access(beside, os.W_OK):
            return beside
    except OSError:
        pass
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "inferstream" / "onnx-cache"


class SavedModelBackend(OnnxSession):
    """A TensorFlow SavedModel, converted to ONNX once and served by ONNX Runtime.

    The converted file is cached under `cache_dir` (default `<version dir>/.onnx-cache/`) by a hash
    of the SavedModel's files, the opset, the signature and the tf2onnx version, so a changed model
    is converted again and an unchanged one loads in milliseconds. Conversion needs the `tensorflow`
    extra; serving a cached conversion does not.
    """

    def __init__(self, path: str | Path, cache_dir: str | Path | None = None, opset: int = 17,
                 signature: str = "serving_default", **session_options: Any) -> None:
        source = Path(path)
        if source.name == "saved_model.pb":
            source = source.parent
        if not (source / "saved_model.pb").is_file():
            raise FileNotFoundError(f"not a SavedModel directory (no saved_model.pb): {source}")
        try:
            converter = version("tf2onnx")
        except PackageNotFoundError:
            converter = "none"
        key = _tree_digest(source, f"opset={opset};signature={signature};tf2onnx={converter}")[:16]
        cache = Path(cache_dir) if cache_dir else _default_cache_dir(source)
        converted = cache / f"{source.name}-{key}.onnx"
        if not converted.is_file():
            log.info("converting SavedModel %s to ONNX (%s)", source, converted)
            convert_savedmodel(source, converted, opset=opset, signature=signature)
        super().__init__(converted, **session_options)
        self.source = source

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "backend": "savedmodel", "path": str(self.source), "converted": str(self.path)}


# ----------------------------------------------------------------------------------------- factory
def open_backend(
    path: str | Path,
    backend: str | None = None,
    *,
    providers: Sequence[str] = ("cuda", "cpu"),
    device_id: int = 0,
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
    graph_optimization: str = "all",
    io_binding: bool | None = None,
    trt_cache_dir: str | None = None,
    trt_fp16: bool = False,
    memory_pattern: bool = False,
    cache_dir: str | Path | None = None,
    inputs: Sequence[Mapping[str, Any]] = (),
    outputs: Sequence[Mapping[str, Any]] = (),
) -> Backend:
    """Load `path` with the backend that serves it (`backend`, else from the extension).

    `intra_op_threads` is ONNX Runtime's intra-op threads, LiteRT's `num_threads` and torch's
    `set_num_threads` (0: the runtime's default). `inputs`/`outputs` are config.yaml's declarations;
    only TorchScript, which records none, needs them.
    """
    kind = backend_for(path, backend)
    wants_gpu = any(p.lower() in _GPU_SHORT_NAMES for p in providers)
    ort_options = dict(providers=providers, device_id=device_id, intra_op_threads=intra_op_threads,
                       inter_op_threads=inter_op_threads, graph_optimization=graph_optimization,
                       io_binding=io_binding, trt_cache_dir=trt_cache_dir, trt_fp16=trt_fp16,
                       memory_pattern=memory_pattern)
    if kind == "onnx":
        return OnnxSession(path, **ort_options)
    if kind == "savedmodel":
        return SavedModelBackend(path, cache_dir=cache_dir, **ort_options)
    if kind == "tflite":
        if wants_gpu:
            log.info("%s: TensorFlow Lite runs on CPU here (no GPU delegate); providers %s ignored", Path(path).name,
                     list(providers))
        return TFLiteBackend(path, threads=intra_op_threads)
    return TorchScriptBackend(path, providers=providers, device_id=device_id, threads=intra_op_threads,
                              inputs=specs_from_config(inputs), outputs=specs_from_config(outputs))
