"""Provider choice and OnnxSession on the tiny generated model (CPU-only onnxruntime)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from tiny_models import SIZE, tiny_classifier, tiny_logits

from operators.session import OnnxSession, choose_providers

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TRT = "TensorrtExecutionProvider"


@pytest.fixture
def tiny_path(tmp_path):
    return tiny_classifier(tmp_path / "tiny.onnx", num_classes=4)


def _batch(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, size=(n, 3, SIZE, SIZE)).astype(np.float32)


# ------------------------------------------------------------------------------ choose_providers
def test_gpu_providers_requested_but_unavailable_fall_back_to_cpu_only():
    assert choose_providers(["tensorrt", "cuda", "cpu"], [CPU]) == [(CPU, {})]


def test_gpu_providers_requested_without_cpu_still_get_cpu_fallback():
    assert choose_providers(["cuda"], [CPU]) == [(CPU, {})]


def test_available_gpu_providers_are_ordered_by_preference_with_device_options():
    chosen = choose_providers(["tensorrt", "cuda", "cpu"], [CPU, CUDA, TRT], device_id=3,
                              trt_cache_dir="/tmp/trt-cache", trt_fp16=True)
    assert [name for name, _ in chosen] == [TRT, CUDA, CPU]
    trt_opts, cuda_opts, cpu_opts = (opts for _, opts in chosen)
    assert trt_opts == {"device_id": 3, "trt_fp16_enable": True, "trt_engine_cache_enable": True,
                        "trt_engine_cache_path": "/tmp/trt-cache"}
    assert cuda_opts == {"device_id": 3}
    assert cpu_opts == {}


def test_preference_order_not_availability_order_decides():
    chosen = choose_providers(["cuda", "tensorrt"], [TRT, CUDA, CPU])
    assert [name for name, _ in chosen] == [CUDA, TRT, CPU]


def test_tensorrt_without_cache_dir_has_no_cache_options():
    (trt, opts), _ = choose_providers(["tensorrt"], [TRT, CPU])
    assert trt == TRT
    assert opts == {"device_id": 0, "trt_fp16_enable": False}


def test_unknown_provider_name_raises_value_error():
    with pytest.raises(ValueError, match="rocm"):
        choose_providers(["rocm", "cpu"], [CPU])


def test_cpu_is_always_appended_last_when_not_requested():
    chosen = choose_providers(["cuda"], [CUDA, CPU])
    assert chosen == [(CUDA, {"device_id": 0}), (CPU, {})]


def test_provider_short_names_are_case_insensitive_and_deduplicated():
    chosen = choose_providers(["CUDA", "cuda", "Cpu", "cpu"], [CUDA, CPU])
    assert [name for name, _ in chosen] == [CUDA, CPU]


# ----------------------------------------------------------------------------------- OnnxSession
def test_session_introspects_inputs_and_outputs(tiny_path):
    session = OnnxSession(tiny_path, providers=("cpu",))
    assert len(session.inputs) == 1
    (spec,) = session.inputs
    assert spec.name == "input"
    assert spec.dtype == np.float32
    assert spec.shape == ("batch", 3, SIZE, SIZE)
    assert spec.dynamic_batch
    (out,) = session.outputs
    assert out.name == "logits"
    assert out.shape == ("batch", 4)
    desc = session.describe()
    assert desc["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["batch", 3, SIZE, SIZE]}]
    assert desc["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", 4]}]


def test_session_run_matches_numpy_oracle(tiny_path):
    session = OnnxSession(tiny_path, providers=("cpu",))
    x = _batch(5)
    result = session.run({"input": x})
    assert list(result) == ["logits"]
    np.testing.assert_allclose(result["logits"], tiny_logits(x), rtol=1e-4, atol=1e-4)


def test_session_requesting_cuda_on_cpu_only_runtime_runs_on_cpu(tiny_path):
    assert CUDA not in ort.get_available_providers()  # this test environment is CPU-only onnxruntime
    session = OnnxSession(tiny_path, providers=("cuda", "cpu"))
    assert session.providers[0] == CPU
    assert session.provider == CPU
    assert not session.on_gpu
    assert session.io_binding is False  # IO binding defaults off on CPU
    x = _batch(2)
    np.testing.assert_allclose(session.run({"input": x})["logits"], tiny_logits(x), rtol=1e-4, atol=1e-4)


def test_session_io_binding_path_matches_plain_path(tiny_path):
    plain = OnnxSession(tiny_path, providers=("cpu",), io_binding=False)
    bound = OnnxSession(tiny_path, providers=("cpu",), io_binding=True)
    assert bound.io_binding is True
    x = _batch(3, seed=7)
    expected = plain.run({"input": x})["logits"]
    got = bound.run({"input": x})["logits"]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got, tiny_logits(x), rtol=1e-4, atol=1e-4)


def test_session_io_binding_accepts_non_contiguous_input(tiny_path):
    bound = OnnxSession(tiny_path, providers=("cpu",), io_binding=True)
    x = np.asfortranarray(_batch(2, seed=3))
    np.testing.assert_allclose(bound.run({"input": x})["logits"], tiny_logits(x), rtol=1e-4, atol=1e-4)


def test_session_missing_model_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        OnnxSession(tmp_path / "nope.onnx", providers=("cpu",))


def test_session_bad_graph_optimization_raises_value_error(tiny_path):
    with pytest.raises(ValueError, match="graph_optimization"):
        OnnxSession(tiny_path, providers=("cpu",), graph_optimization="maximum")
