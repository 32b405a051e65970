"""The usage page's numbers: one range, read through the report layer (``UsageReports``: the
SQLite ledger's file or the PostgreSQL ledger, the same answers from either).

``UsageQuery.parse`` checks the page's query string; ``usage_view`` runs the aggregates for it (all
from roll-ups, see the report layer) and returns plain rows for the template, the charts and CSV.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final, Literal

from gateway.auth.keys import Caller
from gateway.errors import InvalidRequest
from gateway.usage.report_source import UsageReports
from gateway.usage.reports import DAY, HOUR, Dim, Groups, summary_fields

By = Literal["key", "team", "model"]
BYS: Final = ("key", "team", "model")
MAX_DAYS: Final = 400  # the widest range a page shows
MAX_HOURLY_DAYS: Final = 31  # hourly charts: at most 744 bars
TOP: Final = 5


@dataclass(frozen=True, slots=True)
class UsageQuery:
    start: date
    end: date  # inclusive
    period: Literal["hour", "day"]
    by: By
    filters: Mapping[str, str] = field(default_factory=dict)  # key / team / model: one value each

    @classmethod
    def parse(cls, params: Mapping[str, str], today: date) -> UsageQuery:
        end = _date(params, "end", today)
        start = _date(params, "start", end - timedelta(days=6))
        if start > end:
            raise InvalidRequest("`start` must not be after `end`.", param="start")
        days = (end - start).days + 1
        if days > MAX_DAYS:
            raise InvalidRequest(f"A range covers at most {MAX_DAYS} days.", param="start")
        period = params.get("period") or ("hour" if days <= 2 else "day")
        if period not in ("hour", "day"):
            raise InvalidRequest("`period` must be hour or day.", param="period")
        if period == "hour" and days > MAX_HOURLY_DAYS:
            raise InvalidRequest(f"Hourly charts cover at most {MAX_HOURLY_DAYS} days.", param="period")
        by = params.get("by") or "key"
        if by not in BYS:
            raise InvalidRequest("`by` must be key, team or model.", param="by")
        filters = {name: params[name] for name in BYS if params.get(name)}
        return cls(start, end, "hour" if period == "hour" else "day", by, filters)  # type: ignore[arg-type]

    @property
    def bounds(self) -> tuple[float, float]:
        lo = datetime.combine(self.start, datetime.min.time(), tzinfo=UTC).timestamp()
        return lo, lo + ((self.end - self.start).days + 1) * DAY

    def params(self, **changes: str) -> dict[str, str]:
        """The query string of this view (with ``changes``), for links and the CSV download."""
        out = {"start": self.start.isoformat(), "end": self.end.isoformat(), "period": self.period, "by": self.by}
        out.update(self.filters)
        out.update(changes)
        return {k: v for k, v in out.items() if v}


@dataclass(frozen=True, slots=True)
class UsageView:
    query: UsageQuery
    totals: dict[str, Any]
    series: list[dict[str, Any]]  # one per bucket: label, requests, cost_usd, total_tokens, ...
    breakdown: list[dict[str, Any]]  # one per key / team / model, most spent first
    top_series: list[tuple[str, list[float]]]  # the top groups' cost per bucket
    top_keys: list[dict[str, Any]]
    top_models: list[dict[str, Any]]
    budgets: list[dict[str, Any]]


async def usage_view(ledger: UsageReports, query: UsageQuery, callers: Sequence[Caller], now: float) -> UsageView:
    lo, hi = query.bounds
    where = {name: (value,) for name, value in query.filters.items()}
    period: Dim = query.period
    step = HOUR if period == "hour" else DAY
    series_groups = await ledger.aggregate(group=(period,), start=lo, end=hi, where=where)
    by_groups = await ledger.aggregate(group=(query.by,), start=lo, end=hi, where=where)
    breakdown = _ranked(by_groups, query.by)
    tops = {}
    for dim in ("key", "model"):
        tops[dim] = breakdown[:TOP] if dim == query.by else _ranked(
            await ledger.aggregate(group=(dim,), start=lo, end=hi, where=where), dim)[:TOP]  # fmt: skip
    top_names = [row["name"] for row in breakdown[:TOP] if row["name"] is not None]
    top_groups = await ledger.aggregate(group=(period, query.by), start=lo, end=hi,
                                        where={**where, query.by: tuple(top_names)}) if top_names else {}  # fmt: skip
    buckets = [lo + i * step for i in range(int((hi - lo) // step))]
    labels = [_label(b, period) for b in buckets]
    series = [
        {"label": label, "bucket": b, **_fields(series_groups.get((b,)))}
        for b, label in zip(buckets, labels, strict=True)
    ]
    top_series = [
        (name, [float((top_groups.get((b, name)) or {}).get("cost_usd", 0.0)) for b in buckets]) for name in top_names
    ]
    totals = _fields(_sum(by_groups.values()))
    return UsageView(
        query=query,
        totals=totals,
        series=series,
        breakdown=breakdown,
        top_series=top_series,
        top_keys=tops["key"],
        top_models=tops["model"],
        budgets=await _budgets(ledger, callers, now),
    )


async def _budgets(ledger: UsageReports, callers: Sequence[Caller], now: float) -> list[dict[str, Any]]:
    """Each key with a budget: what it spent today and this month (UTC), and the share used."""
    budgeted = [c for c in callers if c.budget_usd_daily or c.budget_usd_monthly]
    if not budgeted:
        return []
    names = tuple(c.name for c in budgeted)
    today = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    month = today.replace(day=1)
    spent_today = await ledger.aggregate(group=("key",), start=today, where={"key": names})
    spent_month = await ledger.aggregate(group=("key",), start=month, where={"key": names})
    rows = []
    for c in budgeted:
        day_usd = float((spent_today.get((c.name,)) or {}).get("cost_usd", 0.0))
        month_usd = float((spent_month.get((c.name,)) or {}).get("cost_usd", 0.0))
        rows.append({
            "key": c.name, "team": c.team,
            "daily_usd": c.budget_usd_daily, "spent_today_usd": day_usd,
            "daily_used": day_usd / c.budget_usd_daily if c.budget_usd_daily else None,
            "monthly_usd": c.budget_usd_monthly, "spent_month_usd": month_usd,
            "monthly_used": month_usd / c.budget_usd_monthly if c.budget_usd_monthly else None,
        })  # fmt: skip
    return rows


def _ranked(groups: Groups, by: str) -> list[dict[str, Any]]:
    rows = [{"name": name, **_fields(t)} for (name,), t in groups.items()]
    rows.sort(key=lambda r: (-(r["cost_usd"] or 0.0), -r["total_tokens"], r["name"] is None, r["name"] or ""))
    return rows


def _fields(t: Mapping[str, float] | None) -> dict[str, Any]:
    if t is None:
        t = dict.fromkeys(("records", "answered_locally", "cached", "prompt_tokens", "completion_tokens",
                           "total_tokens", "cost_usd", "priced", "saved_usd", "saved_rows", "unpriced",
                           "errors", "latency_ms"), 0.0)  # fmt: skip
    out = summary_fields(dict(t))
    served = int(t["records"]) - int(t["answered_locally"])
    out["errors"] = int(t["errors"])
    out["avg_latency_ms"] = t["latency_ms"] / t["records"] if t["records"] else None
    out["served"] = served
    return out


def _sum(groups: Any) -> dict[str, float] | None:
    total: dict[str, float] | None = None
    for t in groups:
        total = dict(t) if total is None else {k: total[k] + v for k, v in t.items()}
    return total


def _label(bucket: float, period: str) -> str:
    when = datetime.fromtimestamp(bucket, UTC)
    return when.strftime("%Y-%m-%d %H:00") if period == "hour" else when.date().isoformat()


def _date(params: Mapping[str, str], name: str, default: date) -> date:
    raw = params.get(name)
    if not raw:
        return default
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise InvalidRequest(f"`{name}` must be a date, YYYY-MM-DD.", param=name) from None
