"""Reports on the usage ledger: totals by key, team, model or day, and a key's spend.

Plain functions taking a ledger file's path (or an open connection), usable without an event loop:
the one query layer behind ``GET /admin/usage``, ``gateway usage`` and budgets seeded at start-up.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Mapping
from datetime import UTC, date, datetime, time
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal

from gateway.usage.schema import BUSY_TIMEOUT_S, SCHEMA_VERSION, LedgerError, user_version

SummaryBy = Literal["key", "team", "model", "day"]

_GROUPS: Final[Mapping[str, str]] = MappingProxyType(
    {"key": "key_name", "team": "team", "model": "model", "day": "date(ts, 'unixepoch')"}
)
SUMMARY_GROUPS: Final = tuple(_GROUPS)
# Rows the gateway answered itself, never sent upstream (an SQL expression): dry runs, and the
# gateway's own error answers except 502/504, which say that the upstream failed to answer.
_LOCAL: Final = "(outcome = 'dry_run' OR (outcome = 'refused' AND status NOT IN (502, 504)))"
# Rows answered from the response cache (or collapsed onto an identical request's upstream answer).
_CACHED: Final = "(cache IS NOT NULL AND cache IN ('hit', 'collapsed'))"


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
        f"SELECT {group} AS grp, SUM({_LOCAL}), SUM({_CACHED}), SUM(prompt_tokens), "  # noqa: S608
        f"SUM(completion_tokens), SUM(total_tokens), SUM(cost_usd), SUM(saved_usd), "
        f"SUM(cost_usd IS NULL AND NOT {_LOCAL}), COUNT(*) FROM usage "
        f"{'WHERE ' + ' AND '.join(where) if where else ''} GROUP BY grp ORDER BY grp"
    )
    with _reader(source) as conn:
        rows = conn.execute(sql, params).fetchall()
    return [
        {
            by: grp,
            "requests": count - local - cached,
            "refused": local,
            "cached": cached,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": total,
            "cost_usd": cost,
            "saved_usd": saved,
            "unpriced_requests": unpriced,
        }
        for grp, local, cached, prompt, completion, total, cost, saved, unpriced, count in rows
    ]


def spend_usd(source: Path | str | sqlite3.Connection, key_name: str, since_ts: float) -> float:
    """The sum of the key's known costs since ``since_ts`` (unix time), from the index on (key_name, ts)."""
    with _reader(source) as conn:
        row = conn.execute(
            "SELECT TOTAL(cost_usd) FROM usage WHERE key_name = ? AND ts >= ?", (key_name, since_ts)
        ).fetchone()
    return float(row[0])


@contextlib.contextmanager
def _reader(source: Path | str | sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """The given connection, or a new one on an existing ledger file (closed afterwards)."""
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
            raise LedgerError(f"{path} is not a ledger of schema version {SCHEMA_VERSION} (user_version {version})")
        yield conn
    finally:
        conn.close()


def _unix(since: datetime | date | float) -> float:
    if isinstance(since, datetime):
        return (since if since.tzinfo is not None else since.replace(tzinfo=UTC)).timestamp()
    if isinstance(since, date):
        return datetime.combine(since, time(), tzinfo=UTC).timestamp()
    return float(since)
