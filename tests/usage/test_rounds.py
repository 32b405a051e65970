"""A writer round's batches (``gateway.usage.rounds``): every record once, in order, and only what
was queued when the round began (unless the round is the last one, on shutdown)."""

from __future__ import annotations

from collections import deque

from gateway.usage.rounds import round_batches


def test_a_round_takes_what_was_queued_in_order_in_batches_of_at_most_max_batch() -> None:
    for size, max_batch in ((1, 10), (10, 10), (25, 10), (7, 1), (100, 1000)):
        queue = deque(range(size))
        batches = list(round_batches(queue, max_batch))
        assert [r for batch in batches for r in batch] == list(range(size))
        assert all(1 <= len(batch) <= max_batch for batch in batches)
        assert not queue


def test_records_queued_during_a_round_wait_for_the_next_one() -> None:
    queue = deque(range(5))
    taken = []
    for batch in round_batches(queue, 2):
        taken += batch
        queue.append(100 + len(taken))  # arrives while the batch is being written
    assert taken == [0, 1, 2, 3, 4]
    assert list(queue) == [102, 104, 105]  # the next round's, in the order they came


def test_the_last_round_takes_until_the_queue_is_empty() -> None:
    queue = deque(range(3))
    taken = []
    for batch in round_batches(queue, 2, until_empty=True):
        taken += batch
        if len(taken) < 6:
            queue.append(100 + len(taken))
    assert taken == [0, 1, 2, 102, 104, 105]
    assert not queue
