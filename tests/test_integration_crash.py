"""At-least-once under SIGKILL: nothing committed before its verdict is on the broker."""

from __future__ import annotations

import pytest
from kafka_helpers import collect, frame_image, frame_record, ids, send_records

from streams.schemas import DEAD_LETTERS, FRAMES, VERDICTS

pytestmark = pytest.mark.integration

N = 3000


def test_sigkill_mid_stream_then_restart_loses_no_frame(settings, start_worker, run):
    images = [frame_image(i % 50) for i in range(N)]  # 50 distinct pictures keep the test quick
    expected = {f"cam-{i % 4}:{i}" for i in range(N)}
    run(send_records(settings, FRAMES, [frame_record(f"cam-{i % 4}", i, img) for i, img in enumerate(images)]))

    first = start_worker(settings)
    before = collect(settings, VERDICTS, lambda rs: len(rs) >= 200, timeout_s=90)
    first.kill()
    done_at_kill = ids(collect(settings, VERDICTS, lambda rs: False, timeout_s=2))
    assert 200 <= len(done_at_kill) < N, "the kill must land mid-stream for this test to mean anything"
    assert len(before) >= 200

    start_worker(settings)
    verdicts = collect(settings, VERDICTS, lambda rs: ids(rs) >= expected, timeout_s=150)
    dead = collect(settings, DEAD_LETTERS, lambda rs: False, timeout_s=1)

    assert ids(verdicts) == expected  # every input id has its verdict
    assert dead == []
    # at-least-once: duplicates are allowed (and idempotent by key), losses are not
    assert len(verdicts) >= N


def test_a_second_worker_takes_partitions_mid_stream_without_losing_frames(settings, start_worker, run):
    settings = settings.replace(partitions=4)
    sent = 0

    def send_frames(count: int) -> None:
        nonlocal sent
        run(send_records(settings, FRAMES, [frame_record(f"cam-{i % 8}", i, frame_image(i % 50))
                                             for i in range(sent, sent + count)]))
        sent += count

    def workers(records: list[dict]) -> set[str]:
        return {r["value"]["worker"] for r in records}

    send_frames(12000)
    start_worker(settings)
    collect(settings, VERDICTS, lambda rs: len(rs) >= 1, timeout_s=90)
    start_worker(settings)  # joins the same group: a rebalance while records are in flight
    # Keep frames coming until the second worker judges some: however fast the first one is, the
    # rebalance happens mid-stream (the second worker's group join takes seconds).
    for _ in range(40):
        if len(workers(collect(settings, VERDICTS, lambda rs: len(workers(rs)) >= 2, timeout_s=3))) >= 2:
            break
        send_frames(3000)
    expected = {f"cam-{i % 8}:{i}" for i in range(sent)}
    verdicts = collect(settings, VERDICTS, lambda rs: ids(rs) >= expected, timeout_s=180)

    assert ids(verdicts) == expected
    assert len(workers(verdicts)) == 2, f"both workers should have judged frames, saw {workers(verdicts)}"
