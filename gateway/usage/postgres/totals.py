"""The totals the PostgreSQL roll-ups hold, as SQL: one place for the batch write, the schema's
back-fill and the reports' partial hours, so that every one counts a row the same way (and the same
way as ``gateway.usage.rollups`` does on SQLite)."""

from __future__ import annotations

from typing import Final

from gateway.usage.schema import ROLLUP_TOTALS

# Rows the gateway answered itself (never sent upstream) and rows answered from the cache.
LOCAL: Final = "(outcome = 'dry_run' OR (outcome = 'refused' AND status NOT IN (502, 504)))"
CACHED: Final = "(cache IS NOT NULL AND cache IN ('hit', 'collapsed'))"

# ROLLUP_TOTALS (gateway.usage.schema) over usage rows, in order.
ROW_TOTALS: Final = (
    "count(*)",
    f"count(*) FILTER (WHERE {LOCAL})",
    f"count(*) FILTER (WHERE {CACHED})",
    "count(*) FILTER (WHERE status >= 500)",
    "coalesce(sum(prompt_tokens), 0)",
    "coalesce(sum(completion_tokens), 0)",
    "coalesce(sum(total_tokens), 0)",
    "coalesce(sum(cost_usd), 0)",
    "count(cost_usd)",
    "coalesce(sum(saved_usd), 0)",
    "count(saved_usd)",
    f"count(*) FILTER (WHERE cost_usd IS NULL AND NOT {LOCAL})",
    "coalesce(sum(latency_ms), 0)",
)
assert len(ROW_TOTALS) == len(ROLLUP_TOTALS)

# The same totals' columns in usage_daily (created before the hourly roll-up, with its own names).
DAILY_COLUMNS: Final = (
    "rows", "local", "cached", "errors", "prompt_tokens", "completion_tokens", "total_tokens",
    "cost_usd", "priced", "saved_usd", "saved", "unpriced", "latency_ms",
)  # fmt: skip
assert len(DAILY_COLUMNS) == len(ROLLUP_TOTALS)


def bucket_sql(seconds: int, column: str = "ts") -> str:
    """SQL for the start (unix time, bigint) of the UTC bucket of ``seconds`` holding ``column``."""
    return f"(floor(extract(epoch FROM {column}) / {seconds})::bigint * {seconds})"


def hourly_upsert(source: str) -> str:
    """SQL adding the rows of ``source`` (a table or a CTE of usage rows) to usage_hourly."""
    totals = ", ".join(ROLLUP_TOTALS)
    adds = ", ".join(f"{c} = usage_hourly.{c} + EXCLUDED.{c}" for c in ROLLUP_TOTALS)
    return (
        f"INSERT INTO usage_hourly (bucket, key_name, team, model, {totals}) "  # noqa: S608 - constants only
        f"SELECT {bucket_sql(3600)}, coalesce(key_name, ''), coalesce(team, ''), model, {', '.join(ROW_TOTALS)} "
        f"FROM {source} GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4 "
        f"ON CONFLICT (bucket, key_name, team, model) DO UPDATE SET {adds}"
    )
