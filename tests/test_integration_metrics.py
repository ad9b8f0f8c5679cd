"""A running worker's /metrics, scraped and parsed with prometheus-client's own parser."""

from __future__ import annotations

import json
import signal
import urllib.request

import pytest
from conftest import wait_until
from kafka_helpers import collect, frame_image, frame_record, ids, send_records
from prometheus_client.parser import text_string_to_metric_families

from streams.schemas import FRAMES, POSTS, VERDICTS

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_worker_metrics_count_what_flowed_through_it(settings, start_worker, run):
    n = 60
    records = [frame_record("cam", i, frame_image(i)) for i in range(n)]
    records.append((b"cam", b"not an image", records[0][2]))
    run(send_records(settings, FRAMES, records))
    worker = start_worker(settings.replace(frames_max_in_flight=40))
    collect(settings, VERDICTS, lambda rs: len(ids(rs)) >= n, timeout_s=90)
    port = worker.settings.web_port
    frames, verdicts = settings.topic(FRAMES), settings.topic(VERDICTS)

    # counters are updated after delivery; the lag gauge every second after a commit
    assert wait_until(lambda: value(scrape(port), "inferstream_records_consumed_total", topic=frames) == n + 1, 20)
    assert wait_until(lambda: value(scrape(port), "inferstream_consumer_lag_records", topic=frames, partition="0") == 0
                      or value(scrape(port), "inferstream_consumer_lag_records", topic=frames, partition="1") == 0, 30)
    m = scrape(port)
    assert value(m, "inferstream_records_produced_total", topic=verdicts) == n
    assert value(m, "inferstream_dead_letters_total", topic=frames, reason="image_decode_failed") == 1
    assert value(m, "inferstream_end_to_end_latency_seconds_count", topic=frames) == n
    assert value(m, "inferstream_batch_size_records_sum", model="tiny", version="1") == n  # every frame in one batch
    assert value(m, "inferstream_batch_size_records_count", model="tiny", version="1") <= n
    assert value(m, "inferstream_inference_latency_seconds_count", model="tiny", version="1") >= 1
    assert value(m, "inferstream_model_info", model="tiny", version="1", task="classify", provider="CPUExecutionProvider") == 1
    assert value(m, "inferstream_malloc_info", allocator="glibc") == 1  # nothing preloaded here
    assert value(m, "inferstream_malloc_trim_seconds_count") == 0  # malloc_trim_every_s is off by default
    assert value(m, "inferstream_in_flight_records", topic=frames) == 0
    # each agent's bound on records in flight, as configured: frames have their own (their tensors are big)
    assert value(m, "inferstream_in_flight_limit_records", topic=frames) == 40
    assert value(m, "inferstream_in_flight_limit_records", topic=settings.topic(POSTS)) == settings.max_in_flight
    # records reached the agent a fetch at a time, not one by one (they were all on the topic before it started)
    handed = value(m, "inferstream_fetched_batch_records_count", topic=frames)
    assert value(m, "inferstream_fetched_batch_records_sum", topic=frames) == n + 1 and handed < (n + 1) / 4
    safe = value(m, "inferstream_verdicts_total", kind="frame", safe="true") or 0
    unsafe = value(m, "inferstream_verdicts_total", kind="frame", safe="false") or 0
    assert safe + unsafe == n and (value(m, "inferstream_violations_total", check="objects") or 0) == unsafe
    assert value(m, "inferstream_consumer_lag_available") == 1

    # /debug/state: every frames partition fetched, committed up to what was sent; the agent's task waits
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/debug/state", timeout=5) as r:
        state = json.loads(r.read())
    mine = [p for p in state["consumer"]["partitions"] if p["topic"] == frames]
    assert mine and all(p["fetching"] and not p["paused"] for p in mine)
    assert sum(p["highwater"] for p in mine) == n + 1
    assert all(p["committed"] == p["highwater"] and p["acked_not_committed"] == 0 for p in mine if p["highwater"])
    assert state["consumer"]["flow_active"] and not state["consumer"]["suspended"]
    # each agent's task waits for its next fetch: in batches_of's queue, under the agent in streams/app.py
    waiting = [t["frames"] for t in state["tasks"] if t["coroutine"] == "Agent._execute_actor"]
    assert waiting and all(f[0].startswith("queues.py:") and " batches_of" in f[1] and " agent" in f[2] for f in waiting)
    # SIGUSR1 logs the same report
    worker.proc.send_signal(signal.SIGUSR1)
    assert wait_until(lambda: "diagnostics (SIGUSR1)" in worker.log() and f"'topic': '{frames}'" in worker.log(), 10)


def test_malloc_trim_timer_trims_on_its_interval(settings, start_worker):
    worker = start_worker(settings.replace(malloc_trim_every_s=0.5))
    port = worker.settings.web_port

    def trims_so_far() -> float:
        try:
            return value(scrape(port), "inferstream_malloc_trim_seconds_count") or 0
        except OSError:  # not serving yet
            return 0

    assert wait_until(lambda: trims_so_far() >= 3, 60)
    m = scrape(port)
    trims, seconds = value(m, "inferstream_malloc_trim_seconds_count"), value(m, "inferstream_malloc_trim_seconds_sum")
    assert 0 < seconds < trims  # each walk of the arenas took real time, well under a second here
    assert value(m, "inferstream_malloc_trimmed_bytes_total") >= 0


def test_ready_reports_models_and_group_membership(settings, start_worker, run):
    worker = start_worker(settings)

    def ready():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{worker.settings.web_port}/ready", timeout=2) as r:
                return json.loads(r.read())
        except OSError:
            return None

    assert wait_until(lambda: (ready() or {}).get("ready") is True, 60)
    body = ready()
    assert body["checks"] == {"models_loaded": True, "group_joined": True, "not_rebalancing": True, "agents_running": True}
    assert body["models"]["objects"]["name"] == "tiny"
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.settings.web_port}/health", timeout=2) as r:
        assert json.loads(r.read()) == {"status": "ok"}


def test_json_logs_carry_record_coordinates_of_dead_letters(settings, start_worker, run):
    good = frame_record("cam", 0, frame_image(0))
    run(send_records(settings, FRAMES, [(b"cam", b"not an image", good[2]), good]))
    worker = start_worker(settings.replace(log_format="json"))
    collect(settings, VERDICTS, lambda rs: len(rs) >= 1, timeout_s=90)

    def dead_letter_line():
        for line in worker.log().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("reason") == "image_decode_failed":
                return entry
        return None

    assert wait_until(lambda: dead_letter_line() is not None, 10)
    entry = dead_letter_line()
    assert entry["level"] == "warning" and entry["topic"] == settings.topic(FRAMES)
    assert entry["offset"] == 0 and entry["key"] == "cam" and entry["stage"] == "decode"
    assert isinstance(entry["partition"], int) and entry["ts"].endswith("Z")
