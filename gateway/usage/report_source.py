"""The report layer whatever the ledger: ``UsageReports``, what the console and ``GET /admin/usage``
read, answered by the SQLite ledger's file (``SqliteReports``, over ``gateway.usage.reports``) or by
the PostgreSQL ledger (``gateway.usage.postgres.ledger.PostgresLedger``, over
``gateway.usage.postgres.reports``): the same groups and totals for the same rows.

Both run their queries off the event loop: SQLite's in a worker thread, PostgreSQL's on the async
driver (with a timeout: ``LedgerUnavailable``, a 503, when PostgreSQL does not answer).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any, Protocol

from gateway.usage.reports import Dim, Groups, SummaryBy, aggregate, summarize


class UsageReports(Protocol):
    async def aggregate(
        self,
        *,
        group: Sequence[Dim] = (),
        start: datetime | date | float | None = None,
        end: datetime | date | float | None = None,
        where: Mapping[str, Sequence[str]] | None = None,
    ) -> Groups:
        """``gateway.usage.reports.aggregate``'s answer: totals of ``start <= ts < end`` per group."""
        ...

    async def summarize(self, by: SummaryBy, key: str | None, since: date | None) -> list[dict[str, Any]]:
        """``gateway.usage.reports.summarize``'s rows."""
        ...


class SqliteReports:
    """``UsageReports`` on the SQLite ledger's file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def aggregate(
        self,
        *,
        group: Sequence[Dim] = (),
        start: datetime | date | float | None = None,
        end: datetime | date | float | None = None,
        where: Mapping[str, Sequence[str]] | None = None,
    ) -> Groups:
        return await asyncio.to_thread(aggregate, self.path, group=group, start=start, end=end, where=where)

    async def summarize(self, by: SummaryBy, key: str | None, since: date | None) -> list[dict[str, Any]]:
        return await asyncio.to_thread(summarize, self.path, by=by, key=key, since=since)
