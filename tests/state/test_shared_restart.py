"""Redis killed (SIGKILL) and restarted empty under a gateway with shared budgets and the ledger on
PostgreSQL: the budget counters are seeded again from the ledger, so what was spent stays spent (no
budget spent twice), and the ledger's queue comes back (its consumer group is made again)."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import psycopg
from redis import Redis

from gateway.server.thread import LocalServer
from tests.helpers.gateway import CHAT_BODY, StartGateway, key_secret, key_table, keys_config, wait_until
from tests.helpers.postgres import PostgresServer
from tests.helpers.processes import free_port
from tests.helpers.redis import redis_server


def spend(gateway: LocalServer, request_id: str) -> httpx.Response:
    headers = {"authorization": f"Bearer {key_secret('spender')}", "x-request-id": request_id}
    return httpx.post(gateway.url + "/v1/chat/completions", json=CHAT_BODY, headers=headers, timeout=15)


def ledger_rows(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM usage WHERE key_name = 'spender'").fetchone()
    return 0 if row is None else int(row[0])


def test_redis_restarted_empty_reseeds_budgets_from_the_ledger_and_nothing_is_spent_twice(
    postgres: PostgresServer, start_gateway: StartGateway, tmp_path: Path
) -> None:
    url, port, prefix = postgres.database(), free_port(), f"t{uuid.uuid4().hex[:8]}"
    # What one request costs, from a gateway with no budget: the budget below allows three of them.
    free = start_gateway({"GATEWAY_UPSTREAM_API_KEY": "sk-org"}, config=keys_config(tmp_path / "free.toml",
                         key_table("spender")))  # fmt: skip
    cost = float(spend(free, "probe").headers["x-gateway-cost-usd"])
    assert cost > 0
    config = keys_config(tmp_path / "gateway.toml", key_table("spender", f"budget_usd_daily = {cost * 2.5:.10f}"))
    env = {"GATEWAY_UPSTREAM_API_KEY": "sk-org", "GATEWAY_USAGE_DATABASE_URL": url,
           "GATEWAY_SHARED_KEY_PREFIX": prefix, "GATEWAY_SHARED_TIMEOUT": "1.0",
           "GATEWAY_SHARED_BREAKER_COOLDOWN": "0.2", "GATEWAY_USAGE_CLAIM_AFTER": "1"}  # fmt: skip
    (tmp_path / "redis").mkdir()
    with redis_server(tmp_path / "redis", port) as first:
        gateway = start_gateway({**env, "GATEWAY_SHARED_REDIS_URL": first.url}, config=config)
        statuses = [spend(gateway, f"before-{i}").status_code for i in range(5)]
        assert statuses == [200, 200, 200, 402, 402]  # 2.5 requests' worth: the third overdraws it
        assert wait_until(lambda: ledger_rows(url) == 5, timeout=10)  # in PostgreSQL, off Redis
        first.proc.kill()  # SIGKILL: everything it held is gone (it persists nothing)
        first.proc.wait(5)
    with redis_server(tmp_path / "redis", port) as second:
        client = Redis.from_url(second.url)
        try:
            assert client.dbsize() == 0  # restarted empty
            after = [spend(gateway, f"after-{i}").status_code for i in range(4)]
            # The spend counted again from the ledger: still used up, whichever path admitted.
            assert after == [402] * 4
            counters = list(client.scan_iter(f"{prefix}:rl:*:bg:daily:*"))
            assert len(counters) == 1  # seeded again in Redis: the shared path decided
            assert int(client.get(counters[0]) or 0) >= round(cost * 3 * 1_000_000)
            # The ledger's queue is back too: a new request reaches PostgreSQL through it.
            assert wait_until(lambda: ledger_rows(url) == 9, timeout=10)
            assert client.exists(f"{prefix}:ledger") == 1
        finally:
            client.close()


def test_redis_restarted_empty_keeps_a_keys_minute_from_the_ledger(start_gateway: StartGateway, tmp_path: Path) -> None:
    """A key's RPM window is gone with Redis; the requests of its last minute are in the ledger (rows
    or records still queued): the window is seeded from them, so the restart gives no fresh minute."""
    port, prefix = free_port(), f"t{uuid.uuid4().hex[:8]}"
    config = keys_config(tmp_path / "gateway.toml", key_table("spender", "rpm = 3"), ledger=tmp_path / "usage.db")
    env = {"GATEWAY_UPSTREAM_API_KEY": "sk-org", "GATEWAY_SHARED_KEY_PREFIX": prefix, "GATEWAY_SHARED_TIMEOUT": "1.0",
           "GATEWAY_SHARED_BREAKER_COOLDOWN": "0.2", "GATEWAY_USAGE_PATH": str(tmp_path / "usage.db")}  # fmt: skip
    (tmp_path / "redis").mkdir()
    with redis_server(tmp_path / "redis", port) as first:
        gateway = start_gateway({**env, "GATEWAY_SHARED_REDIS_URL": first.url}, config=config)
        assert [spend(gateway, f"before-{i}").status_code for i in range(4)] == [200, 200, 200, 429]
        first.proc.kill()  # SIGKILL: its windows are gone
        first.proc.wait(5)
    with redis_server(tmp_path / "redis", port) as second:
        client = Redis.from_url(second.url)
        try:
            assert client.dbsize() == 0  # restarted empty
            refused = [spend(gateway, f"after-{i}") for i in range(2)]
            assert [r.status_code for r in refused] == [429, 429]  # the minute's three, from the ledger
            assert refused[0].json()["error"]["code"] == "rate_limit_exceeded"
            assert refused[0].headers["x-ratelimit-remaining-requests"] == "0"
            assert client.zcard(f"{prefix}:rl:{{spender}}:req") == 3  # seeded: the three admitted before
        finally:
            client.close()
