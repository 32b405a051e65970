"""The report layer on the roll-ups: the same totals as the raw rows for any range and grouping,
whatever has been rolled up; raw rows pruned past their retention with the roll-ups kept; and
queries that read indexes, never the whole raw table."""

from __future__ import annotations

import random
import re
import sqlite3
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.config import SettingsError, load_settings
from gateway.usage.ledger import Ledger
from gateway.usage.reports import DAY, HOUR, Dim, aggregate, summarize
from gateway.usage.rollups import RollupKeeper, prune, refresh
from gateway.usage.schema import INSERT, UsageRecord, migrate

T0 = datetime(2025, 3, 1, tzinfo=UTC).timestamp()
KEYS = ("alice", "bob", "carol", None)
TEAMS = {"alice": "red", "bob": "blue", "carol": None, None: None}
MODELS = ("m1", "m2", "m3")


def seeded(count: int, seed: int = 7, days: float = 5) -> list[UsageRecord]:
    rng = random.Random(seed)
    records = []
    for i in range(count):
        key = rng.choice(KEYS)
        refused = rng.random() < 0.1
        hit = not refused and rng.random() < 0.1
        cost = None if refused or rng.random() < 0.1 else round(rng.random(), 4)
        records.append(
            UsageRecord(
                ts=T0 + rng.random() * days * DAY,
                request_id=f"r{i}",
                key_name=key,
                team=TEAMS[key],
                model=rng.choice(MODELS),
                endpoint="/v1/chat/completions",
                status=429 if refused else rng.choice((200, 200, 200, 502)),
                prompt_tokens=rng.randrange(100),
                completion_tokens=rng.randrange(50),
                total_tokens=0,
                cost_usd=cost,
                outcome="refused" if refused else "cache_hit" if hit else "completed",
                cut=False,
                latency_ms=rng.random() * 100,
                ttfb_ms=None,
                cache="hit" if hit else None,
                saved_usd=round(rng.random(), 3) if hit else None,
            )
        )
    return records


def ledger_with(path: Path, records: Sequence[UsageRecord]) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn)
    conn.execute("BEGIN")
    conn.executemany(INSERT, records)
    conn.execute("COMMIT")
    return conn


def by_hand(records: Sequence[UsageRecord], group: Sequence[Dim], lo: float, hi: float) -> dict[tuple[Any, ...], Any]:
    """What the report must say, computed from the records themselves."""
    out: dict[tuple[Any, ...], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in records:
        if not lo <= r.ts < hi:
            continue
        values: dict[str, Any] = {"key": r.key_name, "team": r.team, "model": r.model}
        values["hour"], values["day"] = int(r.ts) // HOUR * HOUR, int(r.ts) // DAY * DAY
        t = out[tuple(values[d] for d in group)]
        t["records"] += 1
        t["cost_usd"] += r.cost_usd or 0
        t["priced"] += r.cost_usd is not None
        t["prompt_tokens"] += r.prompt_tokens
        t["cached"] += r.cache == "hit"
        t["answered_locally"] += r.outcome == "refused" and r.status not in (502, 504)
    return {g: dict(t) for g, t in out.items()}


def check(
    conn: sqlite3.Connection, records: Sequence[UsageRecord], group: Sequence[Dim], lo: float | None, hi: float | None
) -> None:
    got = aggregate(conn, group=group, start=lo, end=hi)
    want = by_hand(records, group, -1e18 if lo is None else lo, 1e18 if hi is None else hi)
    assert set(got) == set(want), (group, lo, hi)
    for g, t in want.items():
        for name, value in t.items():
            assert got[g][name] == pytest.approx(value), (group, g, name)


@pytest.mark.parametrize("rolled_up", [0, 1234, 5000])
def test_totals_match_the_raw_rows_for_any_range_and_grouping(tmp_path: Path, rolled_up: int) -> None:
    """Whole days from the daily roll-up, whole hours from the hourly one, partial hours and rows
    not rolled up yet from the raw rows: every range adds up to what the rows hold."""
    records = seeded(5000)
    conn = ledger_with(tmp_path / "usage.db", records)
    if rolled_up == 5000:
        assert refresh(conn, chunk=617) == 5000  # in chunks of one transaction each
    elif rolled_up:  # a keeper that is behind: the rest is read from the raw rows
        assert refresh(conn, chunk=rolled_up, max_chunks=1) == rolled_up
    rng = random.Random(rolled_up)
    ranges = [(T0 - DAY, T0 + 10 * DAY), (T0 + DAY, T0 + 3 * DAY), (T0 + 0.5 * HOUR, T0 + 2.25 * HOUR)]
    for _ in range(6):
        a, b = sorted((T0 + rng.random() * 5 * DAY, T0 + rng.random() * 5 * DAY))
        ranges.append((a, b))
    groups: list[Sequence[Dim]] = [(), ("key",), ("team",), ("model",), ("day",), ("hour",), ("day", "key")]
    for lo, hi in ranges:
        for group in groups:
            check(conn, records, group, lo, hi)
    conn.close()


def test_whole_months_come_from_the_monthly_roll_up(tmp_path: Path) -> None:
    """75 days from March 1st: March and April whole, May in part; ranges across months, unbounded."""
    records = seeded(4000, seed=3, days=75)
    conn = ledger_with(tmp_path / "usage.db", records)
    refresh(conn, chunk=1500)
    conn.execute(
        "INSERT INTO usage SELECT NULL, ts + 3600, request_id, key_name, team, model, endpoint, status, "
        "prompt_tokens, completion_tokens, total_tokens, cost_usd, outcome, cut, latency_ms, ttfb_ms, cache, "
        "saved_usd, requested_model, fallback_from FROM usage WHERE id <= 300"
    )  # rows not rolled up yet
    records = records + [r._replace(ts=r.ts + 3600) for r in records[:300]]
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    ranges: list[tuple[float | None, float | None]] = [
        (None, None),
        (T0 - DAY, T0 + 80 * DAY),
        (None, T0 + 45.5 * DAY),
        (T0 + 10.3 * DAY, T0 + 70.9 * DAY),
        (T0 + 31 * DAY, None),
    ]
    groups: list[Sequence[Dim]] = [(), ("key",), ("team",), ("model",), ("day",), ("key", "model")]
    for lo, hi in ranges:
        for group in groups:
            check(conn, records, group, lo, hi)
    assert any("FROM usage_monthly" in s for s in statements)
    conn.close()


def test_a_filter_keeps_the_named_keys_and_models(tmp_path: Path) -> None:
    records = seeded(2000)
    conn = ledger_with(tmp_path / "usage.db", records)
    refresh(conn)
    got = aggregate(conn, group=("model",), start=T0 + 3.3 * HOUR, where={"key": ("alice", "bob"), "model": ("m2",)})
    want = by_hand(
        [r for r in records if r.key_name in ("alice", "bob") and r.model == "m2"], ("model",), T0 + 3.3 * HOUR, 1e12
    )
    assert set(got) == {("m2",)}
    assert got[("m2",)]["cost_usd"] == pytest.approx(want[("m2",)]["cost_usd"])
    assert aggregate(conn, group=("key",), where={"key": ()}) == {}
    with pytest.raises(ValueError, match="unknown dimension"):
        aggregate(conn, group=("week",))  # type: ignore[arg-type]
    conn.close()


def test_summaries_read_the_roll_ups_after_the_raw_rows_are_pruned(tmp_path: Path) -> None:
    records = seeded(3000)
    path = tmp_path / "usage.db"
    conn = ledger_with(path, records)
    before = summarize(path, by="key")
    refresh(conn)
    assert _rounded(summarize(path, by="key")) == _rounded(before)
    # Rows not rolled up are never pruned; the newest row is always kept (ids are never reused).
    conn.execute("UPDATE usage_rollup_state SET last_id = 1000")
    assert prune(conn, T0 + 100 * DAY, limit=300) == 1000
    conn.execute("UPDATE usage_rollup_state SET last_id = 3000")
    assert prune(conn, T0 + 100 * DAY) == 1999
    assert conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0] == 1
    by_day = summarize(path, by="day")  # whole days: from the daily roll-up alone
    assert [r["day"] for r in by_day] == [f"2025-03-0{d}" for d in range(1, 6)]
    assert sum(r["requests"] + r["refused"] + r["cached"] for r in by_day) == 3000
    assert _rounded(summarize(path, by="key")) == _rounded(before)
    conn.close()


def _rounded(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()} for row in rows]


def test_report_queries_use_the_indexes(tmp_path: Path) -> None:
    """No plan scans the raw table: roll-ups by their keys, raw rows by id or by ts."""
    conn = ledger_with(tmp_path / "usage.db", seeded(500))
    refresh(conn)
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    aggregate(conn, group=("day", "key"), start=T0 + 0.5 * HOUR, end=T0 + 4.5 * DAY)
    aggregate(conn, group=("hour",), start=T0 + 0.5 * HOUR, where={"key": ("alice",)})
    selects = [s for s in statements if s.startswith("SELECT") and "usage_rollup_state" not in s]
    assert len(selects) >= 6
    for sql in selects:
        plan = " ".join(str(row) for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
        assert not re.search(r"SCAN usage\b", plan), (sql, plan)
        assert "SEARCH" in plan, (sql, plan)
    conn.close()


async def test_the_keeper_rolls_up_what_the_ledger_writes(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    records = seeded(800)
    async with Ledger(path, flush_interval=0.01) as ledger:
        keeper = RollupKeeper(path, interval=3600, retention_days=1, clock=lambda: T0 + 4 * DAY)
        await keeper.start()
        try:
            for r in records:
                ledger.record(r)
        finally:
            await ledger.aclose()  # everything written
            assert await keeper.run_once() == 800
            await keeper.aclose()
    conn = sqlite3.connect(path)
    try:
        kept = conn.execute("SELECT COUNT(*), MIN(ts) FROM usage").fetchone()
        assert kept[0] == sum(1 for r in records if r.ts >= T0 + 3 * DAY)
        assert kept[1] >= T0 + 3 * DAY
        assert conn.execute("SELECT SUM(records) FROM usage_daily").fetchone()[0] == 800
    finally:
        conn.close()
    assert sum(r["requests"] + r["refused"] + r["cached"] for r in summarize(path, by="model")) == 800


def test_raw_retention_keeps_a_month_for_the_budgets() -> None:
    with pytest.raises(SettingsError, match="raw_retention_days"):
        load_settings(None, {"GATEWAY_USAGE_RAW_RETENTION_DAYS": "7"})
    assert load_settings(None, {"GATEWAY_USAGE_RAW_RETENTION_DAYS": "32"}).usage.raw_retention_days == 32
    assert load_settings(None, {}).usage.raw_retention_days == 0
