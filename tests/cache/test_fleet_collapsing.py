"""Collapsing across replicas, on a real redis-server: two gateways on 127.0.0.1 share one Redis
and one upstream stand-in that holds its answers (so identical requests overlap). The fleet makes
one upstream call; a replica that joins another's flight relays a stream while it streams; a
leader's error is never sent to a joiner; a leader whose client hangs up keeps fetching for it."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.server.thread import LocalServer, serve_in_thread
from tests.cache.test_response_cache import CHAT, EMBEDDINGS, deterministic_chat, post, sdk
from tests.helpers.gateway import EMBEDDING_MODEL, StartGateway, wait_until
from tests.helpers.redis import RedisServer
from tests.helpers.upstreams import CATALOG_JSON, EMBEDDING_PAYLOAD, Gate, gated_upstream

AUTH = {"authorization": "Bearer sk-client"}
COLLAPSED = "flexai-gateway; fwd=miss; collapsed"


def fleet_env(redis: RedisServer) -> dict[str, str]:
    return {
        "GATEWAY_CACHE_ENABLED": "true",
        "GATEWAY_SHARED_REDIS_URL": redis.url,
        "GATEWAY_SHARED_KEY_PREFIX": f"t{uuid.uuid4().hex[:8]}",  # this test's own keys
        "GATEWAY_SHARED_TIMEOUT": "0.2",
    }


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture
def fleet(start_gateway: StartGateway, redis: RedisServer, gate: Gate) -> Iterator[tuple[LocalServer, LocalServer]]:
    env = fleet_env(redis)
    with serve_in_thread(gated_upstream(gate)) as upstream:
        yield start_gateway(env, upstream_url=upstream.url), start_gateway(env, upstream_url=upstream.url)
        gate.release.set()  # never leave the stand-in holding an answer


def in_flight(gateway: LocalServer) -> int:
    for line in httpx.get(gateway.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("gateway_in_flight_requests "):
            return int(float(line.split()[1]))
    return 0


def test_identical_requests_on_two_replicas_make_one_upstream_call(
    fleet: tuple[LocalServer, LocalServer], gate: Gate
) -> None:
    one, two = fleet
    with ThreadPoolExecutor(6) as pool, sdk(one) as first, sdk(two) as second:
        futures = [
            pool.submit(client.embeddings.with_raw_response.create, model=EMBEDDING_MODEL, input="fleet")
            for client in (first, second, first, second, first, second)
        ]
        assert wait_until(lambda: gate.calls >= 1 and in_flight(one) + in_flight(two) >= 6)
        gate.release.set()
        answers = [f.result(timeout=15) for f in futures]
    assert gate.calls == 1  # one upstream call for the fleet
    statuses = sorted(a.headers["cache-status"] for a in answers)
    assert statuses.count(COLLAPSED) == 5, statuses
    assert statuses.count("flexai-gateway; fwd=miss; stored") == 1, statuses
    assert len({tuple(a.parse().data[0].embedding) for a in answers}) == 1
    # Stored by the leader, in both tiers: a later request on either replica is a hit.
    for gateway in fleet:
        with sdk(gateway) as client:
            again = client.embeddings.with_raw_response.create(model=EMBEDDING_MODEL, input="fleet")
        assert again.headers["cache-status"].startswith("flexai-gateway; hit"), again.headers["cache-status"]
    assert gate.calls == 1


def test_a_joiner_on_another_replica_relays_a_stream_while_it_streams(
    fleet: tuple[LocalServer, LocalServer], gate: Gate
) -> None:
    one, two = fleet
    body = deterministic_chat("live across replicas", stream=True)
    with httpx.stream("POST", one.url + CHAT, json=body, headers=AUTH, timeout=15) as leader:
        leading = leader.iter_bytes()
        assert b"first " in next(leading)
        with httpx.stream("POST", two.url + CHAT, json=body, headers=AUTH, timeout=15) as joiner:
            assert joiner.headers["cache-status"] == COLLAPSED
            joining = joiner.iter_bytes()
            assert b"first " in next(joining)
            assert gate.completed == 0  # the first event came while the upstream still generates
            gate.release.set()
            rest = b"".join(joining)
        led = b"".join(leading)
    assert b"third" in rest
    assert rest.rstrip().endswith(b"data: [DONE]")
    assert b"third" in led
    assert led.rstrip().endswith(b"data: [DONE]")
    assert gate.calls == 1


def test_a_joiner_completes_when_the_leaders_client_hangs_up(
    fleet: tuple[LocalServer, LocalServer], gate: Gate
) -> None:
    one, two = fleet
    body = deterministic_chat("leader leaves", stream=True)
    with httpx.stream("POST", one.url + CHAT, json=body, headers=AUTH, timeout=15) as leader:
        leading = leader.iter_bytes()  # (kept: a dropped iterator would close the response)
        assert b"first " in next(leading)
        with httpx.stream("POST", two.url + CHAT, json=body, headers=AUTH, timeout=15) as joiner:
            assert joiner.headers["cache-status"] == COLLAPSED
            joining = joiner.iter_bytes()
            assert b"first " in next(joining)
            leader.close()  # the leader's only client hangs up ...
            assert wait_until(lambda: in_flight(one) == 0)
            gate.release.set()  # ... and the upstream goes on, for the joiner
            rest = b"".join(joining)
    assert rest.rstrip().endswith(b"data: [DONE]")
    assert gate.cancelled == 0
    assert gate.calls == 1


def failing_first_upstream(release: threading.Event) -> tuple[Starlette, list[int]]:
    """Embeddings: the first call is held until ``release``, then answers 500; later calls 200."""
    import anyio

    statuses: list[int] = []

    async def catalog(request: Request) -> Response:
        return Response(CATALOG_JSON, media_type="application/json")

    async def embeddings(request: Request) -> Response:
        await request.body()
        first = not statuses
        statuses.append(500 if first else 200)
        if first:
            for _ in range(1000):  # at most 10 s
                if release.is_set():
                    break
                await anyio.sleep(0.01)
            error = {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}
            return Response(orjson.dumps(error), status_code=500, media_type="application/json")
        return Response(EMBEDDING_PAYLOAD, media_type="application/json")

    routes = [Route("/api/models", catalog), Route("/v1/embeddings", embeddings, methods=["POST"])]
    return Starlette(routes=routes), statuses


def test_a_leaders_error_is_never_sent_to_a_joiner(start_gateway: StartGateway, redis: RedisServer) -> None:
    release = threading.Event()
    app, statuses = failing_first_upstream(release)
    env = {**fleet_env(redis), "GATEWAY_UPSTREAM_MAX_RETRIES": "0"}
    with serve_in_thread(app) as upstream, ThreadPoolExecutor(2) as pool:
        one = start_gateway(env, upstream_url=upstream.url)
        two = start_gateway(env, upstream_url=upstream.url)
        body = {"model": EMBEDDING_MODEL, "input": "declined"}
        led = pool.submit(post, one, EMBEDDINGS, body)
        assert wait_until(lambda: len(statuses) == 1)
        joined = pool.submit(post, two, EMBEDDINGS, body)
        assert wait_until(lambda: in_flight(two) == 1)
        release.set()
        leader, joiner = led.result(timeout=15), joined.result(timeout=15)
    assert leader.status_code >= 500
    assert joiner.status_code == 200, joiner.text  # went upstream on its own, after the decline
    assert statuses == [500, 200]
    assert "collapsed" not in joiner.headers.get("cache-status", "")
