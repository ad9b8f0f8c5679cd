"""A flood of synchronous `POST /predict` calls on a worker that is consuming a stream of frames, through
the real broker: the stream's verdicts all arrive and their end-to-end p99 stays within a bound derived
from the same worker's p99 without the flood; the calls over `sync_max_in_flight` are refused at once
(429, Retry-After) and counted in the worker's /metrics."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
from collections import Counter

import numpy as np
import pytest
from conftest import image_policy
from kafka_helpers import collect, frame_image, frame_record, ids
from skimage import data
from test_integration_metrics import scrape, value
from test_integration_serving import wait_ready

from operators.images import encode_image
from streams.config import REPO_MODELS
from streams.kafka import ensure_topics, producer
from streams.schemas import FRAMES, VERDICTS

pytestmark = pytest.mark.integration

MODEL = "efficientnet-lite0"  # a real model (4.7M parameters): API calls take the model time frames need
RATE = 20.0  # frames per second, a camera's pace, in both phases
FRAMES_PER_PHASE = 200  # 10 s a phase: the p99 is the 3rd-worst frame
CLIENTS = 8
SYNC_LIMIT = 2  # sync_max_in_flight: at most 2 of the 8 clients' calls are admitted at once
CAT_CLASSES = range(281, 286)  # ImageNet's domestic cats: skimage's chelsea, the flood's image


class Flood:
    """`clients` threads, each POSTing the same image to /predict/{model} over its own keep-alive
    connection as fast as it is answered, ignoring Retry-After (the abusive case). Counts answers by
    status; every 429 is checked for its Retry-After header and error body."""

    def __init__(self, port: int, model: str, body: bytes, clients: int) -> None:
        self.port, self.model, self.body = port, model, body
        self.statuses: Counter[int] = Counter()
        self.bad_refusals: list[str] = []
        self.top1: Counter[int] = Counter()  # class ids of the answered calls' best class
        self.refused = threading.Event()  # the limit was reached at least once
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            while not self._stop.is_set():
                connection.request("POST", f"/predict/{self.model}", self.body, {"Content-Type": "image/jpeg"})
                response = connection.getresponse()
                answer = json.loads(response.read())
                with self._lock:
                    self.statuses[response.status] += 1
                    if response.status == 200:
                        self.top1[answer["result"][0]["class_id"]] += 1
                    if response.status == 429:
                        if response.getheader("Retry-After") != "1" or answer.get("error") != "too_many_requests":
                            self.bad_refusals.append(f"{response.getheader('Retry-After')!r} {answer}")
                        self.refused.set()
        except BaseException as exc:  # reported by stop(); a dead client would quietly weaken the flood
            self.errors.append(exc)
        finally:
            connection.close()

    def start(self) -> Flood:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> Counter[int]:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        assert not self.errors, self.errors
        return self.statuses


async def produce_steadily(settings, stream_id: str, n: int, rate: float) -> None:
    """Frames `stream_id:0..n-1`, one every 1/rate s on a fixed schedule (a camera's pace, not a
    synchronisation), each stamped with its send time: the verdict's end_to_end is measured from it."""
    await ensure_topics(settings)
    kafka = producer(settings)
    await kafka.start()
    try:
        records = [frame_record(stream_id, i, frame_image(i)) for i in range(n)]
        started, futures = time.monotonic(), []
        for i, (key, value, headers) in enumerate(records):
            await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
            futures.append(await kafka.send(settings.topic(FRAMES), value, key=key, headers=headers,
                                            timestamp_ms=int(time.time() * 1000)))
        await asyncio.gather(*futures)
    finally:
        await kafka.stop()


def end_to_end_ms(settings, stream_id: str, n: int) -> np.ndarray:
    """Every frame's verdict (asserting none is missing) -> the end-to-end latencies (ms), one per frame."""
    expected = {f"{stream_id}:{i}" for i in range(n)}
    verdicts = collect(settings, VERDICTS, lambda rs: expected <= ids(rs), timeout_s=60)
    assert expected <= ids(verdicts), f"{len(expected - ids(verdicts))} of {n} frames got no verdict"
    first = {}
    for r in verdicts:  # a redelivered frame's second verdict is not its latency
        first.setdefault(r["value"]["id"], r["value"]["latency_ms"]["end_to_end"])
    return np.array([first[i] for i in sorted(expected)], dtype=float)


def test_flood_of_predict_calls_keeps_the_stream_p99_bounded_and_counts_refusals(settings, start_worker, tmp_path):
    settings = settings.replace(model_dir=str(REPO_MODELS), policy=image_policy(tmp_path, MODEL, labels=("tench",)),
                                recommendations="off", sync_max_in_flight=SYNC_LIMIT, sync_retry_after_s=1)
    worker = start_worker(settings)
    wait_ready(worker)
    port = worker.settings.web_port

    asyncio.run(produce_steadily(settings, "calm", FRAMES_PER_PHASE, RATE))
    calm = end_to_end_ms(settings, "calm", FRAMES_PER_PHASE)

    flood = Flood(port, MODEL, encode_image(data.chelsea(), "jpeg"), CLIENTS).start()
    try:
        assert flood.refused.wait(30), f"the flood never reached the limit: {flood.statuses}\n{worker.log()[-3000:]}"
        asyncio.run(produce_steadily(settings, "flooded", FRAMES_PER_PHASE, RATE))
        flooded = end_to_end_ms(settings, "flooded", FRAMES_PER_PHASE)
    finally:
        statuses = flood.stop()
    rejected = value(scrape(port), "inferstream_sync_rejected_total", api="rest", model=MODEL, reason="in_flight_limit")

    calm_p99, flooded_p99 = np.percentile(calm, 99), np.percentile(flooded, 99)
    report = (f"calm p50/p99 {np.median(calm):.0f}/{calm_p99:.0f} ms, flooded p50/p99 {np.median(flooded):.0f}/"
              f"{flooded_p99:.0f} ms, answers {dict(statuses)}, rejected_total {rejected}")
    print(report)
    # The bound. Frames come at 20/s for 10 s: a worker that fell behind would add lag with every frame, and
    # the later frames' latencies would pass 500 ms within seconds. One that keeps up loses at most the
    # batch a frame joins (at most SYNC_LIMIT API images in it, never one ahead of the frame) and the CPU
    # that answering the flood takes on 2 shared cores: measured 90-220 ms p99 with 8 clients (320 ms with
    # 64, mostly the HTTP work of ~4,000 refusals/s) against a calm 25-40 ms. 3x covers a slower machine.
    # (Without the limit the lanes alone measured 190 ms at 16 clients, 340 ms at 32: this bound is the
    # stream keeping up, not a comparison of the two protections.)
    bound = max(3 * calm_p99, calm_p99 + 500)
    assert flooded_p99 <= bound, f"{report}: flooded p99 over {bound:.0f} ms"
    assert statuses[200] > 0 and statuses[429] > 0 and set(statuses) == {200, 429}, report  # no 5xx, no 503
    assert set(flood.top1) <= set(CAT_CLASSES), flood.top1  # the calls that got in were answered right
    assert not flood.bad_refusals, flood.bad_refusals[:3]  # every 429: Retry-After 1, too_many_requests
    assert rejected == statuses[429], report  # every refusal counted, and nothing else
