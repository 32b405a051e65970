"""The report layer on the PostgreSQL ledger (a real server): the same groups and totals as the
SQLite ledger gives for the same records, for any range and grouping (whole days from usage_daily,
whole hours from usage_hourly, the partial hours at the ends from the rows); roll-ups that count a
batch written twice once; a ledger of schema version 1 migrated with its roll-ups back-filled; and
statements that the indexes answer."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import psycopg
import pytest
from psycopg import AsyncConnection

from gateway.usage.postgres import reports as pg_reports
from gateway.usage.postgres.schema import MIGRATIONS, SCHEMA_VERSION, migrate
from gateway.usage.postgres.write import Entry, write_batch
from gateway.usage.reports import DAY, HOUR, Dim, Groups, aggregate
from gateway.usage.rollups import refresh
from gateway.usage.schema import ROLLUP_TOTALS, UsageRecord
from tests.helpers.postgres import PostgresServer
from tests.usage.test_reports import T0, by_hand, ledger_with, seeded

GROUPS: list[Sequence[Dim]] = [(), ("key",), ("team",), ("model",), ("day",), ("hour",), ("day", "key"),
                               ("hour", "model")]  # fmt: skip


def ranges(seed: int) -> list[tuple[float | None, float | None]]:
    """Unbounded, whole days, partial hours at both ends, inside one hour, and random ones."""
    rng = random.Random(seed)
    out: list[tuple[float | None, float | None]] = [
        (None, None),
        (T0 - DAY, T0 + 10 * DAY),
        (T0 + DAY, T0 + 3 * DAY),
        (T0 + 0.5 * HOUR, T0 + 2.25 * HOUR),
        (T0 + 3.1 * HOUR, T0 + 3.7 * HOUR),
        (None, T0 + 2.6 * DAY),
        (T0 + 1.3 * DAY, None),
    ]
    for _ in range(5):
        a, b = sorted((T0 + rng.random() * 5 * DAY, T0 + rng.random() * 5 * DAY))
        out.append((a, b))
    return out


def same(got: Groups, want: Groups, context: object) -> None:
    """The same groups, every total equal (the money to float precision); counts as ints, sums of money
    and latency as floats (the console formats them by type)."""
    assert set(got) == set(want), context
    for g, totals in want.items():
        for name in ROLLUP_TOTALS:
            assert got[g][name] == pytest.approx(totals[name]), (context, g, name)
            real = name in ("cost_usd", "saved_usd", "latency_ms")
            assert type(got[g][name]) is (float if real else int), (context, g, name)


async def write_all(url: str, records: Sequence[UsageRecord], *, batch: int = 500) -> None:
    entries = [Entry(f"id-{i:06d}", r) for i, r in enumerate(records)]
    async with await AsyncConnection.connect(url, autocommit=True) as conn:
        await migrate(conn)
        for i in range(0, len(entries), batch):
            assert await write_batch(conn, entries[i : i + batch]) == len(entries[i : i + batch])
        # A batch delivered again (a replica that died before confirming it): no row, no total added.
        assert await write_batch(conn, entries[batch : 2 * batch + 7]) == 0


@pytest.fixture(scope="module")
def ledgers(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The same 3000 records in a SQLite ledger (partly rolled up) and on PostgreSQL."""
    records = seeded(3000)
    path = tmp_path_factory.mktemp("reports") / "usage.db"
    conn = ledger_with(path, records)
    refresh(conn, chunk=1000, max_chunks=2)  # the rest is read from the rows not rolled up yet
    conn.close()
    url = postgres.database()
    asyncio.run(write_all(url, records))
    return path, url


def test_postgresql_gives_the_sqlite_ledgers_totals_for_any_range_and_grouping(ledgers: tuple[Path, str]) -> None:
    path, url = ledgers
    records = seeded(3000)
    with psycopg.connect(url) as conn:
        for lo, hi in ranges(11):
            for group in GROUPS:
                got = pg_reports.aggregate_blocking(conn, group=group, start=lo, end=hi)
                same(got, aggregate(path, group=group, start=lo, end=hi), (group, lo, hi))
                want = by_hand(records, group, -1e18 if lo is None else lo, 1e18 if hi is None else hi)
                assert {g: got[g]["records"] for g in got} == {g: t["records"] for g, t in want.items()}


async def test_filters_and_the_async_driver(ledgers: tuple[Path, str]) -> None:
    path, url = ledgers
    wheres: list[Mapping[str, Sequence[str]]] = [
        {"key": ("alice", "bob"), "model": ("m2",)},
        {"team": ("red",)},
        {"key": ("carol",), "team": ("nobody",)},
        {"key": ()},
    ]
    async with await AsyncConnection.connect(url) as conn:
        for where in wheres:
            for group in (("model",), ("hour", "key"), ()):
                for lo, hi in ((T0 + 3.3 * HOUR, None), (T0 + 0.2 * DAY, T0 + 2.9 * DAY)):
                    got = await pg_reports.aggregate(conn, group=group, start=lo, end=hi, where=where)
                    same(got, aggregate(path, group=group, start=lo, end=hi, where=where), (where, group, lo))
        assert await pg_reports.aggregate(conn, group=("key",), where={"key": ()}) == {}
        assert await pg_reports.aggregate(conn, start=T0 + DAY, end=T0) == {}
        with pytest.raises(ValueError, match="unknown dimension"):
            await pg_reports.aggregate(conn, group=("week",))  # type: ignore[arg-type]
        summary = await pg_reports.summarize(conn, by="day", since=T0 + 1.5 * DAY)
    assert [r["day"] for r in summary] == ["2025-03-02", "2025-03-03", "2025-03-04", "2025-03-05"]


def test_the_statements_read_the_roll_ups_and_the_rows_by_index(ledgers: tuple[Path, str]) -> None:
    """No plan reads the raw table but by an index (the partial hours at the ends of a range)."""
    _path, url = ledgers
    shapes: list[tuple[Sequence[Dim], float | None, float | None, Mapping[str, Sequence[str]] | None]] = [
        (("day", "key"), T0 + 0.5 * HOUR, T0 + 4.5 * DAY, None),
        (("hour",), T0 + 0.5 * HOUR, None, {"key": ("alice",)}),
        (("model",), T0 + 0.3 * DAY, T0 + 3.6 * DAY, {"model": ("m1",)}),
        ((), None, None, None),
    ]
    with psycopg.connect(url) as conn:
        conn.execute("SET enable_seqscan = off")  # what the planner does once the tables are large
        for group, lo, hi, where in shapes:
            query = pg_reports.aggregate_query(group, lo, hi, where)
            assert query is not None
            plan = "\n".join(row[0] for row in conn.execute(f"EXPLAIN {query[0]}", query[1]))
            assert not re.search(r"Seq Scan on usage\b(?!_)", plan), plan
            if lo is not None:  # the partial days at the ends: from the hours
                assert "usage_hourly" in plan, plan
        daily = pg_reports.aggregate_query(("key",), T0 + 0.5 * HOUR, T0 + 4.5 * DAY, None)
        assert daily is not None
        assert "usage_daily" in daily[0]


async def test_a_ledger_of_version_1_gets_its_roll_ups_back_filled(postgres: PostgresServer, tmp_path: Path) -> None:
    """Rows and daily totals written by a gateway of schema version 1; after the migration the
    reports (hourly charts, errors, latency) answer what SQLite answers for the same records."""
    records = seeded(800, seed=5)
    url = postgres.database()
    async with await AsyncConnection.connect(url, autocommit=True) as conn:
        async with conn.transaction():
            for statement in MIGRATIONS[0]:
                await conn.execute(statement)
            await conn.execute("CREATE TABLE usage_schema (version integer NOT NULL)")
            await conn.execute("INSERT INTO usage_schema VALUES (1)")
        async with conn.cursor() as cursor:
            await cursor.executemany(
                "INSERT INTO usage (id, ts, request_id, key_name, team, model, endpoint, status, prompt_tokens, "
                "completion_tokens, total_tokens, cost_usd, outcome, cut, latency_ms, ttfb_ms, cache, saved_usd) "
                "VALUES (%s, to_timestamp(%s), %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [(f"v1-{i}", *r[:17]) for i, r in enumerate(records)],
            )
        local = "(outcome = 'dry_run' OR (outcome = 'refused' AND status NOT IN (502, 504)))"
        await conn.execute(  # what a version 1 gateway kept alongside
            "INSERT INTO usage_daily SELECT (ts AT TIME ZONE 'UTC')::date, coalesce(key_name, ''), "  # noqa: S608
            f"coalesce(team, ''), model, count(*), count(*) FILTER (WHERE {local}), count(*) FILTER (WHERE cache "
            "IN ('hit', 'collapsed')), sum(prompt_tokens), sum(completion_tokens), sum(total_tokens), "
            "coalesce(sum(cost_usd), 0), count(cost_usd), coalesce(sum(saved_usd), 0), count(saved_usd), "
            f"count(*) FILTER (WHERE cost_usd IS NULL AND NOT {local}) FROM usage GROUP BY 1, 2, 3, 4"
        )
        assert await migrate(conn) == SCHEMA_VERSION == 2
        sqlite = ledger_with(tmp_path / "usage.db", records)
        try:
            for lo, hi in ranges(3)[:8]:
                for group in (("hour",), ("day", "key"), ("model",), ()):
                    got = await pg_reports.aggregate(conn, group=group, start=lo, end=hi)
                    same(got, aggregate(sqlite, group=group, start=lo, end=hi), (group, lo, hi))
        finally:
            sqlite.close()
        # And a version 2 write adds to the back-filled totals.
        await write_batch(conn, [Entry("v2-1", records[0]._replace(request_id="again"))])
        whole = await pg_reports.aggregate(conn)
        assert whole[()]["records"] == 801
