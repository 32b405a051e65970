"""The ledger's tables on PostgreSQL and their versioned migrations, run by the gateway at start.

``usage`` holds one row per settled request, keyed by the id the gateway gave the record when the
request settled (``id``; the request's ``X-Request-ID`` is the ``request_id`` column: a client may
send the same one twice, so it cannot be the key). ``usage_daily`` holds the totals per UTC day,
key, team and model that the reports read (kept by ``gateway.usage.postgres.write`` in the same
transaction as the rows), so a report over millions of rows reads thousands.

``migrate`` brings a database up to ``SCHEMA_VERSION``: one transaction under a transaction-level
advisory lock, so replicas that start at once run the steps one after the other (the later ones
find nothing to do). A database newer than this gateway is refused (``LedgerError``).
"""

from __future__ import annotations

from typing import Final

from psycopg import AsyncConnection
from psycopg.rows import TupleRow

from gateway.usage.schema import LedgerError

# An arbitrary 64-bit number naming the advisory lock of this ledger's migrations.
MIGRATION_LOCK: Final = 0x6761_7465_7761_7931
VERSION_TABLE: Final = "usage_schema"

# Migration i brings a database from version i to i + 1 (its statements run in one transaction).
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE usage (
            id text PRIMARY KEY,
            ts timestamptz NOT NULL,
            request_id text NOT NULL,
            key_name text,
            team text,
            model text NOT NULL,
            endpoint text NOT NULL,
            status integer NOT NULL,
            prompt_tokens bigint NOT NULL,
            completion_tokens bigint NOT NULL,
            total_tokens bigint NOT NULL,
            cost_usd numeric,
            outcome text NOT NULL,
            cut boolean NOT NULL,
            latency_ms double precision NOT NULL,
            ttfb_ms double precision,
            cache text,
            saved_usd numeric
        )""",
        "CREATE INDEX usage_key_ts ON usage (key_name, ts)",
        "CREATE INDEX usage_team_ts ON usage (team, ts)",
        "CREATE INDEX usage_ts ON usage (ts)",
        "CREATE INDEX usage_request_id ON usage (request_id)",
        # Totals per UTC day; no key or no team is '' here (a primary key has no NULLs).
        """CREATE TABLE usage_daily (
            day date NOT NULL,
            key_name text NOT NULL,
            team text NOT NULL,
            model text NOT NULL,
            rows bigint NOT NULL,
            local bigint NOT NULL,
            cached bigint NOT NULL,
            prompt_tokens bigint NOT NULL,
            completion_tokens bigint NOT NULL,
            total_tokens bigint NOT NULL,
            cost_usd numeric NOT NULL,
            priced bigint NOT NULL,
            saved_usd numeric NOT NULL,
            saved bigint NOT NULL,
            unpriced bigint NOT NULL,
            PRIMARY KEY (day, key_name, team, model)
        )""",
        "CREATE INDEX usage_daily_key_day ON usage_daily (key_name, day)",
    ),
    (
        # Routing (docs/routing.md): the name the client sent when another model served, and the
        # models passed over before it (x-gateway-fallback-from).
        "ALTER TABLE usage ADD COLUMN requested_model text, ADD COLUMN fallback_from text",
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


async def migrate(conn: AsyncConnection[TupleRow]) -> int:
    """Bring the schema up to ``SCHEMA_VERSION``; returns the version. Safe to run from many
    processes at once (see the module docstring). ``conn`` must have no transaction open: the
    advisory lock lasts until the transaction that took it ends."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (version integer NOT NULL)")
        cursor = await conn.execute(f"SELECT version FROM {VERSION_TABLE}")  # noqa: S608 - a constant
        row = await cursor.fetchone()
        version = 0 if row is None else int(row[0])
        if version > SCHEMA_VERSION:
            raise LedgerError(f"the ledger's schema is version {version}, newer than this gateway's ({SCHEMA_VERSION})")
        for step in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[step]:
                await conn.execute(statement)
        if row is None:
            await conn.execute(f"INSERT INTO {VERSION_TABLE} VALUES (%s)", (SCHEMA_VERSION,))  # noqa: S608
        elif version < SCHEMA_VERSION:
            await conn.execute(f"UPDATE {VERSION_TABLE} SET version = %s", (SCHEMA_VERSION,))  # noqa: S608
    return SCHEMA_VERSION


async def schema_version(conn: AsyncConnection[TupleRow]) -> int:
    """The version a database is at (0: no ledger yet)."""
    cursor = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (VERSION_TABLE,))
    exists = await cursor.fetchone()
    if exists is None or not exists[0]:
        return 0
    cursor = await conn.execute(f"SELECT version FROM {VERSION_TABLE}")  # noqa: S608
    row = await cursor.fetchone()
    return 0 if row is None else int(row[0])
