"""The PostgreSQL ledger's record queue and its shipping (for ``gateway.usage.postgres.ledger``).

``record`` (on the request path) gives the record its ledger id and queues it in memory; it never
blocks nor raises. Past ``max_queue`` records the oldest is dropped, and a record after ``close`` is
dropped too (counted by the ledger's ``drop``). ``run`` (off the request path) hands the queue on in
batches of at most ``max_batch``: with a durable queue (``stream``) within 10 ms of a record, pushed
to the stream while Redis answers (for 5 s after it failed, written to PostgreSQL through ``write``
instead); without one every ``flush_interval`` seconds, or as soon as ``max_batch`` records wait. A
round hands on what was queued when it began; a batch that could not go is queued again, in order.
``handing`` is held while a batch is out of the queue and not yet handed on: the reads that add
the queued records to the rows take it too (``gateway.usage.postgres.reads``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from itertools import count

from gateway.usage.postgres.health import Health
from gateway.usage.postgres.stream import RecordStream
from gateway.usage.postgres.write import Entry
from gateway.usage.rounds import round_batches
from gateway.usage.schema import UsageRecord

logger = logging.getLogger("gateway.usage.postgres")

_LINGER = 0.01  # seconds the shipper gathers records before a push to the stream
_STREAM_RETRY = 5.0  # seconds the shipper writes to PostgreSQL itself after the stream failed


class Shipper:
    """The PostgreSQL ledger's queue of records and the task that hands it on (module docstring)."""

    def __init__(
        self,
        write: Callable[[list[Entry]], Awaitable[bool]],
        drop: Callable[[int], None],
        health: Health,
        *,
        stream: RecordStream | None,
        stream_errors: tuple[type[Exception], ...],
        flush_interval: float,
        max_batch: int,
        max_queue: int,
    ) -> None:
        """``write``: to PostgreSQL, False when it did not answer; ``drop``: counts records dropped;
        ``stream_errors``: Redis's."""
        self._write = write
        self._drop = drop
        self._health = health
        self._stream = stream
        self._stream_errors = stream_errors
        self._flush_interval = flush_interval
        self._max_batch = max_batch
        self._max_queue = max_queue
        self.queue: deque[Entry] = deque()
        # Held while a batch is out of the queue and not yet written (or pushed to the stream), and by
        # the reads that add the queued records to the rows: each record is counted once, never zero times.
        self.handing = asyncio.Lock()
        self._prefix = os.urandom(8).hex()  # ledger ids: unique per process, then a counter
        self._ids = count(1)
        self._wake = asyncio.Event()
        self._stream_retry_at = 0.0  # monotonic time from which to push to the stream again
        self._stopping = False
        self._closed = False

    @property
    def stopping(self) -> bool:
        """Whether ``stop`` was called (the ledger is closing or closed)."""
        return self._stopping

    def record(self, r: UsageRecord) -> None:
        if self._closed:
            self._drop(1)
            return
        self.queue.append(Entry(f"{self._prefix}{next(self._ids):x}", r))
        if len(self.queue) > self._max_queue:
            self.queue.popleft()
            self._drop(1)
        if self._stream is not None or len(self.queue) >= self._max_batch:
            self._wake.set()

    def stop(self) -> None:
        """``run`` ends after a last round that hands on everything queued."""
        self._stopping = True
        self._wake.set()

    def close(self) -> None:
        """What is still queued is dropped, and so is every record from now on."""
        self._closed = True
        self._drop(len(self.queue))
        self.queue.clear()

    async def run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._flush_interval)
            if self._stream is not None:
                await self._health.pause(_LINGER)  # what arrives meanwhile goes in the same entry
            self._wake.clear()
            try:
                shipped = await self._ship()
            except Exception:  # a bug must not end the shipping for good: logged, then retried
                logger.exception("ledger: shipping failed")
                shipped = False
            if not shipped:
                await self._health.pause(min(1.0, self._flush_interval))
        await self._ship(until_empty=True)

    async def _ship(self, *, until_empty: bool = False) -> bool:
        """Hand on a round's batches (``gateway.usage.rounds``); False when a batch could not go (it
        is queued again)."""
        batches = round_batches(self.queue, self._max_batch, until_empty=until_empty)
        while True:
            async with self.handing:  # (the reads that count queued records wait for this batch)
                batch = next(batches, None)
                if batch is None:
                    break
                try:
                    if not await self._hand_on(batch):
                        self.queue.extendleft(reversed(batch))
                        return False
                except asyncio.CancelledError:  # aclose's deadline: counted as dropped there, not lost silently
                    self.queue.extendleft(reversed(batch))
                    raise
        return True

    async def _hand_on(self, batch: list[Entry]) -> bool:
        """To the stream (while it answers), else to PostgreSQL; False when neither took it."""
        if self._stream is not None and time.monotonic() >= self._stream_retry_at:
            try:
                await self._stream.push(batch)
            except self._stream_errors as exc:
                self._health.failed("Redis", exc)
                self._stream_retry_at = time.monotonic() + _STREAM_RETRY  # meanwhile straight to PostgreSQL
            else:
                self._health.answered("Redis")
                return True
        return await self._write(batch)
