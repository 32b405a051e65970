"""The usage ledger's table: one row per request (``UsageRecord``), its versioned migrations.

The schema version is SQLite's ``PRAGMA user_version``; ``MIGRATIONS`` brings a database up to
date (``migrate``). Writing is ``gateway.usage.ledger``'s job, reading ``gateway.usage.reports``'.
"""

from __future__ import annotations

import sqlite3
from typing import Final, NamedTuple

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
        # Routing (docs/routing.md): the name the client asked for when another model served (an
        # alias), and the models passed over before the one that served (x-gateway-fallback-from).
        "ALTER TABLE usage ADD COLUMN requested_model TEXT",
        "ALTER TABLE usage ADD COLUMN fallback_from TEXT",
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


def user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])
