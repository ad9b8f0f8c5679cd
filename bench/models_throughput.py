"""Every default moderation model: raw ONNX Runtime vs the whole pipeline through the broker, one run.

For each model of policies/default.yaml (plus pii-ner when models/pii-ner/1/model.onnx exists):

1. raw: the model's own operator, `run_batch` on items prepared in advance by its `preprocess` (so
   the session run *and* postprocessing - softmax/top-k, YOLO decode + NMS, BIO entity decoding - are
   included; JPEG decoding, resizing/normalising and tokenisation are not), at batch 1 and at the
   model's config `max_batch_size`, items/s over `--seconds`. Also the session alone
   (`model.session.run` on a batch stacked in advance, no postprocessing) at `max_batch_size`.
   Measured before and again after the model's pipeline run; the mean of the two is reported (both
   are kept, with their ratio as `raw_drift_after_vs_before`, because the machine may be shared).
2. pipeline: one embedded broker for the whole run; per model a fresh topic prefix and app id and a
   policy holding only that model's checks (from policies/default.yaml), so the worker runs that model
   alone. N records are produced first (text models: text-only posts, the texts of
   samples/posts.jsonl repeated with an index suffix; image models: 640x480 JPEG frames of
   scikit-image photos), then `python -m streams.cli worker` starts as a subprocess; verdicts/s as
   seen by a consumer, group join and model load excluded. Reported in steady state: the worker
   decodes/tokenises up to `max_in_flight` (1024 by default) records ahead of inference, so before its first
   verdict that work is already done for ~256 records, and its last ~256 verdicts need none; with a
   few hundred frames, first-to-last would leave most JPEG decoding out of the span (measured:
   nudenet-320n 27 frames/s first-to-last on 300 frames vs ~18 raw). The rate is therefore taken
   between verdict 256 and verdict N-256; first-to-last is kept too (`verdicts_per_s_first_to_last`).
3. ratio pipeline / raw at the same batch size (raw `run_batch` at `max_batch_size`; the worker's
   micro-batcher may form smaller batches, reported from its /metrics as `pipeline_mean_batch`).

Also recorded: CPU ms per item (raw: this process, ONNX Runtime's threads included; pipeline: worker +
broker over the steady window, from /proc), less sensitive to other load than items/s; and the worker's
own histograms (mean batch size, time inside run_batch) from its /metrics.

Writes bench/results/models_throughput.json. The machine may be shared and noisy (load averages are
recorded): compare ratios measured in the same run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.frames_throughput import publish, sample_frames  # noqa: E402
from bench.harness import Worker, cpu_seconds  # noqa: E402
from operators.images import decode_image, encode_image  # noqa: E402
from operators.model_repository import LoadedModel, ModelConfigError, ModelRepository  # noqa: E402
from operators.tasks import get as task_of  # noqa: E402
from streams.broker import EmbeddedBroker, free_port  # noqa: E402
from streams.config import Settings  # noqa: E402
from streams.kafka import consumer, ensure_topics  # noqa: E402
from streams.produce import produce_jsonl  # noqa: E402
from streams.schemas import DEAD_LETTERS, POST_SCHEMA, POSTS, VERDICTS  # noqa: E402

DEFAULT_POLICY = ROOT / "policies" / "default.yaml"
SAMPLE_POSTS = ROOT / "samples" / "posts.jsonl"
# pii-ner is not in the default policy; its check as the README documents it.
PII_CHECK = {"model": "pii-ner", "input": "text", "types": ["PERSON", "EMAIL", "PHONE", "ID"], "above": 0.5}
# Records per pipeline run at --records-scale 1. The steady window leaves out max_in_flight (1024 by default) verdicts
# at each end, so image models need ~1,000 frames; each run takes ~15-40 s on a shared 2-core CPU
# (measured there: toxicity ~1,100-1,400 posts/s, pii-ner ~70-100, nudenet-320n ~15-27, efficientnet-lite0
# ~30-40 frames/s through the pipeline, depending on the other load).
DEFAULT_RECORDS = {"toxicity": 20000, "pii-ner": 1500, "nudenet-320n": 800, "efficientnet-lite0": 1000}
RECORDS_BY_TASK = {"text-classify": 20000, "ner": 1500, "detect": 800, "classify": 1000}
TEXT_TASKS = ("text-classify", "ner")


@dataclass
class ModelSpec:
    name: str
    checks: dict[str, dict[str, Any]]  # every check of the default policy that names this model


def default_models(repo: ModelRepository) -> tuple[list[ModelSpec], dict[str, str]]:
    """The models the default policy names, each with its checks, plus pii-ner (with the README's check)
    when the policy does not name it; only models whose files are built. Returns (specs, skipped: why)."""
    checks = (yaml.safe_load(DEFAULT_POLICY.read_text()) or {}).get("checks", {})
    specs: dict[str, ModelSpec] = {}
    for check_name, check in checks.items():
        name = str(check["model"]).partition("@")[0]
        specs.setdefault(name, ModelSpec(name, {})).checks[check_name] = dict(check)
    specs.setdefault("pii-ner", ModelSpec("pii-ner", {"pii": dict(PII_CHECK)}))
    built, skipped = [], {}
    for spec in specs.values():
        try:
            repo.config(spec.name)  # raises when the model file is missing
            built.append(spec)
        except ModelConfigError as exc:
            skipped[spec.name] = str(exc)
    return built, skipped


# ------------------------------------------------------------------------------------------- inputs
def sample_texts(n: int) -> list[str]:
    """The sample posts' texts, repeated with an index suffix so no two are identical."""
    texts = [json.loads(line)["text"] for line in SAMPLE_POSTS.read_text().splitlines() if line.strip()]
    texts = [t for t in texts if t]
    return [f"{texts[i % len(texts)]} #{i}" for i in range(n)]


def write_posts(path: Path, n: int) -> Path:
    """N text-only posts as JSONL, for streams.produce.produce_jsonl (the `inferstream produce` path)."""
    with path.open("w", encoding="utf-8") as fh:
        for i, text in enumerate(sample_texts(n)):
            fh.write(json.dumps({"schema": POST_SCHEMA, "id": f"bench-{i}", "user_id": f"u-{i % 97}", "text": text,
                                 "created_at": "2026-11-25T10:00:00Z"}) + "\n")
    return path


def sample_images(n: int, decoded: bool) -> list[np.ndarray]:
    """N 640x480 RGB frames of the 4 photos of frames_throughput.sample_frames (shared arrays, so memory
    stays small). `decoded`: round-tripped through JPEG, as the pipeline's models see them after decoding;
    otherwise the originals, for frames_throughput.publish to encode."""
    photos = sample_frames(4)
    if decoded:
        photos = [decode_image(encode_image(f, "jpeg"), "jpeg") for f in photos]
    return [photos[i % len(photos)] for i in range(n)]


# ---------------------------------------------------------------------------------------------- raw
def _rate(call, items_per_call: int, seconds: float) -> tuple[float, float]:
    """(items/s, CPU ms per item of this whole process, ONNX Runtime's threads included)."""
    call()  # warm-up (first runs allocate and, on some providers, compile)
    done, started, cpu0 = 0, time.perf_counter(), sum(os.times()[:2])
    while (elapsed := time.perf_counter() - started) < seconds:
        call()
        done += items_per_call
    return done / elapsed, (sum(os.times()[:2]) - cpu0) * 1000 / done


def session_feeds(operator: Any, model: LoadedModel, items: list[Any]) -> list[tuple[dict[str, np.ndarray], list[str] | None]]:
    """The session call(s) `run_batch` would make for `items`, built in advance (stacked, padded)."""
    task = model.config.task
    session = model.session
    if task == "classify":
        return [({operator.input_name: np.stack(items)}, None)]
    if task == "detect":
        return [({operator.input_name: np.stack([tensor for tensor, _ in items])}, None)]
    if getattr(operator, "tokenizer", None) is not None:  # ner, or a tokenized text classifier
        batches = operator.tokenizer.batches(items, operator.pre.call_cost_tokens)
        return [(batch.feeds(session.inputs), [operator.output]) for _, batch in batches]
    texts = np.array(items, dtype=object).reshape(-1, 1)  # a raw-strings model (toxicity)
    return [({operator.input_name: texts}, [operator.output])]


def raw_throughput(model: LoadedModel, seconds: float) -> dict[str, Any]:
    operator = task_of(model.config.task).operator_for(model)
    cfg = model.config
    max_batch = cfg.max_batch_size
    pool_size = 2 * max_batch
    raw_inputs = sample_texts(pool_size) if cfg.task in TEXT_TASKS else sample_images(pool_size, decoded=True)
    items = [operator.preprocess(x) for x in raw_inputs]  # prepared in advance: not measured

    def batches_of(size: int):
        starts = list(range(0, pool_size - size + 1, size)) or [0]
        state = {"i": 0}

        def call() -> None:
            start = starts[state["i"] % len(starts)]
            state["i"] += 1
            operator.run_batch(items[start : start + size])

        return call

    rates: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for b in sorted({1, max_batch}):
        rates[f"run_batch_b{b}"], cpu[f"run_batch_b{b}"] = _rate(batches_of(b), b, seconds)
    calls = session_feeds(operator, model, items[:max_batch])

    def session_only() -> None:
        for feeds, outputs in calls:
            model.session.run(feeds, outputs)

    rates[f"session_b{max_batch}"], cpu[f"session_b{max_batch}"] = _rate(session_only, max_batch, seconds)
    return {"items_per_s": rates, "cpu_ms_per_item": cpu, "session_calls_per_batch": len(calls)}


# ----------------------------------------------------------------------------------------- pipeline
def _cpu_snapshot(pids: dict[str, int]) -> dict[str, float | None]:
    return {name: (sum(os.times()[:2]) if pid == os.getpid() else cpu_seconds(pid)) for name, pid in pids.items()}


async def collect(settings: Settings, n: int, worker: subprocess.Popen, pids: dict[str, int], timeout_s: float,
                  stall_s: float) -> dict[str, Any]:
    """Read verdicts and dead letters from the start until `n` arrived, the worker exits, nothing new came
    for `stall_s` after the first, or `timeout_s`. After each fetch that brought verdicts: (receipt time on
    this process's monotonic clock, verdicts so far, CPU seconds of `pids`)."""
    from aiokafka import TopicPartition

    names = [settings.topic(VERDICTS), settings.topic(DEAD_LETTERS)]
    kafka = consumer(settings, group_id=None, auto_offset_reset="earliest", enable_auto_commit=False)
    await kafka.start()
    marks: list[tuple[float, int, dict[str, float | None]]] = []
    produced_ms: list[int] = []
    dead: list[dict] = []
    try:
        while not all(kafka.partitions_for_topic(t) for t in names):
            await kafka._client.force_metadata_update()
            await asyncio.sleep(0.2)
        kafka.assign([TopicPartition(t, p) for t in names for p in kafka.partitions_for_topic(t)])
        deadline = time.monotonic() + timeout_s
        while len(produced_ms) + len(dead) < n and time.monotonic() < deadline and worker.poll() is None:
            if marks and time.monotonic() - marks[-1][0] > stall_s:
                break
            fetched = await kafka.getmany(timeout_ms=200)
            now, before = time.monotonic(), len(produced_ms)
            for tp, msgs in fetched.items():
                for m in msgs:
                    record = json.loads(m.value)
                    if tp.topic == names[1]:
                        dead.append(record)
                    else:
                        produced_ms.append(int(record["produced_at_ms"]))
            if len(produced_ms) > before:
                marks.append((now, len(produced_ms), _cpu_snapshot(pids)))
    finally:
        await kafka.stop()
    return {"marks": marks, "produced_ms": produced_ms, "dead": dead}


def window_stats(marks: list[tuple[float, int, dict]], start: int, end: int) -> dict[str, Any]:
    """Verdicts/s and CPU between the fetch that brought verdict number `start` and the one that brought
    `end` (counted from 1), on fetch boundaries so the verdict count and the time span match."""
    first = next(m for m in marks if m[1] >= start)
    last = next(m for m in marks if m[1] >= end)
    span, count = last[0] - first[0], last[1] - first[1]
    out: dict[str, Any] = {"from_verdict": first[1], "to_verdict": last[1], "seconds": span,
                           "verdicts_per_s": count / span if span > 0 else None}
    used = {k: last[2][k] - first[2][k] for k in first[2] if first[2][k] is not None and last[2][k] is not None}
    if span > 0 and count > 0:
        out["cpu_cores_used"] = {k: round(v / span, 3) for k, v in used.items()}
        if "worker" in used and "broker" in used:  # the collector (this process) is not part of the pipeline
            out["cpu_ms_per_verdict"] = (used["worker"] + used["broker"]) * 1000 / count
    return out


def scrape_metrics(web_port: int) -> dict[str, float]:
    """The worker's batch-size and inference histograms (sums and counts over all its batches)."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"inferstream_batch_size_records_sum": "batch_records", "inferstream_batch_size_records_count": "batches",
              "inferstream_inference_latency_seconds_sum": "inference_seconds"}
    out: dict[str, float] = {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return out
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                out[wanted[sample.name]] = out.get(wanted[sample.name], 0.0) + sample.value
    return out


def _timeline(marks: list[tuple[float, int, dict]]) -> list[tuple[float, int]]:
    t0, out, next_s = marks[0][0], [], 1.0
    for t, count, _ in marks:
        if t - t0 >= next_s:
            out.append((round(t - t0, 2), count))
            next_s = float(int(t - t0) + 1)
    if out[-1:] != [(round(marks[-1][0] - t0, 2), marks[-1][1])]:
        out.append((round(marks[-1][0] - t0, 2), marks[-1][1]))
    return out


def run_pipeline(base: Settings, broker: EmbeddedBroker, spec: ModelSpec, task: str, n: int, work: Path,
                 run_id: str) -> dict[str, Any]:
    mdir = work / spec.name
    mdir.mkdir(parents=True, exist_ok=True)
    policy = mdir / "policy.yaml"
    policy.write_text(yaml.safe_dump({"checks": spec.checks}, sort_keys=False))
    settings = base.replace(broker=broker.bootstrap, topic_prefix=f"bench-{run_id}-{spec.name}-", app_id=f"inferstream-bench-{run_id}-{spec.name}",
                            policy=str(policy), web_port=free_port(), data_dir=str(mdir / "data"))
    asyncio.run(ensure_topics(settings))
    t0 = time.perf_counter()
    if task in TEXT_TASKS:
        report = produce_jsonl(settings, POSTS, write_posts(mdir / "posts.jsonl", n))
        if report.sent != n:
            raise RuntimeError(f"{spec.name}: produced {report.sent} of {n} posts")
        kind = "posts"
    else:
        asyncio.run(publish(settings, sample_images(n, decoded=False), rate=None))
        kind = "frames"
    produce_s = time.perf_counter() - t0

    load_before = os.getloadavg()
    log_path = mdir / "worker.log"
    started = time.monotonic()
    worker = Worker(settings, log_path)
    pids = {"worker": worker.pid, "broker": broker.process.pid, "bench": os.getpid()}
    try:
        got = asyncio.run(collect(settings, n, worker.proc, pids, timeout_s=900, stall_s=60))
        metrics = scrape_metrics(settings.web_port)
    finally:
        worker.stop()
    load_after = os.getloadavg()
    marks, produced = got["marks"], got["produced_ms"]
    if len(produced) < 2 or len(marks) < 2:
        raise RuntimeError(f"{spec.name}: {len(produced)} verdicts, {len(got['dead'])} dead letters "
                           f"(worker exit code {worker.proc.returncode}); see {log_path}")
    got_n = len(produced)
    # The worker decodes/tokenises up to max_in_flight records ahead of inference: before the first verdict
    # that work is already done for the first ~max_in_flight records, and the last ~max_in_flight verdicts
    # need none. Steady state is the window in between; first-to-last is kept for comparison.
    ahead = settings.frames_max_in_flight if kind == "frames" else settings.max_in_flight
    lo, hi = ahead, got_n - ahead
    steady_covers_in_flight = hi - lo >= got_n // 4
    if not steady_covers_in_flight:
        lo, hi = got_n // 4, 3 * got_n // 4
    whole = window_stats(marks, 1, got_n)
    steady = window_stats(marks, max(lo, 1), hi)
    worker_span = (max(produced) - min(produced)) / 1000
    span = whole["seconds"]
    result: dict[str, Any] = {
        "records": n,
        "record_kind": kind,
        "verdicts": got_n,
        "dead_letters": len(got["dead"]),
        "dead_letter_reasons": sorted({d.get("reason", "?") for d in got["dead"]}),
        "produce_seconds": produce_s,
        "first_verdict_after_worker_start_s": marks[0][0] - started,
        "span_seconds": span,
        "verdicts_per_s": steady["verdicts_per_s"],
        "verdicts_per_s_first_to_last": whole["verdicts_per_s"],
        "verdicts_per_s_worker_clock_first_to_last": (got_n - 1) / worker_span if worker_span > 0 else None,
        "steady_window": {**steady, "excludes_max_in_flight_at_both_ends": steady_covers_in_flight},
        "first_to_last": whole,
        # verdicts received by each whole second after the first verdict: shows stalls and load changes
        "timeline": _timeline(marks),
        "cpu_cores_used": steady.get("cpu_cores_used"),
        "cpu_ms_per_verdict": steady.get("cpu_ms_per_verdict"),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "worker_log": str(log_path.relative_to(ROOT)),
    }
    if metrics.get("batches"):
        result["pipeline_batches"] = int(metrics["batches"])
        result["pipeline_mean_batch"] = metrics["batch_records"] / metrics["batches"]
        result["pipeline_inference_seconds"] = metrics["inference_seconds"]
        # time inside run_batch (session + postprocess) per second from first to last verdict (the histogram
        # also holds the first batch, finished before the first verdict: slightly over 1 means always busy)
        result["model_busy_fraction"] = metrics["inference_seconds"] / span if span > 0 else None
    if got_n + len(got["dead"]) < n:
        result["incomplete"] = True
    return result


# --------------------------------------------------------------------------------------------- main
def code_state() -> dict[str, Any]:
    """The commit measured and the tracked files changed from it (a shared checkout may be mid-edit)."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    changed = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.strip() if commit else None,
            "changed_tracked_files": None if changed is None else [line[3:] for line in changed.splitlines()]}


def _fmt(x: float | None) -> str:
    if x is None or not np.isfinite(x):
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _rates(raw: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:,.1f}/s ({raw['cpu_ms_per_item'][k]:.2f} CPU ms each)" for k, v in raw["items_per_s"].items())


def _mean(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: (a[k] + b[k]) / 2 for k in a}


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Items/s. Pipeline: steady window (first to last verdict in brackets). The last two columns explain the
    ratio: the batches the worker formed, and CPU ms per item (raw at b=max; worker + broker, steady window)."""
    lines = ["| model | task | raw b=1 | raw b=max | session-only b=max | pipeline (first->last) | pipeline / raw (b=max) "
             "| pipeline mean batch | CPU ms/item raw -> pipeline |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["max_batch_size"]
        raw, pipe = r["raw_items_per_s"], r.get("pipeline", {})
        ratio = r.get("pipeline_vs_raw_same_batch")
        cpu_raw, cpu_pipe = r["raw_cpu_ms_per_item"][f"run_batch_b{b}"], pipe.get("cpu_ms_per_verdict")
        lines.append(f"| {r['model']} | {r['task']} | {_fmt(raw['run_batch_b1'])} | {_fmt(raw[f'run_batch_b{b}'])} (b={b}) | "
                     f"{_fmt(raw[f'session_b{b}'])} | {_fmt(pipe.get('verdicts_per_s'))} "
                     f"({_fmt(pipe.get('verdicts_per_s_first_to_last'))}) | "
                     f"{'-' if ratio is None else f'{ratio:.2f}'} | {_fmt(pipe.get('pipeline_mean_batch'))} | "
                     f"{cpu_raw:.2f} -> {'-' if cpu_pipe is None else f'{cpu_pipe:.2f}'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="", help="comma-separated subset (default: every default moderation model)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per raw measurement")
    parser.add_argument("--records-scale", type=float, default=1.0, help="multiplies each model's pipeline record count")
    parser.add_argument("--skip-pipeline", action="store_true", help="raw measurements only (no broker, no worker)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "models_throughput.json"))
    args = parser.parse_args()

    started_at = time.time()
    load_start = os.getloadavg()
    repo = ModelRepository(ROOT / "models")
    specs, skipped = default_models(repo)
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", flush=True)
    if args.models:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = set(wanted) - {s.name for s in specs}
        if unknown:
            parser.error(f"not a default moderation model (or not built): {', '.join(sorted(unknown))}; "
                         f"have {', '.join(s.name for s in specs)}")
        specs = [s for s in specs if s.name in wanted]

    base = Settings.load()
    run_id = time.strftime("%H%M%S")
    work = ROOT / ".inferstream" / "bench-models"
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    broker = EmbeddedBroker(free_port(), log_path=work / "broker.log")
    if not args.skip_pipeline:
        broker.start()
    try:
        for spec in specs:
            model = repo.load(spec.name)
            cfg = model.config
            row: dict[str, Any] = {"model": cfg.ref, "task": cfg.task, "provider": model.session.provider,
                                   "max_batch_size": cfg.max_batch_size, "max_wait_ms": cfg.max_wait_ms,
                                   "checks": spec.checks}
            print(f"{cfg.ref} ({cfg.task}, {model.session.provider}): raw ...", flush=True)
            row["load_average_before_raw"] = os.getloadavg()
            before = raw_throughput(model, args.seconds)
            print("  raw " + _rates(before), flush=True)
            if args.skip_pipeline:
                row["raw_items_per_s"], row["raw_cpu_ms_per_item"] = before["items_per_s"], before["cpu_ms_per_item"]
                row["session_calls_per_batch"] = before["session_calls_per_batch"]
                rows.append(row)
                continue
            n = max(50, int(DEFAULT_RECORDS.get(spec.name, RECORDS_BY_TASK.get(cfg.task, 500)) * args.records_scale))
            print(f"  pipeline: {n} {'posts' if cfg.task in TEXT_TASKS else 'frames'} ...", flush=True)
            row["pipeline"] = pipe = run_pipeline(base, broker, spec, cfg.task, n, work, run_id)
            print(f"  pipeline {pipe['verdicts_per_s']:,.1f} verdicts/s steady, {pipe['verdicts_per_s_first_to_last']:,.1f} "
                  f"first to last over {pipe['span_seconds']:.1f} s "
                  f"(mean batch {pipe.get('pipeline_mean_batch', float('nan')):.1f}, "
                  f"CPU cores used {pipe.get('cpu_cores_used')})", flush=True)
            # raw again after the pipeline: on a shared machine the two brackets show the drift; the mean is used
            after = raw_throughput(model, args.seconds)
            print("  raw again " + _rates(after), flush=True)
            row["raw_before_pipeline"], row["raw_after_pipeline"] = before, after
            row["raw_items_per_s"] = _mean(before["items_per_s"], after["items_per_s"])
            row["raw_cpu_ms_per_item"] = _mean(before["cpu_ms_per_item"], after["cpu_ms_per_item"])
            row["session_calls_per_batch"] = before["session_calls_per_batch"]
            b = cfg.max_batch_size
            row["raw_drift_after_vs_before"] = after["items_per_s"][f"run_batch_b{b}"] / before["items_per_s"][f"run_batch_b{b}"]
            if pipe.get("cpu_ms_per_verdict"):  # CPU cost per item: less sensitive to other load than items/s
                row["pipeline_vs_raw_cpu_cost"] = pipe["cpu_ms_per_verdict"] / row["raw_cpu_ms_per_item"][f"run_batch_b{b}"]
            row["pipeline_vs_raw_same_batch"] = pipe["verdicts_per_s"] / row["raw_items_per_s"][f"run_batch_b{b}"]
            row["pipeline_vs_session_only"] = pipe["verdicts_per_s"] / row["raw_items_per_s"][f"session_b{b}"]
            print(f"  ratio pipeline / raw run_batch b={b}: {row['pipeline_vs_raw_same_batch']:.2f}", flush=True)
            del model
            gc.collect()
            rows.append(row)
    finally:
        broker.stop()

    import onnxruntime

    result = {
        "benchmark": "models_throughput",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started_at)),
        "duration_s": time.time() - started_at,
        "machine": {"cpus": os.cpu_count(), "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                    "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
                    "load_average_start": load_start, "load_average_end": os.getloadavg()},
        "method": {
            "raw": "operator.run_batch on items prepared in advance by operator.preprocess: session run + postprocessing; "
                   "decode/resize/normalise/tokenisation excluded; items/s over --seconds",
            "session_only": "model.session.run on the batch stacked/padded in advance (text: the length-bucketed calls run_batch makes)",
            "pipeline": "records produced before the worker starts; verdicts/s as received by a consumer, between the "
                        "max_in_flight-th verdict and the max_in_flight-th from last (steady state: decoding ahead of "
                        "inference neither done in advance nor finished); verdicts_per_s_first_to_last: first to last verdict",
            "cpu_ms_per_item": "raw: CPU time of the benchmark process per item (ONNX Runtime threads included); pipeline: "
                               "worker + broker CPU time per verdict over the steady window",
            "inputs": {"text": "samples/posts.jsonl texts with an index suffix, text-only posts",
                       "image": "640x480 JPEG frames of scikit-image photos (chelsea, coffee, astronaut, rocket)"},
            "seconds_per_raw_measurement": args.seconds,
            "records_scale": args.records_scale,
        },
        "code": code_state(),
        "skipped_models": skipped,
        "worker_settings": {k: getattr(base, k) for k in ("partitions", "decode_threads", "max_in_flight", "intra_op_threads",
                                                           "fetch_max_wait_ms", "providers")},
        "models": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print()
    print(markdown_table(rows))
    print(f"\nload average {load_start} -> {result['machine']['load_average_end']}; results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
