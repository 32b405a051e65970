"""Usage and cost, end to end: streamed usage, cost headers, budgets, TPM, the ledger, the access log."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from gateway.app import create_app
from gateway.cli import main
from gateway.config import load_settings
from gateway.demo import DemoState, default_catalog
from gateway.server.thread import LocalServer, serve_in_thread
from gateway.usage.reports import summarize
from tests.helpers.gateway import CHAT_MODEL, CHAT_PATH, StartGateway, gateway_env, key_secret, key_table, keys_config

WAIT = 10.0
MESSAGES: Any = [{"role": "user", "content": "Tell me something"}]
PRICE_PER_TOKEN = 0.80 / 1e6  # the demo catalog's price for CHAT_MODEL, in and out


ADMIN = key_secret("admin")


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    return tmp_path / "usage.db"


@pytest.fixture
def launch(start_gateway: StartGateway, tmp_path: Path, ledger: Path) -> Callable[[str], LocalServer]:
    def start(tables: str) -> LocalServer:
        config = tmp_path / "gateway.toml"
        keys_config(config, tables, ledger=ledger)
        return start_gateway({"GATEWAY_UPSTREAM_API_KEY": "sk-org", "GATEWAY_USAGE_PATH": str(ledger)}, config=config)

    return start


@pytest.fixture
def sdk(launch: Callable[[str], LocalServer]) -> Iterator[openai.OpenAI]:
    gateway = launch(key_table("alice"))
    with openai.OpenAI(
        base_url=gateway.url + "/v1", api_key=key_secret("alice"), max_retries=0, timeout=WAIT
    ) as client:
        yield client


def usage_rows(gateway: LocalServer, *, by: str = "key", expected_requests: int) -> list[dict[str, Any]]:
    """Poll GET /admin/usage until the batched ledger writes have landed (bounded)."""
    rows: list[dict[str, Any]] = []
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        answer = httpx.get(
            gateway.url + "/admin/usage", params={"by": by}, headers={"authorization": f"Bearer {ADMIN}"}, timeout=WAIT
        )
        assert answer.status_code == 200, answer.text
        rows = answer.json()["data"]
        if sum(r["requests"] + r["refused"] for r in rows) >= expected_requests:
            return rows
        time.sleep(0.05)
    raise AssertionError(f"the ledger did not reach {expected_requests} requests: {rows}")


def test_streamed_usage_is_recorded_and_the_extra_chunk_is_hidden(
    sdk: openai.OpenAI, demo_state: DemoState, launch: Callable[[str], LocalServer]
) -> None:
    chunks = list(sdk.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, stream=True))
    assert chunks
    assert all(c.choices for c in chunks)  # the client did not ask for usage: no usage-only chunk
    assert all(c.usage is None for c in chunks)
    forwarded = orjson.loads([r for r in demo_state.requests if r.path == CHAT_PATH][-1].body)
    assert forwarded["stream_options"] == {"include_usage": True}  # but the gateway asked upstream
    with_usage = list(
        sdk.chat.completions.create(
            model=CHAT_MODEL,
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert with_usage[-1].usage is not None  # asked for: delivered
    usage = with_usage[-1].usage
    # ... with the request's cost added to the usage object (OpenAI's SDK keeps unknown members)
    assert usage.model_extra is not None
    assert usage.model_extra["cost_usd"] == pytest.approx(usage.total_tokens * PRICE_PER_TOKEN, abs=1e-10)
    server_url = str(sdk.base_url).removesuffix("/v1/")
    rows = usage_rows(LocalServer("127.0.0.1", 0, server_url), by="key", expected_requests=2)
    alice = next(r for r in rows if r["key"] == "alice")
    assert alice["requests"] == 2
    assert alice["completion_tokens"] == 2 * usage.completion_tokens
    assert alice["cost_usd"] == pytest.approx(2 * usage.total_tokens * PRICE_PER_TOKEN)


def test_stream_cost_can_be_turned_off(start_gateway: StartGateway) -> None:
    gateway = start_gateway({"GATEWAY_USAGE_STREAM_COST": "false"})
    body = {"model": CHAT_MODEL, "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream(
        "POST", gateway.url + CHAT_PATH, json=body, headers={"authorization": "Bearer sk-client"}, timeout=WAIT
    ) as response:
        relayed = b"".join(response.iter_raw())
    assert response.status_code == 200
    assert b'"usage":{' in relayed
    assert b"cost_usd" not in relayed


def test_a_stream_cut_by_the_client_is_recorded_as_cut_with_what_was_generated(
    start_gateway: StartGateway, ledger: Path
) -> None:
    """An upstream reporting usage as it goes (vLLM's continuous usage); the client hangs up mid-stream."""
    catalog = orjson.dumps(default_catalog())
    events = [
        b"data: "
        + orjson.dumps(
            {
                "choices": [{"index": 0, "delta": {"content": f"word{n} "}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n},
            }
        )
        + b"\n\n"
        for n in (1, 2)
    ]
    hung_up = threading.Event()

    async def upstream(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/api/models":
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
            )
            await send({"type": "http.response.body", "body": catalog})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for chunk in events:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        # ... and then nothing more, until the gateway hangs up (bounded).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(WAIT):
                while (await receive())["type"] != "http.disconnect":
                    pass
                hung_up.set()

    with serve_in_thread(upstream) as inline:
        gateway = start_gateway({"GATEWAY_USAGE_PATH": str(ledger), "GATEWAY_USAGE_FLUSH_INTERVAL": "0.05"}, inline.url)
        body = {"model": CHAT_MODEL, "messages": MESSAGES, "stream": True}
        seen = 0
        with httpx.stream(
            "POST", gateway.url + CHAT_PATH, json=body, headers={"authorization": "Bearer sk"}, timeout=WAIT
        ) as r:
            for line in r.iter_lines():
                seen += line.startswith("data: ")
                if seen == 2:
                    break  # the client hangs up with the stream still open
        rows: list[tuple[Any, ...]] = []
        deadline = time.monotonic() + WAIT
        while not rows and time.monotonic() < deadline:
            time.sleep(0.05)
            if ledger.exists():
                with contextlib.closing(sqlite3.connect(ledger)) as db:
                    rows = db.execute(
                        "SELECT outcome, cut, prompt_tokens, completion_tokens, cost_usd FROM usage"
                    ).fetchall()
    assert rows == [("client_disconnected", 1, 10, 2, pytest.approx(12 * PRICE_PER_TOKEN))]
    assert hung_up.is_set()  # and the upstream's stream was cancelled


def test_non_streamed_answers_carry_their_cost(sdk: openai.OpenAI) -> None:
    raw = sdk.chat.completions.with_raw_response.create(model=CHAT_MODEL, messages=MESSAGES)
    completion = raw.parse()
    assert completion.usage is not None
    cost = float(raw.headers["x-gateway-cost-usd"])
    assert cost == pytest.approx(completion.usage.total_tokens * PRICE_PER_TOKEN, abs=1e-8)
    assert cost > 0


def test_daily_budget_refuses_the_next_request_with_402(launch: Callable[[str], LocalServer], ledger: Path) -> None:
    gateway = launch(key_table("thrifty", "budget_usd_daily = 0.000005"))  # about half a small request
    headers = {"authorization": f"Bearer {key_secret('thrifty')}"}
    body = {"model": CHAT_MODEL, "messages": MESSAGES}
    first = httpx.post(gateway.url + CHAT_PATH, json=body, headers=headers, timeout=WAIT)
    assert first.status_code == 200  # admitted: its certain minimum cost fits
    second = httpx.post(gateway.url + CHAT_PATH, json=body, headers=headers, timeout=WAIT)
    assert second.status_code == 402
    error = second.json()["error"]
    assert (error["code"], error["type"]) == ("budget_exceeded", "insufficient_quota")
    assert "daily budget" in error["message"]
    assert int(second.headers["retry-after"]) >= 1


def test_budgets_and_the_ledger_survive_a_restart(
    start_gateway: StartGateway, tmp_path: Path, ledger: Path, upstream: LocalServer
) -> None:
    config = tmp_path / "restart.toml"
    keys_config(config, key_table("thrifty", "budget_usd_daily = 0.000005"), ledger=ledger)
    env = {"GATEWAY_UPSTREAM_API_KEY": "sk-org", "GATEWAY_USAGE_PATH": str(ledger)}
    headers = {"authorization": f"Bearer {key_secret('thrifty')}"}
    body = {"model": CHAT_MODEL, "messages": MESSAGES}
    full_env = gateway_env(upstream.url, env)
    with serve_in_thread(create_app(load_settings(config, full_env))) as first:
        assert httpx.post(first.url + CHAT_PATH, json=body, headers=headers, timeout=WAIT).status_code == 200
    # The first gateway is stopped (its ledger flushed on shutdown); a new one reads the same file.
    rows = summarize(ledger, by="key")
    assert [(r["key"], r["requests"]) for r in rows] == [("thrifty", 1)]
    second = start_gateway(env, config=config)
    again = httpx.post(second.url + CHAT_PATH, json=body, headers=headers, timeout=WAIT)
    assert again.status_code == 402  # today's spend was seeded from the ledger


def test_tpm_is_settled_with_real_usage(launch: Callable[[str], LocalServer]) -> None:
    gateway = launch(key_table("tokens", "tpm = 40"))
    headers = {"authorization": f"Bearer {key_secret('tokens')}"}
    statuses = []
    for _ in range(6):
        answer = httpx.post(
            gateway.url + CHAT_PATH, json={"model": CHAT_MODEL, "messages": MESSAGES}, headers=headers, timeout=WAIT
        )
        statuses.append(answer.status_code)
    # Each demo answer uses about 12 tokens: a few fit in 40 per minute, then 429.
    assert statuses[0] == 200
    assert 429 in statuses
    assert statuses.index(429) >= 2


def test_access_log_has_one_line_per_request_without_secrets(
    launch: Callable[[str], LocalServer], caplog: pytest.LogCaptureFixture
) -> None:
    gateway = launch(key_table("alice"))
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        ok = httpx.post(
            gateway.url + CHAT_PATH,
            json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "SECRET-PROMPT"}]},
            headers={"authorization": f"Bearer {key_secret('alice')}", "x-request-id": "req-42"},
            timeout=WAIT,
        )
        refused = httpx.post(
            gateway.url + CHAT_PATH,
            json={"model": "bge-m3", "messages": MESSAGES},
            headers={"authorization": f"Bearer {key_secret('alice')}"},
            timeout=WAIT,
        )
        deadline = time.monotonic() + WAIT
        while len([r for r in caplog.records if r.name == "gateway.access"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert (ok.status_code, refused.status_code) == (200, 400)
    lines = [getattr(r, "access", {}) for r in caplog.records if r.name == "gateway.access"]
    assert len(lines) == 2
    first = next(line for line in lines if line["request_id"] == "req-42")
    assert (first["key"], first["team"], first["model"], first["status"]) == ("alice", "team-a", CHAT_MODEL, 200)
    assert first["outcome"] == "completed"
    assert first["completion_tokens"] > 0
    assert first["cost_usd"] > 0
    assert first["latency_ms"] >= first["ttfb_ms"] > 0
    second = next(line for line in lines if line["request_id"] != "req-42")
    assert (second["status"], second["outcome"], second["error_code"]) == (400, "refused", "model_endpoint_mismatch")
    text = caplog.text
    assert key_secret("alice") not in text
    assert "SECRET-PROMPT" not in text


def test_admin_usage_needs_an_admin_key_and_the_cli_prints_the_table(
    launch: Callable[[str], LocalServer],
    ledger: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway = launch(key_table("alice"))
    alice = {"authorization": f"Bearer {key_secret('alice')}"}
    httpx.post(gateway.url + CHAT_PATH, json={"model": CHAT_MODEL, "messages": MESSAGES}, headers=alice, timeout=WAIT)
    assert httpx.get(gateway.url + "/admin/usage", headers=alice, timeout=WAIT).status_code == 401
    rows = usage_rows(gateway, by="model", expected_requests=1)
    assert rows[0]["model"] == CHAT_MODEL
    bad = httpx.get(gateway.url + "/admin/usage", params={"by": "color"}, headers={"authorization": f"Bearer {ADMIN}"})
    assert bad.status_code == 400
    monkeypatch.setenv("GATEWAY_USAGE_PATH", str(ledger))
    assert main(["usage", "--by", "model"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["MODEL", "REQUESTS"]
    assert table[1].split()[:2] == [CHAT_MODEL, "1"]


def test_200_concurrent_requests_from_10_keys_respect_limits_and_are_accounted_once(
    launch: Callable[[str], LocalServer], ledger: Path
) -> None:
    names = [f"user{i}" for i in range(10)]
    gateway = launch("".join(key_table(n, "rpm = 12\ntpm = 100") for n in names))

    async def burst() -> list[tuple[str, int, dict[str, Any]]]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=WAIT) as client:

            async def one(name: str) -> tuple[str, int, dict[str, Any]]:
                answer = await client.post(
                    CHAT_PATH,
                    json={"model": CHAT_MODEL, "messages": MESSAGES},
                    headers={"authorization": f"Bearer {key_secret(name)}"},
                )
                return name, answer.status_code, answer.json()

            return await asyncio.gather(*(one(n) for n in names for _ in range(20)))

    results = asyncio.run(burst())
    assert {status for _, status, _ in results} <= {200, 429}
    served = Counter(name for name, status, _ in results if status == 200)
    tokens: Counter[str] = Counter()
    largest = 0
    for name, status, body in results:
        if status == 200:
            tokens[name] += body["usage"]["total_tokens"]
            largest = max(largest, body["usage"]["total_tokens"])
    for name in names:
        assert 1 <= served[name] <= 12  # never more than the RPM
        assert tokens[name] <= 100 + largest  # TPM exceeded by at most one request's worth
    usage_rows(gateway, expected_requests=200)
    recorded = summarize(ledger, by="key")
    mine = [r for r in recorded if r["key"] in names]
    assert sum(r["requests"] + r["refused"] for r in mine) == 200  # every request, exactly once
    assert {r["key"]: r["requests"] for r in mine} == {n: served[n] for n in names}  # refusals apart
    for row in recorded:
        if row["key"] in names:
            assert row["total_tokens"] == tokens[row["key"]]
