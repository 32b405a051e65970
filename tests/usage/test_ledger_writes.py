"""The ledger's batch writes: many rows per INSERT statement, every row once and intact, as many
rows per statement as the SQLite build can bind, a bad record still dropped alone, and under a
steady stream of records one batch per flush interval (not one per write's duration)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from gateway.usage import writes
from gateway.usage.ledger import Ledger
from gateway.usage.schema import UsageRecord
from gateway.usage.writes import MAX_ROWS_PER_INSERT, open_writer, write_batch, write_each

COLUMNS = ", ".join(UsageRecord._fields)


def record(i: int, *, tokens: int = 7) -> UsageRecord:
    """A record whose every column differs from its neighbours' (so a shifted value shows)."""
    return UsageRecord(
        1767225600.0 + i / 1000,
        f"req-{i}",
        f"key-{i % 3}" if i % 4 else None,
        "red" if i % 2 else None,
        f"model-{i % 5}",
        "/v1/chat/completions",
        200 + i % 3,
        tokens,
        i,
        tokens + i,
        None if i % 7 == 0 else i / 10_000,
        "client_disconnected" if i % 6 == 0 else "completed",
        i % 6 == 0,
        10.0 + i,
        None if i % 5 == 0 else 1.0 + i,
        "hit" if i % 8 == 0 else None,
        0.5 if i % 8 == 0 else None,
    )


def stored(path: Path) -> list[UsageRecord]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(f"SELECT {COLUMNS} FROM usage ORDER BY id").fetchall()  # noqa: S608 - constants
    finally:
        conn.close()
    return [UsageRecord._make([*row[:12], bool(row[12]), *row[13:]]) for row in rows]  # cut: 0/1 to a bool


async def test_a_batch_of_several_statements_stores_every_row_once_and_intact(tmp_path: Path) -> None:
    records = [record(i) for i in range(2 * MAX_ROWS_PER_INSERT + 37)]  # two full statements and a rest
    path = tmp_path / "usage.db"
    async with Ledger(path, flush_interval=3600) as ledger:  # written in one batch, by aclose
        for r in records:
            ledger.record(r)
    assert ledger.dropped == 0
    assert stored(path) == records


def test_rows_per_statement_follow_the_builds_parameter_limit(tmp_path: Path) -> None:
    """An SQLite that binds at most 40 parameters gets INSERTs of 2 rows (17 columns each)."""
    conn = open_writer(tmp_path / "usage.db")
    statements: list[str] = []
    try:
        conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 40)
        conn.set_trace_callback(statements.append)
        records = [record(i) for i in range(5)]
        write_batch(conn, records)
    finally:
        conn.close()
    inserts = [s for s in statements if s.startswith("INSERT")]  # (with their values, as traced)
    assert [s.count("), (") + 1 for s in inserts] == [2, 2, 1]
    assert stored(tmp_path / "usage.db") == records


def test_a_batch_stores_nulls_and_the_cut_flag_as_a_row_by_row_write_does(tmp_path: Path) -> None:
    """A batch binds None as NaN and ``cut`` as 0 or 1 (types sqlite3 binds without looking up an
    adapter): every column's value and SQL type are those of the same records written one by one,
    each value bound as it is (None and the bool through sqlite3's adapters)."""
    records = [record(i) for i in range(24)]  # every nullable column NULL in some rows; cut both ways
    columns = ", ".join(f"typeof({c}), {c}" for c in UsageRecord._fields)
    missing = ", ".join(f"COUNT(*) - COUNT({c})" for c in UsageRecord._fields)  # NULLs per column
    by_batch, by_row = open_writer(tmp_path / "batch.db"), open_writer(tmp_path / "row.db")
    try:
        write_batch(by_batch, records)
        assert write_each(by_row, records) == []
        rows = by_batch.execute(f"SELECT {columns} FROM usage ORDER BY id").fetchall()  # noqa: S608 - constants
        assert rows == by_row.execute(f"SELECT {columns} FROM usage ORDER BY id").fetchall()  # noqa: S608
        nulls = by_batch.execute(f"SELECT {missing} FROM usage").fetchone()  # noqa: S608
        null_columns = {c for c, n in zip(UsageRecord._fields, nulls, strict=True) if n}
        cuts = by_batch.execute("SELECT DISTINCT typeof(cut), cut FROM usage ORDER BY cut").fetchall()
    finally:
        by_batch.close()
        by_row.close()
    nullable = {"key_name", "team", "cost_usd", "ttfb_ms", "cache", "saved_usd", "requested_model", "fallback_from"}
    assert null_columns == nullable
    assert cuts == [("integer", 0), ("integer", 1)]
    assert stored(tmp_path / "batch.db") == records


def test_batches_of_every_size_run_a_few_statements_that_stay_prepared(tmp_path: Path) -> None:
    """Batches of 1 to 300 rows (as flushes at moderate traffic are: each of its own size) go in as
    INSERTs of a power of two rows, at most MAX_ROWS_PER_INSERT: 8 statements in all, fewer than
    sqlite3's statement cache holds (128), so none is compiled again (a statement of each batch's own
    size was compiled anew for nearly every batch)."""
    conn = open_writer(tmp_path / "usage.db")
    statements: list[str] = []
    written: list[UsageRecord] = []
    try:
        conn.set_trace_callback(statements.append)
        for size in range(1, 301):
            batch = [record(len(written) + i) for i in range(size)]
            write_batch(conn, batch)
            written += batch
    finally:
        conn.close()
    sizes = {s.count("), (") + 1 for s in statements if s.startswith("INSERT")}
    assert sizes == {1, 2, 4, 8, 16, 32, 64, 128} == {1 << n for n in range(MAX_ROWS_PER_INSERT.bit_length())}
    assert stored(tmp_path / "usage.db") == written


async def test_a_bad_record_in_a_large_batch_is_dropped_alone(tmp_path: Path) -> None:
    records = [record(i, tokens=10**30 if i == 250 else 7) for i in range(450)]  # beyond 64 bits: refused
    path = tmp_path / "usage.db"
    async with Ledger(path, flush_interval=3600) as ledger:
        for r in records:
            ledger.record(r)
    assert ledger.dropped == 1
    assert stored(path) == records[:250] + records[251:]


async def test_records_arriving_during_a_write_wait_for_the_next_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records keep coming (one every ms) while each write takes 20 ms (a busy disk): the writer
    writes what a flush interval (0.25 s) gathered, not, write after write, what arrived during the
    last one (about 40 small transactions a second, each a wake-up of its thread)."""
    batches: list[int] = []
    real_write = writes.write_batch

    def slow_write(conn: sqlite3.Connection | None, batch: Sequence[UsageRecord]) -> None:
        batches.append(len(batch))
        time.sleep(0.02)
        real_write(conn, batch)

    monkeypatch.setattr(writes, "write_batch", slow_write)
    path = tmp_path / "usage.db"
    records = [record(i) for i in range(1000)]
    async with Ledger(path, flush_interval=0.25) as ledger:
        for r in records:  # about a second (bounded: 1,000 records)
            ledger.record(r)
            await asyncio.sleep(0.001)
        during = len(batches)
    assert 2 <= during <= 8, batches  # about one per 0.25 s (it was about 40)
    assert sum(batches) == len(records)  # the rest written by aclose
    assert stored(path) == records
