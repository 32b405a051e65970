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
dropped. docs/usage.md, "The ledger on PostgreSQL", says the same for operators.

This module holds the ledger's parts together: the ``PostgresLedger`` the gateway uses, its start
and close, its connection pool and schema, and the write of a batch (the shipper's and the
consumer's). The queue and its shipping are in ``gateway.usage.postgres.shipping``, the reads (with
their time limits) in ``gateway.usage.postgres.reads``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import date, datetime
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from gateway.usage.postgres.consumer import StreamConsumer
from gateway.usage.postgres.health import Health
from gateway.usage.postgres.reads import Reads
from gateway.usage.postgres.retention import Pruner
from gateway.usage.postgres.schema import migrate
from gateway.usage.postgres.shipping import Shipper
from gateway.usage.postgres.stream import RecordStream
from gateway.usage.postgres.write import Entry, write_batch
from gateway.usage.reports import Dim, Groups, SummaryBy
from gateway.usage.schema import LedgerError, UsageRecord

logger = logging.getLogger("gateway.usage.postgres")

_PG_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout, OSError, TimeoutError)
_WRITE_TIMEOUT = 30.0  # seconds a batch may take before the write counts as failed (and is retried)
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
        self._drain_timeout = drain_timeout
        self._dropped = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._migrated = False
        self._health = Health()
        self._shipper = Shipper(
            self._write,
            self._drop,
            self._health,
            stream=stream,
            stream_errors=self._stream_errors,
            flush_interval=flush_interval,
            max_batch=max_batch,
            max_queue=max_queue,
        )
        self._reads = Reads(
            self._migrated_connection, self._health, self._shipper.queue, self._shipper.handing, errors=_PG_ERRORS
        )
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
        return len(self._shipper.queue)

    async def start(self) -> None:
        await self._pool.open(wait=False)
        try:
            async with asyncio.timeout(_START_TIMEOUT):
                await self._ensure_schema()
        except _PG_ERRORS as exc:  # PostgreSQL not answering yet: the writers retry
            self._health.failed("PostgreSQL", exc)
        self._tasks.append(asyncio.create_task(self._shipper.run(), name="ledger-shipper"))
        if self._pruner is not None:
            self._pruning = asyncio.create_task(self._pruner.run(), name="ledger-retention")
        if self._consumer is not None:
            self._tasks.append(asyncio.create_task(self._consumer.run(), name="ledger-consumer"))

    def record(self, r: UsageRecord) -> None:
        self._shipper.record(r)

    async def spend_usd(self, key_name: str, since_ts: float) -> float:
        """The key's spend since ``since_ts``: written rows plus the records queued here, each once
        (a batch being written is waited for)."""
        return await self._reads.spend_usd(key_name, since_ts)

    async def recent_requests(self, key_name: str, since_ts: float) -> list[tuple[float, int]]:
        """The key's requests since ``since_ts`` the rate limiter counted, as (time, tokens): rows plus
        the records queued here, each once (``gateway.usage.ledger.Ledger.recent_requests``)."""
        return await self._reads.recent_requests(key_name, since_ts)

    async def summarize(self, by: SummaryBy, key: str | None, since: date | None) -> list[dict[str, Any]]:
        """``gateway.usage.postgres.reports.summarize`` (for ``GET /admin/usage``)."""
        return await self._reads.summarize(by, key, since)

    async def aggregate(
        self,
        *,
        group: Sequence[Dim] = (),
        start: datetime | date | float | None = None,
        end: datetime | date | float | None = None,
        where: Mapping[str, Sequence[str]] | None = None,
    ) -> Groups:
        """``gateway.usage.postgres.reports.aggregate`` (for the console: ``UsageReports``)."""
        return await self._reads.aggregate(group=group, start=start, end=end, where=where)

    async def aclose(self) -> None:
        if self._shipper.stopping:  # closing or closed already
            return
        self._shipper.stop()
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
            self._shipper.close()
            await self._reads.aclose()
            await self._pool.close()
            if self._stream is not None:
                with contextlib.suppress(*self._stream_errors):
                    await self._stream.aclose()

    # ------------------------------------------------------------------------ writing

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

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[AsyncConnection[TupleRow]]:
        async with self._pool.connection() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def _migrated_connection(self) -> AsyncIterator[AsyncConnection[TupleRow]]:
        """A connection to the schema, created or migrated first if need be (for the reads)."""
        await self._ensure_schema()
        async with self._connection() as conn:
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
