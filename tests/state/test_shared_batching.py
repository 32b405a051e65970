"""How the shared store's scripts reach a real redis-server: settlements off the request path but
never lost at shutdown, many admissions at once all decided by Redis (not by the fallback), and
scripts loaded again after Redis forgot them."""

from __future__ import annotations

import asyncio
import uuid

import redis.asyncio as aioredis

from gateway.auth.keys import Caller
from gateway.config import SharedSettings
from gateway.state.budgets import Budgets
from gateway.state.limits import RateLimiter
from gateway.state.redis_limits import SharedTicket, limit_keys
from gateway.state.shaping import UpstreamShaper
from gateway.state.shared import SharedStore, open_shared_store
from gateway.state.store import Claim, LocalStore
from tests.helpers.redis import RedisServer


def _store(redis: RedisServer) -> tuple[SharedStore, str]:
    # A generous timeout: these tests are about what reaches Redis, not how fast. At the default
    # 0.1 s, 250 admissions in one write timed out once on a loaded CI machine (two test workers and
    # redis-server on two cores), and the fallback decided one of them.
    prefix = f"t{uuid.uuid4().hex[:8]}"
    local = LocalStore(RateLimiter(), Budgets(None), UpstreamShaper(0, 0, 1.0), None)
    settings = SharedSettings(redis_url=redis.url, key_prefix=prefix, timeout=2.0)
    return open_shared_store(settings, local), prefix


def _caller(rpm: int | None = None, tpm: int | None = None) -> Caller:
    return Caller("alice", None, None, None, rpm, tpm, None, None, admin=False)


async def _meta(redis: RedisServer, prefix: str) -> tuple[dict[bytes | str, bytes | str], int, int]:
    """The key's counters as Redis holds them: meta hash, requests in the window, settled ids."""
    keys = limit_keys(prefix, "alice")
    client = aioredis.from_url(redis.url)
    try:
        return await client.hgetall(keys[4]), await client.zcard(keys[0]), await client.zcard(keys[5])
    finally:
        await client.aclose()


async def test_settlements_still_waiting_are_sent_before_shutdown_completes(redis: RedisServer) -> None:
    store, prefix = _store(redis)
    await store.start()
    holds = [await store.admit(Claim(_caller(tpm=10_000), 10, 20, None, budgeted=False)) for _ in range(3)]
    for hold in holds:
        store.settle(hold, 25, None)  # posted: not sent yet when the store is closed right after
    await store.aclose()
    meta, requests, settled = await _meta(redis, prefix)
    assert requests == 3
    assert settled == 3
    assert meta[b"tokens"] == b"75"
    assert meta[b"reserved"] == b"0"


async def test_many_admissions_at_once_are_all_decided_by_redis(redis: RedisServer) -> None:
    # More at once than redis-py's connection pool holds (100): they share a few connections,
    # none is refused by the pool (which would hand the request to the fallback policy).
    store, prefix = _store(redis)
    await store.start()
    try:
        who = _caller(rpm=1_000, tpm=1_000_000)
        holds = await asyncio.gather(*(store.admit(Claim(who, 1, 1, None, budgeted=False)) for _ in range(250)))
        assert all(isinstance(hold.ticket, SharedTicket) for hold in holds)
        assert store.fallbacks == 0
        for hold in holds:
            store.settle(hold, 2, None)
    finally:
        await store.aclose()
    meta, requests, settled = await _meta(redis, prefix)
    assert (requests, settled) == (250, 250)
    assert meta[b"tokens"] == b"500"


async def test_scripts_forgotten_by_redis_are_loaded_again(redis: RedisServer) -> None:
    store, prefix = _store(redis)
    await store.start()
    client = aioredis.from_url(redis.url)
    try:
        who = _caller(rpm=10)
        await client.script_flush()  # as after a restart: the admission's script is unknown
        hold = await store.admit(Claim(who, 1, 1, None, budgeted=False))
        assert (b"x-ratelimit-remaining-requests", b"9") in hold.headers
        await client.script_flush()  # and the settlement's
        store.settle(hold, 3, None)
        await store.aclose()
        assert store.fallbacks == 0
        meta, _, settled = await _meta(redis, prefix)
        assert settled == 1
        assert meta[b"tokens"] == b"3"
    finally:
        await client.aclose()
