"""Reports on the PostgreSQL ledger: the same answers as ``gateway.usage.reports`` gives on SQLite.

``summarize`` (totals by key, team, model or day) and ``spend_usd`` (a key's spend since a time)
read the daily totals (``usage_daily``) when the period starts at a UTC midnight, as every report
and budget period does, and the rows (``usage``, by its indexes) otherwise. Each query is built
once (``summary_query``, ``spend_query``) and run by an async connection (the gateway) or a
blocking one (the ``gateway usage`` command, ``summarize_blocking``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, time
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Final, Literal

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import TupleRow

from gateway.errors import GatewayError
from gateway.usage.postgres.write import CACHED, LOCAL

SummaryBy = Literal["key", "team", "model", "day"]
Query = tuple[str, list[Any]]


class LedgerUnavailable(GatewayError):
    """A report, or a budgeted key's spend, cannot be read while PostgreSQL does not answer."""

    status = 503
    code = "ledger_unavailable"


# The group of each report, on the daily totals and on the rows ('' is "no key/team" in the totals).
_DAILY_GROUPS: Final[Mapping[str, str]] = MappingProxyType(
    {"key": "NULLIF(key_name, '')", "team": "NULLIF(team, '')", "model": "model", "day": "to_char(day, 'YYYY-MM-DD')"}
)
_ROW_GROUPS: Final[Mapping[str, str]] = MappingProxyType(
    {"key": "key_name", "team": "team", "model": "model", "day": "to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD')"}
)
_DAILY_SUMS: Final = (
    "sum(local), sum(cached), sum(prompt_tokens), sum(completion_tokens), sum(total_tokens), "
    "CASE WHEN sum(priced) > 0 THEN sum(cost_usd) END, CASE WHEN sum(saved) > 0 THEN sum(saved_usd) END, "
    "sum(unpriced), sum(rows)"
)
_ROW_SUMS: Final = (
    f"count(*) FILTER (WHERE {LOCAL}), count(*) FILTER (WHERE {CACHED}), sum(prompt_tokens), "
    "sum(completion_tokens), sum(total_tokens), sum(cost_usd), sum(saved_usd), "
    f"count(*) FILTER (WHERE cost_usd IS NULL AND NOT {LOCAL}), count(*)"
)


def summary_query(by: SummaryBy, key: str | None, since: datetime | date | float | None) -> Query:
    """The SQL and parameters of ``summarize`` (see ``gateway.usage.reports.summarize``)."""
    if by not in _DAILY_GROUPS:
        raise ValueError(f"by must be one of {', '.join(_DAILY_GROUPS)}, not {by!r}")
    start = None if since is None else _unix(since)
    daily = start is None or _midnight(start)
    where: list[str] = []
    params: list[Any] = []
    if key is not None:
        where.append("key_name = %s")
        params.append(key)
    if start is not None:
        where.append("day >= %s" if daily else "ts >= to_timestamp(%s)")
        params.append(datetime.fromtimestamp(start, UTC).date() if daily else start)
    group, sums, table = (
        (_DAILY_GROUPS[by], _DAILY_SUMS, "usage_daily") if daily else (_ROW_GROUPS[by], _ROW_SUMS, "usage")
    )
    filters = f"WHERE {' AND '.join(where)}" if where else ""
    sql = (
        f'SELECT {group} COLLATE "C" AS grp, {sums} FROM {table} {filters} '  # noqa: S608
        "GROUP BY grp ORDER BY grp NULLS FIRST"
    )
    return sql, params


def summary_rows(by: SummaryBy, rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    return [
        {
            by: grp,
            "requests": int(count) - int(local) - int(cached),
            "refused": int(local),
            "cached": int(cached),
            "prompt_tokens": int(prompt),
            "completion_tokens": int(completion),
            "total_tokens": int(total),
            "cost_usd": _money(cost),
            "saved_usd": _money(saved),
            "unpriced_requests": int(unpriced),
        }
        for grp, local, cached, prompt, completion, total, cost, saved, unpriced, count in rows
    ]


def spend_query(key_name: str, since_ts: float) -> Query:
    if _midnight(since_ts):
        day = datetime.fromtimestamp(since_ts, UTC).date()
        return "SELECT coalesce(sum(cost_usd), 0) FROM usage_daily WHERE key_name = %s AND day >= %s", [key_name, day]
    return "SELECT coalesce(sum(cost_usd), 0) FROM usage WHERE key_name = %s AND ts >= to_timestamp(%s)", [
        key_name,
        since_ts,
    ]


async def summarize(
    conn: AsyncConnection[TupleRow],
    *,
    by: SummaryBy,
    key: str | None = None,
    since: datetime | date | float | None = None,
) -> list[dict[str, Any]]:
    sql, params = summary_query(by, key, since)
    cursor = await conn.execute(sql, params)
    return summary_rows(by, await cursor.fetchall())


async def spend_usd(conn: AsyncConnection[TupleRow], key_name: str, since_ts: float) -> float:
    sql, params = spend_query(key_name, since_ts)
    cursor = await conn.execute(sql, params)
    row = await cursor.fetchone()
    return 0.0 if row is None else float(row[0])


def summarize_blocking(
    url: str, *, by: SummaryBy, key: str | None = None, since: datetime | date | float | None = None
) -> list[dict[str, Any]]:
    """``summarize`` on a connection of its own, without an event loop (the ``gateway usage`` command)."""
    sql, params = summary_query(by, key, since)
    with psycopg.connect(url, connect_timeout=10, application_name="flexai-gateway usage") as conn:
        return summary_rows(by, conn.execute(sql, params).fetchall())


def _money(value: Decimal | float | None) -> float | None:
    return None if value is None else float(value)


def _midnight(unix: float) -> bool:
    return unix % 86400 == 0


def _unix(since: datetime | date | float) -> float:
    if isinstance(since, datetime):
        return (since if since.tzinfo is not None else since.replace(tzinfo=UTC)).timestamp()
    if isinstance(since, date):
        return datetime.combine(since, time(), tzinfo=UTC).timestamp()
    return float(since)
