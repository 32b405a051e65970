"""The usage ledger on a real PostgreSQL server (and a real Redis for its durable queue): one row
per settled request whatever is delivered twice, migrations that many replicas may run at once,
and reports that answer exactly what the SQLite ledger's reports answer."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import redis.asyncio as aioredis
from psycopg import AsyncConnection
from redis.exceptions import RedisError

from gateway.usage.ledger import Ledger
from gateway.usage.postgres import ledger as pg_ledger_module
from gateway.usage.postgres import reports as pg_reports
from gateway.usage.postgres.ledger import PostgresLedger
from gateway.usage.postgres.retention import prune
from gateway.usage.postgres.schema import MIGRATIONS, SCHEMA_VERSION, migrate, schema_version
from gateway.usage.postgres.stream import GROUP, RecordStream, consumer_name, decode, encode
from gateway.usage.postgres.write import Entry, write_batch
from gateway.usage.reports import spend_usd, summarize
from gateway.usage.schema import LedgerError, UsageRecord
from tests.helpers.postgres import PostgresServer
from tests.helpers.processes import GATEWAY, clean_env, free_port
from tests.helpers.redis import RedisServer
from tests.usage.test_ledger import DAY1, DAY2, rec

# Every kind of row a report tells apart: keys, teams and none, two days, unknown costs, refusals
# (the gateway's own) and upstream failures (502: a request), dry runs, cache hits and what they saved.
MIXED = [
    rec(1, key="alice", team="red", model="m1", cost=1.0, tokens=(10, 1)),
    rec(2, key="alice", team="red", model="m2", cost=None, tokens=(20, 2), ts=DAY2),
    rec(3, key="bob", team="blue", model="m1", cost=0.25, tokens=(30, 3), ts=DAY2),
    rec(4, key=None, team=None, model="m1", cost=None, tokens=(40, 4)),
    rec(5, key="alice", cost=0.0, tokens=(0, 0), status=429, outcome="refused"),
    rec(6, key="alice", cost=None, tokens=(0, 0), status=403, outcome="refused"),
    rec(7, key="alice", cost=None, tokens=(0, 0), status=200, outcome="dry_run"),
    rec(8, key="bob", team="blue", cost=None, tokens=(0, 0), status=502, outcome="refused", ts=DAY2),
    rec(9, key="bob", team="blue", cost=0.0, tokens=(7, 7), outcome="cache_hit", cache="hit", saved=0.125, ts=DAY2),
    rec(10, key="Zed", team="blue", model="M0", cost=0.1, ts=DAY2 + 3600),
]


@pytest.fixture
async def conn(postgres: PostgresServer) -> AsyncIterator[AsyncConnection[Any]]:
    async with await AsyncConnection.connect(postgres.database(), autocommit=True) as c:
        await migrate(c)
        yield c


async def count(conn: AsyncConnection[Any], sql: str = "SELECT count(*) FROM usage") -> int:
    cursor = await conn.execute(sql)
    row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


async def test_a_batch_delivered_twice_is_one_row_per_record_and_counted_once(conn: AsyncConnection[Any]) -> None:
    first = [Entry("id-1", rec(1)), Entry("id-2", rec(2, cost=0.25))]
    assert await write_batch(conn, first) == 2
    # The same batch again (a replica died after its commit; another took the batch over), with a new record.
    assert await write_batch(conn, [*first, Entry("id-3", rec(3)), Entry("id-3", rec(3))]) == 1
    assert await count(conn) == 3
    [alice] = await pg_reports.summarize(conn, by="key")
    assert (alice["requests"], alice["prompt_tokens"], alice["cost_usd"]) == (3, 30, 1.25)
    # The same X-Request-ID sent by a client twice is two requests: two rows (the key is the ledger's id).
    assert await write_batch(conn, [Entry("id-4", rec(1))]) == 1
    assert await count(conn, "SELECT count(*) FROM usage WHERE request_id = 'req-1'") == 2


async def test_a_version_1_ledger_gains_the_routing_columns(postgres: PostgresServer) -> None:
    async with await AsyncConnection.connect(postgres.database(), autocommit=True) as c:
        async with c.transaction():  # a ledger written by a gateway before routing (schema version 1)
            for statement in MIGRATIONS[0]:
                await c.execute(statement)
            await c.execute("CREATE TABLE usage_schema (version integer NOT NULL)")
            await c.execute("INSERT INTO usage_schema VALUES (1)")
            await c.execute(
                "INSERT INTO usage (id, ts, request_id, model, endpoint, status, prompt_tokens, completion_tokens, "
                "total_tokens, outcome, cut, latency_ms) VALUES ('old', now(), 'req-old', 'm1', "
                "'/v1/chat/completions', 200, 1, 1, 2, 'completed', false, 1.0)"
            )
        assert await migrate(c) == SCHEMA_VERSION == 2
        routed = rec(1)._replace(requested_model="chat-default", fallback_from="m0;reason=upstream_503")
        assert await write_batch(c, [Entry("new", routed)]) == 1
        cursor = await c.execute("SELECT id, model, requested_model, fallback_from FROM usage ORDER BY id")
        assert await cursor.fetchall() == [
            ("new", "m1", "chat-default", "m0;reason=upstream_503"),
            ("old", "m1", None, None),
        ]


async def test_migrations_are_idempotent_and_safe_when_replicas_start_at_once(postgres: PostgresServer) -> None:
    url = postgres.database()
    connections = [await AsyncConnection.connect(url, autocommit=True) for _ in range(6)]
    try:
        assert await schema_version(connections[0]) == 0
        results = await asyncio.gather(*(migrate(c) for c in connections))  # six replicas start at once
        assert results == [SCHEMA_VERSION] * 6
        assert await migrate(connections[0]) == SCHEMA_VERSION  # and again: nothing to do
        assert await count(connections[0], "SELECT count(*) FROM usage_schema") == 1
        assert await schema_version(connections[1]) == SCHEMA_VERSION
        async with connections[0].transaction():
            await connections[0].execute("UPDATE usage_schema SET version = version + 1")
        with pytest.raises(LedgerError, match="newer than this gateway"):
            await migrate(connections[1])
    finally:
        for c in connections:
            await c.close()


async def test_reports_answer_what_the_sqlite_ledger_answers(conn: AsyncConnection[Any], tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    async with Ledger(path) as sqlite_ledger:
        for record in MIXED:
            sqlite_ledger.record(record)
    await write_batch(conn, [Entry(f"id-{i}", r) for i, r in enumerate(MIXED)])
    sinces: list[datetime | date | float | None] = [None, date(2025, 3, 2), datetime(2025, 3, 1, 13), DAY2 + 1]
    for by in ("key", "team", "model", "day"):
        for key in (None, "alice", "bob", "nobody"):
            for since in sinces:
                expected = summarize(path, by=by, key=key, since=since)
                answered = await pg_reports.summarize(conn, by=by, key=key, since=since)
                assert answered == [_approx(row) for row in expected], (by, key, since)
    assert [r["key"] for r in await pg_reports.summarize(conn, by="key")] == [None, "Zed", "alice", "bob"]
    for key, since in (("alice", DAY1 - 3600), ("bob", datetime(2025, 3, 2, tzinfo=UTC).timestamp()), ("bob", DAY2)):
        assert await pg_reports.spend_usd(conn, key, since) == pytest.approx(spend_usd(path, key, since))


def _approx(row: dict[str, Any]) -> dict[str, Any]:
    return {k: pytest.approx(v) if isinstance(v, float) else v for k, v in row.items()}


async def test_without_redis_records_are_written_in_batches_and_on_close(postgres: PostgresServer) -> None:
    url = postgres.database()
    ledger = PostgresLedger(url, flush_interval=0.05, max_batch=7)
    await ledger.start()
    for i in range(20):
        ledger.record(rec(i, cost=0.5))
    assert await ledger.spend_usd("alice", DAY1 - 1) == pytest.approx(10.0)  # rows and queued records, once each
    for i in range(20, 25):
        ledger.record(rec(i))
    await ledger.aclose()  # writes what is still queued
    ledger.record(rec(99))  # after close: counted as dropped, never raised
    assert ledger.dropped == 1
    async with await AsyncConnection.connect(url, autocommit=True) as c:
        assert await count(c, "SELECT count(DISTINCT request_id) FROM usage") == 25
        assert await count(c, "SELECT sum(rows) FROM usage_daily") == 25


async def test_records_arriving_during_a_write_wait_for_the_next_interval(
    postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without Redis, records keep coming (one every ms) while each write takes 20 ms more than it
    would: the shipper writes what a flush interval (0.25 s) gathered, not, write after write, what
    arrived during the last one (about 40 small transactions a second)."""
    batches: list[int] = []
    real_write = write_batch

    async def slow_write(conn: AsyncConnection[Any], batch: list[Entry]) -> None:
        batches.append(len(batch))
        await asyncio.sleep(0.02)
        await real_write(conn, batch)

    monkeypatch.setattr(pg_ledger_module, "write_batch", slow_write)
    url = postgres.database()
    ledger = PostgresLedger(url, flush_interval=0.25, max_batch=5000)
    await ledger.start()
    for i in range(1000):  # about a second (bounded: 1,000 records)
        ledger.record(rec(i))
        await asyncio.sleep(0.001)
    during = len(batches)
    await ledger.aclose()
    assert 2 <= during <= 8, batches  # about one per 0.25 s (it was about 40)
    assert sum(batches) == 1000
    async with await AsyncConnection.connect(url, autocommit=True) as c:
        assert await count(c, "SELECT count(DISTINCT request_id) FROM usage") == 1000


async def test_a_batch_being_written_counts_towards_spend_once(postgres: PostgresServer) -> None:
    """Between leaving the queue and its commit a batch is in neither place: spend_usd (what budgets
    read) waits for it, then counts it once; never zero times, never twice."""
    url = postgres.database()
    ledger = PostgresLedger(url, flush_interval=0.05, max_batch=100)
    await ledger.start()
    async with await AsyncConnection.connect(url, autocommit=True) as watcher:

        async def insert_waits() -> bool:
            waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%INSERT%'"
            return await count(watcher, waiting) == 1

        async with await AsyncConnection.connect(url) as locker:
            async with locker.transaction():
                # Writes to the hourly totals wait (the batch's one statement with them); reads do not.
                await locker.execute("LOCK TABLE usage_hourly IN EXCLUSIVE MODE")
                for i in range(4):
                    ledger.record(rec(i, cost=0.5))
                assert await wait_for(insert_waits)  # the batch is out of the queue, not written
                spend = asyncio.create_task(ledger.spend_usd("alice", DAY1 - 1))
                await asyncio.sleep(0.2)
                assert not spend.done()  # it waits for the batch being written
            assert await asyncio.wait_for(spend, 10) == pytest.approx(2.0)  # committed: counted once
            assert await ledger.spend_usd("alice", DAY1 - 1) == pytest.approx(2.0)
        await ledger.aclose()
        assert await count(watcher) == 4


async def test_a_value_postgresql_cannot_store_drops_that_record_alone(postgres: PostgresServer) -> None:
    url = postgres.database()
    ledger = PostgresLedger(url, flush_interval=0.05)
    await ledger.start()
    for i in range(10):
        ledger.record(rec(i, tokens=(10**30, 1)) if i == 3 else rec(i))
    ledger.record(rec(10, model="bad\x00model"))
    await ledger.aclose()
    assert ledger.dropped == 2
    async with await AsyncConnection.connect(url, autocommit=True) as c:
        cursor = await c.execute("SELECT request_id FROM usage")
        assert {row[0] for row in await cursor.fetchall()} == {f"req-{i}" for i in range(10)} - {"req-3"}


def stream_ledger(url: str, redis: RedisServer, key: str, claim_after: float = 1.0) -> PostgresLedger:
    client = aioredis.from_url(redis.url, socket_timeout=4)
    stream = RecordStream(client, key, consumer_name(), claim_after=claim_after, batch=8)
    return PostgresLedger(url, stream=stream, stream_errors=(RedisError,), claim_after=claim_after)


async def wait_for(condition: Callable[[], Any], seconds: float = 10.0) -> bool:
    for _ in range(int(seconds / 0.05)):
        if await condition():
            return True
        await asyncio.sleep(0.05)
    return bool(await condition())


async def test_replicas_share_the_stream_and_every_record_lands_once(
    postgres: PostgresServer, redis: RedisServer
) -> None:
    url, key = postgres.database(), f"t{uuid.uuid4().hex[:8]}:ledger"
    replicas = [stream_ledger(url, redis, key) for _ in range(3)]
    for replica in replicas:
        await replica.start()
    async with await AsyncConnection.connect(url, autocommit=True) as c:
        try:
            for i in range(150):
                replicas[i % 3].record(rec(i, cost=0.01))
                if i % 10 == 0:
                    await asyncio.sleep(0.001)

            async def all_written() -> bool:
                return await count(c) == 150

            assert await wait_for(all_written)
        finally:
            for replica in replicas:
                await replica.aclose()
        assert await count(c, "SELECT count(DISTINCT request_id) FROM usage") == 150
        assert await count(c, "SELECT sum(rows) FROM usage_daily") == 150
    client = aioredis.from_url(redis.url)
    try:
        assert await client.xlen(key) == 0  # written batches are confirmed and removed
        assert (await client.xpending(key, GROUP))["pending"] == 0
    finally:
        await client.aclose()


async def test_batches_left_by_a_dead_consumer_are_taken_over(postgres: PostgresServer, redis: RedisServer) -> None:
    url, key = postgres.database(), f"t{uuid.uuid4().hex[:8]}:ledger"
    client = aioredis.from_url(redis.url, socket_timeout=4)
    try:
        dead = RecordStream(client, key, "dead-replica", claim_after=0.3, batch=8)
        await dead.create_group()
        await dead.push([Entry(f"x{i}", rec(i)) for i in range(5)])
        assert len(await dead.read(None)) == 1  # read, then the replica "died" before writing it
        survivor = stream_ledger(url, redis, key, claim_after=0.3)
        await survivor.start()
        try:
            async with await AsyncConnection.connect(url, autocommit=True) as c:

                async def written() -> bool:
                    return await count(c) == 5

                assert await wait_for(written)
        finally:
            await survivor.aclose()
        assert (await client.xpending(key, GROUP))["pending"] == 0
    finally:
        await client.aclose()


def test_the_usage_command_reads_postgresql(postgres: PostgresServer) -> None:
    url = postgres.database()

    async def fill() -> None:
        async with await AsyncConnection.connect(url, autocommit=True) as c:
            await migrate(c)
            await write_batch(c, [Entry(f"id-{i}", r) for i, r in enumerate(MIXED)])

    asyncio.run(fill())
    rows = pg_reports.summarize_blocking(url, by="day", since=date(2025, 3, 2))
    assert [(r["day"], r["requests"], r["cached"]) for r in rows] == [("2025-03-02", 4, 1)]
    with pytest.raises(psycopg.OperationalError):
        pg_reports.summarize_blocking(postgres.url("no_such_database"), by="key")


async def test_with_redis_down_records_go_straight_to_postgresql(postgres: PostgresServer) -> None:
    url = postgres.database()
    closed = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=1, socket_connect_timeout=1)
    stream = RecordStream(closed, "down:ledger", consumer_name(), claim_after=1.0, batch=8)
    ledger = PostgresLedger(url, stream=stream, stream_errors=(RedisError,))
    await ledger.start()
    try:
        for i in range(12):
            ledger.record(rec(i))
        async with await AsyncConnection.connect(url, autocommit=True) as c:

            async def written() -> bool:
                return await count(c) == 12

            assert await wait_for(written)
    finally:
        await ledger.aclose()
    assert ledger.dropped == 0


def test_the_usage_command_names_an_unreachable_database_without_its_password() -> None:
    url = f"postgresql://gateway:s3cret-pw@127.0.0.1:{free_port()}/gateway"
    env = clean_env({"GATEWAY_USAGE_DATABASE_URL": url})
    done = subprocess.run([GATEWAY, "usage"], env=env, capture_output=True, text=True, timeout=60, check=False)  # noqa: S603
    assert done.returncode == 1
    assert "cannot read the usage ledger on PostgreSQL" in done.stderr
    assert "s3cret-pw" not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


def test_a_stream_entry_from_a_replica_without_the_routing_columns_still_decodes() -> None:
    """A rolling upgrade: an older replica's batch in the stream has no requested_model and
    fallback_from; it is read with those empty, never dropped as a bad entry."""
    record = UsageRecord(1.0, "req-1", "alice", None, "m", "/v1/chat/completions", 200, 1, 2, 3, 0.5,
                         "completed", False, 10.0, 2.0, None, None)  # fmt: skip
    older = orjson.dumps([["ledger-id-1", *record[:17]]])
    (entry,) = decode(older)
    assert entry.id == "ledger-id-1"
    assert entry.record == record
    assert entry.record.requested_model is None
    assert entry.record.fallback_from is None
    assert decode(encode([entry])) == [entry]


async def test_retention_deletes_old_raw_rows_and_keeps_their_totals(postgres: PostgresServer) -> None:
    """[usage] raw_retention_days on PostgreSQL: a ledger started with it prunes at once; the reports
    (summaries, grouped totals) answer what they did before from the hourly and daily roll-ups."""
    url = postgres.database()
    now = time.time()
    old = [Entry(f"old-{i}", rec(i, ts=now - 40 * 86400 + i, cost=0.5)) for i in range(30)]
    recent = [Entry(f"new-{i}", rec(100 + i, ts=now - 3600 + i, cost=0.25)) for i in range(5)]
    async with await AsyncConnection.connect(url, autocommit=True) as c:
        await migrate(c)
        assert await write_batch(c, old + recent) == 35
        before = await pg_reports.summarize(c, by="day")
        grouped = await pg_reports.aggregate(c, group=("key",))
        assert await prune(c, now - 39 * 86400, chunk=7) == 30  # several chunks
        assert await count(c) == 5
        assert await pg_reports.summarize(c, by="day") == before
        assert await pg_reports.aggregate(c, group=("key",)) == grouped
        assert await write_batch(c, old[:3]) == 3  # (rows written anew are counted anew: never that old)
        assert await prune(c, now - 39 * 86400) == 3
        assert await write_batch(c, [Entry("older", rec(200, ts=now - 33 * 86400))]) == 1
        assert await count(c) == 6
        totals = await pg_reports.aggregate(c, group=("key",))
    ledger = PostgresLedger(url, retention_days=32)
    await ledger.start()  # prunes at once, then hourly
    try:
        async with await AsyncConnection.connect(url, autocommit=True) as c:
            assert await wait_for(lambda: _count_is(c, 5))
            assert await pg_reports.aggregate(c, group=("key",)) == totals  # "older" still counted
    finally:
        await ledger.aclose()


async def _count_is(conn: AsyncConnection[Any], expected: int) -> bool:
    return await count(conn) == expected


async def test_recent_requests_are_what_the_rate_limiter_counted(postgres: PostgresServer) -> None:
    """What seeds a key's shared window after Redis restarted empty: the key's requests of the last
    minute that were sent upstream or answered from the cache (rows, and records not written yet),
    never the gateway's own refusals."""
    url = postgres.database()
    now = time.time()
    async with await AsyncConnection.connect(url, autocommit=True) as c:
        await migrate(c)
        await write_batch(c, [
            Entry("a", rec(1, ts=now - 30, tokens=(3, 4))),
            Entry("b", rec(2, ts=now - 20, status=429, outcome="refused")),  # refused by the gateway
            Entry("c", rec(3, ts=now - 10, status=502, outcome="refused")),  # sent upstream, it failed
            Entry("d", rec(4, ts=now - 90)),  # before the window
            Entry("e", rec(5, ts=now - 5, key="bob")),
        ])  # fmt: skip
    ledger = PostgresLedger(url, flush_interval=60.0)
    await ledger.start()
    try:
        ledger.record(rec(6, ts=now - 1, tokens=(1, 1)))  # still queued here
        recent = await ledger.recent_requests("alice", now - 60)
    finally:
        await ledger.aclose()
    assert [(round(now - at), tokens) for at, tokens in sorted(recent)] == [(30, 7), (10, 15), (1, 2)]
