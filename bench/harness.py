"""What the benchmarks share: a worker as a child process, its /metrics, and what /proc says about it.

Each bench starts `python -m streams.cli worker` the way an operator would (settings in the
environment, this checkout's code: cwd and PYTHONPATH are the repository root, so a separate
worktree runs its own code, not the venv's editable install).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from streams.config import Settings

ROOT = Path(__file__).resolve().parent.parent


# What `--allocator` preloads into a worker (Debian/Ubuntu package libjemalloc2; the Docker images do the same)
PRELOAD = {"glibc": "", "jemalloc": "libjemalloc.so.2"}


def worker_env(settings: Settings, allocator: str = "glibc") -> dict[str, str]:
    # always set: an LD_PRELOAD inherited from the shell would otherwise override `glibc`
    return {**os.environ, **settings.to_env(), "PYTHONPATH": str(ROOT), "LD_PRELOAD": PRELOAD[allocator]}


class Worker:
    """`inferstream worker` as a child process, logging to `log` (`append`: a restart keeps the history)."""

    def __init__(self, settings: Settings, log: Path, append: bool = False, allocator: str = "glibc") -> None:
        self.settings = settings
        self.log_path = log
        self.log = log.open("ab" if append else "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker"], cwd=ROOT,
                                     env=worker_env(settings, allocator), stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def metrics(self) -> dict[str, float]:
        """Consumer lag (summed over partitions) and the highest degradation rung, from /metrics."""
        out: dict[str, float] = {}
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.settings.web_port}/metrics", timeout=2) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith("inferstream_consumer_lag_records{"):
                        out["lag"] = out.get("lag", 0.0) + float(line.split()[-1])
                    elif line.startswith("inferstream_degradation_level{"):
                        out["rung"] = max(out.get("rung", 0.0), float(line.split()[-1]))
        except OSError:
            pass
        return out

    def debug_state(self, tasks: bool = False) -> dict | None:
        """The worker's /debug/state (None while it does not answer)."""
        return self._get_json(f"/debug/state?tasks={int(tasks)}")

    def debug_memory(self, objects: bool = False) -> dict | None:
        """The worker's /debug/memory (None while it does not answer)."""
        return self._get_json(f"/debug/memory?objects={int(objects)}")

    def _get_json(self, path: str) -> dict | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.settings.web_port}{path}", timeout=10) as r:
                return json.loads(r.read())
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, nothing more is committed."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self.log.close()


def imported_from(settings: Settings, module: str = "streams") -> str:
    """Where a worker started like Worker imports `module` from (proves which checkout runs)."""
    return subprocess.run([sys.executable, "-c", f"import {module}; print({module}.__file__)"], cwd=ROOT,
                          env=worker_env(settings), capture_output=True, text=True, check=True).stdout.strip()


# --------------------------------------------------------------------------------------------- /proc
def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc), or None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


GLIBC_HEAP_ALIGN = 64 * 2**20  # glibc maps each thread arena at a multiple of HEAP_MAX_SIZE (64 MiB on 64-bit)


def resident_by_kind(pid: int) -> dict[str, int] | None:
    """Resident bytes of a process by where they live (/proc/<pid>/smaps): `main_heap` (brk: glibc's
    main arena), `thread_arenas` (anonymous mappings that start on a 64 MiB boundary: glibc's
    per-thread arenas), `other_anonymous` (mmap'd chunks above the mmap threshold, ONNX Runtime's
    arena, Python's object arenas, thread stacks) and `files` (code, mapped model files). None when
    the process is gone. Where a worker's growth sits says what could cure it."""
    kinds = dict.fromkeys(("main_heap", "thread_arenas", "other_anonymous", "files"), 0)
    kind = None
    try:
        with open(f"/proc/{pid}/smaps") as smaps:
            for line in smaps:
                head = line.split(maxsplit=5)
                if "-" in head[0] and len(head) >= 5:  # a mapping's header: range perms offset dev inode [path]
                    start = int(head[0].split("-")[0], 16)
                    path = head[5].strip() if len(head) > 5 else ""
                    kind = ("main_heap" if path == "[heap]" else "files" if path.startswith("/")
                            else "thread_arenas" if not path and start % GLIBC_HEAP_ALIGN == 0
                            else "other_anonymous")
                elif head[0] == "Rss:" and kind:
                    kinds[kind] += int(head[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return kinds


# ------------------------------------------------------------------------------------------ outputs
async def collect(settings: Settings, topic: str, stop: threading.Event, out: list[tuple[int, dict]]) -> None:
    """Append (timestamp, parsed value) of every record of `topic`, from the start, until `stop` is set."""
    from aiokafka import TopicPartition

    from streams.kafka import consumer

    kafka = consumer(settings, group_id=None, auto_offset_reset="earliest", enable_auto_commit=False)
    await kafka.start()
    try:
        name = settings.topic(topic)
        while not kafka.partitions_for_topic(name):
            await kafka._client.force_metadata_update()
            await asyncio.sleep(0.2)
        kafka.assign([TopicPartition(name, p) for p in kafka.partitions_for_topic(name)])
        while not stop.is_set():
            for msgs in (await kafka.getmany(timeout_ms=200)).values():
                out.extend((m.timestamp, json.loads(m.value)) for m in msgs)
    finally:
        await kafka.stop()


@contextmanager
def reading(settings: Settings, topic: str) -> Iterator[list[tuple[int, dict]]]:
    """`collect` in a thread of its own for the body of the `with`: the list fills as records arrive."""
    out: list[tuple[int, dict]] = []
    stop = threading.Event()
    reader = threading.Thread(target=lambda: asyncio.run(collect(settings, topic, stop, out)), daemon=True)
    reader.start()
    try:
        yield out
    finally:
        stop.set()
        reader.join(10)


def produced_per_s(records: list[tuple[int, dict]]) -> float | None:
    """Records per second between the first and the last `produced_at_ms` (None for fewer than two)."""
    produced = sorted(v["produced_at_ms"] for _, v in records)
    span = (produced[-1] - produced[0]) / 1000 if len(produced) > 1 else 0
    return (len(produced) - 1) / span if span > 0 else None
