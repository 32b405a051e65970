"""The response cache's Redis tier, on a real redis-server: one replica's answer serves another,
a stalled Redis never stops the cache or the upstream from answering, purges reach both tiers."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from gateway.cache.redis_tier import decode, encode
from gateway.cache.store import Entry
from gateway.demo import DemoState
from gateway.server.thread import LocalServer
from gateway.usage.model import Usage
from tests.helpers.gateway import EMBEDDING_MODEL, StartGateway, requests_on
from tests.helpers.redis import RedisServer

EMBEDDINGS = "/v1/embeddings"
AUTH = {"authorization": "Bearer sk-client"}


@pytest.fixture
def two_replicas(start_gateway: StartGateway, redis: RedisServer) -> tuple[LocalServer, LocalServer]:
    env = {
        "GATEWAY_CACHE_ENABLED": "true",
        "GATEWAY_SHARED_REDIS_URL": redis.url,
        "GATEWAY_SHARED_KEY_PREFIX": f"t{uuid.uuid4().hex[:8]}",
        "GATEWAY_SHARED_TIMEOUT": "0.2",
    }
    return start_gateway(env), start_gateway(env)


@pytest.fixture
def paused(redis: RedisServer) -> Iterator[RedisServer]:
    try:
        yield redis
    finally:
        redis.resume()


def embed(gateway: LocalServer, text: str) -> httpx.Response:
    body = {"model": EMBEDDING_MODEL, "input": text}
    response = httpx.post(gateway.url + EMBEDDINGS, json=body, headers=AUTH, timeout=15)
    assert response.status_code == 200, response.text
    return response


def test_an_answer_stored_by_one_replica_serves_another(
    two_replicas: tuple[LocalServer, LocalServer], demo_state: DemoState
) -> None:
    one, two = two_replicas
    first = embed(one, "shared")
    assert first.headers["cache-status"] == "flexai-gateway; fwd=miss; stored"

    def from_the_other() -> httpx.Response:
        return embed(two, "shared")

    deadline = time.monotonic() + 5  # the first replica writes to Redis off its request path
    hit = from_the_other()
    while "hit" not in hit.headers["cache-status"] and time.monotonic() < deadline:
        time.sleep(0.05)
        hit = from_the_other()
    assert hit.headers["cache-status"].startswith("flexai-gateway; hit")
    assert hit.json() == first.json()
    assert len(requests_on(demo_state, EMBEDDINGS)) <= 2  # at most one more before the write landed
    metrics = httpx.get(two.url + "/metrics").text
    assert "gateway_cache_remote_up 1.0" in metrics
    assert "gateway_cache_remote_hits_total 1.0" in metrics


def test_a_stalled_redis_never_stops_answers(
    two_replicas: tuple[LocalServer, LocalServer], paused: RedisServer, demo_state: DemoState
) -> None:
    one, two = two_replicas
    embed(one, "kept in memory")
    paused.pause()
    started = time.monotonic()
    assert embed(one, "kept in memory").headers["cache-status"].startswith("flexai-gateway; hit")  # memory
    fresh = embed(two, "never seen")  # the Redis lookup times out: a miss, then the upstream answers
    assert fresh.headers["cache-status"].startswith("flexai-gateway; fwd=miss")
    assert time.monotonic() - started < 5  # bounded by [shared] timeout, not by Redis
    metrics = httpx.get(two.url + "/metrics").text
    assert "gateway_cache_remote_up 0.0" in metrics


def test_a_purge_reaches_the_redis_tier(two_replicas: tuple[LocalServer, LocalServer], demo_state: DemoState) -> None:
    one, two = two_replicas
    embed(one, "purged")
    time.sleep(0.3)  # the write to Redis lands off the request path
    purge = httpx.post(one.url + "/admin/cache/purge", json={"model": EMBEDDING_MODEL})
    assert purge.json()["purged"] == 1
    assert purge.json()["purged_shared"] == 1
    assert "hit" not in embed(two, "purged").headers["cache-status"]


def test_entries_round_trip_and_garbage_is_a_miss() -> None:
    entry = Entry(200, ((b"content-type", b"application/json"),), b'{"a":1}', False, "m", "ns", 1.5, 60.0)
    assert decode(encode(entry)) == entry
    counted = dataclasses.replace(entry, usage=Usage(prompt_tokens=3, total_tokens=3))
    assert decode(encode(counted)) == counted
    assert decode(b"") is None
    assert decode(b"\x00\x00\x00\x05hello") is None
