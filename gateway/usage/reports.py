"""Reports on the usage ledger: totals over a time range, grouped by key, team, model, hour or day.

Plain functions taking a ledger file's path (or an open connection), usable without an event loop:
the one query layer behind ``GET /admin/usage``, ``gateway usage``, the console and budgets seeded
at start-up. They read the hourly and daily roll-ups (``gateway.usage.rollups``) for the whole
buckets of a range, plus the raw rows for what no roll-up covers: the rows not rolled up yet (by
id, a short range) and the partial hours at either end of the range (by the ``ts`` index). No
report scans the raw rows of a whole range.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any, Final, Literal

from gateway.usage.rollups import LOCAL_SQL, ROW_TOTALS, bucket_sql, last_rolled_id
from gateway.usage.schema import (
    BUSY_TIMEOUT_S,
    ROLLUP_CUTS,
    ROLLUP_TOTALS,
    SCHEMA_VERSION,
    LedgerError,
    user_version,
    version_mismatch,
)

# The most rows recent_requests returns (a key's window is at most its rpm; this bounds a read).
MAX_RECENT: Final = 100_000

SummaryBy = Literal["key", "team", "model", "day"]
Dim = Literal["key", "team", "model", "hour", "day"]
SUMMARY_GROUPS: Final = ("key", "team", "model", "day")
DIMENSIONS: Final = ("key", "team", "model", "hour", "day")
HOUR: Final = 3600
DAY: Final = 86400
_COLUMNS: Final = {"key": "key_name", "team": "team", "model": "model"}
_FOREVER: Final = float(2**53)
Totals = dict[str, float]  # ROLLUP_TOTALS by name
Groups = dict[tuple[Any, ...], Totals]


def aggregate(
    source: Path | str | sqlite3.Connection,
    *,
    group: Sequence[Dim] = (),
    start: datetime | date | float | None = None,
    end: datetime | date | float | None = None,
    where: Mapping[str, Sequence[str]] | None = None,
) -> Groups:
    """ROLLUP_TOTALS of the rows with ``start <= ts < end``, per value of ``group``.

    ``where`` keeps the rows whose key, team or model is one of the values given. A group's key is
    the tuple of its values in ``group`` order: a name (None: no key or team), or a bucket's unix
    start time for "hour" and "day" (UTC). Times: a date is its midnight UTC, a naive datetime is
    UTC, a float is unix time; None is unbounded.
    """
    lo, hi = bounds(group, where, start, end)
    result: Groups = {}
    if hi <= lo:
        return result
    with reader(source) as conn:
        conn.execute("BEGIN")  # one snapshot: the roll-ups and the rows not rolled up yet agree
        try:
            last_id = last_rolled_id(conn)
            raw, rolled = pieces(lo, hi, finest=finest_period(group))
            for period, a, b in rolled:
                _merge(result, conn.execute(*_rollup_sql(period, a, b, group, where)))
            if rolled:  # the rows of those buckets that are not rolled up yet
                span = (rolled[0][1], rolled[-1][2])
                _merge(result, conn.execute(*_raw_sql(span, group, where, after_id=last_id)))
            for span in raw:
                _merge(result, conn.execute(*_raw_sql(span, group, where)))
        finally:
            conn.execute("COMMIT")
    return result


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
    (answered by the gateway itself: refusals, dry runs), ``cached`` (answered from the response
    cache), ``prompt_tokens``, ``completion_tokens``, ``total_tokens`` (served, cached answers
    included), ``cost_usd`` (the sum of the known costs; None when none is known), ``saved_usd``
    (what the cached answers would have cost from the upstream; None when there were none) and
    ``unpriced_requests`` (requests sent upstream whose cost is unknown: no price in the catalog,
    or no usage in the answer). ``key`` keeps one key's rows only;
    ``since`` keeps rows from that time on (a date: its midnight UTC; a naive datetime: UTC;
    a float: unix time).
    """
    check_by(by)
    return summary_rows(aggregate(source, group=(by,), start=since, where=None if key is None else {"key": (key,)}), by)


def check_by(by: str) -> None:
    if by not in SUMMARY_GROUPS:
        raise ValueError(f"by must be one of {', '.join(SUMMARY_GROUPS)}, not {by!r}")


def summary_rows(groups: Groups, by: SummaryBy) -> list[dict[str, Any]]:
    """``summarize``'s rows from ``aggregate``'s groups by ``by`` (either ledger's)."""
    rows = []
    for (value,), totals in sorted(groups.items(), key=lambda item: _order(item[0][0])):
        name = _day(value) if by == "day" else value
        rows.append({by: name, **summary_fields(totals)})
    return rows


def summary_fields(t: Totals) -> dict[str, Any]:
    """``summarize``'s fields of one group's totals."""
    local, cached = int(t["answered_locally"]), int(t["cached"])
    return {
        "requests": int(t["records"]) - local - cached,
        "refused": local,
        "cached": cached,
        "prompt_tokens": int(t["prompt_tokens"]),
        "completion_tokens": int(t["completion_tokens"]),
        "total_tokens": int(t["total_tokens"]),
        "cost_usd": t["cost_usd"] if t["priced"] else None,
        "saved_usd": t["saved_usd"] if t["saved_rows"] else None,
        "unpriced_requests": int(t["unpriced"]),
    }


def spend_usd(source: Path | str | sqlite3.Connection, key_name: str, since_ts: float) -> float:
    """The sum of the key's known costs since ``since_ts`` (unix time): ``aggregate``'s, so a month's
    budget reads a few roll-up rows of the key, not a month of its requests."""
    totals = aggregate(source, start=since_ts, where={"key": (key_name,)}).get(())
    return 0.0 if totals is None else float(totals["cost_usd"])


def recent_requests(source: Path | str | sqlite3.Connection, key_name: str, since_ts: float) -> list[tuple[float, int]]:
    """When each of the key's requests since ``since_ts`` was admitted and its tokens: the rows the
    rate limiter counted (sent upstream or answered from the cache; not the gateway's own refusals).
    Read by the ts index: a rate limit's window, a minute of every key's rows."""
    with reader(source) as conn:
        rows = conn.execute(
            f"SELECT ts, total_tokens FROM usage WHERE key_name = ? AND ts >= ? AND NOT {LOCAL_SQL} "  # noqa: S608
            "ORDER BY ts LIMIT ?",
            (key_name, since_ts, MAX_RECENT),
        ).fetchall()
    return [(float(ts), int(tokens)) for ts, tokens in rows]


def bounds(
    group: Sequence[str],
    where: Mapping[str, Sequence[str]] | None,
    start: datetime | date | float | None,
    end: datetime | date | float | None,
) -> tuple[float, float]:
    """``aggregate``'s range as unix times (unbounded: +-2**53); ValueError for an unknown dimension."""
    unknown = [d for d in group if d not in DIMENSIONS] + [d for d in (where or {}) if d not in _COLUMNS]
    if unknown:
        raise ValueError(f"unknown dimension {unknown[0]!r}")
    return -_FOREVER if start is None else _unix(start), _FOREVER if end is None else _unix(end)


def finest_period(group: Sequence[str]) -> str:
    """The coarsest roll-up a report grouped by ``group`` may read."""
    return "hourly" if "hour" in group else "daily" if "day" in group else "monthly"


def bounded(t: float) -> bool:
    """Whether ``t`` is a real time, not an unbounded end of a range."""
    return abs(t) < _FOREVER


def pieces(lo: float, hi: float, *, finest: str) -> tuple[list[tuple[float, float]], list[tuple[str, float, float]]]:
    """Split [lo, hi) into raw-row spans (partial hours at the ends) and roll-up spans, in time
    order: whole months from the monthly roll-ups, whole days from the daily ones, whole hours from
    the hourly ones, never coarser than ``finest`` (what the report groups by: "hourly", "daily",
    "monthly")."""
    h_lo, h_hi = _ceil(lo, HOUR), _floor(hi, HOUR)
    if h_lo >= h_hi:
        return [(lo, hi)], []
    raw = [span for span in ((lo, h_lo), (h_hi, hi)) if span[0] < span[1]]
    d_lo, d_hi = _ceil(h_lo, DAY), _floor(h_hi, DAY)
    if finest == "hourly" or d_lo >= d_hi:
        return raw, [("hourly", h_lo, h_hi)]
    m_lo, m_hi = _month(d_lo, up=True), _month(d_hi, up=False)
    if finest == "daily" or m_lo >= m_hi:
        m_lo = m_hi = d_hi
    rolled = [("hourly", h_lo, d_lo), ("daily", d_lo, m_lo), ("monthly", m_lo, m_hi), ("daily", m_hi, d_hi),
              ("hourly", d_hi, h_hi)]  # fmt: skip
    return raw, [piece for piece in rolled if piece[1] < piece[2]]


def _month(t: float, *, up: bool) -> float:
    """The start of the UTC month at or after (``up``) or at or before ``t``."""
    if abs(t) >= _FOREVER:
        return t
    when = datetime.fromtimestamp(t, UTC)
    start = datetime(when.year, when.month, 1, tzinfo=UTC)
    if up and start.timestamp() < t:
        start = datetime(when.year + when.month // 12, when.month % 12 + 1, 1, tzinfo=UTC)
    return start.timestamp()


def _rollup_sql(
    period: str, lo: float, hi: float, group: Sequence[Dim], where: Mapping[str, Sequence[str]] | None
) -> tuple[str, list[Any]]:
    needed = {_COLUMNS[d] for d in (*group, *(where or {})) if d in _COLUMNS}
    table = next(f"usage_{period}{suffix}" for suffix, columns in ROLLUP_CUTS if needed <= set(columns))
    day = "bucket" if period == "daily" else f"(bucket - bucket % {DAY})"  # a day of hourly rows
    exprs = [_COLUMNS.get(d, "bucket" if d == "hour" else day) for d in group]
    sums = ", ".join(f"SUM({name})" for name in ROLLUP_TOTALS)
    conditions, params = ["bucket >= ?", "bucket < ?"], [lo, hi]
    _filters(where, conditions, params, unary="")
    sql = f"SELECT {', '.join([*exprs, sums])} FROM {table} WHERE {' AND '.join(conditions)}"  # noqa: S608
    return sql + (f" GROUP BY {', '.join(str(i + 1) for i in range(len(exprs)))}" if exprs else ""), params


def _raw_sql(
    span: tuple[float, float], group: Sequence[Dim], where: Mapping[str, Sequence[str]] | None, *, after_id: int = -1
) -> tuple[str, list[Any]]:
    exprs = [f"ifnull({_COLUMNS[d]}, '')" if d in _COLUMNS else bucket_sql(HOUR if d == "hour" else DAY)
             for d in group]  # fmt: skip
    # Rows not rolled up yet are found by id (a short range): "+ts" keeps SQLite off the ts index there.
    ts = "+ts" if after_id >= 0 else "ts"
    conditions, params = [f"{ts} >= ?", f"{ts} < ?"], [span[0], span[1]]
    if after_id >= 0:
        conditions.insert(0, "id > ?")
        params.insert(0, after_id)
    _filters(where, conditions, params, unary="+" if after_id >= 0 else "")
    sql = f"SELECT {', '.join([*exprs, *ROW_TOTALS])} FROM usage WHERE {' AND '.join(conditions)}"  # noqa: S608
    return sql + (f" GROUP BY {', '.join(str(i + 1) for i in range(len(exprs)))}" if exprs else ""), params


def _filters(where: Mapping[str, Sequence[str]] | None, conditions: list[str], params: list[Any], unary: str) -> None:
    for dim, values in (where or {}).items():
        conditions.append(f"{unary}{_COLUMNS[dim]} IN ({', '.join('?' * len(values))})" if values else "0")
        params.extend(values)


def _merge(result: Groups, rows: Iterator[tuple[Any, ...]]) -> None:
    width = len(ROLLUP_TOTALS)
    for row in rows:
        if not row[-width]:  # no rows (an ungrouped query always answers one)
            continue
        group = tuple(None if value == "" else value for value in row[:-width])
        totals = result.get(group)
        if totals is None:
            result[group] = {name: value or 0 for name, value in zip(ROLLUP_TOTALS, row[-width:], strict=True)}
        else:
            for name, value in zip(ROLLUP_TOTALS, row[-width:], strict=True):
                totals[name] += value or 0


@contextlib.contextmanager
def reader(source: Path | str | sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """The given connection, or a new one on an existing ledger file (closed afterwards): open one
    for several reports in a row (a page), so that they share SQLite's page cache."""
    if isinstance(source, sqlite3.Connection):
        yield source
        return
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no ledger at {path}")
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        version = user_version(conn)
        if version != SCHEMA_VERSION:
            raise LedgerError(version_mismatch(path, version))
        yield conn
    finally:
        conn.close()


def _order(value: Any) -> tuple[bool, Any]:
    return (value is not None, value)


def _day(bucket: Any) -> str:
    return datetime.fromtimestamp(int(bucket), UTC).date().isoformat()


def _ceil(t: float, step: int) -> float:
    return -_FOREVER if t <= -_FOREVER else float(-(-t // step) * step)


def _floor(t: float, step: int) -> float:
    return _FOREVER if t >= _FOREVER else float(t // step * step)


def _unix(when: datetime | date | float) -> float:
    if isinstance(when, datetime):
        return (when if when.tzinfo is not None else when.replace(tzinfo=UTC)).timestamp()
    if isinstance(when, date):
        return datetime.combine(when, time(), tzinfo=UTC).timestamp()
    return float(when)
