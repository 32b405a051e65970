"""The PostgreSQL ledger's reads (for ``gateway.usage.postgres.ledger``): a key's spend and the
requests the rate limiter counted, each the rows plus the records still queued in this process
(``gateway.usage.postgres.shipping``), and the reports (``gateway.usage.postgres.reports``).

A read waits at most 2 s when a request waits on it (a budget's or a rate limit's) and 30 s for
``/admin/usage`` and the console, then raises ``LedgerUnavailable`` (as it does when PostgreSQL does
not answer): never a 500 for the database's state. A query that overruns is left to end in the
background (cancelling it would wait for PostgreSQL too); ``aclose`` cancels those still running."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import date, datetime
from functools import partial
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import TupleRow

from gateway.usage.postgres import reports
from gateway.usage.postgres.health import Health
from gateway.usage.postgres.reports import LedgerUnavailable
from gateway.usage.postgres.write import Entry
from gateway.usage.reports import Dim, Groups, SummaryBy
from gateway.usage.schema import LedgerError, counted_locally

T = TypeVar("T")

_SPEND_TIMEOUT = 2.0  # seconds a budget's first read of a period may add to a request
_REPORT_TIMEOUT = 30.0  # seconds /admin/usage may wait for PostgreSQL


class Reads:
    def __init__(
        self,
        connect: Callable[[], AbstractAsyncContextManager[AsyncConnection[TupleRow]]],
        health: Health,
        queue: deque[Entry],
        handing: asyncio.Lock,
        *,
        errors: tuple[type[Exception], ...],
    ) -> None:
        """``connect``: a connection to the migrated schema; ``queue``: the records queued here, and
        ``handing``: held while a batch is out of it (``gateway.usage.postgres.shipping.Shipper``);
        ``errors``: those that mean PostgreSQL did not answer."""
        self._connect = connect
        self._health = health
        self._queue = queue
        self._handing = handing
        self._errors: tuple[type[Exception], ...] = (*errors, psycopg.Error, LedgerError)
        self._reads: set[asyncio.Task[Any]] = set()  # reads that overran their caller's timeout

    async def spend_usd(self, key_name: str, since_ts: float) -> float:
        async with self._no_batch_out():
            queued = sum(e.record.cost_usd or 0.0 for e in self._queue
                         if e.record.key_name == key_name and e.record.ts >= since_ts)  # fmt: skip
            return queued + await self._read(reports.spend_usd, _SPEND_TIMEOUT, key_name, since_ts)

    async def recent_requests(self, key_name: str, since_ts: float) -> list[tuple[float, int]]:
        async with self._no_batch_out():
            local = [(e.record.ts, e.record.total_tokens) for e in self._queue if e.record.key_name == key_name
                     and e.record.ts >= since_ts and not counted_locally(e.record)]  # fmt: skip
            return local + await self._read(reports.recent_requests, _SPEND_TIMEOUT, key_name, since_ts)

    async def summarize(self, by: SummaryBy, key: str | None, since: date | None) -> list[dict[str, Any]]:
        return await self._read(partial(reports.summarize, by=by, key=key, since=since), _REPORT_TIMEOUT)

    async def aggregate(
        self,
        *,
        group: Sequence[Dim],
        start: datetime | date | float | None,
        end: datetime | date | float | None,
        where: Mapping[str, Sequence[str]] | None,
    ) -> Groups:
        read = partial(reports.aggregate, group=group, start=start, end=end, where=where)
        return await self._read(read, _REPORT_TIMEOUT)

    async def aclose(self) -> None:
        """Cancel the reads still running (those that overran), and wait for them."""
        for read in self._reads:
            read.cancel()
        await asyncio.gather(*self._reads, return_exceptions=True)

    async def _read(self, query: Callable[..., Awaitable[T]], within: float, *args: Any) -> T:
        """``query(conn, *args)``, or ``LedgerUnavailable`` after ``within`` seconds. A query that
        overruns is left to end in the background: cancelling it would wait for PostgreSQL too."""

        async def run() -> T:
            async with self._connect() as conn:
                return await query(conn, *args)

        task = asyncio.ensure_future(run())
        self._reads.add(task)
        task.add_done_callback(_forget(self._reads))
        try:
            result = await asyncio.wait_for(asyncio.shield(task), within)
        except self._errors as exc:  # never a 500 for the database's state
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


def _forget(tasks: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
    def forget(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: an overrun read's error is already answered as LedgerUnavailable

    return forget
