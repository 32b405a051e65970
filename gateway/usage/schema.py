"""The usage ledger's table: one row per request (``UsageRecord``), its versioned migrations.

The schema version is SQLite's ``PRAGMA user_version``; ``MIGRATIONS`` brings a database up to
date (``migrate``). Writing is ``gateway.usage.ledger``'s job, reading ``gateway.usage.reports``'.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Final, NamedTuple

# The per-bucket totals every roll-up row holds (their SQL over usage rows is gateway.usage.rollups').
ROLLUP_TOTALS: Final = (
    "records",  # usage rows
    "answered_locally",  # answered by the gateway itself (refusals, dry runs), never sent upstream
    "cached",  # answered from the response cache (or collapsed onto an identical request)
    "errors",  # answered with a status of 500 or more
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_usd",  # the sum of the known costs
    "priced",  # rows whose cost is known
    "saved_usd",  # what the cached answers would have cost upstream
    "saved_rows",  # rows with a saved cost
    "unpriced",  # requests sent upstream whose cost is unknown
    "latency_ms",  # the sum of the rows' latencies
)


ROLLUP_PERIODS: Final = ("hourly", "daily", "monthly")
# Each period's roll-up tables: usage_<period><suffix>, grouped by the bucket and these columns. A
# report reads the smallest one that has the columns it groups and filters by: the whole ledger's
# cost per key over 90 days is a few tens of thousands of rows, not every (key, team, model).
ROLLUP_CUTS: Final = (
    ("_total", ()),
    ("_by_model", ("model",)),
    ("_by_team", ("team",)),
    ("_by_key", ("key_name", "team")),
    ("", ("key_name", "team", "model")),
)
# Indexes for a filter plus a range (the primary keys start with the bucket, for plain ranges).
_ROLLUP_INDEXES: Final = {"": ("key_name", "team", "model"), "_by_key": ("key_name",)}


def _rollup_table(table: str, columns: tuple[str, ...]) -> str:
    # key_name and team are '' for rows without one ('' is never a key's name; an empty team is none).
    totals = ", ".join(f"{name} {'REAL' if name in ('cost_usd', 'saved_usd', 'latency_ms') else 'INTEGER'} NOT NULL"
                       for name in ROLLUP_TOTALS)  # fmt: skip
    groups = "".join(f"{column} TEXT NOT NULL, " for column in columns)
    return (
        f"CREATE TABLE {table} (bucket INTEGER NOT NULL, {groups}{totals}, "
        f"PRIMARY KEY ({', '.join(('bucket', *columns))})) WITHOUT ROWID"
    )


def _rollup_statements() -> list[str]:
    statements = []
    for period in ROLLUP_PERIODS:
        for suffix, columns in ROLLUP_CUTS:
            table = f"usage_{period}{suffix}"
            statements.append(_rollup_table(table, columns))
            statements += [
                f"CREATE INDEX {table}_{c} ON {table} ({c}, bucket)" for c in _ROLLUP_INDEXES.get(suffix, ())
            ]
    return statements


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
    (
        # What the response cache did ("hit", "collapsed", "stored", ...; NULL: not consulted) and
        # what an answer from it would have cost from the upstream.
        "ALTER TABLE usage ADD COLUMN cache TEXT",
        "ALTER TABLE usage ADD COLUMN saved_usd REAL",
    ),
    (
        # Roll-ups of the usage rows per UTC hour and per UTC day, by key, team and model: what the
        # reports read (gateway.usage.reports), kept when raw rows are pruned. They are brought up
        # to date from the rows with an id above ``usage_rollup_state.last_id`` (gateway.usage.rollups),
        # off the write path (an older ledger's rows are rolled up the same way, in chunks).
        *_rollup_statements(),
        "CREATE TABLE usage_rollup_state (id INTEGER PRIMARY KEY CHECK (id = 1), last_id INTEGER NOT NULL)",
        "INSERT INTO usage_rollup_state (id, last_id) VALUES (1, 0)",
    ),
    (
        # Routing (docs/routing.md): the name the client asked for when another model served (an
        # alias), and the models passed over before the one that served (x-gateway-fallback-from).
        "ALTER TABLE usage ADD COLUMN requested_model TEXT",
        "ALTER TABLE usage ADD COLUMN fallback_from TEXT",
    ),
    (
        # Every raw row paid for four b-trees (the table and three indexes): since the roll-ups, the
        # reads need only two. A key's spend comes from the roll-ups (gateway.usage.reports.spend_usd),
        # its recent requests and every partial hour from the ts index, the rows not rolled up yet by
        # id; nothing reads by team. Without these two a row costs the writer ~45 % less CPU (batches
        # of 2,000 rows in a loop: 4.3 -> 2.3 us a row).
        "DROP INDEX IF EXISTS usage_key_ts",
        "DROP INDEX IF EXISTS usage_team_ts",
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)
# Seconds a connection waits for a lock held by another (a reader, another process).
BUSY_TIMEOUT_S: Final = 5.0


class LedgerError(Exception):
    """The database is not a ledger this version can use."""


class UsageRecord(NamedTuple):
    """One request, as the ledger keeps it: a row of the ``usage`` table, its fields in column order
        (a tuple, so it is cheap to make on the request path and goes to SQLite as it is).

        ``outcome``: "completed", "client_disconnected", "upstream_broken", "refused", ...;
        ``cut``: the response stream was cut short; ``ttfb_ms``: None when no response byte was sent;
    ``cache``: "hit" or "collapsed" (the answer came from the cache: ``outcome`` "cache_hit", tokens
    served but none drawn upstream), "stored", "miss", "refresh", "bypass", or None.
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
    cache: str | None = None  # what the response cache did (None: not consulted)
    saved_usd: float | None = None  # an answer from the cache: what it would have cost upstream
    requested_model: str | None = None  # the name asked for, when another model served (an alias)
    fallback_from: str | None = None  # the models passed over, "model;reason=code, ..."


# The SQL interpolates constants only (the record's field names, which are the columns); values are bound.
INSERT: Final = (
    f"INSERT INTO usage ({', '.join(UsageRecord._fields)}) VALUES ({', '.join('?' * len(UsageRecord._fields))})"  # noqa: S608
)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to ``SCHEMA_VERSION`` (one transaction per step); returns the version."""
    conn.execute("BEGIN IMMEDIATE")  # one migrator at a time, across processes
    try:
        version = user_version(conn)
        if version > SCHEMA_VERSION:
            raise LedgerError(version_mismatch(_file_of(conn), version))
        for step in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[step]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {step + 1}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return SCHEMA_VERSION


def user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _file_of(conn: sqlite3.Connection) -> Path:
    """The file of the connection's main database."""
    return Path(conn.execute("PRAGMA database_list").fetchone()[2])


def version_mismatch(path: Path, version: int) -> str:
    """Why a file at another schema version cannot be used (read, or migrated: only to a newer
    version), and what to do about it."""
    if version == 0:
        return f"{path} is not a usage ledger (it has no schema version)"
    if version < SCHEMA_VERSION:
        return (
            f"{path} is a usage ledger of schema version {version}, written by an older gateway: this one reads "
            f"version {SCHEMA_VERSION}, and migrates the file when it starts with it ([usage] path)"
        )
    return (
        f"{path} is a usage ledger of schema version {version}, newer than this gateway's ({SCHEMA_VERSION}): "
        "use it with the gateway that wrote it"
    )


def counted_locally(r: UsageRecord) -> bool:
    """A record the gateway answered itself (as ``gateway.usage.rollups.LOCAL_SQL`` says of a row):
    not counted by the rate limiter."""
    return r.outcome == "dry_run" or (r.outcome == "refused" and r.status not in (502, 504))
