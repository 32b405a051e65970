"""How the console writes numbers: money, counts, shares, ages and times (Jinja2 filters)."""

from __future__ import annotations

from datetime import UTC, datetime


def usd(value: float | None) -> str:
    if value is None:
        return "\N{EN DASH}"
    if value == 0 or abs(value) >= 1:
        return f"${value:,.2f}"
    return f"${value:.4f}" if abs(value) >= 0.01 else f"${value:.6f}"  # the demo's prices are tiny


def num(value: float | None) -> str:
    if value is None:
        return "\N{EN DASH}"
    return f"{value:,.0f}" if float(value).is_integer() or abs(value) >= 100 else f"{value:,.2f}"


def pct(value: float | None) -> str:
    return "\N{EN DASH}" if value is None else f"{value * 100:.1f} %"


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    return f"{seconds / 60:.0f} min ago" if seconds < 7200 else f"{seconds / 3600:.1f} h ago"


def utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
