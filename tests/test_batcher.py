"""MicroBatcher: grouping, per-caller results, failure isolation, responsiveness."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import numpy as np
import pytest
from scipy.special import softmax
from tiny_models import tiny_logits, write_tiny_repository

from operators.batcher import BatchFailed, MicroBatcher
from operators.classify import ImageClassifier
from operators.model_repository import ModelRepository


def _square_plus(x: int) -> int:
    return x * x + 7


async def _with_batcher(batcher: MicroBatcher, body):
    try:
        return await body()
    finally:
        await batcher.close()


def test_concurrent_submits_are_grouped_into_batches_no_larger_than_max():
    sizes: list[int] = []

    def run_batch(items):
        sizes.append(len(items))
        time.sleep(0.01)  # let the next batch pile up while this one runs
        return [_square_plus(x) for x in items]

    async def main():
        batcher = MicroBatcher(run_batch, max_batch_size=4, max_wait_s=0.02)
        results = await _with_batcher(batcher, lambda: asyncio.gather(*(batcher.submit(i) for i in range(30))))
        return batcher, results

    batcher, results = asyncio.run(main())
    assert results == [_square_plus(i) for i in range(30)]
    assert sum(sizes) == 30
    assert max(sizes) <= 4
    assert max(sizes) > 1  # concurrent submits were actually batched together
    assert len(sizes) < 30


def test_each_caller_gets_the_result_for_its_own_item_under_random_timing():
    rng = random.Random(1234)
    items = list(range(200))
    rng.shuffle(items)
    delays = {i: rng.uniform(0, 0.02) for i in items}
    batches: list[list[int]] = []

    def run_batch(batch):
        batches.append(list(batch))
        time.sleep(rng.uniform(0, 0.003))
        return [_square_plus(x) for x in batch]

    async def main():
        batcher = MicroBatcher(run_batch, max_batch_size=8, max_wait_s=0.003)

        async def caller(i):
            await asyncio.sleep(delays[i])
            return i, await batcher.submit(i)

        return await _with_batcher(batcher, lambda: asyncio.gather(*(caller(i) for i in items)))

    pairs = asyncio.run(main())
    assert len(pairs) == len(items)
    for item, result in pairs:
        assert result == _square_plus(item)
    assert sorted(x for b in batches for x in b) == sorted(items)  # every item ran exactly once
    assert max(len(b) for b in batches) <= 8


def test_max_wait_flushes_a_partial_batch():
    sizes: list[int] = []

    def run_batch(items):
        sizes.append(len(items))
        return [x + 1 for x in items]

    async def main():
        batcher = MicroBatcher(run_batch, max_batch_size=64, max_wait_s=0.05)
        started = time.monotonic()
        results = await _with_batcher(
            batcher, lambda: asyncio.wait_for(asyncio.gather(*(batcher.submit(i) for i in range(3))), 2))
        return results, time.monotonic() - started

    results, elapsed = asyncio.run(main())
    assert results == [1, 2, 3]
    assert sizes == [3]  # one partial batch, well below max_batch_size
    assert elapsed >= 0.04  # it did wait for more items ...
    assert elapsed < 1.0  # ... but not forever


def test_event_loop_stays_responsive_while_run_batch_blocks():
    in_batch = threading.Event()

    def run_batch(items):
        in_batch.set()
        time.sleep(0.3)  # a blocking model call
        return list(items)

    async def main():
        batcher = MicroBatcher(run_batch, max_batch_size=4, max_wait_s=0)
        ticks_during_batch = 0

        async def ticker():
            nonlocal ticks_during_batch
            while True:
                await asyncio.sleep(0.01)
                if in_batch.is_set():
                    ticks_during_batch += 1

        tick_task = asyncio.create_task(ticker())
        try:
            result = await _with_batcher(batcher, lambda: batcher.submit("x"))
        finally:
            tick_task.cancel()
        return result, ticks_during_batch

    result, ticks = asyncio.run(main())
    assert result == "x"
    assert ticks >= 10  # ~30 expected in 0.3 s; a blocked loop would give 0 or 1


def test_poison_item_fails_alone_and_others_get_correct_results():
    poison = 13
    calls: list[list[int]] = []

    def run_batch(items):
        calls.append(list(items))
        if poison in items:
            raise RuntimeError("model exploded")
        return [_square_plus(x) for x in items]

    async def main():
        batcher = MicroBatcher(run_batch, max_batch_size=8, max_wait_s=0.02)
        return await _with_batcher(batcher, lambda: asyncio.gather(
            *(batcher.submit(i) for i in range(20)), return_exceptions=True))

    results = asyncio.run(main())
    for i, result in enumerate(results):
        if i == poison:
            assert isinstance(result, BatchFailed)
            assert "model exploded" in str(result)
        else:
            assert result == _square_plus(i)
    assert [poison] in calls  # the poison item was retried alone
    assert any(poison in c and len(c) > 1 for c in calls)  # after failing inside a bigger batch


def test_without_isolation_a_failed_batch_fails_all_its_callers():
    def run_batch(items):
        if 0 in items:
            raise RuntimeError("boom")
        return list(items)

    async def main():
        batcher = MicroBatcher(run_batch, max_batch_size=4, max_wait_s=0.05, isolate_failures=False)
        return await _with_batcher(batcher, lambda: asyncio.gather(
            *(batcher.submit(i) for i in range(3)), return_exceptions=True))

    results = asyncio.run(main())
    assert all(isinstance(r, BatchFailed) for r in results)


def test_wrong_number_of_results_fails_callers_with_batch_failed():
    def run_batch(items):
        return list(items) + ["extra"]

    async def main():
        batcher = MicroBatcher(run_batch, max_batch_size=4, max_wait_s=0.02)
        return await _with_batcher(batcher, lambda: asyncio.gather(
            *(batcher.submit(i) for i in range(4)), return_exceptions=True))

    results = asyncio.run(main())
    assert len(results) == 4
    for r in results:
        assert isinstance(r, BatchFailed)
        assert "results for" in str(r)


def test_batcher_keeps_serving_after_a_failed_batch():
    def run_batch(items):
        if "bad" in items:
            raise ValueError("bad item")
        return [s.upper() for s in items]

    async def main():
        batcher = MicroBatcher(run_batch, max_batch_size=4, max_wait_s=0)

        async def body():
            with pytest.raises(BatchFailed):
                await batcher.submit("bad")
            return await batcher.submit("good")

        return await _with_batcher(batcher, body)

    assert asyncio.run(main()) == "GOOD"


@pytest.mark.parametrize("kwargs", [{"max_batch_size": 0}, {"max_batch_size": -3}, {"max_wait_s": -0.001}])
def test_invalid_constructor_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        MicroBatcher(lambda items: items, **kwargs)


def test_stats_and_on_batch_count_batches_and_items():
    seen: list[tuple[int, float]] = []
    sizes: list[int] = []

    def run_batch(items):
        sizes.append(len(items))
        return list(items)

    async def main():
        batcher = MicroBatcher(run_batch, max_batch_size=5, max_wait_s=0.01,
                               on_batch=lambda size, seconds: seen.append((size, seconds)))
        await _with_batcher(batcher, lambda: asyncio.gather(*(batcher.submit(i) for i in range(12))))
        return batcher.stats

    stats = asyncio.run(main())
    assert stats.items == 12
    assert stats.batches == len(sizes)
    assert stats.size == sizes[-1]
    assert [s for s, _ in seen] == sizes
    assert all(seconds >= 0 for _, seconds in seen)
    assert max(sizes) <= 5


def test_stats_do_not_count_failed_items():
    def run_batch(items):
        if -1 in items:
            raise RuntimeError("nope")
        return list(items)

    async def main():
        batcher = MicroBatcher(run_batch, max_batch_size=8, max_wait_s=0.02)
        await _with_batcher(batcher, lambda: asyncio.gather(
            *(batcher.submit(i) for i in (1, 2, -1, 3)), return_exceptions=True))
        return batcher.stats

    stats = asyncio.run(main())
    assert stats.items == 3  # the three good items, re-run one by one after the mixed batch failed


def test_real_model_failure_mid_batch_fails_only_the_poisoned_image(tmp_path):
    write_tiny_repository(tmp_path, "poisoned", "1", poison=True)
    classifier = ImageClassifier(ModelRepository(tmp_path).load("poisoned", providers=("cpu",)))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, size=(40, 50, 3), dtype=np.uint8) for _ in range(7)]  # max 254: safe
    white = 4
    images[white] = np.full((40, 50, 3), 255, np.uint8)
    tensors = [classifier.preprocess(img) for img in images]

    async def main():
        batcher = MicroBatcher(classifier.run_batch, max_batch_size=8, max_wait_s=0.02)
        return await _with_batcher(batcher, lambda: asyncio.gather(
            *(batcher.submit(t) for t in tensors), return_exceptions=True))

    results = asyncio.run(main())
    assert isinstance(results[white], BatchFailed)
    for i, result in enumerate(results):
        if i == white:
            continue
        probs = softmax(tiny_logits(tensors[i][None]), axis=-1)[0]
        expected = sorted(range(len(probs)), key=lambda c: (-probs[c], c))[:3]
        assert result.class_ids == expected
        np.testing.assert_allclose(result.scores, probs[expected], rtol=1e-4)


def test_submit_many_splits_a_large_submission_across_batches_in_order():
    sizes: list[int] = []

    def run_batch(items):
        sizes.append(len(items))
        return [_square_plus(x) for x in items]

    async def main():
        batcher = MicroBatcher(run_batch, max_batch_size=8, max_wait_s=0.001)
        return await _with_batcher(batcher, lambda: batcher.submit_many(list(range(30))))

    assert asyncio.run(main()) == [_square_plus(i) for i in range(30)]
    assert sizes == [8, 8, 8, 6]


def test_submissions_share_batches_and_each_gets_its_own_results():
    batches: list[list[int]] = []
    release = threading.Event()

    def run_batch(items):
        batches.append(list(items))
        release.wait(1)  # the first batch runs while the others queue up behind it
        return [_square_plus(x) for x in items]

    async def main():
        batcher = MicroBatcher(run_batch, max_batch_size=10, max_wait_s=0.01)

        async def body():
            first = asyncio.ensure_future(batcher.submit_many([100]))
            while not batches:
                await asyncio.sleep(0.001)
            rest = [asyncio.ensure_future(batcher.submit_many(list(range(k * 4, k * 4 + 4)))) for k in range(3)]
            await asyncio.sleep(0)
            release.set()
            return await first, await asyncio.gather(*rest)

        return await _with_batcher(batcher, body)

    first, rest = asyncio.run(main())
    assert first == [_square_plus(100)]
    assert rest == [[_square_plus(x) for x in range(k * 4, k * 4 + 4)] for k in range(3)]
    assert batches[1:] == [list(range(0, 10)), [10, 11]]  # 12 queued items: a full batch, then the rest


def test_submit_many_returns_batch_failed_in_place_of_a_poisoned_item():
    def run_batch(items):
        if 13 in items:
            raise ValueError("poison")
        return [x + 1 for x in items]

    async def main():
        batcher = MicroBatcher(run_batch, max_batch_size=8, max_wait_s=0)
        return await _with_batcher(batcher, lambda: batcher.submit_many([1, 13, 2]))

    results = asyncio.run(main())
    assert results[0] == 2 and results[2] == 3
    assert isinstance(results[1], BatchFailed)


def test_a_cancelled_submission_is_skipped_and_others_still_run():
    ran: list[int] = []
    release = threading.Event()

    def run_batch(items):
        ran.extend(items)
        release.wait(1)
        return list(items)

    async def main():
        batcher = MicroBatcher(run_batch, max_batch_size=4, max_wait_s=0)

        async def body():
            first = asyncio.ensure_future(batcher.submit(0))
            while not ran:
                await asyncio.sleep(0.001)
            doomed = asyncio.ensure_future(batcher.submit_many([1, 2]))
            kept = asyncio.ensure_future(batcher.submit_many([3]))
            await asyncio.sleep(0)
            doomed.cancel()
            release.set()
            return await first, await kept

        return await _with_batcher(batcher, body)

    assert asyncio.run(main()) == (0, [3])
    assert ran == [0, 3]


def test_a_closed_batcher_refuses_new_work():
    async def main():
        batcher = MicroBatcher(lambda items: list(items))
        await batcher.close()
        with pytest.raises(RuntimeError, match="closed"):
            await batcher.submit(1)

    asyncio.run(main())


def test_stream_items_are_batched_before_synchronous_calls_that_queued_earlier():
    from operators.batcher import SYNC

    batches: list[list[str]] = []
    release = threading.Event()

    def run_batch(items):
        batches.append(list(items))
        release.wait(1)
        return list(items)

    async def main():
        batcher = MicroBatcher(run_batch, max_batch_size=3, max_wait_s=0)

        async def body():
            first = asyncio.ensure_future(batcher.submit("first"))
            while not batches:
                await asyncio.sleep(0.001)
            api = asyncio.ensure_future(batcher.submit_many(["api-1", "api-2"], SYNC))
            await asyncio.sleep(0)
            stream = asyncio.ensure_future(batcher.submit_many(["rec-1", "rec-2"]))
            await asyncio.sleep(0)
            release.set()
            return await asyncio.gather(first, api, stream)

        return await _with_batcher(batcher, body)

    asyncio.run(main())
    assert batches == [["first"], ["rec-1", "rec-2", "api-1"], ["api-2"]]
