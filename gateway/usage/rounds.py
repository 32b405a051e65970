"""The batches of one writer round, shared by the SQLite ledger and the PostgreSQL ledger's shipper.

A round takes what was queued when it began; records that arrive during it wait for the next
round. Were they taken at once, a busy gateway would write a small batch after every write,
hundreds a second, each a transaction and a wake-up of the writer beside the event loop. On
shutdown (``until_empty``) a round also takes what arrives meanwhile, until the queue is empty.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")


def round_batches(queue: deque[T], max_batch: int, *, until_empty: bool = False) -> Iterator[list[T]]:
    """Batches of at most ``max_batch`` taken from the left of ``queue``, each when asked for (so a
    caller that holds a lock while it writes can take the batch under it). A caller that puts a
    batch back (a failed write) stops asking: the round ends there."""
    left = sys.maxsize if until_empty else len(queue)  # records this round may still take
    while queue and left > 0:
        take = min(max_batch, len(queue), left)
        left -= take
        yield [queue.popleft() for _ in range(take)]
