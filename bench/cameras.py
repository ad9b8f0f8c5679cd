"""Live cameras (issue 15): what one `inferstream cameras` process does on this machine.

Against the embedded broker and GStreamer's RTSP server (tests/rtsp_server.py, run by Debian's
python3; one server process, one mount per camera, each client its own pipeline) serving a
generated H.264 clip: 640x480 at 25 fps, ~1.5 Mbit/s (a typical camera sub-stream), a panning
mosaic of scikit-image photos with sensor-like noise. Every camera is sampled to 5 fps and published
at 640x480 (JPEG quality 85), as `inferstream cameras` does with `fps: 5, max_side: 640`.

1. capacity: for N = 1, 2, 4, 8, ... cameras (a fresh broker, server and ingester per step), a
   measured window per step; per camera frames read/published/dropped, the worst seconds since last
   frame and whether the delay from the camera's clock to the broker grows; CPU of the ingester, the
   RTSP server, the broker and the rest of the machine (from /proc), and the load average. N keeps up
   when every camera publishes >= 95% of 5 fps, nothing is dropped, and no camera's delay grows by
   more than 0.5 s over the window (a reader that falls ever further behind the camera). The
   ingester's CPU is split into its main thread (event loop) and the others (readers).
   gil: with 16 cameras, how often a thread of the ingester holds the GIL (py-spy --gil, when installed).
2. stall: 4 cameras, the broker SIGSTOPped for 60 s then SIGCONTed; the ingester's RSS every second
   before, during and after; drops by reason; the time from SIGCONT to the first acknowledged frame,
   to the first record appended after the resume reaching a consumer, and to the first frame *read*
   after the resume reaching a consumer.
3. reconnect: the RTSP server killed mid-stream (SIGKILL) and restarted after an outage; the time from
   the server being ready to each camera's first frame of its new session reaching a consumer, and the
   gap a consumer sees, with the ingester's default backoff and a fast one; the ingester's RSS and
   thread count after each reconnect.

Writes bench/results/cameras.json (`--parts` runs some parts; the others keep their last figures, and
every capacity run is kept in `capacity_runs`). The machine is shared (2 cores): the load average and
the CPU of everything else are recorded beside every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import av
import cv2
import numpy as np
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from rtsp_server import RtspServer  # noqa: E402

from streams.broker import EmbeddedBroker, free_port  # noqa: E402
from streams.config import Settings  # noqa: E402
from streams.kafka import consumer, ensure_topics  # noqa: E402
from streams.memory import rss_bytes  # noqa: E402
from streams.schemas import FRAMES, decode_headers  # noqa: E402

W, H = 640, 480
CAMERA_FPS = 25  # what the camera sends
SAMPLE_FPS = 5  # what the ingester publishes
CLIP_SECONDS = 150  # longer than any session a part needs (the clip's end would end the session)
KEEP_UP_RATE = 0.95
MAX_DELAY_GROWTH_S = 0.5
SETTLE_S = 5.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
CAMERA = {"fps": SAMPLE_FPS, "max_side": 640, "jpeg_quality": 85}
DEFAULT_BACKOFF = {"backoff_initial_s": 0.5, "backoff_max_s": 30.0}  # CameraConfig's defaults
FAST_BACKOFF = {"backoff_initial_s": 0.2, "backoff_max_s": 1.0}


# --------------------------------------------------------------------------------------------- clip
def make_clip(path: Path, fps: int = CAMERA_FPS, seconds: int = CLIP_SECONDS) -> dict:
    """A camera-like H.264 MP4: a 640x480 window panning over four photos, noise, 2 s GOP, no B-frames."""
    if not path.exists():
        from skimage import data

        tiles = [cv2.resize(p, (W, H)) for p in (data.astronaut(), data.coffee(), data.chelsea(), data.rocket())]
        canvas = np.vstack([np.hstack(tiles[:2]), np.hstack(tiles[2:])]).astype(np.int16)
        rng = np.random.default_rng(0)
        noise = [rng.normal(0, 6, (H, W, 3)).astype(np.int16) for _ in range(7)]  # cycled: generating it costs more than encoding
        partial = path.with_suffix(".partial.mp4")
        with av.open(str(partial), "w") as out:
            stream = out.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
            stream.bit_rate = 1_500_000
            stream.options = {"preset": "veryfast", "g": str(2 * fps), "bf": "0"}
            for i in range(fps * seconds):
                phase = 2 * np.pi * i / (fps * 20)
                x, y = int(320 + 300 * np.sin(phase)), int(240 + 220 * np.sin(2 * phase))
                rgb = np.clip(canvas[y:y + H, x:x + W] + noise[i % len(noise)], 0, 255).astype(np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        partial.rename(path)
    return {"path": str(path), "width": W, "height": H, "fps": fps, "seconds": seconds, "codec": "h264 (libx264 veryfast, "
            "GOP 2 s, no B-frames)", "mbit_per_s": round(path.stat().st_size * 8 / seconds / 1e6, 2)}


# ------------------------------------------------------------------------------------------ /proc
def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads (fields 14 and 15 of /proc/PID/stat)."""
    return cpu_seconds_of(Path(f"/proc/{pid}/stat"))


def machine_cpu() -> tuple[float, float]:
    """(busy, total) seconds over all cores since boot, from /proc/stat."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / CLK_TCK, sum(ticks[:8]) / CLK_TCK


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """{thread id: user + system CPU} of every thread of a process (the main thread's id is the pid)."""
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            threads[int(task.name)] = cpu_seconds_of(task / "stat")
        except (FileNotFoundError, ProcessLookupError):  # the thread ended between listing and reading
            pass
    return threads


def cpu_seconds_of(stat_path: Path) -> float:
    fields = stat_path.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class ThreadMeter:
    """Where a process's CPU went between `start()` and `stop()`: its main thread (the ingester's event
    loop: producer, /metrics) against the other threads (one reader per camera), in % of one core. A
    main thread near 100% is the event loop saturated; a process total stuck near 100% while the machine
    has idle CPU is the GIL."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def start(self) -> None:
        self._t0, self._first = time.monotonic(), thread_cpu_seconds(self.pid)

    def stop(self) -> dict[str, float]:
        elapsed, last = time.monotonic() - self._t0, thread_cpu_seconds(self.pid)
        used = {tid: 100 * (cpu - self._first.get(tid, 0.0)) / elapsed for tid, cpu in last.items()}
        others = [v for tid, v in used.items() if tid != self.pid]
        return {"main_thread": round(used.get(self.pid, 0.0), 1), "other_threads": round(sum(others), 1),
                "busiest_other_thread": round(max(others, default=0.0), 1), "threads": len(used)}


class CpuMeter:
    """CPU of named processes and of the whole machine between `start()` and `stop()`, in % of one core."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def _read(self) -> tuple[float, dict[str, float], tuple[float, float]]:
        return time.monotonic(), {name: cpu_seconds(pid) for name, pid in self.pids.items()}, machine_cpu()

    def start(self) -> None:
        self._first = self._read()

    def stop(self) -> dict[str, float]:
        (t0, p0, (b0, _)), (t1, p1, (b1, _)) = self._first, self._read()
        elapsed = t1 - t0
        used = {name: 100 * (p1[name] - p0[name]) / elapsed for name in self.pids}
        machine = 100 * (b1 - b0) / elapsed
        return {**{k: round(v, 1) for k, v in used.items()}, "machine": round(machine, 1),
                "others": round(machine - sum(used.values()), 1), "cores": os.cpu_count()}


# -------------------------------------------------------------------------------------- processes
class Ingester:
    """`inferstream cameras FILE` as a child process, as an operator runs it; read through its /metrics."""

    def __init__(self, settings: Settings, cameras: list[dict], defaults: dict, workdir: Path) -> None:
        config = workdir / f"cameras-{uuid.uuid4().hex[:6]}.yaml"
        config.write_text(yaml.safe_dump({"defaults": defaults, "cameras": cameras}))
        self.web_port = free_port()
        self.log_path = workdir / "ingester.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "cameras", str(config), "--web-port",
                                      str(self.web_port)], env={**os.environ, **settings.to_env()}, cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready = threading.Event()

        def pump() -> None:
            with open(self.log_path, "a") as log:
                for line in self.proc.stderr:
                    log.write(line)
                    log.flush()
                    if line.startswith("{") and '"web"' in line:
                        ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(60):
            self.stop()
            raise RuntimeError(f"ingester not ready; see {self.log_path}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def metrics(self) -> dict[str, dict[str, float]]:
        """{camera: {sample name[:reason]: value}} from its /metrics (prometheus_client's own parser)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        cameras: dict[str, dict[str, float]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if "camera" in s.labels:
                    name = s.name.removeprefix("inferstream_camera_") + (f":{s.labels['reason']}" if "reason" in s.labels else "")
                    cameras.setdefault(s.labels["camera"], {})[name] = s.value
        return cameras

    def stop(self) -> dict | None:
        """SIGTERM; the final per-camera counts it prints."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        lines = [line for line in (out or "").splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else None


class TopicWatcher:
    """Every record of the frames topic from the beginning, with the wall time it reached this consumer;
    waits are woken by each record that arrives."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.records: list[dict] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._read()), daemon=True)
        self._thread.start()

    async def _read(self) -> None:
        from aiokafka import TopicPartition

        await ensure_topics(self.settings, (FRAMES,))
        name = self.settings.topic(FRAMES)
        kafka = consumer(self.settings, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest")
        await kafka.start()
        try:
            while not kafka.partitions_for_topic(name):
                await kafka._client.force_metadata_update()
            kafka.assign([TopicPartition(name, p) for p in sorted(kafka.partitions_for_topic(name))])
            while not self._stop.is_set():
                batch = await kafka.getmany(timeout_ms=200)
                arrived = time.time()
                rows = []
                for messages in batch.values():
                    for m in messages:
                        h = decode_headers(m.headers)
                        rows.append({"camera": m.key.decode(), "session": h.get("session"), "index": int(h["frame_index"]),
                                     "pts": float(h["pts"]), "ts": m.timestamp / 1000, "arrived": arrived})
                if rows:
                    with self._cond:
                        self.records.extend(rows)
                        self._cond.notify_all()
        finally:
            await kafka.stop()

    def wait_for(self, predicate, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.records), timeout_s)

    def snapshot(self) -> list[dict]:
        with self._cond:
            return list(self.records)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(15)


class Rig:
    """A fresh broker and RTSP server (one mount per camera) for one measurement; stopped on exit."""

    def __init__(self, clip: Path, n_cameras: int, workdir: Path) -> None:
        self.clip, self.n, self.workdir = clip, n_cameras, workdir

    def __enter__(self) -> Rig:
        self.broker = EmbeddedBroker(free_port(), log_path=self.workdir / "broker.log").start()
        self.settings = Settings(broker=self.broker.bootstrap, topic_prefix=f"bench-{uuid.uuid4().hex[:6]}-",
                                 app_id="inferstream-bench-cameras")
        try:
            self.server = RtspServer(free_port(), {f"/cam{i}": self.clip for i in range(self.n)},
                                     self.workdir / "rtsp.log").start()
        except BaseException:
            self.broker.stop()
            raise
        return self

    def cameras(self) -> list[dict]:
        return [{"id": f"cam-{i:02d}", "url": self.server.url(f"/cam{i}")} for i in range(self.n)]

    def __exit__(self, *exc) -> None:
        self.server.kill()
        self.broker.stop()


def wait_until(condition, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)  # polling a counter in another process: there is no event to await
    return condition()


def all_published(ingester: Ingester, n_cameras: int, at_least: float) -> bool:
    m = ingester.metrics()
    return len(m) == n_cameras and all(c.get("frames_published_total", 0) >= at_least for c in m.values())


# --------------------------------------------------------------------------------------- 1 capacity
def capacity_step(clip: Path, n: int, seconds: float, workdir: Path) -> dict:
    with Rig(clip, n, workdir) as rig:
        ingester = Ingester(rig.settings, rig.cameras(), CAMERA, workdir)
        try:
            warm = wait_until(lambda: all_published(ingester, n, 5), 30, 0.5)
            time.sleep(SETTLE_S)  # a session's first second arrives in a burst (the probe's backlog): not steady state
            meter = CpuMeter({"ingester": ingester.pid, "rtsp_server": rig.server.proc.pid,
                              "broker": rig.broker.process.pid, "bench": os.getpid()})
            threads = ThreadMeter(ingester.pid)
            load_before, m0 = loadavg(), ingester.metrics()
            t0 = time.time()
            meter.start()
            threads.start()
            worst_silence: dict[str, float] = {}
            peak_rss, peak_queue = 0, 0.0
            while time.time() - t0 < seconds:
                time.sleep(1.0)  # the sampling period
                for cam, values in ingester.metrics().items():
                    worst_silence[cam] = max(worst_silence.get(cam, 0.0), values["seconds_since_last_frame"])
                    peak_queue = max(peak_queue, values["queue_frames"])
                peak_rss = max(peak_rss, rss_bytes(ingester.pid))
            m1 = ingester.metrics()
            cpu = meter.stop()
            ingester_threads = threads.stop()
            t1 = time.time()
            load_after = loadavg()
        finally:
            final = ingester.stop()
        published_total = sum(c["published"] for c in (final or {}).values())
        watcher = TopicWatcher(rig.settings)
        watcher.wait_for(lambda rs: len(rs) >= published_total, 60)
        records = watcher.snapshot()
        watcher.close()

    elapsed = t1 - t0
    cameras = {}
    for cam in sorted(m1):
        d = {k: m1[cam][k] - m0.get(cam, {}).get(k, 0) for k in m1[cam] if k.endswith("_total") or ":" in k}
        mine = sorted((r for r in records if r["camera"] == cam and t0 <= r["ts"] <= t1), key=lambda r: r["ts"])
        delays = [r["ts"] - r["pts"] for r in mine]  # broker append time minus camera time: constant while keeping up
        growth = (statistics.median(delays[-5:]) - statistics.median(delays[:5])) if len(delays) >= 10 else None
        cameras[cam] = {
            "frames_read_per_s": round(d["frames_read_total"] / elapsed, 2),
            "published_per_s": round(d["frames_published_total"] / elapsed, 2),
            "on_topic_per_s": round(len(mine) / elapsed, 2),
            "dropped": {k.split(":")[1]: int(v) for k, v in d.items() if k.startswith("frames_dropped_total:") and v},
            "reconnects": int(d["reconnects_total"]), "decode_errors": int(d["decode_errors_total"]),
            "worst_seconds_since_last_frame": round(worst_silence.get(cam, float("nan")), 2),
            "delay_growth_s": None if growth is None else round(growth, 3),
        }
    keeps_up = bool(warm) and len(cameras) == n and all(
        c["published_per_s"] >= KEEP_UP_RATE * SAMPLE_FPS and not c["dropped"] and c["reconnects"] == 0
        and c["delay_growth_s"] is not None and c["delay_growth_s"] <= MAX_DELAY_GROWTH_S for c in cameras.values())
    rates = [c["published_per_s"] for c in cameras.values()] or [0.0]
    return {
        "cameras": n, "seconds": round(elapsed, 1), "keeps_up": keeps_up, "warmed_up": bool(warm),
        "published_per_camera_per_s": {"min": min(rates), "median": statistics.median(rates), "max": max(rates)},
        "total_published_per_s": round(sum(rates), 1),
        "worst_delay_growth_s": max((c["delay_growth_s"] or 0.0 for c in cameras.values()), default=None),
        "dropped_total": sum(sum(c["dropped"].values()) for c in cameras.values()),
        "cpu_percent_of_one_core": cpu, "ingester_threads_cpu_percent": ingester_threads,
        "ingester_peak_rss_mb": round(peak_rss / 1e6, 1),
        "peak_queue_frames": peak_queue, "load_average_before": load_before, "load_average_after": load_after,
        "per_camera": cameras,
    }


def capacity(clip: Path, counts: list[int], seconds: float, workdir: Path) -> dict:
    steps = []
    for n in counts:
        step = capacity_step(clip, n, seconds, workdir)
        steps.append(step)
        c = step["cpu_percent_of_one_core"]
        print(f"  {n:3d} cameras: {'keeps up' if step['keeps_up'] else 'BEHIND  '} published/camera "
              f"{step['published_per_camera_per_s']['min']:.2f}-{step['published_per_camera_per_s']['max']:.2f}/s, "
              f"dropped {step['dropped_total']}, delay growth {step['worst_delay_growth_s']} s; CPU% ingester "
              f"{c['ingester']} (main thread {step['ingester_threads_cpu_percent']['main_thread']}), rtsp "
              f"{c['rtsp_server']}, broker {c['broker']}, others {c['others']}; "
              f"load {step['load_average_after'][0]}", flush=True)
        if len(steps) >= 2 and not steps[-1]["keeps_up"] and not steps[-2]["keeps_up"]:
            break  # two steps in a row behind: more cameras will not keep up either
    largest = 0
    for step in steps:  # the largest count below the first that fell behind
        if not step["keeps_up"]:
            break
        largest = step["cameras"]
    # CPU per camera barely depends on what else runs, the count that keeps up does (the machine is shared):
    # the slope of CPU over cameras in the steps that kept up (the intercept is the idle process)
    kept = [st for st in steps if st["keeps_up"]]
    per_camera = {name: round(float(np.polyfit([st["cameras"] for st in kept],
                                               [st["cpu_percent_of_one_core"][name] for st in kept], 1)[0]), 2)
                  for name in ("ingester", "rtsp_server", "broker")} if len(kept) >= 2 else None
    return {"criteria": f"every camera publishes >= {KEEP_UP_RATE:.0%} of {SAMPLE_FPS} fps, no frame dropped, no "
                        f"reconnect, delay (broker append time - camera pts) grows <= {MAX_DELAY_GROWTH_S} s over the window",
            "largest_count_keeping_up": largest, "cpu_percent_of_one_core_per_camera": per_camera,
            "estimate_cameras_if_the_ingester_had_every_core": None if not per_camera else
            int(100 * os.cpu_count() / per_camera["ingester"]),
            "steps": steps}


def gil_share(clip: Path, n: int, workdir: Path, seconds: float = 12.0, rate_hz: int = 100) -> dict:
    """How often one of the ingester's threads holds the GIL with `n` cameras (py-spy `--gil` keeps only
    samples where a thread holds it: their count over all samples taken). Not in the capacity steps:
    sampling 20+ threads costs CPU of its own."""
    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if spy is None:
        return {"skipped": "py-spy is not installed (pip install py-spy)"}
    with Rig(clip, n, workdir) as rig:
        ingester = Ingester(rig.settings, rig.cameras(), CAMERA, workdir)
        try:
            wait_until(lambda: all_published(ingester, n, 5), 30, 0.5)
            time.sleep(SETTLE_S)  # as in the capacity steps
            meter = CpuMeter({"ingester": ingester.pid})
            meter.start()
            raw = workdir / "py-spy-gil.txt"
            done = subprocess.run([spy, "record", "--gil", "--nonblocking", "--format", "raw", "-r", str(rate_hz),
                                   "-d", str(int(seconds)), "-o", str(raw), "--pid", str(ingester.pid)],
                                  capture_output=True, text=True)
            cpu = meter.stop()
        finally:
            ingester.stop()
    if done.returncode or not raw.exists():
        return {"skipped": f"py-spy failed: {done.stderr.strip()[-300:]}"}
    held = sum(int(line.rsplit(" ", 1)[1]) for line in raw.read_text().splitlines() if line.strip())
    return {"cameras": n, "seconds": seconds, "rate_hz": rate_hz, "gil_held_share": round(held / (rate_hz * seconds), 3),
            "cpu_percent_of_one_core": cpu, "load_average": loadavg()}


# ------------------------------------------------------------------------------------------ 2 stall
def stall(clip: Path, n: int, stall_s: float, workdir: Path, before_s: float = 20.0, after_s: float = 40.0) -> dict:
    with Rig(clip, n, workdir) as rig:
        watcher = TopicWatcher(rig.settings)
        ingester = Ingester(rig.settings, rig.cameras(), CAMERA, workdir)
        timeline: list[dict] = []
        try:
            wait_until(lambda: all_published(ingester, n, 5), 30, 0.5)
            started = time.time()

            def sample(phase: str) -> dict:
                m = ingester.metrics()
                row = {"t": round(time.time() - started, 2), "phase": phase, "rss_mb": round(rss_bytes(ingester.pid) / 1e6, 1),
                       "published": sum(c["frames_published_total"] for c in m.values()),
                       "read": sum(c["frames_read_total"] for c in m.values()),
                       "queue_frames": sum(c["queue_frames"] for c in m.values()),
                       "queue_bytes": sum(c["queue_bytes"] for c in m.values()),
                       "reconnects": sum(c["reconnects_total"] for c in m.values()),
                       "dropped": {r: sum(c.get(f"frames_dropped_total:{r}", 0) for c in m.values())
                                   for r in ("queue_full", "send_failed", "oversized")}}
                timeline.append(row)
                return row

            def sample_for(phase: str, seconds: float) -> None:
                end = time.time() + seconds
                while time.time() < end:
                    sample(phase)
                    time.sleep(1.0)  # the sampling period

            meter = CpuMeter({"ingester": ingester.pid, "rtsp_server": rig.server.proc.pid, "broker": rig.broker.process.pid})
            meter.start()
            sample_for("before", before_s)
            at_stop = sample("before")
            load_at_stop = loadavg()
            os.kill(rig.broker.process.pid, signal.SIGSTOP)
            stopped_at = time.time()
            try:
                sample_for("stalled", stall_s)
                at_cont = sample("stalled")
                read_by_camera = {cam: c["frames_read_total"] for cam, c in ingester.metrics().items()}
            finally:
                os.kill(rig.broker.process.pid, signal.SIGCONT)
            resumed_at = time.time()
            acked = wait_until(lambda: sample("resumed")["published"] > at_cont["published"], 60)
            first_ack_s = time.time() - resumed_at if acked else None
            sample_for("after", after_s)
            cpu = meter.stop()
            # a frame read after SIGCONT has a frame_index at least the camera's frames-read count at SIGCONT
            # (indexes count decoded frames from 0 across sessions)
            watcher.wait_for(lambda rs: any(r["ts"] >= resumed_at for r in rs), 30)
            records = watcher.snapshot()
        finally:
            final = ingester.stop()
            watcher.close()
    first_appended = min((r["arrived"] for r in records if r["ts"] >= resumed_at), default=None)
    first_read = min((r["arrived"] for r in records if r["index"] >= read_by_camera.get(r["camera"], 1e18)), default=None)
    before = [r["rss_mb"] for r in timeline if r["phase"] == "before"]
    during = [r["rss_mb"] for r in timeline if r["phase"] == "stalled"]
    after = [r["rss_mb"] for r in timeline if r["phase"] == "after"]
    sent_during = at_cont["published"] - at_stop["published"]
    return {
        "cameras": n, "stall_s": round(resumed_at - stopped_at, 1), "queue_frames_per_camera": 8,
        "rss_mb": {"before_median": statistics.median(before), "before_max": max(before), "stalled_peak": max(during),
                   "stalled_last": during[-1], "after_median": statistics.median(after), "after_max": max(after)},
        "published_during_stall": sent_during,
        "dropped_during_stall": {r: at_cont["dropped"][r] - at_stop["dropped"][r] for r in at_cont["dropped"]},
        "dropped_total_at_end": timeline[-1]["dropped"],
        "read_during_stall": at_cont["read"] - at_stop["read"],
        "peak_queue_frames_all_cameras": max(r["queue_frames"] for r in timeline),
        "peak_queue_bytes_all_cameras": max(r["queue_bytes"] for r in timeline),
        "reconnects": timeline[-1]["reconnects"],
        "after_sigcont_s": {"first_acknowledged": None if first_ack_s is None else round(first_ack_s, 2),
                            "first_record_appended_after_resume_at_consumer":
                                None if first_appended is None else round(first_appended - resumed_at, 2),
                            "first_frame_read_after_resume_at_consumer":
                                None if first_read is None else round(first_read - resumed_at, 2)},
        "published_per_s_after": round((timeline[-1]["published"] - at_cont["published"]) / (timeline[-1]["t"] - at_cont["t"]), 2),
        "cpu_percent_of_one_core": cpu, "load_average_at_stall": load_at_stop, "load_average_after": loadavg(),
        "final": final, "timeline": timeline,
    }


# -------------------------------------------------------------------------------------- 3 reconnect
def reconnect(clip: Path, n: int, outages: list[float], trials: int, workdir: Path) -> dict:
    runs = []
    opening = session_open_times(clip, workdir)
    for name, backoff in (("default", DEFAULT_BACKOFF), ("fast", FAST_BACKOFF)):
        with Rig(clip, n, workdir) as rig:
            watcher = TopicWatcher(rig.settings)
            ingester = Ingester(rig.settings, rig.cameras(), {**CAMERA, **backoff}, workdir)
            try:
                for outage in outages:
                    for trial in range(trials):
                        runs.append({"backoff": name, **backoff, "outage_s": outage, "trial": trial,
                                     **reconnect_trial(rig, ingester, watcher, n, outage)})
                        r = runs[-1]
                        print(f"  backoff {name}, outage {outage:g} s: reconnect after ready "
                              f"{r['first_frame_after_ready_s']} s, gap {r['gap_s']} s, ingester RSS {r['ingester_rss_mb']} MB, "
                              f"{r['ingester_threads']} threads; load {r['load_average'][0]}", flush=True)
            finally:
                ingester.stop()
                watcher.close()
    summary = {}
    for run in runs:
        key = f"{run['backoff']}, outage {run['outage_s']:g} s"
        summary.setdefault(key, {"after_ready_s": [], "gap_s": []})
        summary[key]["after_ready_s"] += run["first_frame_after_ready_s"]
        summary[key]["gap_s"] += run["gap_s"]
    for key, v in summary.items():
        ready = [x for x in v["after_ready_s"] if x is not None]
        gaps = [x for x in v["gap_s"] if x is not None]
        summary[key] = {"samples": len(v["after_ready_s"]), "reconnected": len(ready),
                        "after_ready_s": {"median": round(statistics.median(ready), 2), "max": round(max(ready), 2)} if ready else None,
                        "gap_s": {"median": round(statistics.median(gaps), 2), "max": round(max(gaps), 2)} if gaps else None}
    rss = [run["ingester_rss_mb"] for run in runs]
    threads = [run["ingester_threads"] for run in runs]
    return {"cameras_per_trial": n, "backoffs": {"default": DEFAULT_BACKOFF, "fast": FAST_BACKOFF},
            "ingester_rss_mb_after_each_reconnect": {"min": min(rss), "max": max(rss), "first": rss[0], "last": rss[-1]},
            "ingester_threads_after_each_reconnect": {"min": min(threads), "max": max(threads)},
            "read_timeout_s": 10.0, "session_open": opening, "summary": summary, "trials": runs}


def session_open_times(clip: Path, workdir: Path, tries: int = 4) -> list[dict]:
    """What a reconnect costs besides the backoff: opening an RTSP session (handshake and FFmpeg's
    probe) and its first sampled frame, with the ingester's source options."""
    from operators.video import open_source, read_frames
    from streams.cameras import CameraConfig

    options = CameraConfig(id="probe", url="-", **CAMERA).source_options()
    times = []
    with RtspServer(free_port(), {"/cam": clip}, workdir / "rtsp-open.log") as server:
        for _ in range(tries):
            started = time.monotonic()
            with open_source(server.url("/cam"), options) as container:
                opened = time.monotonic() - started
                next(read_frames(container, fps=SAMPLE_FPS, max_side=CAMERA["max_side"]))
                times.append({"open_s": round(opened, 3), "first_frame_s": round(time.monotonic() - started, 3)})
    return times


def reconnect_trial(rig: Rig, ingester: Ingester, watcher: TopicWatcher, n: int, outage_s: float) -> dict:
    def sessions(rs: list[dict]) -> dict[str, str]:
        latest: dict[str, tuple[float, str]] = {}
        for r in rs:
            if r["camera"] not in latest or r["ts"] > latest[r["camera"]][0]:
                latest[r["camera"]] = (r["ts"], r["session"])
        return {cam: s for cam, (_, s) in latest.items()}

    def streaming(rs: list[dict]) -> bool:  # every camera has 5+ frames of its current session on the topic
        current = sessions(rs)
        return len(current) == n and all(sum(1 for r in rs if r["session"] == s) >= 5 for s in current.values())

    watcher.wait_for(streaming, 60)
    old = sessions(watcher.snapshot())
    rig.server.kill()
    killed_at = time.time()
    time.sleep(outage_s)  # the outage itself: a duration, not a synchronisation
    rig.server.start()
    ready_at = time.time()
    load = loadavg()
    watcher.wait_for(lambda rs: {r["camera"] for r in rs if r["ts"] > killed_at and r["session"] != old.get(r["camera"])}
                     >= set(old), outage_s + 90)
    records = watcher.snapshot()
    after_ready, gaps = [], []
    for cam, session in sorted(old.items()):
        last_old = max((r for r in records if r["camera"] == cam and r["session"] == session), key=lambda r: r["ts"])
        new = [r for r in records if r["camera"] == cam and r["ts"] > killed_at and r["session"] != session]
        first_new = min(new, key=lambda r: r["ts"]) if new else None
        after_ready.append(round(first_new["arrived"] - ready_at, 2) if first_new else None)
        gaps.append(round(first_new["ts"] - last_old["ts"], 2) if first_new else None)
    return {"outage_measured_s": round(ready_at - killed_at, 2), "first_frame_after_ready_s": after_ready,
            "gap_s": gaps, "load_average": load,  # RSS and threads after each reconnect: a leak per session shows here
            "ingester_rss_mb": round(rss_bytes(ingester.pid) / 1e6, 1),
            "ingester_threads": len(list(Path(f"/proc/{ingester.pid}/task").iterdir()))}


# ------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="capacity,gil,stall,reconnect")
    parser.add_argument("--counts", default="1,2,4,8,12,16,24,32,40,48,64", help="camera counts of the capacity steps")
    parser.add_argument("--seconds", type=float, default=25.0, help="measured window of each capacity step")
    parser.add_argument("--gil-cameras", type=int, default=16)
    parser.add_argument("--stall-cameras", type=int, default=4)
    parser.add_argument("--stall-seconds", type=float, default=60.0)
    parser.add_argument("--reconnect-cameras", type=int, default=2)
    parser.add_argument("--outages", default="1,3,15", help="seconds the RTSP server stays down, per trial")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "inferstream-bench-cameras"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cameras.json"))
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    RtspServer.check()

    print("clip ...", flush=True)
    clip_info = make_clip(workdir / f"clip-{W}x{H}-{CAMERA_FPS}fps-{CLIP_SECONDS}s.mp4")
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}  # parts not run keep their last figures
    results.update({
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine(), "nice": os.nice(0)},
        "clip": clip_info, "camera_config": CAMERA, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    results.setdefault("when_each_part", {}).update(dict.fromkeys(parts, results["when"]))
    if "capacity" in parts:
        print("capacity ...", flush=True)
        results["capacity"] = capacity(Path(clip_info["path"]), [int(c) for c in args.counts.split(",")], args.seconds, workdir)
        results.setdefault("capacity_runs", []).append({  # the machine is shared: every run's outcome beside its load
            "when": results["when"], "largest_count_keeping_up": results["capacity"]["largest_count_keeping_up"],
            "steps": [{k: step[k] for k in ("cameras", "keeps_up", "published_per_camera_per_s", "worst_delay_growth_s",
                                            "cpu_percent_of_one_core", "load_average_after")}
                      for step in results["capacity"]["steps"]]})
        print(f"  largest count keeping up: {results['capacity']['largest_count_keeping_up']}", flush=True)
    if "gil" in parts:
        print(f"GIL share at {args.gil_cameras} cameras ...", flush=True)
        results["gil"] = gil_share(Path(clip_info["path"]), args.gil_cameras, workdir)
        print(f"  {results['gil']}", flush=True)
    if "stall" in parts:
        print(f"stall ({args.stall_seconds:g} s) ...", flush=True)
        s = results["stall"] = stall(Path(clip_info["path"]), args.stall_cameras, args.stall_seconds, workdir)
        print(f"  RSS {s['rss_mb']['before_median']} -> peak {s['rss_mb']['stalled_peak']} -> {s['rss_mb']['after_median']} MB, "
              f"dropped {s['dropped_during_stall']}, after SIGCONT {s['after_sigcont_s']}", flush=True)
    if "reconnect" in parts:
        print("reconnect ...", flush=True)
        results["reconnect"] = reconnect(Path(clip_info["path"]), args.reconnect_cameras,
                                         [float(o) for o in args.outages.split(",")], args.trials, workdir)
        for key, v in results["reconnect"]["summary"].items():
            print(f"  {key}: {v}", flush=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
