"""Reports on the PostgreSQL ledger: the same answers as ``gateway.usage.reports`` gives on SQLite.

``aggregate`` has the SQLite layer's shape and meaning (totals of ``start <= ts < end`` per key,
team, model, hour or day, ``where`` filters) and splits a range the same way: whole days from the
daily totals (``usage_daily``), whole hours from the hourly ones (``usage_hourly``), and the raw
rows (by the ``ts`` or ``(key_name, ts)`` index) only for the partial hours at the ends. The pieces
are one statement (``aggregate_query``), so they read one snapshot; the roll-ups are written in the
same transaction as the rows, so there is nothing "not rolled up yet" to add. ``summarize`` is
built on it as on SQLite; ``spend_usd`` (a key's spend since a time) reads ``usage_daily`` from a
UTC midnight and the rows otherwise. Each query runs on an async connection (the gateway) or a
blocking one (the ``gateway usage`` command, ``summarize_blocking``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Final

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import TupleRow

from gateway.errors import GatewayError
from gateway.usage.postgres.totals import DAILY_COLUMNS, LOCAL, ROW_TOTALS, bucket_sql
from gateway.usage.reports import (
    DAY,
    HOUR,
    MAX_RECENT,
    Dim,
    Groups,
    SummaryBy,
    bounded,
    bounds,
    check_by,
    finest_period,
    pieces,
    summary_rows,
)
from gateway.usage.schema import ROLLUP_TOTALS

Query = tuple[str, list[Any]]
When = datetime | date | float | None
_REAL: Final = frozenset(("cost_usd", "saved_usd", "latency_ms"))  # the rest are counts


class LedgerUnavailable(GatewayError):
    """A report, or a budgeted key's spend, cannot be read while PostgreSQL does not answer."""

    status = 503
    code = "ledger_unavailable"


# Each dimension on each source: the roll-ups hold '' for "no key / team", the rows NULL.
_NAMES: Final = MappingProxyType({"key": "key_name", "team": "team", "model": "model"})
_ROLLUP_DIMS: Final = MappingProxyType({"key": "NULLIF(key_name, '')", "team": "NULLIF(team, '')", "model": "model"})
_TIME_DIMS: Final = MappingProxyType({
    "hourly": {"hour": "bucket", "day": f"(bucket - mod(bucket, {DAY}))"},
    "daily": {"day": f"((day - DATE '1970-01-01')::bigint * {DAY})"},
    "raw": {"hour": bucket_sql(HOUR), "day": bucket_sql(DAY)},
})  # fmt: skip


def aggregate_query(
    group: Sequence[Dim], start: When, end: When, where: Mapping[str, Sequence[str]] | None
) -> Query | None:
    """The one statement of ``aggregate`` (None: an empty range)."""
    lo, hi = bounds(group, where, start, end)
    if hi <= lo:
        return None
    raw, rolled = pieces(lo, hi, finest="daily" if finest_period(group) == "monthly" else finest_period(group))
    parts: list[Query] = [_rollup_part(period, a, b, group, where) for period, a, b in rolled]
    parts += [_raw_part(a, b, group, where) for a, b in raw]
    width = len(group)
    sums = ", ".join(f"sum(t{i})" for i in range(len(ROLLUP_TOTALS)))
    keys = ", ".join(f"g{i}" for i in range(width))
    union = " UNION ALL ".join(p[0] for p in parts)
    sql = f"SELECT {', '.join(filter(None, (keys, sums)))} FROM ({union}) AS pieces"  # noqa: S608 - constants only
    if width:
        sql += f" GROUP BY {keys}"
    return sql, [value for part in parts for value in part[1]]


def _rollup_part(
    period: str, lo: float, hi: float, group: Sequence[Dim], where: Mapping[str, Sequence[str]] | None
) -> Query:
    table, column = ("usage_hourly", "bucket") if period == "hourly" else ("usage_daily", "day")
    names = ROLLUP_TOTALS if period == "hourly" else DAILY_COLUMNS
    exprs = [_ROLLUP_DIMS.get(d) or _TIME_DIMS[period][d] for d in group]
    conditions: list[str] = []
    params: list[Any] = []
    for op, t in ((">=", lo), ("<", hi)):
        if bounded(t):
            conditions.append(f"{column} {op} %s")
            params.append(int(t) if period == "hourly" else datetime.fromtimestamp(t, UTC).date())
    _filters(where, conditions, params)
    return _select(exprs, names, table, conditions, grouped=False), params


def _raw_part(lo: float, hi: float, group: Sequence[Dim], where: Mapping[str, Sequence[str]] | None) -> Query:
    exprs = [_NAMES.get(d) or _TIME_DIMS["raw"][d] for d in group]
    conditions = ["ts >= to_timestamp(%s)", "ts < to_timestamp(%s)"]  # a partial hour: always bounded
    params: list[Any] = [lo, hi]
    _filters(where, conditions, params)
    return _select(exprs, ROW_TOTALS, "usage", conditions, grouped=True), params


def _select(exprs: list[str], totals: Sequence[str], table: str, conditions: list[str], *, grouped: bool) -> str:
    columns = [f"{e} AS g{i}" for i, e in enumerate(exprs)] + [f"{t} AS t{i}" for i, t in enumerate(totals)]
    sql = f"SELECT {', '.join(columns)} FROM {table}"  # noqa: S608 - constants only; every value is bound
    if conditions:
        sql += f" WHERE {' AND '.join(conditions)}"
    if grouped and exprs:
        sql += f" GROUP BY {', '.join(str(i + 1) for i in range(len(exprs)))}"
    return sql


def _filters(where: Mapping[str, Sequence[str]] | None, conditions: list[str], params: list[Any]) -> None:
    for dim, values in (where or {}).items():
        conditions.append(f"{_NAMES[dim]} = ANY(%s)")
        params.append(list(values))


def groups_of(rows: Sequence[Sequence[Any]], width: int) -> Groups:
    """``aggregate``'s answer from the statement's rows, typed as the SQLite layer's (ints, floats)."""
    result: Groups = {}
    for row in rows:
        if not row[width]:  # no rows (an ungrouped query always answers one)
            continue
        totals = {
            name: float(value or 0) if name in _REAL else int(value or 0)
            for name, value in zip(ROLLUP_TOTALS, row[width:], strict=True)
        }
        result[tuple(int(v) if isinstance(v, Decimal | int) else v for v in row[:width])] = totals
    return result


async def aggregate(
    conn: AsyncConnection[TupleRow],
    *,
    group: Sequence[Dim] = (),
    start: When = None,
    end: When = None,
    where: Mapping[str, Sequence[str]] | None = None,
) -> Groups:
    """``gateway.usage.reports.aggregate`` on PostgreSQL."""
    query = aggregate_query(group, start, end, where)
    if query is None:
        return {}
    cursor = await conn.execute(*query)
    return groups_of(await cursor.fetchall(), len(group))


def aggregate_blocking(
    conn: psycopg.Connection[TupleRow],
    *,
    group: Sequence[Dim] = (),
    start: When = None,
    end: When = None,
    where: Mapping[str, Sequence[str]] | None = None,
) -> Groups:
    """``aggregate`` on a blocking connection."""
    query = aggregate_query(group, start, end, where)
    return {} if query is None else groups_of(conn.execute(*query).fetchall(), len(group))


def spend_query(key_name: str, since_ts: float) -> Query:
    if since_ts % DAY == 0:
        day = datetime.fromtimestamp(since_ts, UTC).date()
        return "SELECT coalesce(sum(cost_usd), 0) FROM usage_daily WHERE key_name = %s AND day >= %s", [key_name, day]
    return "SELECT coalesce(sum(cost_usd), 0) FROM usage WHERE key_name = %s AND ts >= to_timestamp(%s)", [
        key_name,
        since_ts,
    ]


async def summarize(
    conn: AsyncConnection[TupleRow], *, by: SummaryBy, key: str | None = None, since: When = None
) -> list[dict[str, Any]]:
    """``gateway.usage.reports.summarize`` on PostgreSQL."""
    check_by(by)
    where = None if key is None else {"key": (key,)}
    return summary_rows(await aggregate(conn, group=(by,), start=since, where=where), by)


async def spend_usd(conn: AsyncConnection[TupleRow], key_name: str, since_ts: float) -> float:
    cursor = await conn.execute(*spend_query(key_name, since_ts))
    row = await cursor.fetchone()
    return 0.0 if row is None else float(row[0])


async def recent_requests(conn: AsyncConnection[TupleRow], key_name: str, since_ts: float) -> list[tuple[float, int]]:
    """``gateway.usage.reports.recent_requests`` on PostgreSQL (the ``(key_name, ts)`` index)."""
    cursor = await conn.execute(
        f"SELECT extract(epoch FROM ts), total_tokens FROM usage WHERE key_name = %s AND ts >= to_timestamp(%s) "  # noqa: S608
        f"AND NOT {LOCAL} ORDER BY ts LIMIT %s",
        (key_name, since_ts, MAX_RECENT),
    )
    return [(float(ts), int(tokens)) for ts, tokens in await cursor.fetchall()]


def summarize_blocking(url: str, *, by: SummaryBy, key: str | None = None, since: When = None) -> list[dict[str, Any]]:
    """``summarize`` on a connection of its own, without an event loop (the ``gateway usage`` command)."""
    check_by(by)
    where = None if key is None else {"key": (key,)}
    with psycopg.connect(url, connect_timeout=10, application_name="flexai-gateway usage") as conn:
        return summary_rows(aggregate_blocking(conn, group=(by,), start=since, where=where), by)
