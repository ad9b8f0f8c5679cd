"""Shared fixtures. Integration tests run through a real tansu broker started once per session on a
free loopback port; each test gets its own topic prefix and consumer group, so tests never see each
other's records."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from streams.broker import EmbeddedBroker, free_port
from streams.config import Settings

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models, kafka_helpers

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def broker(tmp_path_factory) -> EmbeddedBroker:
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    b = EmbeddedBroker(free_port(), log_path=log).start()
    yield b
    b.stop()


@pytest.fixture
def tiny_repo(tmp_path) -> Path:
    from tiny_models import write_tiny_repository

    root = tmp_path / "models"
    write_tiny_repository(root, "tiny", "1")
    write_tiny_repository(root, "poisoned", "1", poison=True)
    return root


def write_policy(path: Path, checks: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"checks": checks}))
    return str(path)


def image_policy(tmp_path: Path, model: str, labels=("class-0",), above=0.5) -> str:
    """A policy with one image check: `labels` of `model` in its top 3 above `above` are violations."""
    check = {"model": model, "input": "image", "labels": list(labels), "top_k": 3, "above": above}
    return write_policy(tmp_path / f"policy-{model}.yaml", {"objects": check})


@pytest.fixture
def settings(broker, tiny_repo, tmp_path) -> Settings:
    """Settings for one test: unique topics and group, short group timings, the tiny model."""
    tag = uuid.uuid4().hex[:8]
    return Settings(
        broker=broker.bootstrap, topic_prefix=f"t{tag}-", app_id=f"inferstream-test-{tag}", partitions=2,
        session_timeout_s=6, heartbeat_interval_s=2, commit_interval_s=0.5,
        model_dir=str(tiny_repo), policy=image_policy(tmp_path, "tiny"), data_dir=str(tmp_path / "data"), intra_op_threads=1,
    )


class WorkerProcess:
    """`inferstream worker` as a child process, as an operator would run it."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings = settings.replace(web_port=free_port())
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        env = {**os.environ, **self.settings.to_env()}
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker"], env=env, cwd=REPO,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, nothing more is committed."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def start_worker(tmp_path) -> Callable[..., WorkerProcess]:
    started: list[WorkerProcess] = []

    def start(settings: Settings) -> WorkerProcess:
        w = WorkerProcess(settings, tmp_path / f"worker-{len(started)}.log").start()
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


@pytest.fixture
def run():
    """Run a coroutine to completion from a synchronous test."""
    return asyncio.run
