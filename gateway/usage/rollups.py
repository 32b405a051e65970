"""The usage roll-ups: totals per UTC hour and per UTC day, by key, team and model.

The ledger's write path is not touched: ``refresh`` brings both tables up to date from the rows
with an id above ``usage_rollup_state.last_id`` (SQLite hands out increasing ids, and one writer
at a time commits them, so every row is rolled up exactly once), in chunks of one transaction
each. ``RollupKeeper`` does that in the background every few seconds on its own thread and
connection, and prunes raw rows past ``[usage] raw_retention_days`` (only rows already rolled
up; the roll-ups are kept). The reports read the roll-ups plus the few rows not rolled up yet
(``gateway.usage.reports``), so they are exact whatever the keeper's delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final, TypeVar

from gateway.threads import background_priority
from gateway.usage.schema import BUSY_TIMEOUT_S, ROLLUP_CUTS, ROLLUP_TOTALS

logger = logging.getLogger("gateway.usage.rollups")
T = TypeVar("T")

# Rows the gateway answered itself, never sent upstream: dry runs, and the gateway's own error
# answers except 502/504, which say that the upstream failed to answer.
LOCAL_SQL: Final = "(outcome = 'dry_run' OR (outcome = 'refused' AND status NOT IN (502, 504)))"
# Rows answered from the response cache (or collapsed onto an identical request's upstream answer).
CACHED_SQL: Final = "(cache IS NOT NULL AND cache IN ('hit', 'collapsed'))"
# ROLLUP_TOTALS over usage rows, in order.
ROW_TOTALS: Final = (
    "COUNT(*)",
    f"SUM({LOCAL_SQL})",
    f"SUM({CACHED_SQL})",
    "SUM(status >= 500)",
    "SUM(prompt_tokens)",
    "SUM(completion_tokens)",
    "SUM(total_tokens)",
    "TOTAL(cost_usd)",
    "COUNT(cost_usd)",
    "TOTAL(saved_usd)",
    "COUNT(saved_usd)",
    f"SUM(cost_usd IS NULL AND NOT {LOCAL_SQL})",
    "TOTAL(latency_ms)",
)
# Each period's bucket (its start, unix time, UTC) from an hour's bucket.
PERIODS: Final = {
    "hourly": "bucket",
    "daily": "bucket - bucket % 86400",
    "monthly": "CAST(strftime('%s', bucket, 'unixepoch', 'start of month') AS INTEGER)",
}
CHUNK_ROWS: Final = 50_000  # rows rolled up per transaction (bounds how long the write lock is held)
PRUNE_ROWS: Final = 10_000  # raw rows deleted per transaction


def bucket_sql(seconds: int, column: str = "ts") -> str:
    """SQL for the start (unix time) of the UTC bucket of ``seconds`` holding ``column``."""
    return f"(CAST({column} AS INTEGER) - CAST({column} AS INTEGER) % {seconds})"


# A chunk of rows is read once, into its totals per hour, key, team and model (a temporary table);
# every roll-up table is then fed from those (a few rows per busy key and hour, not every request).
_TOTALS_TYPES: Final = ", ".join(f"{name} {'REAL' if name in ('cost_usd', 'saved_usd', 'latency_ms') else 'INTEGER'}"
                                 for name in ROLLUP_TOTALS)  # fmt: skip
_STAGE: Final = (
    "CREATE TEMP TABLE IF NOT EXISTS rollup_chunk "
    f"(bucket INTEGER, key_name TEXT, team TEXT, model TEXT, {_TOTALS_TYPES})",
    "DELETE FROM temp.rollup_chunk",
    f"INSERT INTO temp.rollup_chunk SELECT {bucket_sql(3600)}, ifnull(key_name, ''), ifnull(team, ''), model, "  # noqa: S608
    f"{', '.join(ROW_TOTALS)} FROM usage WHERE id > ? AND id <= ? GROUP BY 1, 2, 3, 4",
)


def _upsert(table: str, bucket: str, columns: tuple[str, ...]) -> str:
    totals = ", ".join(ROLLUP_TOTALS)
    adds = ", ".join(f"{name} = {name} + excluded.{name}" for name in ROLLUP_TOTALS)
    keys = ", ".join(("bucket", *columns))
    groups = ", ".join(str(i + 1) for i in range(len(columns) + 1))
    return (
        f"INSERT INTO {table} ({keys}, {totals}) "  # noqa: S608 (constants only)
        f"SELECT {', '.join((bucket, *columns))}, {', '.join(f'SUM({name})' for name in ROLLUP_TOTALS)} "
        f"FROM temp.rollup_chunk WHERE true GROUP BY {groups} "
        f"ON CONFLICT ({keys}) DO UPDATE SET {adds}"
    )


_UPSERTS: Final = tuple(
    _upsert(f"usage_{period}{suffix}", bucket, columns)
    for period, bucket in PERIODS.items()
    for suffix, columns in ROLLUP_CUTS
)


def last_rolled_id(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT last_id FROM usage_rollup_state").fetchone()[0])


def refresh(conn: sqlite3.Connection, *, chunk: int = CHUNK_ROWS, max_chunks: int = 1000) -> int:
    """Roll up the rows written since the last refresh; returns how many (autocommit connection)."""
    done = 0
    for _ in range(max_chunks):
        conn.execute("BEGIN IMMEDIATE")
        try:
            low = last_rolled_id(conn)
            top = conn.execute("SELECT MAX(id) FROM usage WHERE id > ? AND id <= ?", (low, low + chunk)).fetchone()[0]
            if top is None:
                newest = conn.execute("SELECT MAX(id) FROM usage").fetchone()[0]
                if newest is None or newest <= low:
                    conn.execute("COMMIT")
                    return done
                top = low + chunk  # a gap of more than a chunk of ids (rows deleted before being rolled up)
            conn.execute(_STAGE[0])
            conn.execute(_STAGE[1])
            conn.execute(_STAGE[2], (low, top))
            for upsert in _UPSERTS:
                conn.execute(upsert)
            count = conn.execute("SELECT TOTAL(records) FROM temp.rollup_chunk").fetchone()[0]
            conn.execute("UPDATE usage_rollup_state SET last_id = ?", (top,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        done += int(count)
    return done


def prune(conn: sqlite3.Connection, before_ts: float, *, limit: int = PRUNE_ROWS, max_rounds: int = 1000) -> int:
    """Delete raw rows older than ``before_ts`` that are rolled up; returns how many.

    The newest row is always kept, so that SQLite never hands out an id already rolled up again.
    """
    deleted = 0
    for _ in range(max_rounds):
        cursor = conn.execute(
            "DELETE FROM usage WHERE id IN (SELECT id FROM usage WHERE ts < ? "
            "AND id <= (SELECT last_id FROM usage_rollup_state) AND id < (SELECT MAX(id) FROM usage) LIMIT ?)",
            (before_ts, limit),
        )
        deleted += cursor.rowcount
        if cursor.rowcount < limit:
            break
    return deleted


class RollupKeeper:
    """Keeps the roll-ups current and prunes raw rows, in the background (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        *,
        interval: float = 2.0,
        retention_days: float = 0,
        prune_interval: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = path
        self._interval = interval
        self._retention_s = retention_days * 86400
        self._prune_interval = prune_interval
        self._clock = clock
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # used on the executor's one thread only
        self._task: asyncio.Task[None] | None = None
        self._last_prune = float("-inf")

    async def start(self) -> None:
        """Open the (already migrated) ledger and start the background refresh."""
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="rollups", initializer=background_priority
        )
        self._conn = await self._in_thread(_connect, self._path)
        self._task = asyncio.create_task(self._run(), name="usage-rollups")

    async def run_once(self) -> int:
        """Refresh now (and prune when due); returns the rows rolled up."""
        rolled = await self._in_thread(refresh, self._conn)
        now = self._clock()
        if self._retention_s > 0 and now - self._last_prune >= self._prune_interval:
            self._last_prune = now
            pruned = await self._in_thread(prune, self._conn, now - self._retention_s)
            if pruned:
                logger.info("usage: pruned %d raw rows older than the retention (roll-ups kept)", pruned)
        return rolled

    async def aclose(self) -> None:
        """Stop, roll up what the ledger wrote last, close."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._executor is None:
            return
        with contextlib.suppress(sqlite3.Error):
            await self._in_thread(refresh, self._conn)
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._in_thread(conn.close)
        self._executor.shutdown(wait=True)
        self._executor = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.run_once()
            except sqlite3.Error as exc:  # locked, disk full: the next round retries
                logger.warning("usage: rolling up the ledger failed, will retry: %s", exc)

    async def _in_thread(self, fn: Callable[..., T], *args: object) -> T:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA temp_store=MEMORY")  # the chunk's staging table
    return conn
