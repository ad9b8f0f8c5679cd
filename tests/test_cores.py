"""The worker's core-sharing rule (streams/cores.py) is applied to the process and its sessions."""

from __future__ import annotations

import sys

import pytest
from tiny_models import write_tiny_repository

from operators.model_repository import ModelRepository
from operators.session import set_intra_op_spinning
from streams.config import Settings
from streams.cores import decode_threads, share_cores, usable_cores


@pytest.fixture
def restore_process_settings():
    interval = sys.getswitchinterval()
    yield
    sys.setswitchinterval(interval)
    set_intra_op_spinning(True)


def _spinning_entry(tmp_path) -> str | None:
    """The session's allow_spinning entry; None where it is not set (ONNX Runtime's default: spin)."""
    write_tiny_repository(tmp_path, "tiny", "1")
    options = ModelRepository(tmp_path).load("tiny@1", providers=("cpu",)).session._session.get_session_options()
    try:
        return options.get_session_config_entry("session.intra_op.allow_spinning")
    except RuntimeError:  # "does not have configuration with key"
        return None


def test_sessions_created_after_share_cores_do_not_spin(tmp_path, restore_process_settings):
    share_cores(Settings())
    assert _spinning_entry(tmp_path) == "0"
    assert sys.getswitchinterval() == pytest.approx(0.0005)


def test_spinning_and_the_gil_interval_can_be_left_as_python_and_ort_have_them(tmp_path, restore_process_settings):
    sys.setswitchinterval(0.005)
    share_cores(Settings().replace(intra_op_spinning=True, gil_switch_interval_ms=0))
    assert _spinning_entry(tmp_path) is None
    assert sys.getswitchinterval() == pytest.approx(0.005)


def test_decode_threads_default_to_one_per_usable_core():
    assert decode_threads(Settings()) == usable_cores()
    assert decode_threads(Settings().replace(decode_threads=3)) == 3
