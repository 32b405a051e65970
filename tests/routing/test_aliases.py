"""Aliases (docs/routing.md): a name clients send as ``model``, resolved per request to a catalog
model by its strategy; the answer names the model that served (``x-gateway-model``), and the
ledger, the cost and the key's allowlist are the serving model's."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from gateway.demo import DemoState
from tests.helpers.gateway import (
    CHAT_MODEL,
    CHAT_PATH,
    EMBEDDING_MODEL,
    STT_MODEL,
    UNHEALTHY_MODEL,
    assert_gateway_error,
    key_secret,
    key_table,
    keys_config,
    requests_on,
)
from tests.routing.conftest import RoutedGateway, alias_table

LLAMA = "Llama-3.1-8B-Instruct"  # text, $0.10 per million tokens, no tools
WAIT = 15.0


def sdk(url: str, key: str = "sk-client") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=WAIT)


def ledger_rows(ledger: Path, count: int) -> list[dict[str, Any]]:
    """The ledger's rows once ``count`` are written (bounded wait)."""
    rows: list[dict[str, Any]] = []
    deadline = time.monotonic() + WAIT
    while len(rows) < count and time.monotonic() < deadline:
        time.sleep(0.05)
        if ledger.exists():
            with contextlib.closing(sqlite3.connect(ledger)) as db:
                db.row_factory = sqlite3.Row
                rows = [dict(r) for r in db.execute("SELECT * FROM usage ORDER BY id")]
    return rows


def test_an_alias_is_served_by_its_first_routable_model_with_only_model_changed(
    routed_gateway: RoutedGateway, demo_state: DemoState, tmp_path: Path
) -> None:
    ledger = tmp_path / "usage.db"
    gateway = routed_gateway(
        alias_table("chat-default", [UNHEALTHY_MODEL, CHAT_MODEL]),
        {"GATEWAY_USAGE_PATH": str(ledger), "GATEWAY_USAGE_FLUSH_INTERVAL": "0.05"},
    )
    # The client's exact bytes (odd spacing, key order): only the model's value may change.
    sent = b'{"messages":[{"role":"user","content":"Hi \\"model\\": there"}],  "model" :  "chat-default", "seed": 7}'
    with httpx.Client(base_url=gateway.url, timeout=WAIT) as http:
        answer = http.post(
            CHAT_PATH, content=sent, headers={"content-type": "application/json", "authorization": "Bearer sk"}
        )
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-gateway-model"] == CHAT_MODEL
    assert answer.headers["x-gateway-fallback-from"] == f"{UNHEALTHY_MODEL};reason=model_unavailable"
    assert answer.json()["model"] == CHAT_MODEL
    (upstream,) = requests_on(demo_state, CHAT_PATH)
    assert upstream.body == sent.replace(b'"model" :  "chat-default"', f'"model":"{CHAT_MODEL}"'.encode())
    usage = answer.json()["usage"]
    price = 0.80 / 1e6  # CHAT_MODEL's price per token, input and output
    assert float(answer.headers["x-gateway-cost-usd"]) == pytest.approx(usage["total_tokens"] * price, abs=1e-9)
    (row,) = ledger_rows(ledger, 1)
    assert (row["model"], row["requested_model"], row["fallback_from"]) == (
        CHAT_MODEL,
        "chat-default",
        f"{UNHEALTHY_MODEL};reason=model_unavailable",
    )
    assert row["cost_usd"] == pytest.approx(usage["total_tokens"] * price, abs=1e-9)


def test_a_catalog_model_answer_names_its_model_too(routed_gateway: RoutedGateway) -> None:
    gateway = routed_gateway("")
    with sdk(gateway.url) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "Hi"}]
        )
    assert raw.headers["x-gateway-model"] == CHAT_MODEL
    assert "x-gateway-fallback-from" not in raw.headers


def test_cheapest_picks_by_the_catalogs_live_prices(routed_gateway: RoutedGateway, demo_state: DemoState) -> None:
    gateway = routed_gateway(
        alias_table("chat-cheap", [CHAT_MODEL, LLAMA], strategy="cheapest"), {"GATEWAY_CATALOG_TTL": "0.2"}
    )
    messages: Any = [{"role": "user", "content": "Hi"}]
    with sdk(gateway.url) as client:
        first = client.chat.completions.with_raw_response.create(model="chat-cheap", messages=messages)
        assert first.headers["x-gateway-model"] == LLAMA  # $0.10 against $0.80
        model = demo_state.find_model(LLAMA)
        assert model is not None
        model["input_per_mtok"] = model["output_per_mtok"] = 5.0  # the price goes up upstream
        fetches = demo_state.catalog_fetches
        deadline = time.monotonic() + WAIT
        served = LLAMA
        while served == LLAMA and time.monotonic() < deadline:
            time.sleep(0.1)
            served = client.chat.completions.with_raw_response.create(model="chat-cheap", messages=messages).headers[
                "x-gateway-model"
            ]
    assert demo_state.catalog_fetches > fetches
    assert served == CHAT_MODEL


def test_fastest_measures_each_model_then_prefers_the_faster(
    routed_gateway: RoutedGateway, demo_state: DemoState
) -> None:
    demo_state.delays[CHAT_MODEL] = 0.3  # the upstream answers this model slowly
    gateway = routed_gateway(alias_table("chat-fast", [CHAT_MODEL, LLAMA], strategy="fastest"))
    with sdk(gateway.url) as client:
        served = [
            client.chat.completions.with_raw_response.create(
                model="chat-fast", messages=[{"role": "user", "content": f"Hi {i}"}]
            ).headers["x-gateway-model"]
            for i in range(4)
        ]
    # Not measured yet: listed order first, so each is measured once; then the faster one.
    assert served == [CHAT_MODEL, LLAMA, LLAMA, LLAMA]


def test_models_lists_aliases_marked_and_per_key(start_gateway: Any, tmp_path: Path, demo_state: DemoState) -> None:
    tables = key_table("alias-user", 'models = ["chat-*", "Llama*"]') + key_table("no-alias", 'models = ["Qwen*"]')
    config = keys_config(tmp_path / "gateway.toml", tables, extra=alias_table("chat-default", [CHAT_MODEL, LLAMA]))
    gateway = start_gateway({"GATEWAY_UPSTREAM_API_KEY": "sk-org"}, config=config)
    with sdk(gateway.url, key_secret("alias-user")) as client:
        listed = {m.id: m for m in client.models.list().data}
        assert "chat-default" in listed
        alias = listed["chat-default"].model_dump()
        # Its models that could serve this key now: not CHAT_MODEL, which the key may not use.
        assert (alias["alias"], alias["models"], alias["strategy"]) == (True, [LLAMA], "ordered")
        assert CHAT_MODEL not in listed
        # A key not allowed a candidate never gets it: the alias skips it.
        raw = client.chat.completions.with_raw_response.create(
            model="chat-default", messages=[{"role": "user", "content": "Hi"}]
        )
        assert raw.headers["x-gateway-model"] == LLAMA
        assert raw.headers["x-gateway-fallback-from"] == f"{CHAT_MODEL};reason=model_not_allowed"
    assert [orjson.loads(r.body)["model"] for r in requests_on(demo_state, CHAT_PATH)] == [LLAMA]
    with sdk(gateway.url, key_secret("no-alias")) as client:
        assert "chat-default" not in {m.id for m in client.models.list().data}
        with pytest.raises(openai.PermissionDeniedError) as refused:
            client.chat.completions.create(model="chat-default", messages=[{"role": "user", "content": "Hi"}])
        assert refused.value.code == "model_not_allowed"


def test_an_alias_with_no_routable_model_is_refused_listing_each(
    routed_gateway: RoutedGateway, demo_state: DemoState
) -> None:
    gateway = routed_gateway(alias_table("chat-down", [UNHEALTHY_MODEL, "Mistral-7B-Instruct-v0.3", "gone-model"]))
    with httpx.Client(base_url=gateway.url, timeout=WAIT) as http:
        answer = http.post(CHAT_PATH, json={"model": "chat-down", "messages": [{"role": "user", "content": "Hi"}]})
    error = assert_gateway_error(answer, 503, "model_unavailable")
    for name, why in (("gone-model", "model_not_found"), ("Mistral-7B-Instruct-v0.3", "model_unavailable")):
        assert f"{name} ({why}:" in error["message"]
    assert UNHEALTHY_MODEL in error["message"]
    assert requests_on(demo_state, CHAT_PATH) == []


def test_the_dry_run_reports_the_chosen_model_and_the_candidate_order(routed_gateway: RoutedGateway) -> None:
    gateway = routed_gateway(alias_table("chat-cheap", [CHAT_MODEL, UNHEALTHY_MODEL, LLAMA], strategy="cheapest"))
    with httpx.Client(base_url=gateway.url, timeout=WAIT) as http:
        report = http.post(
            "/v1/validate/chat/completions",
            json={"model": "chat-cheap", "messages": [{"role": "user", "content": "Hi"}]},
        )
    assert report.status_code == 200, report.text
    assert report.headers["x-gateway-model"] == LLAMA
    body = report.json()
    assert body["model"] == LLAMA
    route = body["route"]
    assert route["candidates"] == [LLAMA, CHAT_MODEL, UNHEALTHY_MODEL]  # $0.10, $0.80, $0.80 (listed order)
    assert (route["chosen"], route["alias"], route["strategy"], route["passed_over"]) == (LLAMA, True, "cheapest", [])


def test_embeddings_and_a_multipart_transcription_through_aliases(
    routed_gateway: RoutedGateway, demo_state: DemoState
) -> None:
    gateway = routed_gateway(alias_table("embed", [EMBEDDING_MODEL]) + alias_table("stt", [STT_MODEL]))
    data = os.urandom(20_000) + b'\r\nname="model"\r\n\r\nstt\r\n'  # the upload holds the field's text too
    with sdk(gateway.url) as client:
        embedded = client.embeddings.with_raw_response.create(model="embed", input="hello")
        heard = client.audio.transcriptions.with_raw_response.create(model="stt", file=("a.wav", data, "audio/wav"))
    assert (embedded.headers["x-gateway-model"], heard.headers["x-gateway-model"]) == (EMBEDDING_MODEL, STT_MODEL)
    assert embedded.parse().data[0].embedding
    assert heard.headers["x-demo-file-sha256"] == hashlib.sha256(data).hexdigest()  # the upload untouched
    (sent,) = requests_on(demo_state, "/v1/audio/transcriptions")
    assert f'name="model"\r\n\r\n{STT_MODEL}\r\n'.encode() in sent.body


def test_an_answer_from_the_cache_names_the_model_of_the_alias(
    routed_gateway: RoutedGateway, demo_state: DemoState
) -> None:
    gateway = routed_gateway("[cache]\nenabled = true\n" + alias_table("chat-default", [UNHEALTHY_MODEL, LLAMA]))
    body = {"model": "chat-default", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0}
    with httpx.Client(base_url=gateway.url, timeout=WAIT) as http:
        first, second = (http.post(CHAT_PATH, json=body) for _ in range(2))
    assert "hit" in second.headers["cache-status"]
    assert first.headers["x-gateway-model"] == second.headers["x-gateway-model"] == LLAMA
    assert second.headers["x-gateway-fallback-from"] == f"{UNHEALTHY_MODEL};reason=model_unavailable"
    assert second.json() == first.json()
    assert len(requests_on(demo_state, CHAT_PATH)) == 1
