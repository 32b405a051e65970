"""The usage ledger: batched writes off the request path, restarts, summaries, migrations."""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from gateway.usage import writes
from gateway.usage.ledger import Ledger
from gateway.usage.reports import recent_requests, spend_usd, summarize
from gateway.usage.rollups import refresh
from gateway.usage.schema import MIGRATIONS, SCHEMA_VERSION, LedgerError, UsageRecord, migrate

DAY1 = datetime(2025, 3, 1, 12, tzinfo=UTC).timestamp()
DAY2 = datetime(2025, 3, 2, 8, tzinfo=UTC).timestamp()


def rec(
    i: int = 0,
    *,
    ts: float = DAY1,
    key: str | None = "alice",
    team: str | None = "red",
    model: str = "m1",
    cost: float | None = 0.5,
    tokens: tuple[int, int] = (10, 5),
    status: int = 200,
    outcome: str = "completed",
    cache: str | None = None,
    saved: float | None = None,
) -> UsageRecord:
    return UsageRecord(
        ts=ts,
        request_id=f"req-{i}",
        key_name=key,
        team=team,
        model=model,
        endpoint="/v1/chat/completions",
        status=status,
        prompt_tokens=tokens[0],
        completion_tokens=tokens[1],
        total_tokens=sum(tokens),
        cost_usd=cost,
        outcome=outcome,
        cut=False,
        latency_ms=12.5,
        ttfb_ms=3.0,
        cache=cache,
        saved_usd=saved,
    )


def rows(path: Path) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT request_id, key_name, cut, ttfb_ms FROM usage ORDER BY id").fetchall()
    finally:
        conn.close()


async def test_records_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "ledger" / "usage.db"
    async with Ledger(path, flush_interval=0.01) as ledger:
        for i in range(120):
            ledger.record(rec(i))
    assert [r[0] for r in rows(path)] == [f"req-{i}" for i in range(120)]
    async with Ledger(path, flush_interval=0.01) as ledger:  # reopened: the migration is a no-op
        ledger.record(
            UsageRecord(
                DAY2,
                "req-x",
                None,
                None,
                "m2",
                "/v1/images/generations",
                502,
                0,
                0,
                0,
                None,
                "upstream_broken",
                True,
                9.0,
                None,
            )
        )
    stored = rows(path)
    assert len(stored) == 121
    assert stored[-1] == ("req-x", None, 1, None)


async def test_wal_mode_and_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    async with Ledger(path):
        pass
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        listed = conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'usage'")
        indexes = {row[0] for row in listed}
        assert indexes == {"usage_ts"}  # a row is stored in two b-trees, the table's and this one
    finally:
        conn.close()


async def test_a_keys_spend_is_read_from_the_roll_ups_and_its_recent_requests_by_time(tmp_path: Path) -> None:
    """Both are read when a key's budget or rate window is seeded: from the roll-ups and by the ts
    index, never by going through the key's whole history."""
    path = tmp_path / "usage.db"
    async with Ledger(path, flush_interval=0.01) as ledger:
        for i in range(40):
            ledger.record(rec(i, cost=0.5, ts=DAY1 + i * 600, key="alice" if i % 2 else "bob"))
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        refresh(conn)
        # The raw rows of whole hours, rolled up, are not read: the spend stays the same without them.
        assert conn.execute("DELETE FROM usage WHERE ts >= ? AND ts < ?", (DAY1 + 3600, DAY1 + 6 * 3600)).rowcount == 30
        statements: list[str] = []
        conn.set_trace_callback(statements.append)
        assert spend_usd(conn, "alice", DAY1 + 1800) == pytest.approx(0.5 * 19)  # i = 3, 5, ..., 39
        assert [ts for ts, _ in recent_requests(conn, "bob", DAY1 + 38 * 600)] == [DAY1 + 38 * 600]
        conn.set_trace_callback(None)
        selects = [s for s in statements if s.startswith("SELECT") and "usage_rollup_state" not in s]
        assert len(selects) >= 3
        for sql in selects:
            plan = " ".join(str(row) for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
            assert not re.search(r"SCAN usage\b", plan), (sql, plan)
    finally:
        conn.close()


async def test_records_queued_right_before_close_are_not_lost(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    ledger = Ledger(path, flush_interval=3600, max_batch=100_000)  # the writer would never wake on its own
    await ledger.start()
    for i in range(1234):
        ledger.record(rec(i))
    assert ledger.pending == 1234
    await ledger.aclose()
    assert len(rows(path)) == 1234
    assert ledger.dropped == 0


async def test_records_are_written_in_the_background(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    async with Ledger(path, flush_interval=0.01) as ledger:
        ledger.record(rec(1))
        for _ in range(500):
            if ledger.pending == 0 and len(rows(path)) == 1:
                break
            await asyncio.sleep(0.01)
        assert len(rows(path)) == 1  # before any close


async def test_many_tasks_each_record_lands_exactly_once(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"

    async def client(ledger: Ledger, worker: int) -> None:
        for j in range(20):
            ledger.record(rec(worker * 1000 + j))
            await asyncio.sleep(0 if j % 3 else 0.001)

    async with Ledger(path, flush_interval=0.005, max_batch=7) as ledger:
        await asyncio.gather(*(client(ledger, w) for w in range(50)))
    ids = [r[0] for r in rows(path)]
    assert len(ids) == 1000
    assert set(ids) == {f"req-{w * 1000 + j}" for w in range(50) for j in range(20)}


async def test_spend_from_the_ledger_includes_queued_records(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    ledger = Ledger(path, flush_interval=3600)
    await ledger.start()
    try:
        ledger.record(rec(1, cost=1.25))
        ledger.record(rec(2, cost=None))
        ledger.record(rec(3, cost=2.0, key="bob"))
        ledger.record(rec(4, cost=4.0, ts=DAY1 - 10))
        assert await ledger.spend_usd("alice", DAY1) == pytest.approx(1.25)
    finally:
        await ledger.aclose()
    assert spend_usd(path, "alice", DAY1) == pytest.approx(1.25)
    assert spend_usd(path, "alice", 0) == pytest.approx(5.25)
    assert spend_usd(path, "nobody", 0) == 0.0


async def test_summaries(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    async with Ledger(path) as ledger:
        ledger.record(rec(1, key="alice", team="red", model="m1", cost=1.0, tokens=(10, 1)))
        ledger.record(rec(2, key="alice", team="red", model="m2", cost=None, tokens=(20, 2), ts=DAY2))
        ledger.record(rec(3, key="bob", team="blue", model="m1", cost=0.25, tokens=(30, 3), ts=DAY2))
        ledger.record(rec(4, key=None, team=None, model="m1", cost=None, tokens=(40, 4)))
        # Answered by the gateway itself: counted apart from requests, never as unpriced ones.
        ledger.record(rec(5, key="alice", cost=0.0, tokens=(0, 0), status=429, outcome="refused"))
        ledger.record(rec(6, key="alice", cost=None, tokens=(0, 0), status=403, outcome="refused"))
        ledger.record(rec(7, key="alice", cost=None, tokens=(0, 0), status=200, outcome="dry_run"))
        # An upstream that failed to answer (502/504) was sent the request: a request, not a refusal.
        ledger.record(rec(8, key="bob", team="blue", cost=None, tokens=(0, 0), status=502, outcome="refused", ts=DAY2))

    by_key = summarize(path, by="key")
    assert [r["key"] for r in by_key] == [None, "alice", "bob"]
    alice = by_key[1]
    assert alice == {
        "key": "alice",
        "requests": 2,
        "refused": 3,
        "cached": 0,
        "prompt_tokens": 30,
        "completion_tokens": 3,
        "total_tokens": 33,
        "cost_usd": 1.0,
        "saved_usd": None,
        "unpriced_requests": 1,
    }
    assert by_key[0]["cost_usd"] is None
    assert {r["team"]: r["requests"] for r in summarize(path, by="team")} == {None: 1, "blue": 2, "red": 2}
    by_model = {r["model"]: (r["requests"], r["cost_usd"]) for r in summarize(path, by="model")}
    assert by_model == {"m1": (4, 1.25), "m2": (1, None)}
    by_day = summarize(path, by="day")
    assert [(r["day"], r["requests"], r["refused"]) for r in by_day] == [("2025-03-01", 2, 3), ("2025-03-02", 3, 0)]
    assert [r["day"] for r in summarize(path, by="day", since=date(2025, 3, 2))] == ["2025-03-02"]
    assert [r["day"] for r in summarize(path, by="day", since=datetime(2025, 3, 1, 13))] == ["2025-03-02"]
    assert summarize(path, by="model", key="bob") == [
        {
            "model": "m1",
            "requests": 2,
            "refused": 0,
            "cached": 0,
            "prompt_tokens": 30,
            "completion_tokens": 3,
            "total_tokens": 33,
            "cost_usd": 0.25,
            "saved_usd": None,
            "unpriced_requests": 1,
        }
    ]
    assert summarize(path, by="key", since=DAY2 + 1) == []
    conn = sqlite3.connect(path)  # an open connection works too (the CLI, tests)
    try:
        assert summarize(conn, by="team", key="alice")[0]["team"] == "red"
    finally:
        conn.close()


async def test_a_record_the_database_cannot_store_fails_alone(tmp_path: Path) -> None:
    """A value SQLite refuses (an integer beyond 64 bits) drops that one record, counted, and never
    blocks the records queued behind it (it used to be retried forever at the head of the queue)."""
    path = tmp_path / "usage.db"
    async with Ledger(path, flush_interval=0.05, max_batch=10) as ledger:
        for i in range(30):
            ledger.record(rec(i, tokens=(10**30, 1)) if i == 3 else rec(i))
        for _ in range(200):  # bounded: the writer flushes every 50 ms
            if ledger.pending == 0:
                break
            await asyncio.sleep(0.02)
        assert ledger.pending == 0
        assert ledger.dropped == 1
        ledger.record(rec(99))  # the writer still works after the bad record
    assert ledger.dropped == 1
    conn = sqlite3.connect(path)
    try:
        ids = {row[0] for row in conn.execute("SELECT request_id FROM usage")}
    finally:
        conn.close()
    assert ids == {f"req-{i}" for i in (*range(30), 99)} - {"req-3"}


def test_queries_refuse_a_missing_or_foreign_database(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        summarize(tmp_path / "none.db", by="key")
    assert not (tmp_path / "none.db").exists()
    foreign = tmp_path / "foreign.db"
    sqlite3.connect(foreign).close()
    with pytest.raises(LedgerError):
        spend_usd(foreign, "alice", 0)


async def test_a_version_1_ledger_is_migrated_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        conn.execute("COMMIT")
        old = rec(1)[: len(UsageRecord._fields) - 4]  # a row as version 1 wrote it (no cache, routing columns)
        conn.execute(f"INSERT INTO usage VALUES (NULL, {', '.join('?' * len(old))})", old)  # noqa: S608
    finally:
        conn.close()
    async with Ledger(path, flush_interval=0.01) as ledger:
        ledger.record(rec(2, cost=0.0, cache="hit", saved=0.5, outcome="cache_hit"))
    alice = summarize(path, by="key")[0]
    assert (alice["requests"], alice["cached"], alice["cost_usd"], alice["saved_usd"]) == (1, 1, 0.5, 0.5)
    assert alice["total_tokens"] == 30  # the tokens served, the cached answer's included


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        assert migrate(conn) == SCHEMA_VERSION
        conn.execute("PRAGMA user_version = 99")
    finally:
        conn.close()
    ledger = Ledger(path)
    with pytest.raises(LedgerError, match="newer"):
        await ledger.start()
    await ledger.aclose()


async def test_the_queue_is_bounded_and_drops_the_oldest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "usage.db"
    ledger = Ledger(path, max_queue=10)
    with caplog.at_level(logging.WARNING, logger="gateway.usage.ledger"):
        for i in range(25):
            ledger.record(rec(i))  # not started: nothing is written yet
    assert ledger.pending == 10
    assert ledger.dropped == 15
    assert len([r for r in caplog.records if "dropping" in r.message]) == 1  # logged once
    await ledger.start()
    await ledger.aclose()
    assert [r[0] for r in rows(path)] == [f"req-{i}" for i in range(15, 25)]


async def test_records_after_close_are_counted_as_dropped(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "usage.db")
    await ledger.start()
    await ledger.aclose()
    await ledger.aclose()  # idempotent
    ledger.record(rec(1))
    assert ledger.dropped == 1
    assert ledger.pending == 0


async def test_a_failed_write_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "usage.db"
    real_write = writes.write_batch
    calls: list[int] = []

    def flaky_write(conn: sqlite3.Connection | None, batch: Sequence[UsageRecord]) -> None:
        calls.append(len(batch))
        if len(calls) == 1:
            raise sqlite3.OperationalError("disk I/O error")
        real_write(conn, batch)

    monkeypatch.setattr(writes, "write_batch", flaky_write)
    async with Ledger(path, flush_interval=0.01) as ledger:
        ledger.record(rec(1))
        ledger.record(rec(2))
        for _ in range(500):
            if len(calls) >= 2:
                break
            await asyncio.sleep(0.01)
    assert calls[:2] == [2, 2]  # the failed batch was written again, whole
    assert [r[0] for r in rows(path)] == ["req-1", "req-2"]
    assert ledger.dropped == 0
