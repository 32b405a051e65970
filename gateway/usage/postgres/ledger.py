"""The usage ledger of record on PostgreSQL (``[usage] database_url``), shared by every replica.

``record`` (on the request path) gives the record its ledger id and queues it in memory; it never
blocks nor raises. Off the request path, with a durable queue (``stream``: a Redis Stream, when
``[shared] redis_url`` is set) a shipper pushes what is queued to the stream within 10 ms (one
entry per batch) and a consumer writes the stream's batches to PostgreSQL, confirming them after
the commit and taking over those another replica left unconfirmed (``gateway.usage.postgres.
consumer``): a replica killed with SIGKILL loses only its last 10 ms. While Redis does not answer
the shipper writes to PostgreSQL itself. Without a stream, the shipper writes the queue every
``flush_interval`` seconds (a crash loses what was queued, as with the SQLite ledger).

While PostgreSQL does not answer, batches wait (in the stream, or in memory up to ``max_queue``
records; past it the oldest are dropped and counted). One log line per change of state
(``gateway.usage.postgres.health``). The schema is created or migrated at ``start``; ``aclose``
ships and writes what it can within ``drain_timeout`` (a second when PostgreSQL is known down):
what it cannot stays in the stream for the other replicas (or the next start), or is counted as
dropped. docs/usage.md, "The ledger on PostgreSQL", says the same for operators."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import date, datetime
from functools import partial
from itertools import count
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from gateway.usage.postgres import reports
from gateway.usage.postgres.consumer import StreamConsumer
from gateway.usage.postgres.health import Health
from gateway.usage.postgres.reports import LedgerUnavailable
from gateway.usage.postgres.retention import Pruner
from gateway.usage.postgres.schema import migrate
from gateway.usage.postgres.stream import RecordStream
from gateway.usage.postgres.write import Entry, write_batch
from gateway.usage.reports import Dim, Groups, SummaryBy
from gateway.usage.schema import LedgerError, UsageRecord, counted_locally

logger = logging.getLogger("gateway.usage.postgres")
T = TypeVar("T")

_PG_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout, OSError, TimeoutError)
_SPEND_TIMEOUT = 2.0  # seconds a budget's first read of a period may add to a request
_REPORT_TIMEOUT = 30.0  # seconds /admin/usage may wait for PostgreSQL
_WRITE_TIMEOUT = 30.0  # seconds a batch may take before the write counts as failed (and is retried)
_LINGER = 0.01  # seconds the shipper gathers records before a push to the stream
_STREAM_RETRY = 5.0  # seconds the shipper writes to PostgreSQL itself after the stream failed
_START_TIMEOUT = 3.0  # seconds the start-up may wait for PostgreSQL (the writers retry after)


class PostgresLedger:
    def __init__(
        self,
        url: str,
        *,
        stream: RecordStream | None = None,
        stream_errors: tuple[type[Exception], ...] = (),
        flush_interval: float = 1.0,
        claim_after: float = 30.0,
        max_batch: int = 500,
        max_queue: int = 100_000,
        drain_timeout: float = 10.0,
        retention_days: int = 0,
    ) -> None:
        """``retention_days``: raw rows older than that are deleted, their totals kept (0: keep all)."""
        self._pool: AsyncConnectionPool[AsyncConnection[TupleRow]] = AsyncConnectionPool(
            url, min_size=1, max_size=4, open=False, timeout=5.0, check=AsyncConnectionPool.check_connection,
            kwargs={"application_name": "flexai-gateway", "connect_timeout": 5},
        )  # fmt: skip
        self._stream = stream
        self._stream_errors: tuple[type[Exception], ...] = (*stream_errors, OSError, TimeoutError)
        self._flush_interval = flush_interval
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._drain_timeout = drain_timeout
        self._queue: deque[Entry] = deque()
        # Held while a batch is out of the queue and not yet written (or pushed to the stream), and by
        # the reads that add the queued records to the rows: each record is counted once, never zero times.
        self._handing = asyncio.Lock()
        self._prefix = os.urandom(8).hex()  # ledger ids: unique per process, then a counter
        self._ids = count(1)
        self._dropped = 0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._reads: set[asyncio.Task[Any]] = set()  # reads that overran their caller's timeout
        self._migrated = False
        self._stream_retry_at = 0.0  # monotonic time from which to push to the stream again
        self._stopping = False
        self._closed = False
        self._health = Health()
        self._pruner = Pruner(self._connection, retention_days) if retention_days > 0 else None
        self._pruning: asyncio.Task[None] | None = None
        self._consumer = (
            None
            if stream is None
            else StreamConsumer(
                stream,
                self._write,
                self._health,
                errors=self._stream_errors,
                claim_after=claim_after,
                interval=flush_interval,
            )
        )

    @property
    def dropped(self) -> int:
        """Records dropped: queue overflow, refused by PostgreSQL, after close, unreadable stream entries."""
        return self._dropped + (self._consumer.dropped if self._consumer is not None else 0)

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def start(self) -> None:
        await self._pool.open(wait=False)
        try:
            async with asyncio.timeout(_START_TIMEOUT):
                await self._ensure_schema()
        except _PG_ERRORS as exc:  # PostgreSQL not answering yet: the writers retry
            self._health.failed("PostgreSQL", exc)
        self._tasks.append(asyncio.create_task(self._ship_forever(), name="ledger-shipper"))
        if self._pruner is not None:
            self._pruning = asyncio.create_task(self._pruner.run(), name="ledger-retention")
        if self._consumer is not None:
            self._tasks.append(asyncio.create_task(self._consumer.run(), name="ledger-consumer"))

    def record(self, r: UsageRecord) -> None:
        if self._closed:
            self._drop(1)
            return
        self._queue.append(Entry(f"{self._prefix}{next(self._ids):x}", r))
        if len(self._queue) > self._max_queue:
            self._queue.popleft()
            self._drop(1)
        if self._stream is not None or len(self._queue) >= self._max_batch:
            self._wake.set()

    async def spend_usd(self, key_name: str, since_ts: float) -> float:
        """The key's spend since ``since_ts``: written rows plus the records queued here, each once
        (a batch being written is waited for)."""
        async with self._no_batch_out():
            queued = sum(e.record.cost_usd or 0.0 for e in self._queue
                         if e.record.key_name == key_name and e.record.ts >= since_ts)  # fmt: skip
            return queued + await self._read(reports.spend_usd, _SPEND_TIMEOUT, key_name, since_ts)

    async def recent_requests(self, key_name: str, since_ts: float) -> list[tuple[float, int]]:
        """The key's requests since ``since_ts`` the rate limiter counted, as (time, tokens): rows plus
        the records queued here, each once (``gateway.usage.ledger.Ledger.recent_requests``)."""
        async with self._no_batch_out():
            local = [(e.record.ts, e.record.total_tokens) for e in self._queue if e.record.key_name == key_name
                     and e.record.ts >= since_ts and not counted_locally(e.record)]  # fmt: skip
            return local + await self._read(reports.recent_requests, _SPEND_TIMEOUT, key_name, since_ts)

    async def summarize(self, by: SummaryBy, key: str | None, since: date | None) -> list[dict[str, Any]]:
        """``gateway.usage.postgres.reports.summarize`` (for ``GET /admin/usage``)."""
        return await self._read(partial(reports.summarize, by=by, key=key, since=since), _REPORT_TIMEOUT)

    async def aggregate(
        self,
        *,
        group: Sequence[Dim] = (),
        start: datetime | date | float | None = None,
        end: datetime | date | float | None = None,
        where: Mapping[str, Sequence[str]] | None = None,
    ) -> Groups:
        """``gateway.usage.postgres.reports.aggregate`` (for the console: ``UsageReports``)."""
        read = partial(reports.aggregate, group=group, start=start, end=end, where=where)
        return await self._read(read, _REPORT_TIMEOUT)

    async def aclose(self) -> None:
        if self._closed or self._stopping:
            return
        self._stopping = True
        self._wake.set()
        self._health.closing.set()
        if self._pruning is not None:
            self._pruning.cancel()
            await asyncio.gather(self._pruning, return_exceptions=True)
        # PostgreSQL known down: a second for what can still go (to the stream), not the whole wait.
        deadline = time.monotonic() + (1.0 if self._health.down("PostgreSQL") else self._drain_timeout)
        errors: tuple[type[BaseException], ...] = (*_PG_ERRORS, *self._stream_errors)
        try:
            shipper, consumer = self._tasks[:1], self._tasks[1:]
            for task in consumer:
                task.cancel()  # a batch it was reading stays pending with it: drained below
            await asyncio.gather(*consumer, return_exceptions=True)
            if shipper:
                await asyncio.wait_for(shipper[0], max(0.1, deadline - time.monotonic()))
                if self._consumer is not None:
                    await asyncio.wait_for(self._consumer.drain(), max(0.1, deadline - time.monotonic()))
        except errors as exc:
            logger.warning("ledger: stopped before everything was written (%s)", type(exc).__name__)
        finally:
            self._closed = True
            self._drop(len(self._queue))
            self._queue.clear()
            for read in self._reads:
                read.cancel()
            await asyncio.gather(*self._reads, return_exceptions=True)
            await self._pool.close()
            if self._stream is not None:
                with contextlib.suppress(*self._stream_errors):
                    await self._stream.aclose()

    # ------------------------------------------------------------------------ shipping

    async def _ship_forever(self) -> None:
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
        """Hand on the records queued now in batches (``until_empty``: and those that arrive
        meanwhile); False when a batch could not go (it is queued again). Records that arrive during
        a round go in the next one: under load a round ships what a wait gathered, not a stream of
        small batches (each a transaction, or a stream entry)."""
        left = len(self._queue)
        while self._queue and (until_empty or left > 0):
            async with self._handing:  # (the reads that count queued records wait for this batch)
                take = min(self._max_batch, len(self._queue), len(self._queue) if until_empty else left)
                left -= take
                batch = [self._queue.popleft() for _ in range(take)]
                if not batch:
                    break
                try:
                    if not await self._hand_on(batch):
                        self._queue.extendleft(reversed(batch))
                        return False
                except asyncio.CancelledError:  # aclose's deadline: counted as dropped there, not lost silently
                    self._queue.extendleft(reversed(batch))
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

    async def _write(self, batch: list[Entry]) -> bool:
        """Write a batch; False when PostgreSQL did not answer (the caller keeps the batch)."""
        try:
            async with asyncio.timeout(_WRITE_TIMEOUT):
                await self._write_now(batch)
        except (*_PG_ERRORS, LedgerError, psycopg.Error) as exc:  # the batch is kept and retried
            self._health.failed("PostgreSQL", exc)
            return False
        self._health.answered("PostgreSQL")
        return True

    async def _write_now(self, batch: list[Entry]) -> None:
        await self._ensure_schema()
        async with self._connection() as conn:
            try:
                await write_batch(conn, batch)
            except (psycopg.DataError, psycopg.IntegrityError):  # a value it cannot store: the rest, not it
                for entry in batch:
                    try:
                        await write_batch(conn, [entry])
                    except (psycopg.DataError, psycopg.IntegrityError) as exc:
                        logger.error("ledger: a usage record could not be stored and was dropped (request %s): %s",
                                     entry.record.request_id, exc)  # fmt: skip
                        self._dropped += 1

    # ------------------------------------------------------------------------ internals

    async def _read(self, query: Callable[..., Awaitable[T]], within: float, *args: Any) -> T:
        """``query(conn, *args)``, or ``LedgerUnavailable`` after ``within`` seconds. A query that
        overruns is left to end in the background: cancelling it would wait for PostgreSQL too."""

        async def run() -> T:
            await self._ensure_schema()
            async with self._connection() as conn:
                return await query(conn, *args)

        task = asyncio.ensure_future(run())
        self._reads.add(task)
        task.add_done_callback(_forget(self._reads))
        try:
            result = await asyncio.wait_for(asyncio.shield(task), within)
        except (*_PG_ERRORS, psycopg.Error, LedgerError) as exc:  # never a 500 for the database's state
            self._health.failed("PostgreSQL", exc)
            raise LedgerUnavailable("The usage ledger is unavailable; retry shortly.", retry_after=5) from exc
        self._health.answered("PostgreSQL")
        return result

    @contextlib.asynccontextmanager
    async def _no_batch_out(self) -> AsyncIterator[None]:
        """While no batch is between the queue and PostgreSQL (or the stream): waited for at most as
        long as a budget's read may take, then ``LedgerUnavailable`` (a write stuck on a stalled
        database must not hold a request longer)."""
        try:
            async with asyncio.timeout(_SPEND_TIMEOUT):
                await self._handing.acquire()
        except TimeoutError as exc:  # the batch's write has waited that long: PostgreSQL does not answer
            self._health.failed("PostgreSQL", exc)
            raise LedgerUnavailable("The usage ledger is unavailable; retry shortly.", retry_after=5) from None
        try:
            yield
        finally:
            self._handing.release()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[AsyncConnection[TupleRow]]:
        async with self._pool.connection() as conn:
            yield conn

    async def _ensure_schema(self) -> None:
        if self._migrated:
            return
        async with self._connection() as conn:
            await migrate(conn)  # LedgerError (a newer schema): the start fails
        self._migrated = True

    def _drop(self, count: int) -> None:
        if count > 0:
            if self._dropped == 0:
                logger.warning("ledger: dropping usage records; further drops are only counted")
            self._dropped += count


def _forget(tasks: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
    def forget(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: an overrun read's error is already answered as LedgerUnavailable

    return forget
