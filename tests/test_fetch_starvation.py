"""The rule that raises the consumer's fetch wait (streams/batches.py): which partitions count as starved.
The raise itself runs against the real broker in tests/test_integration_batching.py."""

from streams.batches import starved_since

BEFORE = (1_000, 17.0)  # position 1,000, last fetch answer at 17.0


def test_answers_without_progress_on_a_partition_with_lag_are_starvation():
    assert starved_since(BEFORE, 1_000, 22.0, highwater=5_000, prefetched=False)


def test_a_frozen_broker_sends_no_answers_so_it_never_raises_the_wait():
    assert not starved_since(BEFORE, 1_000, 17.0, highwater=5_000, prefetched=False)


def test_a_partition_that_moved_is_not_starved():
    assert not starved_since(BEFORE, 1_200, 22.0, highwater=5_000, prefetched=False)


def test_a_caught_up_partition_is_not_starved():
    assert not starved_since(BEFORE, 1_000, 22.0, highwater=1_000, prefetched=False)
    assert not starved_since(BEFORE, 1_000, 22.0, highwater=None, prefetched=False)


def test_records_fetched_but_not_yet_taken_mean_a_slow_agent_not_a_starved_fetch():
    assert not starved_since(BEFORE, 1_000, 22.0, highwater=5_000, prefetched=True)


def test_the_first_look_at_a_partition_only_records_it():
    assert not starved_since(None, 1_000, 22.0, highwater=5_000, prefetched=False)
