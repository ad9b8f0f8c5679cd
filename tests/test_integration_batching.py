"""Back-pressure per agent, not per worker (streams/batches.py): an agent that stops taking records
holds only its own partitions; every other agent of the worker keeps consuming, and the stuck one
gets every record of its topic, once and in order, when it moves again."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request

import pytest
from conftest import REPO

from streams.broker import free_port
from streams.kafka import ensure_named_topics, read_to_high_watermark
from kafka_helpers import send_records

pytestmark = pytest.mark.integration


def forwarded(settings, topic: str, expected: int, timeout_s: float) -> list:
    """The records on `topic` once `expected` are there (or what is there after `timeout_s`)."""

    async def read() -> list:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            records = [r async for r in read_to_high_watermark(settings, topic)]
            if len(records) >= expected or asyncio.get_running_loop().time() > deadline:
                return records
            await asyncio.sleep(0.5)

    return asyncio.run(read())


def test_a_stuck_agent_holds_its_own_partitions_and_no_one_elses(settings, tmp_path, run):
    slow, fast = settings.topic("slow"), settings.topic("fast")
    run(ensure_named_topics(settings, [slow, fast, f"{slow}-out", f"{fast}-out"]))
    run(send_records(settings, "slow", [(b"k%d" % (i % 7), b"slow %d" % i, None) for i in range(600)]))
    gate = tmp_path / "gate"
    settings = settings.replace(web_port=free_port())
    env = {**os.environ, **settings.to_env(), "TWO_AGENTS_SLOW": slow, "TWO_AGENTS_FAST": fast, "TWO_AGENTS_GATE": str(gate)}
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen([sys.executable, str(REPO / "tests" / "two_agents_app.py"), "worker"], env=env, cwd=REPO,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        # `slow` is stuck on its first batch; `fast`'s records, sent after all of slow's, still flow
        run(send_records(settings, "fast", [(b"f", b"fast %d" % i, None) for i in range(200)]))
        fast_out = forwarded(settings, f"{fast}-out", 200, timeout_s=60)
        assert sorted(r.value for r in fast_out) == sorted(b"fast %d" % i for i in range(200)), debug_state(settings)
        assert forwarded(settings, f"{slow}-out", 1, timeout_s=0) == []  # still stuck: nothing forwarded
        gate.touch()
        slow_out = forwarded(settings, f"{slow}-out", 600, timeout_s=60)
        assert {r.value for r in slow_out} == {b"slow %d" % i for i in range(600)}
        assert len({r.key for r in slow_out}) == len(slow_out) == 600  # each source offset forwarded once
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:  # a graceful stop waits for the stuck agent's records
            worker.kill()
            worker.wait()
        log.close()


def debug_state(settings) -> str:
    """The worker's /debug/state (what it waits on), for a failure's message."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/debug/state", timeout=5) as r:
            return r.read().decode()
    except OSError as exc:
        return f"no /debug/state: {exc}"
