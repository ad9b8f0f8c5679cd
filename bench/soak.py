"""The soak: mixed load with faults on a schedule, and books that prove nothing was lost.

The embedded broker, two workers in one consumer group running the default policy (toxicity, pii-ner,
nudenet-320n, efficientnet-lite0) and recommendations, and producers of frames (320x240 JPEG, 8
streams), posts (sample texts, one in 20 with a photo) and events (the catalogue's users and items).

1. Capacity: the pair (`--capacity-workers`, 2) in one group, each kind in turn kept backlogged;
   outputs/s over `--capacity-s`. The load is a fraction of what the system under test serves, not of
   what one worker serves with the machine to itself (session 8: two workers sharing 2 cores, one of
   them killed every 5 minutes, fell 17 minutes behind at 0.7 of that).
2. Load: `--load` (0.7) of that capacity, shared between the kinds by `--shares` (the fractions of
   the machine each kind gets: they sum to 1, so the three together ask for 70% of it).
3. Faults, for `--minutes`: worker B is killed with SIGKILL every `--kill-every-min` and restarted
   one second later (as a supervisor would; worker A is never killed, so its memory is watched over
   the whole run); the broker is frozen (SIGSTOP) for `--pause-s` every `--pause-every-min`, then
   SIGCONT; one record in `--poison-every` is malformed (bench/soak_inputs.py); half-way (between two
   kills) version 2 of efficientnet-lite0 appears in the model repository: a hot swap.
4. Drain: producers stop, the workers run until every input is accounted for (or `--drain-s`).

The books (bench/soak_ledger.py) match every output back to its input by (topic, partition, offset).
Written: bench/results/soak.json and docs/soak.png. Exit status 0: nothing lost and every duplicate
identical apart from timing fields; 1: an input was lost; 2: nothing lost, but a rewrite differed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from aiokafka import TopicPartition

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import PRELOAD, Worker, cpu_seconds, imported_from, open_fds, resident_by_kind  # noqa: E402
from bench.models_throughput import sample_texts  # noqa: E402
from bench.soak_inputs import Inputs, record_id  # noqa: E402
from bench.soak_ledger import Ledger  # noqa: E402
from bench.soak_report import plot, summary  # noqa: E402
from streams.broker import EmbeddedBroker, free_port  # noqa: E402
from streams.config import Settings  # noqa: E402
from streams.kafka import consumer, ensure_topics, producer  # noqa: E402
from streams.memory import allocator, rss_bytes  # noqa: E402
from streams.schemas import DEAD_LETTERS, EVENTS, FRAMES, POSTS, RECOMMENDATIONS, USER_STATE, VERDICTS  # noqa: E402

KINDS = {"frames": FRAMES, "posts": POSTS, "events": EVENTS}
SWAPPED_MODEL = "efficientnet-lite0"
MODELS = ("toxicity", "pii-ner", "nudenet-320n", "efficientnet-lite0", "cf-retrieval", "deepfm-ctr")
# In flight per kind while measuring capacity: enough to keep the worker busy, little left to drain.
CAPACITY_BACKLOG = {"frames": 600, "posts": 3000, "events": 6000}


def now_ms() -> int:
    return int(time.time() * 1000)


def model_repository(work: Path) -> Path:
    """A private repository of the built models (symlinks), so the hot swap touches nobody else's."""
    repo = work / "models"
    if repo.exists():
        shutil.rmtree(repo)
    for name in MODELS:
        (repo / name).mkdir(parents=True)
        (repo / name / "1").symlink_to((ROOT / "models" / name / "1").resolve())
    return repo


def add_version(repo: Path, name: str, version: str) -> None:
    """Version `version` of `name` with version 1's files, made aside and renamed into place."""
    staging = repo / ".staging" / name / version
    staging.mkdir(parents=True)
    for f in (repo / name / "1").iterdir():
        (staging / f.name).symlink_to(f.resolve())
    staging.rename(repo / name / version)


class Run:
    """One topic prefix: a producer, a collector feeding the ledger, and supervised worker slots."""

    def __init__(self, settings: Settings, inputs: Inputs, work: Path, tag: str, allocator: str = "glibc") -> None:
        self.settings = settings
        self.allocator = allocator
        self.inputs = inputs
        self.work = work
        self.tag = tag
        self.topics = {kind: settings.topic(name) for kind, name in KINDS.items()}
        self.ledger = Ledger({t: k for k, t in self.topics.items()}, now_ms())
        self.ledger.poison_names = inputs.names()
        self.seq = dict.fromkeys(KINDS, 0)
        self.slots: dict[str, Worker | None] = {}
        self.killed: set[int] = set()
        self.events: list[dict[str, Any]] = []  # faults, exits and restarts, in order
        self.supervise = True
        self.kafka = None  # made inside the run's event loop (aiokafka binds to it)
        self.pending: set[asyncio.Future] = set()

    def t(self) -> float:
        return round((now_ms() - self.ledger.started_ms) / 1000, 1)

    def note(self, what: str, **details: Any) -> None:
        self.events.append({"t_s": self.t(), "what": what, **details})
        print(f"[{self.tag} {self.t():7.1f}s] {what} {json.dumps(details) if details else ''}", flush=True)

    # -------------------------------------------------------------------------------- workers
    def start_worker(self, slot: str) -> Worker:
        worker = Worker(self.settings.replace(web_port=free_port()), self.work / f"{self.tag}-worker-{slot}.log",
                        append=True, allocator=self.allocator)
        self.slots[slot] = worker
        self.note("start", slot=slot, pid=worker.pid)
        return worker

    def kill(self, slot: str) -> None:
        worker = self.slots.get(slot)
        if worker is not None and worker.alive():
            self.killed.add(worker.pid)
            self.note("kill -9", slot=slot, pid=worker.pid)
            worker.kill()

    async def supervisor(self) -> None:
        """Restart any worker that is gone, one second later (as systemd's Restart=always would)."""
        while self.supervise:
            for slot, worker in list(self.slots.items()):
                if worker is not None and not worker.alive():
                    code = worker.proc.returncode
                    if worker.pid not in self.killed:
                        self.note("exited", slot=slot, pid=worker.pid, code=code)
                    worker.log.close()
                    await asyncio.sleep(1)
                    self.start_worker(slot)
            await asyncio.sleep(0.5)

    # -------------------------------------------------------------------------------- producing
    async def send(self, kind: str) -> None:
        seq = self.seq[kind]
        self.seq[kind] += 1
        (key, value, headers), variant = self.inputs.make(kind, seq)
        topic = self.topics[kind]
        future = await self.kafka.send(topic, value, key=key, headers=headers)

        def sent(f: asyncio.Future) -> None:
            self.pending.discard(f)
            if f.cancelled() or f.exception() is not None:
                self.ledger.send_failed[kind] += 1
            else:
                md = f.result()
                self.ledger.sent(topic, md.partition, md.offset, seq, variant, now_ms(), key)

        self.pending.add(future)
        future.add_done_callback(sent)

    async def paced(self, kind: str, rate: float, until: float) -> None:
        """`rate` records/s of `kind` until the monotonic time `until` (catching up after a stall)."""
        started, done = time.monotonic(), 0
        while (now := time.monotonic()) < until:
            due = int((now - started) * rate)
            while done < due:
                await self.send(kind)
                done += 1
            await asyncio.sleep(0.02)

    async def backlogged(self, kind: str, backlog: int, seconds: float) -> float:
        """Keep `backlog` records of `kind` unanswered for `seconds`; its outputs/s meanwhile."""
        def answered() -> int:
            return self.ledger.answered[kind]

        async def top_up() -> None:
            while self.seq[kind] - answered() < backlog:
                await self.send(kind)

        started = time.monotonic()
        while time.monotonic() - started < 3 or answered() == 0:  # group join, model warm-up: not capacity
            await top_up()
            await asyncio.sleep(0.05)
        t0, n0 = time.monotonic(), answered()
        while time.monotonic() - t0 < seconds:
            await top_up()
            await asyncio.sleep(0.05)
        rate = (answered() - n0) / (time.monotonic() - t0)
        while answered() < self.seq[kind] and time.monotonic() - t0 < seconds + 120:  # drained before the next kind
            await asyncio.sleep(0.2)
        return rate

    # -------------------------------------------------------------------------------- collecting
    async def collect(self, stop: asyncio.Event) -> None:
        from aiokafka import TopicPartition

        names = {self.settings.topic(t): t for t in (VERDICTS, DEAD_LETTERS, USER_STATE, RECOMMENDATIONS)}
        kafka = consumer(self.settings, group_id=None, auto_offset_reset="earliest", enable_auto_commit=False)
        await kafka.start()
        try:
            while not all(kafka.partitions_for_topic(n) for n in names):
                await kafka._client.force_metadata_update()
                await asyncio.sleep(0.2)
            kafka.assign([TopicPartition(n, p) for n in names for p in kafka.partitions_for_topic(n)])
            while not stop.is_set():
                for tp, msgs in (await kafka.getmany(timeout_ms=200, max_records=2000)).items():
                    kind = names[tp.topic]
                    for m in msgs:
                        self.record(kind, tp.partition, m.timestamp, orjson.loads(m.value))
        finally:
            await kafka.stop()

    def record(self, topic: str, partition: int, timestamp_ms: int, value: dict) -> None:
        if topic == VERDICTS:
            self.ledger.verdict(value, record_id)
        elif topic == DEAD_LETTERS:
            self.ledger.dead_letter(value)
        elif topic == USER_STATE:
            self.ledger.snapshot(self.topics["events"], partition, value, timestamp_ms)
        else:
            self.ledger.recommendation(value)


# ------------------------------------------------------------------------------------------ phases
async def settled(run: Run, timeout_s: float = 180) -> None:
    """Until every worker of the run holds a partition of every input topic: the group has joined
    and balanced, so no rebalance falls inside a measurement."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = [await asyncio.to_thread(w.debug_state, False) for w in run.slots.values() if w is not None]
        held = [{p["topic"] for p in ((s or {}).get("consumer") or {}).get("partitions", [])} for s in states]
        if held and all(set(run.topics.values()) <= topics for topics in held):
            run.note("group settled", workers=len(held))
            return
        await asyncio.sleep(1)
    raise RuntimeError(f"the capacity workers did not share the input partitions in {timeout_s:.0f} s")


async def measure_capacity(run: Run, seconds: float, workers: int) -> dict[str, float]:
    """Outputs/s of `workers` workers in one group (the soak's pair by default), each kind in turn."""
    stop = asyncio.Event()
    run.kafka = producer(run.settings)
    await run.kafka.start()
    collector = asyncio.create_task(run.collect(stop))
    for n in range(workers):
        run.start_worker(f"capacity-{n}")
    try:
        await settled(run)
        capacity = {}
        for kind in KINDS:
            capacity[kind] = await run.backlogged(kind, CAPACITY_BACKLOG[kind], seconds)
            run.note("capacity", kind=kind, per_s=round(capacity[kind], 1))
        return capacity
    finally:
        for worker in run.slots.values():
            worker.stop()
        await run.kafka.stop()
        stop.set()
        await collector


def schedule(args: argparse.Namespace) -> list[tuple[float, str]]:
    """(seconds from the start of the load, fault): kills of worker B, broker pauses, one hot swap;
    none in the last minute, so the end of the run is the drain, not a fault."""
    end = args.minutes * 60 - 60
    kills = [t for t in range(int(args.kill_every_min * 30), int(end), int(args.kill_every_min * 60))]
    first_pause = min(args.pause_every_min * 0.6, args.minutes * 0.4) * 60
    pauses = [t for t in range(int(first_pause), int(end), int(args.pause_every_min * 60))]
    half = args.minutes * 30
    # the swap lies between two kills: a redelivery after a kill must not straddle it (its rewrite would
    # name the other version)
    gaps = [(a + b) / 2 for a, b in zip([0, *kills], [*kills, end], strict=True)]
    # ... and away from a broker pause (the faults run one after the other)
    calm = [g for g in gaps if all(abs(g - p) > 60 for p in pauses)] or gaps
    swap = min(calm, key=lambda g: abs(g - half))
    faults = [(float(t), "kill") for t in kills] + [(float(t), "pause") for t in pauses] + [(swap, "swap")]
    return sorted(faults)


async def faults(run: Run, broker: EmbeddedBroker, repo: Path, plan: list[tuple[float, str]], t0: float,
                 pause_s: float) -> None:
    for at, what in plan:
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        if what == "kill":
            run.kill("B")
        elif what == "pause":
            run.note("broker SIGSTOP", seconds=pause_s)
            os.kill(broker.process.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(pause_s)
            finally:
                os.kill(broker.process.pid, signal.SIGCONT)
            run.note("broker SIGCONT")
        else:
            add_version(repo, SWAPPED_MODEL, "2")
            run.note("hot swap", model=SWAPPED_MODEL, version="2")


async def sampler(run: Run, broker: EmbeddedBroker, samples: list[dict], stop: asyncio.Event) -> None:
    allocators: dict[int, str] = {}  # a process's malloc never changes: read once per pid
    while not stop.is_set():
        row: dict[str, Any] = {"t_s": run.t(), "load_average": os.getloadavg(), "unaccounted": run.ledger.unaccounted(),
                               "broker_rss": rss_bytes(broker.process.pid),
                               # who else takes the 2 cores: latency rose through the jemalloc hour while the
                               # workers' CPU stayed flat, and the broker's and this process's were not sampled
                               "broker_cpu_s": cpu_seconds(broker.process.pid), "soak_cpu_s": cpu_seconds(os.getpid())}
        for slot, worker in run.slots.items():
            if worker is not None and worker.alive():
                row[slot] = {"pid": worker.pid, "rss": rss_bytes(worker.pid), "fds": open_fds(worker.pid),
                             "cpu_s": cpu_seconds(worker.pid)}
                if len(samples) % 6 == 0:  # where the memory sits, every 30 s (smaps takes a few ms to read)
                    row[slot]["resident"] = resident_by_kind(worker.pid)
                    if worker.pid not in allocators:
                        allocators[worker.pid] = allocator(worker.pid)
                    row[slot]["allocator"] = allocators[worker.pid]  # what runs, not what was asked
                    # what is live (Python's small blocks, malloc's allocated bytes) against RSS: memory the
                    # program keeps, or memory freed but kept by an allocator
                    if (heap := await asyncio.to_thread(worker.debug_memory)) is not None:
                        row[slot]["heap"] = {"python_blocks": heap["python_blocks"], **heap["malloc"]}
        samples.append(row)
        try:
            await asyncio.wait_for(stop.wait(), 5)
        except TimeoutError:
            pass


async def broker_serves(settings: Settings, topic: str, partition: int, offset: int | None) -> dict[str, Any]:
    """What a fresh consumer outside the group gets from the broker at a stalled partition's committed
    offset: records there mean the worker stopped asking (or stopped taking), none mean the broker
    stopped serving."""
    tp = TopicPartition(topic, partition)
    kafka = consumer(settings, enable_auto_commit=False)
    await kafka.start()
    try:
        kafka.assign([tp])
        records: list = []
        for _ in range(3):  # a loaded broker may answer one fetch with nothing (seen at load 12)
            kafka.seek(tp, offset or 0)
            if records := (await kafka.getmany(tp, timeout_ms=5000, max_records=100)).get(tp, []):
                break
        return {"topic": topic, "partition": partition, "from": offset, "records": len(records),
                "first": records[0].offset if records else None, "highwater": kafka.highwater(tp)}
    except Exception as exc:  # noqa: BLE001 - a probe reports, never ends the soak
        return {"topic": topic, "partition": partition, "from": offset, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        await kafka.stop()


async def stall_watch(run: Run, stop: asyncio.Event, stall_s: float) -> None:
    """A partition a live worker holds with lag whose committed offset has not moved for `stall_s`: the
    worker's whole /debug/state (task stacks included) is saved beside the logs and noted, once per
    episode, so a stall is explained by what the worker was waiting on at the time."""
    since: dict[tuple[int, str, int], tuple[int | None, float]] = {}  # (pid, topic, partition) -> (committed, moved at)
    reported: set[tuple[int, str, int, int | None]] = set()
    while not stop.is_set():
        for slot, worker in list(run.slots.items()):
            if worker is None or not worker.alive():
                continue
            state = await asyncio.to_thread(worker.debug_state, False)
            consumer = (state or {}).get("consumer")
            if not isinstance(consumer, dict):
                continue
            now = time.monotonic()
            stalled = []
            for p in consumer["partitions"]:
                key = (worker.pid, p["topic"], p["partition"])
                behind = p["highwater"] is not None and p["highwater"] > (p["committed"] or 0)
                if key not in since or since[key][0] != p["committed"] or not behind:
                    since[key] = (p["committed"], now)
                elif now - since[key][1] >= stall_s and (*key, p["committed"]) not in reported:
                    reported.add((*key, p["committed"]))
                    stalled.append(p)
            if stalled:
                full = await asyncio.to_thread(worker.debug_state, True)
                probes = [await broker_serves(run.settings, p["topic"], p["partition"], p["committed"]) for p in stalled]
                path = run.work / f"stall-{slot}-{worker.pid}-{int(run.t())}s.json"
                path.write_text(json.dumps({"consumer": consumer, "full": full, "broker_probe": probes}, indent=1, default=str))
                run.note("stall", slot=slot, pid=worker.pid, seconds=stall_s, state=str(path), broker_probe=probes,
                         partitions=[{k: p[k] for k in ("topic", "partition", "committed", "highwater", "fetching",
                                                        "paused", "held", "position", "read_offset", "prefetched")
                                      if k in p} for p in stalled])
        try:
            await asyncio.wait_for(stop.wait(), 10)
        except TimeoutError:
            pass


async def soak(run: Run, broker: EmbeddedBroker, repo: Path, rates: dict[str, float], args: argparse.Namespace,
               samples: list[dict]) -> None:
    stop = asyncio.Event()
    run.ledger.started_ms = now_ms()
    run.kafka = producer(run.settings)
    await run.kafka.start()
    collector = asyncio.create_task(run.collect(stop))
    sampling = asyncio.create_task(sampler(run, broker, samples, stop))
    watching = asyncio.create_task(stall_watch(run, stop, args.stall_s))
    run.start_worker("A")
    run.start_worker("B")
    supervisor = asyncio.create_task(run.supervisor())
    plan = schedule(args)
    run.note("schedule", faults=plan, rates={k: round(v, 1) for k, v in rates.items()})
    t0 = time.monotonic()
    fault_task = asyncio.create_task(faults(run, broker, repo, plan, t0, args.pause_s))
    try:
        until = t0 + args.minutes * 60
        await asyncio.gather(*(run.paced(kind, rate, until) for kind, rate in rates.items()))
        await asyncio.gather(*list(run.pending), return_exceptions=True)
        run.note("producers done", sent=dict(run.seq), failed=dict(run.ledger.send_failed))
        await fault_task
        # until every input is accounted for, `--drain-s` passes, or nothing moved for `--settle-s`
        deadline, told, last = time.monotonic() + args.drain_s, time.monotonic(), (run.ledger.unaccounted(), time.monotonic())
        while (left := run.ledger.unaccounted()) and time.monotonic() < deadline and time.monotonic() - last[1] < args.settle_s:
            await asyncio.sleep(1)
            if left != last[0]:
                last = (left, time.monotonic())
            if time.monotonic() - told > 30:
                told = time.monotonic()
                run.note("draining", unaccounted=left, load_average=os.getloadavg()[0])
        await asyncio.sleep(5)  # late duplicates, if any, still get compared
        run.note("drained", unaccounted=run.ledger.unaccounted())
    finally:
        fault_task.cancel()
        run.supervise = False
        await supervisor
        for slot, worker in run.slots.items():
            if worker is not None and worker.alive():
                run.note("stop", slot=slot, pid=worker.pid, code=worker.stop())
        await run.kafka.stop()
        stop.set()
        await asyncio.gather(collector, sampling, watching)


def code_state() -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "changed": git("status", "--porcelain", "--untracked-files=no").splitlines()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--load", type=float, default=0.7, help="fraction of the measured capacity")
    parser.add_argument("--shares", default="frames=0.45,posts=0.45,events=0.10")
    parser.add_argument("--rates", default="", help="frames=N,posts=N,events=N per second: skip the capacity phase")
    parser.add_argument("--capacity-s", type=float, default=30)
    parser.add_argument("--capacity-workers", type=int, default=2,
                        help="workers sharing the machine while capacity is measured: 2, the pair under test "
                             "(1 measures one worker alone, which two workers on the same cores do not reach)")
    parser.add_argument("--kill-every-min", type=float, default=3)
    parser.add_argument("--pause-every-min", type=float, default=20)
    parser.add_argument("--pause-s", type=float, default=20)
    parser.add_argument("--poison-every", type=int, default=1000)
    parser.add_argument("--drain-s", type=float, default=600)
    parser.add_argument("--settle-s", type=float, default=120, help="end the drain when nothing moved for this long")
    parser.add_argument("--stall-s", type=float, default=60,
                        help="save a worker's /debug/state when a partition it holds has lag and no commit for this long")
    parser.add_argument("--frame-size", default="320x240")
    parser.add_argument("--allocator", choices=sorted(PRELOAD), default="glibc",
                        help="the workers' malloc: glibc's, or jemalloc preloaded (Debian's libjemalloc2)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak.json"))
    parser.add_argument("--png", default=str(ROOT / "docs" / "soak.png"))
    args = parser.parse_args()

    work = ROOT / ".inferstream" / "soak"
    work.mkdir(parents=True, exist_ok=True)
    repo = model_repository(work)
    policy = work / "policy.yaml"
    shutil.copy(ROOT / "policies" / "default.yaml", policy)
    size = tuple(int(x) for x in args.frame_size.split("x"))
    inputs = Inputs(size, sample_texts(997), args.poison_every)
    stamp = time.strftime("%H%M%S")
    load_start = os.getloadavg()
    samples: list[dict] = []
    with EmbeddedBroker(free_port(), log_path=work / "broker.log") as broker:
        base = Settings.load().replace(broker=broker.bootstrap, model_dir=str(repo), policy=str(policy),
                                       recommendations="on", data_dir=str(work / "data"))
        code_path = imported_from(base)
        print(f"workers import streams from {code_path}", flush=True)
        if args.rates:
            capacity = None
            rates = {k: float(v) for k, v in (p.split("=") for p in args.rates.split(","))}
        else:
            cap_settings = base.replace(topic_prefix=f"soakcap-{stamp}-", app_id=f"soakcap-{stamp}")
            asyncio.run(ensure_topics(cap_settings))
            capacity = asyncio.run(measure_capacity(Run(cap_settings, inputs, work, "capacity", args.allocator), args.capacity_s,
                                                    args.capacity_workers))
            shares = {k: float(v) for k, v in (p.split("=") for p in args.shares.split(","))}
            rates = {k: args.load * shares[k] * capacity[k] for k in KINDS}
        settings = base.replace(topic_prefix=f"soak-{stamp}-", app_id=f"soak-{stamp}")
        asyncio.run(ensure_topics(settings))
        run = Run(settings, inputs, work, "soak", args.allocator)
        asyncio.run(soak(run, broker, repo, rates, args, samples))
    run.ledger.save_event_evidence(work / "events-evidence.npz")
    report = summary(run, samples, inputs.expected_reasons())
    report.update({"benchmark": "soak", "command": " ".join([Path(sys.executable).name, *sys.argv]),
                   "args": vars(args), "capacity_per_s": capacity, "rates_per_s": rates, "code": code_state(),
                   "workers_import": code_path, "frame_size": list(size),
                   "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_start": load_start,
                               "load_average_end": os.getloadavg()},
                   "timeline": run.events, "samples": samples})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    plot(report, Path(args.png))
    print(json.dumps(report["verdict"], indent=1))
    print(f"-> {args.out}, {args.png}")
    return report["verdict"]["exit_status"]


if __name__ == "__main__":
    sys.exit(main())
