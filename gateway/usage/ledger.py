"""The usage ledger: one row per request in SQLite, written in batches off the request path.

``Ledger.record`` only appends to an in-memory queue. A background task writes the queue in
batches (one transaction per batch of at most ``max_batch`` rows) every ``flush_interval`` seconds,
or as soon as a full batch is waiting, on a dedicated thread with a connection of its own. A
round writes what was queued when it began; what arrives meanwhile waits for the next round
(``gateway.usage.rounds``).

There are two such writers, and a round goes to one of them. The idle writer's thread has the idle
scheduling policy (``gateway.threads.idle_priority``): where the gateway has one core, a request
arriving while it writes gets the core at once (at nice 10 the event loop waited ~2 us a request
for the writer, and the one-client p99 showed it; bench/README.md, 2026-12-06). But such a thread
gets next to nothing of a core the event loop keeps busy, so its batches are small
(``IDLE_MAX_BATCH`` rows) and one that takes longer than ``flush_interval`` sends the next rounds
to the busy writer, a thread at ``background_priority`` (nice 10), for ``BUSY_HOLD_S`` seconds
before the idle one is tried again; the last rounds, on shutdown, go to the busy writer too. Rounds
never overlap, so the two never write at once; a read goes to the latest round's writer, behind
its write.
``aclose`` writes everything still queued, so a clean shutdown loses nothing. A crash loses the
records not yet written: those recorded in the last ``flush_interval`` seconds (and, if the disk
fell behind, whatever was still queued). The queue is bounded (``max_queue``): past it, the oldest
records are dropped, counted in ``dropped`` and logged once. A batch that the database refuses for
what is in it (a value SQLite cannot store) is written again row by row: the one bad record is
dropped, counted and logged with its request id, and every other record is written. Only failures
of the database itself (disk full, locked) keep the batch queued for a retry.

The writer's thread runs on the gateway's CPU, so its CPU per row is the ledger's cost per request. A
statement per row (``executemany``) cost ~13 us per row in the running gateway at 64 clients, 3x
SQLite's own work: each statement releases the GIL and takes it back from the busy event loop (a
context switch or more each time), and sqlite3 looked up an adapter, in vain and slowly, for
every NULL and bool bound (``gateway.usage.writes``). So a batch is a whole flush interval's
records (``max_batch`` is well above a second's at a few thousand requests/s) and goes in as a few
INSERT statements of many rows each (``gateway.usage.writes``): ~35 statements a second, not
thousands, and ~3 us of the writer's CPU per row at 64 clients (it was ~7 while each write was
followed at once by another, of the records that had arrived during it).

The database is in WAL mode (readers, such as the CLI or ``spend_usd`` at startup, never block the
writer) with ``synchronous=NORMAL`` (a power loss may lose the last transactions, never corrupt).
The table and its migrations are ``gateway.usage.schema``; the queries ``gateway.usage.reports``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from gateway.threads import background_priority, idle_priority
from gateway.usage import writes
from gateway.usage.reports import recent_requests, spend_usd
from gateway.usage.rounds import round_batches
from gateway.usage.schema import UsageRecord, counted_locally

logger = logging.getLogger("gateway.usage.ledger")

T = TypeVar("T")

# How long the ledger writes on its nice-10 thread after its idle one fell behind, before it tries
# the idle one again (seconds).
BUSY_HOLD_S = 30.0
# Rows per batch (a transaction) on the idle writer: a starved batch is noticed after this many.
IDLE_MAX_BATCH = 1024


class _Writer:
    """One thread and the SQLite connection that only it uses."""

    def __init__(self, name: str, initializer: Callable[[], None]) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=initializer)
        self.conn: sqlite3.Connection | None = None

    async def open(self, path: Path) -> None:
        self.conn = await self.run(writes.open_writer, path)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            await self.run(conn.close)
        self._executor.shutdown(wait=True)

    def abandon(self) -> None:
        self._executor.shutdown(wait=False)


class Ledger:
    """Records usage from the request path without blocking it; see the module docstring."""

    def __init__(
        self, path: Path, *, flush_interval: float = 1.0, max_batch: int = 10_000, max_queue: int = 100_000
    ) -> None:
        if flush_interval <= 0 or max_batch < 1 or max_queue < 1:
            raise ValueError("flush_interval must be > 0, max_batch and max_queue >= 1")
        self._path = path
        self._flush_interval = flush_interval
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._queue: deque[UsageRecord] = deque()
        self._dropped = 0
        self._warned_drop = False
        # The writers (see the module docstring): the idle one, unless it fell behind lately.
        self._idle: _Writer | None = None
        self._busy: _Writer | None = None
        self._current: _Writer | None = None  # the latest round's: a read queues behind its write
        self._busy_until = 0.0  # time.monotonic() until which rounds go to the busy writer
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._closed = False

    @property
    def dropped(self) -> int:
        """Records dropped: queue overflow, written after close, or a failed final write."""
        return self._dropped

    @property
    def pending(self) -> int:
        """Records queued, not yet handed to the writer."""
        return len(self._queue)

    async def start(self) -> None:
        """Open (creating or migrating) the database and start the background writer."""
        if self._busy is not None or self._closed:
            raise RuntimeError("Ledger.start() may be called once, before aclose()")
        busy, idle = _Writer("ledger", background_priority), _Writer("ledger-idle", idle_priority)
        try:
            await busy.open(self._path)  # (creates or migrates the file first)
            await idle.open(self._path)
        except BaseException:
            busy.abandon()
            idle.abandon()
            raise
        self._busy, self._idle, self._current = busy, idle, idle
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="ledger-writer")

    def record(self, r: UsageRecord) -> None:
        """Queue one record (call from the event loop's thread). Never blocks, never raises.

        Records are accepted until ``aclose`` has written the last batch.
        """
        if self._closed:
            self._drop(1, "the ledger is closed")
            return
        self._queue.append(r)
        if len(self._queue) > self._max_queue:
            self._queue.popleft()
            self._drop(1, f"more than {self._max_queue} records are waiting to be written")
        if len(self._queue) >= self._max_batch and self._wake is not None:
            self._wake.set()

    async def spend_usd(self, key_name: str, since_ts: float) -> float:
        """The key's spend since ``since_ts``: written rows plus records still queued, each once."""
        queued = sum(r.cost_usd or 0.0 for r in self._queue if r.key_name == key_name and r.ts >= since_ts)
        writer = self._current
        if writer is None or writer.conn is None:
            return queued
        # A writer runs its jobs in order, and the latest round's writer has every earlier round's
        # rows committed or queued before this query: batches taken from the queue before this
        # line are written before the query runs; records still queued now are written after it.
        return queued + await writer.run(spend_usd, writer.conn, key_name, since_ts)

    async def recent_requests(self, key_name: str, since_ts: float) -> list[tuple[float, int]]:
        """The key's requests since ``since_ts`` the rate limiter counted, as (time, tokens): rows
        and records still queued, each once (to seed a shared window again: Redis restarted empty)."""
        queued = [(r.ts, r.total_tokens) for r in self._queue if r.key_name == key_name and r.ts >= since_ts
                  and not counted_locally(r)]  # fmt: skip
        writer = self._current
        if writer is None or writer.conn is None:
            return queued
        return await writer.run(recent_requests, writer.conn, key_name, since_ts) + queued

    async def aclose(self) -> None:
        """Write everything still queued, then close the database. Idempotent."""
        if self._closed or self._stopping:
            return
        self._stopping = True
        if self._task is None or self._wake is None or self._busy is None or self._idle is None:
            self._closed = True
            if self._queue:
                self._drop(len(self._queue), "the ledger was never started")
                self._queue.clear()
            return
        self._wake.set()
        try:
            await self._task
        finally:
            self._closed = True
            if self._queue:
                self._drop(len(self._queue), "the final write failed")
                self._queue.clear()
            self._current = None
            await self._idle.close()
            await self._busy.close()

    async def __aenter__(self) -> Ledger:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _run(self) -> None:
        assert self._wake is not None
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._flush_interval)
            self._wake.clear()
            await self._drain()
        if not await self._drain(until_empty=True):
            await self._drain(until_empty=True)  # one retry on shutdown; what still fails is counted as dropped

    async def _drain(self, *, until_empty: bool = False) -> bool:
        """Write a round's batches (``gateway.usage.rounds``); False when a write failed (the batch is
        queued again)."""
        writer = self._writer_for(until_empty)
        self._current = writer
        max_batch = self._max_batch if writer is self._busy else min(self._max_batch, IDLE_MAX_BATCH)
        for batch in round_batches(self._queue, max_batch, until_empty=until_empty):
            started = time.monotonic()
            try:
                await writer.run(writes.write_batch, writer.conn, batch)
            except (sqlite3.InterfaceError, sqlite3.IntegrityError, sqlite3.DataError, OverflowError, TypeError):
                # Something in the batch cannot be stored: write it row by row, dropping only the bad rows.
                rejected = await writer.run(writes.write_each, writer.conn, batch)
                for record in rejected:
                    logger.error("ledger: a usage record could not be stored and was dropped (request %s)",
                                 record.request_id)  # fmt: skip
                self._dropped += len(rejected)
            except Exception as exc:  # sqlite3.Error mostly (disk full, locked): keep the batch, retry later
                logger.warning("ledger: writing %d records failed, will retry: %s", len(batch), exc)
                self._queue.extendleft(reversed(batch))
                excess = len(self._queue) - self._max_queue
                for _ in range(max(0, excess)):
                    self._queue.popleft()
                if excess > 0:
                    self._drop(excess, f"more than {self._max_queue} records are waiting to be written")
                return False
            if writer is self._idle and time.monotonic() - started > self._flush_interval:
                # Starved: the event loop keeps the core busy. The next rounds go to the busy writer.
                self._busy_until = time.monotonic() + BUSY_HOLD_S
                logger.info("ledger: the idle writer fell behind; writing at background priority for %g s",
                            BUSY_HOLD_S)  # fmt: skip
                return True
        return True

    def _writer_for(self, until_empty: bool) -> _Writer:
        """The idle writer, unless it fell behind in the last ``BUSY_HOLD_S`` or this is the last round."""
        assert self._idle is not None
        assert self._busy is not None
        if until_empty or time.monotonic() < self._busy_until:
            return self._busy
        return self._idle

    def _drop(self, count: int, reason: str) -> None:
        self._dropped += count
        if not self._warned_drop:
            self._warned_drop = True
            logger.warning("ledger: dropping usage records (%s); further drops are only counted", reason)
