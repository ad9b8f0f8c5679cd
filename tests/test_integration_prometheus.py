"""A real Prometheus (Debian's `prometheus`, installed by `make deploy-test-tools`) scrapes a running
worker fed frames, posts, events and REST calls through the real broker; then every query of the
Grafana dashboard, its variables substituted as Grafana would, returns data from Prometheus' HTTP API.

The scrape configuration is deploy/prometheus/prometheus.yml itself: only what a test cannot have
is changed (Docker's DNS becomes the worker's loopback address, scrapes every second)."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import wait_until
from grafana_dashboard import load, multi_value, panel_queries, substitute, template_variables
from kafka_helpers import frame_image, frame_record
from test_deploy import PROMETHEUS, require_tool

from operators.images import encode_image
from streams.broker import free_port
from streams.config import REPO_MODELS, Settings
from streams.kafka import ensure_topics, producer
from streams.schemas import EVENTS, FRAMES, POSTS

pytestmark = pytest.mark.integration

SCRAPE_S = 1.0  # the scrape interval, and so Grafana's minimum $__interval (the datasource's timeInterval)


class Prometheus:
    """`prometheus` as a child process on a free loopback port, with a fresh data dir."""

    def __init__(self, tmp_path: Path, worker_port: int) -> None:
        self.port = free_port()
        self.config = tmp_path / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(self._config(worker_port)))
        self.data = tmp_path / "prometheus-data"
        self.log_path = tmp_path / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def _config(self, worker_port: int) -> dict:
        config = yaml.safe_load(PROMETHEUS.read_text())
        config["global"].update(scrape_interval=f"{SCRAPE_S:g}s", scrape_timeout=f"{SCRAPE_S:g}s",
                                evaluation_interval=f"{SCRAPE_S:g}s")
        config["rule_files"] = [str(PROMETHEUS.parent / f) for f in config.get("rule_files") or []]
        for job in config["scrape_configs"]:
            if job.pop("dns_sd_configs", None) is not None:  # the workers: Docker's DNS -> this worker
                job["static_configs"] = [{"targets": [f"127.0.0.1:{worker_port}"]}]
            elif job["job_name"] == "prometheus":
                job["static_configs"] = [{"targets": [f"127.0.0.1:{self.port}"]}]
            job.pop("scrape_interval", None)
            job.pop("scrape_timeout", None)
        return config

    def start(self) -> Prometheus:
        binary = require_tool("prometheus")
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.data}",
                                      f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        assert wait_until(self.ready, 30), f"prometheus not ready: {self.log()}"
        return self

    def ready(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, f"prometheus exited: {self.log()}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def api(self, path: str, **params) -> dict | list:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?" + urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as exc:  # a bad query is a 400 with the reason
            raise AssertionError(f"{path} {params}: {exc.code} {exc.read().decode()}") from exc
        assert body["status"] == "success", body
        return body["data"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


class Feeder:
    """Keeps frames, posts and events flowing into the broker and calls the REST API, a round every
    `pace_s`, until stopped: every metric family gets samples, and the rates stay non-zero."""

    def __init__(self, settings: Settings, web_port: int, pace_s: float = 0.25) -> None:
        self.settings, self.web_port, self.pace_s = settings, web_port, pace_s
        self.rounds = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._png = encode_image(frame_image(0), "png")

    def __enter__(self) -> Feeder:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        try:
            asyncio.run(self._feed())
        except BaseException as exc:  # asserted after the block: a dead feeder would starve the queries
            self.errors.append(exc)

    async def _feed(self) -> None:
        s = self.settings
        await ensure_topics(s)
        kafka = producer(s)
        await kafka.start()
        try:
            index = 0
            while not self._stop.is_set():
                sends = []
                for _ in range(40):  # a burst: consumer lag above the ladder's 1 record, batches to fit
                    key, value, headers = frame_record("cam", index, frame_image(index))
                    sends.append(await kafka.send(s.topic(FRAMES), value, key=key, headers=headers))
                    index += 1
                if self.rounds % 10 == 0:  # a dead letter now and then: a good frame's headers, no image
                    sends.append(await kafka.send(s.topic(FRAMES), b"not an image", key=key, headers=headers))
                for topic, records in ((POSTS, [post(self.rounds)]), (EVENTS, events(self.rounds))):
                    for key, value in records:
                        sends.append(await kafka.send(s.topic(topic), value, key=key))
                await asyncio.gather(*sends)
                await asyncio.to_thread(self._call_api)
                self.rounds += 1
                await asyncio.to_thread(self._stop.wait, self.pace_s)  # the load's pace, not a synchronisation
        finally:
            await kafka.stop()

    def _call_api(self) -> None:
        for headers in ({}, {"X-Request-Timeout-Ms": "0.001"}):  # answered, and past its deadline (504)
            request = urllib.request.Request(f"http://127.0.0.1:{self.web_port}/predict/tiny", data=self._png,
                                             headers={"Content-Type": "image/png", **headers}, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=10) as r:
                    r.read()
            except urllib.error.HTTPError as exc:
                assert exc.code == 504 and headers, f"/predict answered {exc.code}: {exc.read()[:200]!r}"


def rule_names() -> list[str]:
    files = (PROMETHEUS.parent / f for f in yaml.safe_load(PROMETHEUS.read_text()).get("rule_files") or [])
    return [rule.get("alert") or rule["record"] for path in files
            for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def ready(worker) -> bool:
    assert worker.alive(), f"the worker exited: {worker.log()[-3000:]}"
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{worker.settings.web_port}/ready", timeout=2) as r:
            return json.loads(r.read()).get("ready") is True
    except OSError:  # not listening yet, or 503 while models load and the group forms
        return False


def post(n: int) -> tuple[bytes, bytes]:
    image = {"encoding": "png", "data": base64.b64encode(encode_image(frame_image(n), "png")).decode()}
    record = {"id": f"p{n}", "user_id": f"u{n % 4}", "text": "a post with a photo", "image": image,
              "created_at": "2026-11-25T10:00:00Z"}
    return f"p{n}".encode(), json.dumps(record).encode()


def events(n: int) -> list[tuple[bytes, bytes]]:
    """Two views and a click of catalogue items, and a view of an item the catalogue lacks."""
    user = f"u{1000 + n % 5}"
    items = [f"i{(37 * n + 11 * j) % 300:04d}" for j in range(3)] + ["no-such-item"]
    kinds = ["view", "view", "click", "view"]
    return [(user.encode(), json.dumps({"user_id": user, "item_id": item, "kind": kind,
                                        "ts": f"2026-11-25T09:{n % 60:02d}:{j:02d}Z"}).encode())
            for j, (item, kind) in enumerate(zip(items, kinds, strict=True))]


@pytest.fixture
def observed_settings(settings, tiny_repo, tmp_path) -> Settings:
    """The tiny image model with a degradation ladder that steps down at once on any backlog (a frame
    stride of 2) and never recovers, and a batching target nothing meets (every record is late); the
    recommender's real models; a policy under which about half the frames are unsafe, and a stream
    alert starts on one unsafe frame and ends on one safe frame."""
    config_path = tiny_repo / "tiny" / "1" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["batching"]["target_p99_ms"] = 0.001
    config["degrade"] = {"lag_records": 1, "for_s": 0, "recover_below": 0, "rungs": [{"frame_stride": 2}]}
    config_path.write_text(yaml.safe_dump(config))
    for name in ("cf-retrieval", "deepfm-ctr"):
        shutil.copytree(REPO_MODELS / name, tiny_repo / name)
    policy = tmp_path / "policy.yaml"  # class-2 is the tiny model's best class on about half the test frames
    policy.write_text(yaml.safe_dump({
        "checks": {"objects": {"model": "tiny", "input": "image", "labels": ["class-2"], "top_k": 3, "above": 0.5}},
        "alerts": {"k": 1, "n": 1, "m": 1}}))
    return settings.replace(policy=str(policy), recommendations="on", rec_every_n_events=1000, rec_debounce_s=0.5)


def empty_queries(prom: Prometheus, dashboard: dict, since: float) -> list[str]:
    """The dashboard's queries that return no data over [since, now], first with every variable at
    "All" (the dashboard's default), then with every value of each variable selected one by one."""
    now = time.time()
    range_s = max(round(now - since), 1)
    empty = []
    values: dict[str, list[str]] = {}
    for var in template_variables(dashboard):
        match = {"match[]": var.selector} if var.selector else {}
        values[var.name] = prom.api(f"label/{var.label}/values", start=since, end=now, **match)
        if not values[var.name]:
            empty.append(f"variable {var.name}: label_values({var.selector}, {var.label})")
    if empty:
        return empty  # every query below uses the variables
    selections = {"All": {v.name: v.all_value or multi_value(values[v.name]) for v in template_variables(dashboard)},
                  "each value": {name: multi_value(vs) for name, vs in values.items()}}
    for selection, variables in selections.items():
        for query in panel_queries(dashboard):
            expr = substitute(query.expr, variables, interval_s=SCRAPE_S, scrape_interval_s=SCRAPE_S, range_s=range_s)
            if query.instant:
                data = prom.api("query", query=expr, time=now)
            else:
                data = prom.api("query_range", query=expr, start=since, end=now, step=SCRAPE_S)
            if not data["result"]:
                empty.append(f"{query.where} ({selection}): {expr}")
    return empty


@pytest.fixture
def start_prometheus(tmp_path):
    started: list[Prometheus] = []

    def start(worker_port: int) -> Prometheus:
        started.append(Prometheus(tmp_path, worker_port))
        return started[-1].start()

    yield start
    for prom in started:
        prom.stop()


def test_prometheus_scrapes_the_worker_and_every_dashboard_query_returns_data(observed_settings, start_worker,
                                                                                 start_prometheus):
    dashboard = load()
    worker = start_worker(observed_settings)
    prom = start_prometheus(worker.settings.web_port)
    assert wait_until(lambda: ready(worker), 60), worker.log()[-3000:]
    since = time.time()
    empty: list[str] = []

    def all_have_data() -> bool:
        empty[:] = empty_queries(prom, dashboard, since)
        return not empty

    with Feeder(observed_settings, worker.settings.web_port) as feeder:
        assert wait_until(all_have_data, 75, interval_s=1.0), \
            f"{len(empty)} dashboard queries without data after {feeder.rounds} rounds of input:\n" + "\n".join(empty)
    assert not feeder.errors, feeder.errors
    (target,) = [t for t in prom.api("targets")["activeTargets"] if t["labels"]["job"] == "inferstream-worker"]
    assert target["health"] == "up" and not target["lastError"], target

    # the alerting rules of deploy/prometheus are loaded and evaluate without error on real series
    rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    assert sorted(r["name"] for r in rules) == sorted(rule_names()), rules
    assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]

    # Prometheus' own lint of names, units and help texts, on what the worker serves after the load
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.settings.web_port}/metrics", timeout=5) as r:
        lint = subprocess.run([require_tool("promtool"), "check", "metrics"], input=r.read(), capture_output=True,
                              timeout=60)
    assert lint.returncode == 0, (lint.stdout + lint.stderr).decode()
    assert worker.alive(), worker.log()[-2000:]
