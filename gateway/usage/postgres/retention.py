"""Raw-row retention on the PostgreSQL ledger (``[usage] raw_retention_days``).

Rows older than the retention are deleted in chunks, once at start and then every hour; the hourly
and daily totals (``usage_hourly``, ``usage_daily``) were written with the rows and stay, so the
reports, ``gateway usage``, ``/admin/usage`` and the console still show those days. Several replicas
may prune at once: each chunk is its own statement, deleting what is still there (no lock needed).
A batch written again after its rows were pruned would count twice in the totals, which needs a
batch older than the retention: the durable queue takes a stale batch over within ``claim_after``
seconds, and the retention is at least 32 days (``gateway.config.checks``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Final

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import TupleRow

logger = logging.getLogger("gateway.usage.postgres.retention")

PRUNE_EVERY: Final = 3600.0  # seconds between rounds
CHUNK: Final = 10_000  # rows per DELETE
_MAX_CHUNKS: Final = 10_000  # per round: 100 million rows at most, then the next round goes on
_MAX_ROUNDS: Final = 10**6  # an hour each: bounded far past any process's life

_DELETE: Final = "DELETE FROM usage WHERE id IN (SELECT id FROM usage WHERE ts < to_timestamp(%s) ORDER BY ts LIMIT %s)"

Connect = Callable[[], AbstractAsyncContextManager[AsyncConnection[TupleRow]]]


async def prune(conn: AsyncConnection[TupleRow], older_than: float, chunk: int = CHUNK) -> int:
    """Delete the raw rows before ``older_than`` (unix time), ``chunk`` at a time; how many went."""
    removed = 0
    for _ in range(_MAX_CHUNKS):
        cursor = await conn.execute(_DELETE, (older_than, chunk))
        removed += max(cursor.rowcount, 0)
        if cursor.rowcount < chunk:
            break
    return removed


class Pruner:
    def __init__(self, connect: Connect, days: int, clock: Callable[[], float] = time.time) -> None:
        self._connect = connect
        self._days = days
        self._clock = clock

    async def run_once(self) -> int:
        async with self._connect() as conn:
            removed = await prune(conn, self._clock() - self._days * 86400)
        if removed:
            logger.info("usage: deleted %d ledger rows older than %d days (their totals are kept)", removed,
                        self._days)  # fmt: skip
        return removed

    async def run(self) -> None:
        """Prune now and every ``PRUNE_EVERY`` seconds until cancelled; a failure waits for the next round."""
        for _ in range(_MAX_ROUNDS):
            try:
                await self.run_once()
            except (psycopg.Error, OSError, TimeoutError) as exc:
                logger.warning("usage: pruning old ledger rows failed, will retry: %s", type(exc).__name__)
            await asyncio.sleep(PRUNE_EVERY)
