"""The gateway in front of a stalled PostgreSQL ledger (the real server, SIGSTOPped): requests keep
being served and their records wait; a key with a budget whose spend cannot be read gets a clean 503
instead of a budget that forgot what was spent; one log line each way; nothing is lost on SIGCONT."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.helpers.gateway import CHAT_BODY, StartGateway, assert_gateway_error, key_secret, key_table, keys_config
from tests.helpers.gateway import wait_until as poll
from tests.helpers.postgres import PostgresServer
from tests.helpers.processes import free_port


@pytest.fixture
def stalled(postgres: PostgresServer) -> Iterator[PostgresServer]:
    try:
        yield postgres
    finally:
        postgres.resume()


def rows(url: str) -> list[tuple[str, str]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return [(r[0], r[1]) for r in conn.execute("SELECT key_name, request_id FROM usage ORDER BY request_id")]


def test_a_stalled_ledger_delays_no_request_and_loses_no_record(
    stalled: PostgresServer, start_gateway: StartGateway, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = stalled.database()
    tables = key_table("plain") + key_table("spender", "budget_usd_daily = 5.0")
    config = keys_config(tmp_path / "gateway.toml", tables)
    env = {"GATEWAY_UPSTREAM_API_KEY": "sk-org", "GATEWAY_USAGE_DATABASE_URL": url,
           "GATEWAY_USAGE_FLUSH_INTERVAL": "0.05"}  # fmt: skip
    gateway = start_gateway(env, config=config)
    caplog.set_level(logging.WARNING, logger="gateway.usage.postgres")

    def chat(who: str, request_id: str) -> httpx.Response:
        headers = {"authorization": f"Bearer {key_secret(who)}", "x-request-id": request_id}
        return httpx.post(gateway.url + "/v1/chat/completions", json=CHAT_BODY, headers=headers, timeout=15)

    assert chat("plain", "p-0").status_code == 200
    assert poll(lambda: rows(url) == [("plain", "p-0")])
    stalled.pause()  # SIGSTOP: connections stay open, nothing answers
    assert [chat("plain", f"p-{i}").status_code for i in range(1, 4)] == [200] * 3
    refused = chat("spender", "s-0")  # its spend today cannot be read: no guess
    error = assert_gateway_error(refused, 503, "ledger_unavailable")
    assert "retry" in error["message"].lower()
    assert refused.headers["retry-after"] == "5"
    stalled.resume()
    assert chat("spender", "s-1").status_code == 200  # read again, once PostgreSQL answers
    expected = [("plain", f"p-{i}") for i in range(4)] + [("spender", "s-0"), ("spender", "s-1")]
    assert poll(lambda: rows(url) == expected, timeout=15)
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.usage.postgres"]
    assert any("PostgreSQL unreachable" in line for line in lines)
    assert any("PostgreSQL answers again" in line for line in lines)
    assert len(lines) <= 2 * 2, lines  # a line per change of state, never one per record or request


def test_a_gateway_whose_ledger_database_is_down_at_start_serves_and_says_so(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.usage.postgres")
    closed = f"postgresql://gateway:pg-secret@127.0.0.1:{free_port()}/gateway"
    gateway = start_gateway({"GATEWAY_USAGE_DATABASE_URL": closed, "GATEWAY_USAGE_FLUSH_INTERVAL": "0.05"})
    headers = {"authorization": "Bearer sk-client"}
    answer = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT_BODY, headers=headers, timeout=15)
    assert answer.status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.usage.postgres"]
    assert len(lines) == 1, lines  # one line, not one per attempt or per record
    assert lines[0].startswith("ledger: PostgreSQL unreachable (")
    assert all("pg-secret" not in r.getMessage() for r in caplog.records)
    # The console's usage page (loopback, not keys mode) says the ledger is unavailable: a 503 page.
    page = httpx.get(gateway.url + "/console/usage", timeout=40)
    assert page.status_code == 503
    assert "The usage ledger is unavailable" in page.text
    assert "pg-secret" not in page.text
