"""The response cache as users meet it: the official SDK and httpx against a gateway on 127.0.0.1
in front of a real upstream stand-in (the simulated FlexAI upstream, or a gated one that holds its
answers so that identical requests overlap)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from gateway.demo import DemoState
from gateway.server.thread import LocalServer, serve_in_thread
from tests.helpers.gateway import (
    CHAT_MODEL,
    EMBEDDING_MODEL,
    StartGateway,
    assert_error_envelope,
    key_secret,
    key_table,
    keys_config,
    requests_on,
    wait_until,
)
from tests.helpers.upstreams import (
    FaultyUpstream,
    Gate,
    InlineUpstreamState,
    StatusAnswer,
    create_inline_upstream,
    gated_upstream,
)

CACHE_ON = {"GATEWAY_CACHE_ENABLED": "true"}
EMBEDDINGS = "/v1/embeddings"
CHAT = "/v1/chat/completions"
AUTH = {"authorization": "Bearer sk-client"}


def sdk(gateway: LocalServer, key: str = "sk-client") -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=15)


def post(gateway: LocalServer, path: str, body: dict[str, Any] | bytes, **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    all_headers = {**AUTH, "content-type": "application/json", **headers}
    return httpx.post(gateway.url + path, content=content, headers=all_headers, timeout=15)


def deterministic_chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": CHAT_MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0, **extra}


@pytest.fixture
def cached(start_gateway: StartGateway) -> LocalServer:
    return start_gateway(CACHE_ON)


# --------------------------------------------------------------------------- hits and misses


def test_a_repeated_embeddings_request_is_answered_from_the_cache(cached: LocalServer, demo_state: DemoState) -> None:
    with sdk(cached) as client:
        first = client.embeddings.with_raw_response.create(model=EMBEDDING_MODEL, input="the same words")
        second = client.embeddings.with_raw_response.create(model=EMBEDDING_MODEL, input="the same words")
    assert len(requests_on(demo_state, EMBEDDINGS)) == 1  # the second never reached the upstream
    assert first.headers["cache-status"] == "flexai-gateway; fwd=miss; stored"
    assert second.headers["cache-status"].startswith("flexai-gateway; hit; ttl=")
    assert int(second.headers["age"]) >= 0
    assert "age" not in first.headers
    assert second.parse().data[0].embedding == first.parse().data[0].embedding
    assert second.headers["x-request-id"] != first.headers["x-request-id"]  # a hit gets its own id
    assert float(second.headers["x-gateway-cost-usd"]) == 0.0  # free by default
    assert float(first.headers["x-gateway-cost-usd"]) > 0.0


def test_key_order_nesting_and_equal_numbers_give_one_entry(cached: LocalServer, demo_state: DemoState) -> None:
    a = b'{"model":"%s","temperature":0,"messages":[{"role":"user","content":"order"}],"stop":{"b":1,"a":[1.0,2]}}'
    b = b'{"stop":{"a":[1,2.0],"b":1.0},"messages":[{"content":"order","role":"user"}],"temperature":0.0,"model":"%s"}'
    first = post(cached, CHAT, a % CHAT_MODEL.encode())
    second = post(cached, CHAT, b % CHAT_MODEL.encode())
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert second.headers["cache-status"].startswith("flexai-gateway; hit")
    assert second.json()["id"] == first.json()["id"]  # the stored answer, not a new one
    assert len(requests_on(demo_state, CHAT)) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"messages": [{"role": "user", "content": "other"}]},
        {"max_tokens": 7},
        {"seed": 3},
        {"user": "someone-else"},
        {"unknown_field": {"nested": True}},
        {"stream": True},
    ],
)
def test_every_parameter_that_changes_the_answer_changes_the_key(
    cached: LocalServer, demo_state: DemoState, change: dict[str, Any]
) -> None:
    base = deterministic_chat("param")
    assert post(cached, CHAT, base).status_code == 200
    changed = post(cached, CHAT, {**base, **change})
    assert changed.status_code == 200, changed.text
    assert "hit" not in changed.headers["cache-status"]
    assert len(requests_on(demo_state, CHAT)) == 2


def test_a_sampled_chat_is_not_cached_unless_the_client_opts_in(cached: LocalServer, demo_state: DemoState) -> None:
    sampled = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "sampled"}]}
    one, two = post(cached, CHAT, sampled), post(cached, CHAT, sampled)
    assert one.headers["cache-status"] == two.headers["cache-status"]
    assert two.headers["cache-status"] == "flexai-gateway; fwd=bypass; detail=not-deterministic"
    opted = [post(cached, CHAT, sampled, **{"cache-control": "max-age=600"}) for _ in range(2)]
    assert opted[0].headers["cache-status"] == "flexai-gateway; fwd=miss; stored"
    assert opted[1].headers["cache-status"].startswith("flexai-gateway; hit")
    assert len(requests_on(demo_state, CHAT)) == 3


def test_request_cache_control_no_store_no_cache_and_only_if_cached(cached: LocalServer, demo_state: DemoState) -> None:
    body = deterministic_chat("directives")
    only = post(cached, CHAT, body, **{"cache-control": "only-if-cached"})
    error = assert_error_envelope(only.content, code="not_cached")
    assert only.status_code == 504
    assert "only-if-cached" in error["message"]
    assert only.headers["cache-status"] == "flexai-gateway; fwd=miss; detail=only-if-cached"
    assert requests_on(demo_state, CHAT) == []  # refused before it cost anything

    not_stored = post(cached, CHAT, body, **{"cache-control": "no-store"})
    assert not_stored.headers["cache-status"] == "flexai-gateway; fwd=miss; detail=no-store"
    assert post(cached, CHAT, body, **{"cache-control": "only-if-cached"}).status_code == 504

    stored = post(cached, CHAT, body)
    assert post(cached, CHAT, body, **{"cache-control": "only-if-cached"}).json()["id"] == stored.json()["id"]
    refreshed = post(cached, CHAT, body, pragma="no-cache")
    assert refreshed.headers["cache-status"] == "flexai-gateway; fwd=request; stored"
    assert refreshed.json()["id"] != stored.json()["id"]
    assert post(cached, CHAT, body).json()["id"] == refreshed.json()["id"]  # the refreshed answer is served
    assert (
        post(cached, CHAT, body, **{"cache-control": "max-age=0"})
        .headers["cache-status"]
        .startswith("flexai-gateway; fwd=request")
    )
    assert len(requests_on(demo_state, CHAT)) == 4


@pytest.mark.parametrize("status", [429, 500])
def test_errors_are_never_stored(start_gateway: StartGateway, status: int) -> None:
    with FaultyUpstream("status") as faulty:
        faulty.status_answer = StatusAnswer(status=status)
        gateway = start_gateway({**CACHE_ON, "GATEWAY_UPSTREAM_RETRIES": "0"}, upstream_url=faulty.url)
        body = deterministic_chat("error")
        for _ in range(2):
            answer = post(gateway, CHAT, body)
            assert answer.status_code == status
            assert answer.headers["cache-status"] == "flexai-gateway; fwd=miss; detail=status"
        faulty.mode = "ok"
        healthy = post(gateway, CHAT, body)
        assert healthy.status_code == 200
        assert healthy.headers["cache-status"] == "flexai-gateway; fwd=miss; stored"
        assert len([r for r in faulty.received if r.startswith("POST")]) == 3


def test_an_answer_over_max_entry_bytes_is_relayed_whole_and_not_stored(
    start_gateway: StartGateway, demo_state: DemoState
) -> None:
    gateway = start_gateway({**CACHE_ON, "GATEWAY_CACHE_MAX_ENTRY_BYTES": "64"})
    with sdk(gateway) as client:
        for _ in range(2):
            answer = client.embeddings.with_raw_response.create(model=EMBEDDING_MODEL, input="big")
            assert answer.parse().data[0].embedding
            assert "stored" not in answer.headers["cache-status"]
    assert len(requests_on(demo_state, EMBEDDINGS)) == 2
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'gateway_cache_skips_total{reason="too-large"} 2.0' in metrics


# --------------------------------------------------------------------------- streams


def content_of(stream: openai.Stream[Any]) -> tuple[str, list[Any]]:
    text, usages = "", []
    for chunk in stream:
        if chunk.usage is not None:
            usages.append(chunk.usage)
        for choice in chunk.choices:
            text += choice.delta.content or ""
    return text, usages


def test_a_replayed_stream_parses_with_the_sdk_like_the_live_one(cached: LocalServer, demo_state: DemoState) -> None:
    messages: Any = [{"role": "user", "content": "stream me"}]
    with sdk(cached) as client:
        live = client.chat.completions.with_raw_response.create(
            model=CHAT_MODEL, messages=messages, temperature=0, stream=True
        )
        live_text, live_usage = content_of(live.parse())
        replay = client.chat.completions.with_raw_response.create(
            model=CHAT_MODEL, messages=messages, temperature=0, stream=True
        )
        replay_text, replay_usage = content_of(replay.parse())
        asked = client.chat.completions.create(
            model=CHAT_MODEL, messages=messages, temperature=0, stream=True, stream_options={"include_usage": True}
        )
        _, asked_usage = content_of(asked)
    assert live.headers["cache-status"] == "flexai-gateway; fwd=miss"  # stored only once it completes
    assert replay.headers["cache-status"].startswith("flexai-gateway; hit")
    assert replay.headers["content-type"].startswith("text/event-stream")
    assert replay_text == live_text
    assert live_text
    assert live_usage == replay_usage == []  # the usage chunk the gateway asked for is not shown
    # A client that asks for usage gets it from the same entry, priced at the hit's own cost.
    assert len(asked_usage) == 1
    assert asked_usage[0].completion_tokens > 0
    assert asked_usage[0].model_extra["cost_usd"] == 0.0
    assert len(requests_on(demo_state, CHAT)) == 1


def test_a_stream_cut_by_the_client_is_not_stored(cached: LocalServer, demo_state: DemoState) -> None:
    demo_state.token_delay = 0.05
    body = deterministic_chat("cut me", stream=True)
    with httpx.stream("POST", cached.url + CHAT, json=body, headers=AUTH, timeout=15) as response:
        assert response.status_code == 200
        next(response.iter_bytes())  # the first event, then hang up
    assert wait_until(lambda: demo_state.streams_cancelled == 1)
    demo_state.token_delay = 0.0
    again = post(cached, CHAT, body)
    assert again.headers["cache-status"].startswith("flexai-gateway; fwd=miss")  # not a hit
    assert len(requests_on(demo_state, CHAT)) == 2


# --------------------------------------------------------------------------- collapsing


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture
def gated(start_gateway: StartGateway, gate: Gate) -> Iterator[LocalServer]:
    with serve_in_thread(gated_upstream(gate)) as upstream:
        yield start_gateway(CACHE_ON, upstream_url=upstream.url)


def test_concurrent_identical_embeddings_make_one_upstream_call(gated: LocalServer, gate: Gate) -> None:
    with ThreadPoolExecutor(8) as pool, sdk(gated) as client:

        def embed(_: int) -> Any:
            return client.embeddings.with_raw_response.create(model=EMBEDDING_MODEL, input="together")

        futures = [pool.submit(embed, i) for i in range(8)]
        assert wait_until(lambda: gate.calls >= 1)
        assert wait_until(lambda: _flights_joined(gated) >= 7)
        gate.release.set()
        answers = [f.result(timeout=15) for f in futures]
    assert gate.calls == 1
    statuses = sorted(a.headers["cache-status"] for a in answers)
    assert statuses.count("flexai-gateway; fwd=miss; collapsed") == 7
    assert {len(a.parse().data[0].embedding) for a in answers} == {256}


def test_followers_of_a_stream_complete_when_its_leader_hangs_up(gated: LocalServer, gate: Gate) -> None:
    body = deterministic_chat("collapse me", stream=True)
    with httpx.stream("POST", gated.url + CHAT, json=body, headers=AUTH, timeout=15) as leader:
        assert leader.status_code == 200
        chunks = leader.iter_bytes()
        assert b"first " in next(chunks)  # the leader has the first event ...

        def follow(_: int) -> tuple[str, bytes]:
            with httpx.stream("POST", gated.url + CHAT, json=body, headers=AUTH, timeout=15) as response:
                return response.headers["cache-status"], response.read()

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(follow, i) for i in range(4)]
            assert wait_until(lambda: _flights_joined(gated) >= 4)
            leader.close()  # ... and hangs up before the rest
            gate.release.set()
            followers = [f.result(timeout=15) for f in futures]
    assert gate.calls == 1
    assert gate.cancelled == 0
    for status, raw in followers:
        assert status == "flexai-gateway; fwd=miss; collapsed"
        assert b"first " in raw
        assert b"third" in raw
        assert raw.rstrip().endswith(b"data: [DONE]")
        assert b'"usage"' not in raw  # the gateway's own usage chunk is stripped for them too
    # The completed answer was stored: the next identical request is a hit.
    replay = post(gated, CHAT, body)
    assert replay.headers["cache-status"].startswith("flexai-gateway; hit")
    assert gate.calls == 1


def _flights_joined(gateway: LocalServer) -> int:
    """Requests waiting on or reading a flight: those counted "collapsed" so far plus those waiting
    (read from the in-flight gauge: every request of these tests is the same one)."""
    metrics = httpx.get(gateway.url + "/metrics").text
    for line in metrics.splitlines():
        if line.startswith("gateway_in_flight_requests "):
            return int(float(line.split()[1])) - 1  # all but the leader
    return 0


# --------------------------------------------------------------------------- isolation


def test_pass_through_callers_never_receive_each_others_answers(cached: LocalServer, demo_state: DemoState) -> None:
    with sdk(cached, "sk-alice") as alice, sdk(cached, "sk-bob") as bob:
        a = alice.embeddings.with_raw_response.create(model=EMBEDDING_MODEL, input="private")
        b = bob.embeddings.with_raw_response.create(model=EMBEDDING_MODEL, input="private")
        a2 = alice.embeddings.with_raw_response.create(model=EMBEDDING_MODEL, input="private")
    assert "hit" not in b.headers["cache-status"]
    assert a2.headers["cache-status"].startswith("flexai-gateway; hit")
    assert "hit" not in a.headers["cache-status"]
    assert len(requests_on(demo_state, EMBEDDINGS)) == 2


def test_keys_mode_partitions_by_key_and_records_hits_in_the_ledger(
    start_gateway: StartGateway, demo_state: DemoState, tmp_path: Path
) -> None:
    ledger = tmp_path / "usage.db"
    config = keys_config(tmp_path / "gateway.toml", key_table("alice") + key_table("bob"), ledger=ledger,
                         extra="[cache]\nenabled = true\n")  # fmt: skip
    gateway = start_gateway({"GATEWAY_UPSTREAM_API_KEY": "sk-org", "GATEWAY_USAGE_PATH": str(ledger)}, config=config)
    body = deterministic_chat("keys")
    alice = {"authorization": f"Bearer {key_secret('alice')}"}
    bob = {"authorization": f"Bearer {key_secret('bob')}"}
    first = post(gateway, CHAT, body, **alice)
    hit = post(gateway, CHAT, body, **alice)
    other = post(gateway, CHAT, body, **bob)
    assert hit.headers["cache-status"].startswith("flexai-gateway; hit")
    assert "hit" not in other.headers["cache-status"]
    assert len(requests_on(demo_state, CHAT)) == 2
    assert float(hit.headers["x-gateway-cost-usd"]) == 0.0

    def rows() -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(ledger)
        try:
            return conn.execute(
                "SELECT request_id, key_name, outcome, cache, cost_usd, saved_usd, total_tokens FROM usage ORDER BY id"
            ).fetchall()
        finally:
            conn.close()

    assert wait_until(lambda: len(rows()) == 3)
    by_id = {r[0]: r for r in rows()}
    first_row, hit_row = by_id[first.headers["x-request-id"]], by_id[hit.headers["x-request-id"]]
    assert first_row[2:4] == ("completed", "miss")
    assert first_row[4] > 0
    assert hit_row[1:4] == ("alice", "cache_hit", "hit")
    assert hit_row[4] == 0.0
    assert hit_row[5] == pytest.approx(first_row[4])
    assert hit_row[6] == first_row[6] > 0  # the tokens it served
    metrics = httpx.get(gateway.url + "/metrics", headers={"authorization": f"Bearer {key_secret('admin')}"}).text
    assert f'gateway_cache_requests_total{{endpoint="{CHAT}",result="hit"}} 1.0' in metrics
    assert f'gateway_cache_saved_usd_total{{model="{CHAT_MODEL}"}}' in metrics


# --------------------------------------------------------------------------- purge


def test_an_admin_purge_removes_a_models_entries(cached: LocalServer, demo_state: DemoState) -> None:
    with sdk(cached) as client:
        client.embeddings.create(model=EMBEDDING_MODEL, input="purge me")
        client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "keep"}], temperature=0)
    purge = httpx.post(cached.url + "/admin/cache/purge", json={"model": EMBEDDING_MODEL})
    assert purge.status_code == 200
    assert purge.json() == {"object": "cache.purge", "purged": 1, "model": EMBEDDING_MODEL, "namespace": None}
    with sdk(cached) as client:
        again = client.embeddings.with_raw_response.create(model=EMBEDDING_MODEL, input="purge me")
        kept = client.chat.completions.with_raw_response.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "keep"}], temperature=0
        )
    assert again.headers["cache-status"] == "flexai-gateway; fwd=miss; stored"
    assert kept.headers["cache-status"].startswith("flexai-gateway; hit")
    bad = httpx.post(cached.url + "/admin/cache/purge", json={"model": 3})
    assert bad.status_code == 400
    assert_error_envelope(bad.content, code="invalid_request")
    everything = httpx.post(cached.url + "/admin/cache/purge")
    assert everything.json()["purged"] == 2


def test_a_namespace_separates_entries_and_a_bad_one_is_refused(cached: LocalServer, demo_state: DemoState) -> None:
    body = {"model": EMBEDDING_MODEL, "input": "spaced"}
    first = post(cached, EMBEDDINGS, body, **{"x-gateway-cache-namespace": "tenant-a"})
    other = post(cached, EMBEDDINGS, body, **{"x-gateway-cache-namespace": "tenant-b"})
    same = post(cached, EMBEDDINGS, body, **{"x-gateway-cache-namespace": "tenant-a"})
    assert first.headers["cache-status"] == other.headers["cache-status"] == "flexai-gateway; fwd=miss; stored"
    assert same.headers["cache-status"].startswith("flexai-gateway; hit")
    bad = post(cached, EMBEDDINGS, body, **{"x-gateway-cache-namespace": "x" * 200})
    assert bad.status_code == 400
    assert_error_envelope(bad.content, code="invalid_cache_namespace")
    assert len(requests_on(demo_state, EMBEDDINGS)) == 2
    assert httpx.post(cached.url + "/admin/cache/purge", json={"namespace": "tenant-b"}).json()["purged"] == 1


# ----------------------------------------------------- unfinished streams, billing, content codings


def test_a_stream_without_its_done_event_is_relayed_but_not_stored(start_gateway: StartGateway) -> None:
    with FaultyUpstream("truncated_sse") as faulty:
        gateway = start_gateway(CACHE_ON, upstream_url=faulty.url)
        body = deterministic_chat("unfinished", stream=True)
        for _ in range(2):
            answer = post(gateway, CHAT, body)
            assert answer.status_code == 200
            assert "hit" not in answer.headers["cache-status"]
        assert len([r for r in faulty.received if r.startswith("POST")]) == 2
        metrics = httpx.get(gateway.url + "/metrics").text
        assert 'gateway_cache_skips_total{reason="unfinished"} 2.0' in metrics


def test_bill_hits_full_charges_a_hit_the_upstream_price(start_gateway: StartGateway) -> None:
    gateway = start_gateway({**CACHE_ON, "GATEWAY_CACHE_BILL_HITS": "full"})
    with sdk(gateway) as client:
        first = client.embeddings.with_raw_response.create(model=EMBEDDING_MODEL, input="billed")
        hit = client.embeddings.with_raw_response.create(model=EMBEDDING_MODEL, input="billed")
    assert hit.headers["cache-status"].startswith("flexai-gateway; hit")
    assert float(hit.headers["x-gateway-cost-usd"]) == float(first.headers["x-gateway-cost-usd"]) > 0


def test_a_gzip_entry_is_served_only_to_clients_that_accept_gzip(start_gateway: StartGateway) -> None:
    state = InlineUpstreamState()
    with serve_in_thread(create_inline_upstream(state)) as upstream:
        gateway = start_gateway(CACHE_ON, upstream_url=upstream.url)
        body = {"model": EMBEDDING_MODEL, "input": "coded"}
        gzipped = post(gateway, EMBEDDINGS, body, **{"accept-encoding": "gzip"})
        assert gzipped.headers["content-encoding"] == "gzip"
        assert gzipped.headers["cache-status"] == "flexai-gateway; fwd=miss; stored"
        hit = post(gateway, EMBEDDINGS, body, **{"accept-encoding": "gzip, br"})
        assert hit.headers["cache-status"].startswith("flexai-gateway; hit")
        assert hit.json() == gzipped.json()  # httpx decodes both
        plain = post(gateway, EMBEDDINGS, body, **{"accept-encoding": "identity"})
        assert "content-encoding" not in plain.headers
        assert plain.headers["cache-status"].startswith("flexai-gateway; fwd=miss")  # went upstream
        assert plain.json() == gzipped.json()
        assert len(state.accept_encodings) == 2
