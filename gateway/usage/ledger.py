"""The usage ledger: one row per request in SQLite, written in batches off the request path.

``Ledger.record`` only appends to an in-memory queue. A background task writes the queue in
batches (one transaction per batch of at most ``max_batch`` rows) every ``flush_interval`` seconds,
or as soon as a full batch is waiting, on one dedicated thread that alone uses the connection.
``aclose`` writes everything still queued, so a clean shutdown loses nothing. A crash loses the
records not yet written: those recorded in the last ``flush_interval`` seconds (and, if the disk
fell behind, whatever was still queued). The queue is bounded (``max_queue``): past it, the oldest
records are dropped, counted in ``dropped`` and logged once. A batch that the database refuses for
what is in it (a value SQLite cannot store) is written again row by row: the one bad record is
dropped, counted and logged with its request id, and every other record is written. Only failures
of the database itself (disk full, locked) keep the batch queued for a retry.

The database is in WAL mode (readers, such as the CLI or ``spend_usd`` at startup, never block the
writer) with ``synchronous=NORMAL`` (a power loss may lose the last transactions, never corrupt).
The schema version is ``PRAGMA user_version``; ``MIGRATIONS`` brings a database up to date.

The queries (``summarize``, ``spend_usd``) are plain functions taking a path or a connection,
usable without an event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, time
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, NamedTuple, TypeVar

logger = logging.getLogger("gateway.usage.ledger")

T = TypeVar("T")

SummaryBy = Literal["key", "team", "model", "day"]

# Migration i brings a database from user_version i to i + 1 (statements run in one transaction).
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE usage (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            request_id TEXT NOT NULL,
            key_name TEXT,
            team TEXT,
            model TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            status INTEGER NOT NULL,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            total_tokens INTEGER NOT NULL,
            cost_usd REAL,
            outcome TEXT NOT NULL,
            cut INTEGER NOT NULL,
            latency_ms REAL NOT NULL,
            ttfb_ms REAL
        )""",
        "CREATE INDEX usage_key_ts ON usage (key_name, ts)",
        "CREATE INDEX usage_team_ts ON usage (team, ts)",
        "CREATE INDEX usage_ts ON usage (ts)",
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)

_GROUPS: Final[Mapping[str, str]] = MappingProxyType(
    {"key": "key_name", "team": "team", "model": "model", "day": "date(ts, 'unixepoch')"}
)
SUMMARY_GROUPS: Final = tuple(_GROUPS)
# Rows the gateway answered itself, never sent upstream (an SQL expression): dry runs, and the
# gateway's own error answers except 502/504, which say that the upstream failed to answer.
_LOCAL: Final = "(outcome = 'dry_run' OR (outcome = 'refused' AND status NOT IN (502, 504)))"
_BUSY_TIMEOUT_S: Final = 5.0


class LedgerError(Exception):
    """The database is not a ledger this version can use."""


class UsageRecord(NamedTuple):
    """One request, as the ledger keeps it: a row of the ``usage`` table, its fields in column order
    (a tuple, so it is cheap to make on the request path and goes to SQLite as it is).

    ``outcome``: "completed", "client_disconnected", "upstream_broken", "refused", ...;
    ``cut``: the response stream was cut short; ``ttfb_ms``: None when no response byte was sent.
    """

    ts: float  # unix time the request arrived
    request_id: str
    key_name: str | None
    team: str | None
    model: str
    endpoint: str
    status: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float | None
    outcome: str
    cut: bool
    latency_ms: float
    ttfb_ms: float | None


# The SQL interpolates constants only (the record's field names, which are the columns); values are bound.
_INSERT: Final = (
    f"INSERT INTO usage ({', '.join(UsageRecord._fields)}) VALUES ({', '.join('?' * len(UsageRecord._fields))})"  # noqa: S608
)


class Ledger:
    """Records usage from the request path without blocking it; see the module docstring."""

    def __init__(
        self, path: Path, *, flush_interval: float = 1.0, max_batch: int = 500, max_queue: int = 100_000
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
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # used on the executor's one thread only
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
        if self._executor is not None or self._closed:
            raise RuntimeError("Ledger.start() may be called once, before aclose()")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        try:
            self._conn = await self._in_thread(_open_writer, self._path)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
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
        if self._conn is None:
            return queued
        # The executor runs jobs in order: batches taken from the queue before this line are
        # written before the query runs; records still queued now are written after it.
        return queued + await self._in_thread(spend_usd, self._conn, key_name, since_ts)

    async def aclose(self) -> None:
        """Write everything still queued, then close the database. Idempotent."""
        if self._closed or self._stopping:
            return
        self._stopping = True
        if self._task is None or self._wake is None or self._executor is None:
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
            conn, self._conn = self._conn, None
            if conn is not None:
                await self._in_thread(conn.close)
            self._executor.shutdown(wait=True)

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
        if not await self._drain():
            await self._drain()  # one retry on shutdown; what still fails is counted as dropped

    async def _drain(self) -> bool:
        """Write the queue in batches; False when a write failed (the batch is queued again)."""
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(self._max_batch, len(self._queue)))]
            try:
                await self._in_thread(_write, self._conn, batch)
            except (sqlite3.InterfaceError, sqlite3.IntegrityError, sqlite3.DataError, OverflowError, TypeError):
                # Something in the batch cannot be stored: write it row by row, dropping only the bad rows.
                rejected = await self._in_thread(_write_each, self._conn, batch)
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
        return True

    def _drop(self, count: int, reason: str) -> None:
        self._dropped += count
        if not self._warned_drop:
            self._warned_drop = True
            logger.warning("ledger: dropping usage records (%s); further drops are only counted", reason)

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to ``SCHEMA_VERSION`` (one transaction per step); returns the version."""
    conn.execute("BEGIN IMMEDIATE")  # one migrator at a time, across processes
    try:
        version = _user_version(conn)
        if version > SCHEMA_VERSION:
            raise LedgerError(f"the ledger's schema is version {version}, newer than this gateway's ({SCHEMA_VERSION})")
        for step in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[step]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {step + 1}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return SCHEMA_VERSION


def summarize(
    source: Path | str | sqlite3.Connection,
    *,
    by: SummaryBy,
    key: str | None = None,
    since: datetime | date | float | None = None,
) -> list[dict[str, Any]]:
    """Totals per key, team, model or day (UTC), oldest day / lowest name first.

    Each row: the group (``key``, ``team``, ``model`` or ``day`` as "YYYY-MM-DD"; None for
    requests without a key or team), ``requests`` (those that were sent upstream), ``refused``
    (answered by the gateway itself: refusals, dry runs), ``prompt_tokens``, ``completion_tokens``,
    ``total_tokens``, ``cost_usd`` (the sum of the known costs; None when none is known) and
    ``unpriced_requests`` (requests sent upstream whose cost is unknown: no price in the catalog,
    or no usage in the answer). ``key`` keeps one key's rows only;
    ``since`` keeps rows from that time on (a date: its midnight UTC; a naive datetime: UTC;
    a float: unix time).
    """
    group = _GROUPS.get(by)
    if group is None:
        raise ValueError(f"by must be one of {', '.join(_GROUPS)}, not {by!r}")
    where: list[str] = []
    params: list[Any] = []
    if key is not None:
        where.append("key_name = ?")
        params.append(key)
    if since is not None:
        where.append("ts >= ?")
        params.append(_unix(since))
    sql = (
        f"SELECT {group} AS grp, SUM({_LOCAL}), SUM(prompt_tokens), SUM(completion_tokens), "  # noqa: S608
        f"SUM(total_tokens), SUM(cost_usd), SUM(cost_usd IS NULL AND NOT {_LOCAL}), COUNT(*) FROM usage "
        f"{'WHERE ' + ' AND '.join(where) if where else ''} GROUP BY grp ORDER BY grp"
    )
    with _reader(source) as conn:
        rows = conn.execute(sql, params).fetchall()
    return [
        {
            by: grp,
            "requests": count - local,
            "refused": local,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": total,
            "cost_usd": cost,
            "unpriced_requests": unpriced,
        }
        for grp, local, prompt, completion, total, cost, unpriced, count in rows
    ]


def spend_usd(source: Path | str | sqlite3.Connection, key_name: str, since_ts: float) -> float:
    """The sum of the key's known costs since ``since_ts`` (unix time), from the index on (key_name, ts)."""
    with _reader(source) as conn:
        row = conn.execute(
            "SELECT TOTAL(cost_usd) FROM usage WHERE key_name = ? AND ts >= ?", (key_name, since_ts)
        ).fetchone()
    return float(row[0])


def _open_writer(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            logger.warning("ledger: %s could not be put in WAL mode (journal_mode=%s)", path, mode)
        conn.execute("PRAGMA synchronous=NORMAL")
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _write(conn: sqlite3.Connection | None, batch: Sequence[UsageRecord]) -> None:
    assert conn is not None
    conn.execute("BEGIN")
    try:
        conn.executemany(_INSERT, batch)  # each record is its row (``cut``, a bool, is stored as 0 or 1)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _write_each(conn: sqlite3.Connection | None, batch: Sequence[UsageRecord]) -> list[UsageRecord]:
    """Write each record on its own (in one transaction); returns those the database refused."""
    assert conn is not None
    rejected: list[UsageRecord] = []
    conn.execute("BEGIN")
    try:
        for record in batch:
            try:
                conn.execute(_INSERT, record)
            except (sqlite3.InterfaceError, sqlite3.IntegrityError, sqlite3.DataError, OverflowError, TypeError):
                rejected.append(record)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return rejected


@contextlib.contextmanager
def _reader(source: Path | str | sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """The given connection, or a new one on an existing ledger file (closed afterwards)."""
    if isinstance(source, sqlite3.Connection):
        yield source
        return
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no ledger at {path}")
    conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
    try:
        version = _user_version(conn)
        if version != SCHEMA_VERSION:
            raise LedgerError(f"{path} is not a ledger of schema version {SCHEMA_VERSION} (user_version {version})")
        yield conn
    finally:
        conn.close()


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _unix(since: datetime | date | float) -> float:
    if isinstance(since, datetime):
        return (since if since.tzinfo is not None else since.replace(tzinfo=UTC)).timestamp()
    if isinstance(since, date):
        return datetime.combine(since, time(), tzinfo=UTC).timestamp()
    return float(since)
