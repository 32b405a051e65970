"""`gateway serve` replicas sharing one PostgreSQL ledger through one Redis (real servers, real
processes on 127.0.0.1): every settled request is one row whichever replica served it, the reports
(`/admin/usage`, `gateway usage`) read PostgreSQL, and a replica killed with SIGKILL while its
batches wait for PostgreSQL loses none of them: another replica takes them over."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
from redis import Redis

from gateway.server.thread import LocalServer
from gateway.usage.postgres.stream import FIELD, GROUP, decode
from tests.helpers.gateway import CHAT_BODY, key_secret, key_table, keys_config, wait_until
from tests.helpers.postgres import PostgresServer
from tests.helpers.processes import GATEWAY, clean_env, free_port, running, wait_ready
from tests.helpers.redis import RedisServer

ALICE = {"authorization": f"Bearer {key_secret('alice')}"}
ADMIN = {"authorization": f"Bearer {key_secret('admin')}"}


@contextmanager
def fleet(env: dict[str, str], config: Path, cwd: Path, count: int) -> Iterator[list[tuple[str, Any]]]:
    """``count`` gateway processes started at once (their URL and process), stopped by their pids."""
    with ExitStack() as stack:
        started = []
        for _ in range(count):
            port = free_port()
            proc = stack.enter_context(running(["serve", "--config", str(config), "--port", str(port)], env, cwd))
            started.append((f"http://127.0.0.1:{port}", proc))
        for url, proc in started:
            wait_ready(url, proc)
        yield started


def shared_env(upstream: LocalServer, postgres_url: str, redis: RedisServer, prefix: str) -> dict[str, str]:
    return {
        "GATEWAY_UPSTREAM_URL": upstream.url,
        "GATEWAY_UPSTREAM_API_KEY": "sk-org",
        "GATEWAY_USAGE_PATH": "",
        "GATEWAY_USAGE_DATABASE_URL": postgres_url,
        "GATEWAY_USAGE_CLAIM_AFTER": "1",
        "GATEWAY_SHARED_REDIS_URL": redis.url,
        "GATEWAY_SHARED_KEY_PREFIX": prefix,
        "GATEWAY_SHARED_TIMEOUT": "2.0",  # the property is the ledger: room for a loaded machine
    }


def chat(url: str, request_id: str) -> int:
    headers = {**ALICE, "x-request-id": request_id}
    return httpx.post(url + "/v1/chat/completions", json=CHAT_BODY, headers=headers, timeout=15).status_code


def ledger_ids(url: str) -> list[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        return [row[0] for row in conn.execute("SELECT request_id FROM usage ORDER BY request_id")]


def daily_rows(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT coalesce(sum(rows), 0) FROM usage_daily").fetchone()
    return 0 if row is None else int(row[0])


def test_three_replicas_write_one_row_per_settled_request_and_report_from_postgresql(
    postgres: PostgresServer, redis: RedisServer, upstream: LocalServer, tmp_path: Path
) -> None:
    url = postgres.database()  # empty: the three replicas create the schema as they start, at once
    config = keys_config(tmp_path / "gateway.toml", key_table("alice", "rpm = 20"))
    env = shared_env(upstream, url, redis, f"t{uuid.uuid4().hex[:8]}")
    sent = [f"req-{i:03d}" for i in range(30)]
    with fleet(env, config, tmp_path, 3) as replicas:
        urls = [u for u, _ in replicas]
        with ThreadPoolExecutor(10) as pool:
            statuses = list(pool.map(lambda i: chat(urls[i % 3], sent[i]), range(len(sent))))
        assert sorted(statuses) == [200] * 20 + [429] * 10  # the rpm is shared too
        assert wait_until(lambda: len(ledger_ids(url)) >= len(sent), timeout=15)
        assert ledger_ids(url) == sent  # each request once, whichever replica served it
        assert daily_rows(url) == len(sent)
        # Any replica's /admin/usage reads the one ledger.
        answer = httpx.get(urls[2] + "/admin/usage", params={"by": "key"}, headers=ADMIN, timeout=10).json()
        [alice] = [row for row in answer["data"] if row["key"] == "alice"]
        assert (alice["requests"], alice["refused"]) == (20, 10)
    # The command reads it too, with the replicas gone.
    cli_env = clean_env({"GATEWAY_USAGE_DATABASE_URL": url})
    out = subprocess.run(  # noqa: S603 - our own console script
        [GATEWAY, "usage", "--by", "team", "--json"], env=cli_env, capture_output=True, timeout=30, check=True
    ).stdout
    assert [(r["team"], r["requests"], r["refused"]) for r in orjson.loads(out)] == [("team-a", 20, 10)]


def _consumers(client: Redis, key: str) -> dict[str, int]:
    return {c["name"].decode(): int(c["pending"]) for c in client.xinfo_consumers(key, GROUP)}


def _queued_records(client: Redis, key: str) -> int:
    entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(key)  # type: ignore[assignment]
    return sum(len(decode(fields[FIELD])) for _, fields in entries)


def test_a_replica_killed_with_its_batches_unwritten_loses_no_row(
    postgres: PostgresServer, redis: RedisServer, upstream: LocalServer, tmp_path: Path
) -> None:
    url = postgres.database()
    prefix = f"t{uuid.uuid4().hex[:8]}"
    stream_key = f"{prefix}:ledger"
    config = keys_config(tmp_path / "gateway.toml", key_table("alice"))
    env = shared_env(upstream, url, redis, prefix)
    client = Redis.from_url(redis.url)
    with ExitStack() as stack:
        stack.callback(client.close)
        [(first_url, first)] = stack.enter_context(fleet(env, config, tmp_path, 1))
        # PostgreSQL takes no row for now: the replica's batches wait, read but unconfirmed.
        lock = stack.enter_context(psycopg.connect(url))
        lock.execute("LOCK TABLE usage IN SHARE MODE")
        before = [f"a-{i}" for i in range(8)]
        assert [chat(first_url, rid) for rid in before] == [200] * 8
        name = f"{socket.gethostname()}:{first.pid}:"
        assert wait_until(lambda: _queued_records(client, stream_key) == len(before), timeout=15)
        assert wait_until(
            lambda: any(n.startswith(name) and p > 0 for n, p in _consumers(client, stream_key).items()), timeout=15
        )
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)

        [(second_url, _)] = stack.enter_context(fleet(env, config, tmp_path, 1))
        after = [f"b-{i}" for i in range(4)]
        assert [chat(second_url, rid) for rid in after] == [200] * 4
        lock.rollback()  # PostgreSQL answers again
        assert wait_until(lambda: len(ledger_ids(url)) >= len(before) + len(after), timeout=20)
        assert ledger_ids(url) == before + after  # the killed replica's records too, each once
        assert daily_rows(url) == len(before) + len(after)
        # Nothing is left pending with the dead replica: the survivor took its batches over.
        assert wait_until(partial(_nothing_pending, client, stream_key), timeout=10)


def _nothing_pending(client: Redis, key: str) -> bool:
    return all(p == 0 for p in _consumers(client, key).values())
