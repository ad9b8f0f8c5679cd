"""Provider choice and OnnxSession on the tiny generated model (CPU-only onnxruntime; a GPU build is
simulated by monkeypatching what onnxruntime lists and what a session reports)."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest
import yaml
from tiny_models import SIZE, tiny_classifier, tiny_logits, write_tiny_repository

from operators.model_repository import ModelRepository
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


# ------------------------------------------------------------------------------------- GPU path
def test_tensorrt_brings_cuda_after_it_for_the_nodes_it_cannot_run():
    chosen = choose_providers(["tensorrt", "cpu"], [TRT, CUDA, CPU], device_id=1)
    assert chosen == [(TRT, {"device_id": 1, "trt_fp16_enable": False}), (CUDA, {"device_id": 1}), (CPU, {})]


def _claim_providers(monkeypatch, available, in_use):
    """Simulate an onnxruntime-gpu build: what it lists, and what a created session reports."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(available))
    monkeypatch.setattr(ort.InferenceSession, "get_providers", lambda self: list(in_use))


def test_gpu_build_listing_cuda_that_cannot_start_falls_back_to_cpu_and_says_why(tiny_path, monkeypatch, caplog):
    _claim_providers(monkeypatch, [TRT, CUDA, CPU], [CPU])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # this CPU build warns that it has no CUDA: the simulated failure
        session = OnnxSession(tiny_path, providers=("cuda", "cpu"))
    assert session.requested_providers == [CUDA, CPU]
    assert session.providers == [CPU]
    assert session.provider == CPU
    assert not session.on_gpu
    assert session.io_binding is False
    assert "CUDAExecutionProvider is in this onnxruntime build but could not start" in session.fallback
    assert session.fallback.endswith("running on CPUExecutionProvider")
    assert session.fallback in caplog.text
    desc = session.describe()
    assert (desc["providers"], desc["fallback"], desc["device_id"]) == ([CPU], session.fallback, None)
    x = _batch(2)
    np.testing.assert_allclose(session.run({"input": x})["logits"], tiny_logits(x), rtol=1e-4, atol=1e-4)


def test_cpu_only_build_reports_that_the_gpu_package_is_missing(tiny_path):
    session = OnnxSession(tiny_path, providers=("cuda", "cpu"))
    assert "not in this onnxruntime build" in session.fallback
    assert "inferstream[gpu]" in session.fallback


def test_no_fallback_is_reported_when_no_gpu_was_asked_for(tiny_path):
    assert OnnxSession(tiny_path, providers=("cpu",)).fallback is None


def test_tensorrt_failing_but_cuda_working_reports_the_tensorrt_fallback(tiny_path, monkeypatch, tmp_path):
    _claim_providers(monkeypatch, [TRT, CUDA, CPU], [CUDA, CPU])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        session = OnnxSession(tiny_path, providers=("tensorrt", "cuda"), trt_cache_dir=str(tmp_path / "trt"))
    assert session.on_gpu
    assert session.fallback.startswith("TensorrtExecutionProvider is in this onnxruntime build but could not start")
    assert (tmp_path / "trt").is_dir()  # the engine cache directory is made for TensorRT


class _RecordingBinding:
    """Stands in for onnxruntime's IOBinding on a GPU session: records what was bound where."""

    def __init__(self, outputs):
        self.calls, self._outputs = [], outputs

    def bind_cpu_input(self, name, array):
        self.calls.append(("input", name, array.flags["C_CONTIGUOUS"]))

    def bind_ortvalue_input(self, name, value):
        self.calls.append(("ortvalue", name))

    def bind_output(self, name, device, device_id):
        self.calls.append(("output", name, device, device_id))

    def synchronize_inputs(self):
        self.calls.append(("sync-in",))

    def synchronize_outputs(self):
        self.calls.append(("sync-out",))

    def copy_outputs_to_cpu(self):
        return self._outputs


def test_session_on_gpu_binds_outputs_on_its_cuda_device(tiny_path, monkeypatch):
    _claim_providers(monkeypatch, [CUDA, CPU], [CUDA, CPU])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        session = OnnxSession(tiny_path, providers=("cuda", "cpu"), device_id=2)
    assert session.on_gpu and session.fallback is None
    assert session.io_binding is True  # default on a GPU
    assert session.describe()["device_id"] == 2
    logits = np.zeros((3, 4), np.float32)
    binding = _RecordingBinding([logits])
    ran = []
    monkeypatch.setattr(session, "_session", type("FakeGpuSession", (), {
        "io_binding": lambda self: binding, "run_with_iobinding": lambda self, b: ran.append(b)})())
    result = session.run({"input": np.asfortranarray(_batch(3))})
    assert result["logits"] is logits
    assert ran == [binding]
    assert binding.calls == [("input", "input", True), ("output", "logits", "cuda", 2), ("sync-in",), ("sync-out",)]


def test_ortvalue_inputs_are_bound_without_a_copy_and_outputs_can_stay_on_the_device(tiny_path):
    session = OnnxSession(tiny_path, providers=("cpu",), io_binding=True)
    x = _batch(3, seed=5)
    on_device = session.run_on_device({"input": ort.OrtValue.ortvalue_from_numpy(x)})
    assert isinstance(on_device["logits"], ort.OrtValue)
    np.testing.assert_allclose(on_device["logits"].numpy(), tiny_logits(x), rtol=1e-4, atol=1e-4)
    chained = session.run({"input": ort.OrtValue.ortvalue_from_numpy(x)})
    np.testing.assert_allclose(chained["logits"], tiny_logits(x), rtol=1e-4, atol=1e-4)


def test_gpu_settings_come_from_the_model_config(tmp_path):
    directory = write_tiny_repository(tmp_path, "tiny", "1")
    cfg = yaml.safe_load((directory / "config.yaml").read_text())
    cfg["runtime"].update(device_id=1, io_binding=True, inter_op_threads=1,
                          tensorrt={"cache_dir": "trt-engines", "fp16": True})
    (directory / "config.yaml").write_text(yaml.safe_dump(cfg))
    config = ModelRepository(tmp_path).config("tiny")
    assert config.device_id == 1
    assert config.trt_cache_dir == str(directory / "trt-engines")
    assert config.trt_fp16 is True
    assert config.io_binding is True
    assert config.inter_op_threads == 1
    model = ModelRepository(tmp_path).load("tiny", providers=("cpu",))
    assert model.session.io_binding is True


# ------------------------------------------------------------------------------ memory pattern
def _conv_stack(path):
    """Four 3x3 convolutions over 96x96 images: ~9 MB of activations per image in flight, so a
    batch's plan is tens of MB of ONNX Runtime's arena."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)
    nodes, weights, prev = [], [], "x"
    for i in range(4):
        weights.append(numpy_helper.from_array(rng.normal(size=(16, 16 if i else 3, 3, 3)).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        prev = f"r{i}"
    nodes.append(helper.make_node("ReduceMean", [prev], ["y"], axes=[2, 3], keepdims=0))
    graph = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 96, 96])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])], weights)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _arena_growth_mb(session: OnnxSession) -> float:
    """malloc's live bytes after batches of every size in a shuffled order, against after a warm-up
    with the largest batch (what a stage does before it serves)."""
    from streams.memory import malloc_stats

    images = lambda n: {"x": np.zeros((n, 3, 96, 96), np.float32)}  # noqa: E731
    session.run(images(16))
    before = malloc_stats()["allocated"]
    sizes = list(range(1, 17)) * 4
    np.random.default_rng(0).shuffle(sizes)
    for n in sizes:
        session.run(images(n))
    return (malloc_stats()["allocated"] - before) / 2**20


def test_new_batch_sizes_after_warm_up_do_not_grow_the_arena(tmp_path):
    path = _conv_stack(tmp_path / "convs.onnx")
    with_plans = OnnxSession(path, providers=("cpu",), intra_op_threads=1, memory_pattern=True)
    assert with_plans._session.get_session_options().enable_mem_pattern
    grown = _arena_growth_mb(with_plans)
    assert grown > 16  # the oracle: ONNX Runtime's per-shape plans extend the arena here (33 MB measured)
    default = OnnxSession(path, providers=("cpu",), intra_op_threads=1)
    assert not default._session.get_session_options().enable_mem_pattern
    assert _arena_growth_mb(default) < 8  # 0 measured; a margin for what other threads of this process allocate


def test_model_config_sets_the_memory_pattern(tiny_repo):
    cfg_path = tiny_repo / "tiny" / "1" / "config.yaml"
    assert ModelRepository(tiny_repo).config("tiny").memory_pattern is False
    raw = yaml.safe_load(cfg_path.read_text())
    raw.setdefault("runtime", {})["memory_pattern"] = True
    cfg_path.write_text(yaml.safe_dump(raw))
    loaded = ModelRepository(tiny_repo).load("tiny", providers=("cpu",))
    assert loaded.session._session.get_session_options().enable_mem_pattern
