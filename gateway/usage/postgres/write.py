"""Writing a batch of usage records to PostgreSQL: one statement, one transaction, idempotent.

Each record travels with the id the gateway gave it when its request settled (``Entry``). The
batch is inserted with ``ON CONFLICT (id) DO NOTHING`` and only the rows really inserted are added
to the daily totals (``usage_daily``), in the same statement: writing a batch twice (a replica
that died after its commit, before confirming it; another that took the batch over) leaves one row
per record and totals that count it once.

Rows are inserted in id order and the totals updated in key order, so two replicas writing
overlapping batches at once take their row locks in the same order (no deadlock).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, NamedTuple

from psycopg import AsyncConnection
from psycopg.rows import TupleRow

from gateway.usage.schema import UsageRecord


class Entry(NamedTuple):
    """One record and the ledger id it keeps from its settlement to its row."""

    id: str
    record: UsageRecord


# The record's fields (and the row's columns), in order, with the array type each is sent as.
_ARRAYS: Final = (
    ("id", "text"),
    ("ts", "float8"),
    ("request_id", "text"),
    ("key_name", "text"),
    ("team", "text"),
    ("model", "text"),
    ("endpoint", "text"),
    ("status", "int4"),
    ("prompt_tokens", "int8"),
    ("completion_tokens", "int8"),
    ("total_tokens", "int8"),
    ("cost_usd", "float8"),
    ("outcome", "text"),
    ("cut", "bool"),
    ("latency_ms", "float8"),
    ("ttfb_ms", "float8"),
    ("cache", "text"),
    ("saved_usd", "float8"),
    ("requested_model", "text"),
    ("fallback_from", "text"),
)
assert tuple(name for name, _ in _ARRAYS[1:]) == UsageRecord._fields

# Rows the gateway answered itself (as gateway.usage.reports counts them) and rows from the cache.
LOCAL: Final = "(outcome = 'dry_run' OR (outcome = 'refused' AND status NOT IN (502, 504)))"
CACHED: Final = "(cache IS NOT NULL AND cache IN ('hit', 'collapsed'))"

_COLUMNS: Final = ", ".join(name for name, _ in _ARRAYS)
_UNNEST: Final = ", ".join(f"%s::{kind}[]" for _, kind in _ARRAYS)
_SELECT: Final = ", ".join(
    "to_timestamp(ts)" if name == "ts" else f"{name}::numeric" if name in ("cost_usd", "saved_usd") else name
    for name, _ in _ARRAYS
)
_TOTALS: Final = (
    "rows", "local", "cached", "prompt_tokens", "completion_tokens", "total_tokens",
    "cost_usd", "priced", "saved_usd", "saved", "unpriced",
)  # fmt: skip

INSERT_BATCH: Final = f"""
WITH inserted AS (
    INSERT INTO usage ({_COLUMNS})
    SELECT {_SELECT} FROM unnest({_UNNEST}) AS batch({_COLUMNS})
    ORDER BY id
    ON CONFLICT (id) DO NOTHING
    RETURNING ts, key_name, team, model, status, outcome, cache, prompt_tokens, completion_tokens,
              total_tokens, cost_usd, saved_usd
), totals AS (
    INSERT INTO usage_daily (day, key_name, team, model, {", ".join(_TOTALS)})
    SELECT (ts AT TIME ZONE 'UTC')::date, coalesce(key_name, ''), coalesce(team, ''), model,
           count(*), count(*) FILTER (WHERE {LOCAL}), count(*) FILTER (WHERE {CACHED}),
           sum(prompt_tokens), sum(completion_tokens), sum(total_tokens),
           coalesce(sum(cost_usd), 0), count(cost_usd), coalesce(sum(saved_usd), 0), count(saved_usd),
           count(*) FILTER (WHERE cost_usd IS NULL AND NOT {LOCAL})
    FROM inserted
    GROUP BY 1, 2, 3, 4
    ORDER BY 1, 2, 3, 4
    ON CONFLICT (day, key_name, team, model) DO UPDATE SET
        {", ".join(f"{c} = usage_daily.{c} + EXCLUDED.{c}" for c in _TOTALS)}
    RETURNING 1
)
SELECT count(*) FROM inserted
"""  # noqa: S608 - constants only; every value is bound


async def write_batch(conn: AsyncConnection[TupleRow], entries: Sequence[Entry]) -> int:
    """Insert ``entries`` (one transaction); returns how many were new (the rest were there)."""
    unique = {e.id: e for e in entries}  # a record twice in one batch is still one row
    columns: list[list[object]] = [[] for _ in _ARRAYS]
    for entry in unique.values():
        for column, value in zip(columns, (entry.id, *entry.record), strict=True):
            column.append(value)
    async with conn.transaction():
        cursor = await conn.execute(INSERT_BATCH, columns)
        row = await cursor.fetchone()
    return 0 if row is None else int(row[0])
