"""The shared state store on a real redis-server: one limit across replicas, the same answers as the
in-process limiter, idempotent settlement, reservations that outlive a dead replica only until
their deadline, and the fallback policies while Redis is stalled."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path

import httpx
import pytest

from gateway.auth.keys import Caller
from gateway.config import SharedSettings
from gateway.errors import BudgetExceeded, RateLimited
from gateway.server.thread import LocalServer
from gateway.state.budgets import Budgets
from gateway.state.limits import RateLimiter
from gateway.state.redis_batch import LuaScript
from gateway.state.redis_client import SharedStateUnavailable
from gateway.state.redis_limits import SETTLE, SharedTicket, limit_keys, settle_args
from gateway.state.shaping import UpstreamCapacity, UpstreamShaper
from gateway.state.shared import SharedStore, open_shared_store
from gateway.state.store import Claim, LocalStore
from tests.helpers.clocks import FakeClock
from tests.helpers.gateway import CHAT_BODY, key_secret, key_table, keys_config, wait_until
from tests.helpers.processes import free_port, running, wait_ready
from tests.helpers.redis import RedisServer


def caller(rpm: int | None = None, tpm: int | None = None, name: str = "alice") -> Caller:
    return Caller(name, None, None, None, rpm, tpm, None, None, admin=False)


def claim(who: Caller, prompt: int = 10, requested: int = 20) -> Claim:
    return Claim(who, prompt, requested, None, budgeted=False)


def local_store() -> LocalStore:
    return LocalStore(RateLimiter(), Budgets(None), UpstreamShaper(0, 0, 1.0), None)


@pytest.fixture
async def store(redis: RedisServer) -> AsyncIterator[SharedStore]:
    # A generous timeout: these tests compare answers, not speed (a loaded CI machine is slow).
    settings = SharedSettings(redis_url=redis.url, key_prefix=f"t{uuid.uuid4().hex[:8]}", timeout=2.0)
    shared = open_shared_store(settings, local_store())
    await shared.start()
    try:
        yield shared
    finally:
        await shared.aclose()


async def test_answers_like_the_in_process_limiter(store: SharedStore) -> None:
    local = local_store()
    who = caller(rpm=3, tpm=10_000)
    for _ in range(3):
        shared_hold, local_hold = await store.admit(claim(who)), await local.admit(claim(who))
        assert _without_resets(shared_hold.headers) == _without_resets(local_hold.headers)
    with pytest.raises(RateLimited) as shared_refusal:
        await store.admit(claim(who))
    with pytest.raises(RateLimited) as local_refusal:
        await local.admit(claim(who))
    assert shared_refusal.value.message.split(". Retry")[0] == local_refusal.value.message.split(". Retry")[0]
    assert _without_resets(shared_refusal.value.extra_headers) == _without_resets(local_refusal.value.extra_headers)
    assert shared_refusal.value.retry_after is not None
    assert 59 < shared_refusal.value.retry_after <= 60


def _without_resets(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in headers if not k.startswith(b"x-ratelimit-reset")]


async def test_tokens_per_minute_count_what_was_used_and_settling_twice_counts_once(
    store: SharedStore, redis: RedisServer
) -> None:
    who = caller(tpm=100)
    hold = await store.admit(claim(who, prompt=10, requested=20))  # reserves 30
    assert (b"x-ratelimit-remaining-tokens", b"70") in hold.headers
    store.settle(hold, 60, None)
    store.settle(hold, 60, None)  # the same request settled again: no effect
    await asyncio.sleep(0.05)
    ticket = hold.ticket
    assert isinstance(ticket, SharedTicket)
    # The same settlement replayed on the server (a retried call): counted once.
    keys = limit_keys(store._settings.key_prefix, who.name)
    replayed = settle_args(ticket, 60, None, 3600, cancel=False)
    assert await store._batcher.call(LuaScript.of(SETTLE), keys, replayed) == 0
    after = await store.admit(claim(who, prompt=5, requested=5))
    assert (b"x-ratelimit-remaining-tokens", b"30") in after.headers  # 100 - 60 used - 10 reserved


async def test_a_reservation_of_a_dead_replica_ends_at_its_deadline(redis: RedisServer) -> None:
    settings = SharedSettings(redis_url=redis.url, key_prefix=f"t{uuid.uuid4().hex[:8]}", reservation_deadline=0.3)
    store = open_shared_store(settings, local_store())
    await store.start()
    try:
        who = caller(tpm=100)
        await store.admit(claim(who, prompt=50, requested=50))  # never settled: its replica "died"
        with pytest.raises(RateLimited):
            await store.admit(claim(who, prompt=1, requested=1))
        await asyncio.sleep(0.4)  # Redis's own clock decides: the deadline passes in real time
        hold = await store.admit(claim(who, prompt=1, requested=1))
        assert (b"x-ratelimit-remaining-tokens", b"98") in hold.headers
    finally:
        await store.aclose()


@pytest.fixture
def paused(redis: RedisServer) -> Iterator[RedisServer]:
    try:
        yield redis
    finally:
        redis.resume()


@pytest.mark.parametrize("policy", ["local", "open", "closed"])
async def test_a_stalled_redis_falls_back_by_policy_and_recovers(
    paused: RedisServer, clock: FakeClock, caplog: pytest.LogCaptureFixture, policy: str
) -> None:
    settings = SharedSettings(
        redis_url=paused.url,
        key_prefix=f"t{uuid.uuid4().hex[:8]}",
        timeout=0.05,
        breaker_failures=2,
        breaker_cooldown=5.0,
        fallback=policy,  # type: ignore[arg-type]
    )
    store = open_shared_store(settings, local_store(), clock=clock)
    await store.start()
    store.replicas = 3  # as if the heartbeats had seen three replicas
    who = caller(rpm=9)
    try:
        await store.admit(claim(who))  # Redis answers
        paused.pause()
        admitted = refused = 0
        unavailable: list[SharedStateUnavailable] = []
        for _ in range(6):
            try:
                await store.admit(claim(who))
                admitted += 1
            except SharedStateUnavailable as exc:
                unavailable.append(exc)
                refused += 1
            except RateLimited:
                refused += 1
        # local: this replica's share, 9 / 3 = 3 per minute; open: no limit; closed: 503.
        assert (admitted, refused) == {"local": (3, 3), "open": (6, 0), "closed": (0, 6)}[policy]
        assert all(e.status == 503 and e.retry_after == 5.0 for e in unavailable)
        assert not store.up
        assert store.fallbacks == 6
        lines = [r for r in caplog.records if r.name == "gateway.state.shared"]
        assert len(lines) == 1  # one line per change of state, not per request
        paused.resume()
        clock.advance(5.0)  # the breaker lets one request try again
        hold = await store.admit(claim(who))
        assert store.up
        # Shared again: the first request and this one count; so may the calls that timed out while
        # Redis was stalled, which it ran once it resumed (a timeout errs towards fewer requests).
        remaining = dict(hold.headers)[b"x-ratelimit-remaining-requests"]
        assert int(remaining) in (5, 6, 7)
        assert len([r for r in caplog.records if r.name == "gateway.state.shared"]) == 2
    finally:
        paused.resume()
        await store.aclose()


@contextmanager
def three_replicas(
    redis: RedisServer, upstream: LocalServer, tmp_path: Path, limit: int, **settings: str
) -> Iterator[list[str]]:
    """Three `gateway serve` processes (keys mode, alice with ``limit`` rpm) sharing ``redis``, each
    having seen the other two; stopped by their pids."""
    config = keys_config(tmp_path / "gateway.toml", key_table("alice", f"rpm = {limit}"))
    env = {
        "GATEWAY_UPSTREAM_URL": upstream.url,
        "GATEWAY_UPSTREAM_API_KEY": "sk-org",
        "GATEWAY_USAGE_PATH": "",
        "GATEWAY_SHARED_REDIS_URL": redis.url,
        "GATEWAY_SHARED_KEY_PREFIX": f"t{uuid.uuid4().hex[:8]}",
        "GATEWAY_SHARED_HEARTBEAT_INTERVAL": "0.2",
        **settings,
    }
    with ExitStack() as stack:
        urls, procs = [], []
        for _ in range(3):
            port = free_port()
            argv = ["serve", "--config", str(config), "--port", str(port)]
            procs.append(stack.enter_context(running(argv, env, tmp_path)))
            urls.append(f"http://127.0.0.1:{port}")
        for url, proc in zip(urls, procs, strict=True):
            wait_ready(url, proc)
        for url in urls:  # every replica has seen the other two
            assert wait_until(partial(_sees_replicas, url, ADMIN, 3))
        yield urls


def burst(urls: list[str], count: int) -> list[int]:
    """``count`` chat requests at once as alice, spread evenly over ``urls``: their statuses."""

    def call(i: int) -> int:
        headers = {"authorization": f"Bearer {key_secret('alice')}"}
        url = urls[i % len(urls)] + "/v1/chat/completions"
        return httpx.post(url, json=CHAT_BODY, headers=headers, timeout=15).status_code

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(call, range(count)))


def test_three_replicas_share_one_requests_per_minute_limit(
    redis: RedisServer, upstream: LocalServer, tmp_path: Path
) -> None:
    limit = 6
    # The property is the sharing: a generous timeout on this shared, loaded machine.
    with three_replicas(redis, upstream, tmp_path, limit, GATEWAY_SHARED_TIMEOUT="1.0") as urls:
        statuses = burst(urls, 3 * limit)
        scraped = [_metrics(url, ADMIN) for url in urls]
    assert sorted(statuses) == [200] * limit + [429] * (2 * limit)  # never 3x the limit
    for text in scraped:
        assert "gateway_shared_store_up 1.0" in text
        assert "gateway_shared_store_fallbacks_total 0.0" in text


def test_with_redis_stalled_the_fleet_stays_within_the_limit(
    paused: RedisServer, upstream: LocalServer, tmp_path: Path
) -> None:
    limit = 6
    settings = {"GATEWAY_SHARED_TIMEOUT": "0.3", "GATEWAY_SHARED_BREAKER_FAILURES": "1"}
    with three_replicas(paused, upstream, tmp_path, limit, **settings) as urls:
        paused.pause()  # SIGSTOP: Redis holds its connections and answers nothing
        statuses = burst(urls, 3 * limit)
        scraped = [_metrics(url, ADMIN) for url in urls]
        paused.resume()
    # Each replica enforces its share (6 / 3 replicas seen alive = 2): the fleet at or under 6.
    assert statuses.count(200) == limit
    assert statuses.count(429) == 2 * limit
    for text in scraped:
        assert "gateway_shared_store_up 0.0" in text
        assert "gateway_shared_store_fallbacks_total 0.0" not in text


ADMIN = {"authorization": f"Bearer {key_secret('admin')}"}


def _sees_replicas(url: str, headers: dict[str, str], count: int) -> bool:
    return f"gateway_shared_store_replicas {count:.1f}" in _metrics(url, headers)


def _metrics(url: str, headers: dict[str, str]) -> str:
    return httpx.get(url + "/metrics", headers=headers, timeout=5).text


def budgeted(daily: float | None = None, monthly: float | None = None) -> Caller:
    return Caller("spender", None, None, None, None, None, daily, monthly, admin=False)


async def test_two_replicas_draw_on_one_budget_and_refuse_like_one_process(redis: RedisServer) -> None:
    settings = SharedSettings(redis_url=redis.url, key_prefix=f"t{uuid.uuid4().hex[:8]}", timeout=0.5)
    one, two = (open_shared_store(settings, local_store()) for _ in range(2))
    await one.start()
    await two.start()
    try:
        who = budgeted(daily=1.0)
        hold = await one.admit(Claim(who, 0, 0, 0.4, budgeted=True))
        one.settle(hold, 10, 0.6)
        other = await two.admit(Claim(who, 0, 0, 0.3, budgeted=True))
        two.settle(other, 10, 0.3)
        await asyncio.sleep(0.05)  # settlements run off the request path
        with pytest.raises(BudgetExceeded) as refused:
            await one.admit(Claim(who, 0, 0, 0.2, budgeted=True))  # 0.1 left of 1.0: not enough
        local = Budgets(None)
        await local.admit(who, 0.9)
        with pytest.raises(BudgetExceeded) as in_process:
            await local.admit(who, 0.2)
        assert refused.value.message == in_process.value.message  # "... cannot cover this request ($0.1000 left)"
        assert refused.value.status == 402
    finally:
        await one.aclose()
        await two.aclose()


async def test_a_period_starts_from_the_ledgers_spend_and_a_refusal_reserves_nothing(redis: RedisServer) -> None:
    settings = SharedSettings(redis_url=redis.url, key_prefix=f"t{uuid.uuid4().hex[:8]}", timeout=0.5)

    async def spent(key: str, since: float) -> float:
        return 4.5  # what this replica's ledger says the key spent this month

    store = open_shared_store(settings, local_store(), spent)
    await store.start()
    try:
        who = Caller("spender", None, None, None, 2, None, None, 5.0, admin=False)
        hold = await store.admit(Claim(who, 0, 0, 0.3, budgeted=True))
        with pytest.raises(BudgetExceeded, match="monthly"):
            await store.admit(Claim(who, 0, 0, 0.3, budgeted=True))  # 0.2 left: refused ...
        store.settle(hold, 0, 0.1)
        await asyncio.sleep(0.05)
        # ... and the refusal took neither a request of the rpm nor money: 0.4 left, one request left.
        last = await store.admit(Claim(who, 0, 0, 0.35, budgeted=True))
        assert (b"x-ratelimit-remaining-requests", b"0") in last.headers
    finally:
        await store.aclose()


async def test_the_upstream_concurrency_cap_holds_across_replicas_and_a_lease_comes_back(
    redis: RedisServer,
) -> None:
    settings = SharedSettings(redis_url=redis.url, key_prefix=f"t{uuid.uuid4().hex[:8]}", timeout=0.5)
    one, two = (open_shared_store(settings, local_store(), shaping=(2, 0, 0.2)) for _ in range(2))
    await one.start()
    await two.start()
    try:
        first, second = await one.upstream_slot(), await two.upstream_slot()
        with pytest.raises(UpstreamCapacity, match="concurrency cap"):
            await one.upstream_slot()  # two held fleet-wide: the third waits queue_timeout, then 429
        first.release()
        third = await two.upstream_slot()  # the lease came back (released off the request path)
        second.release()
        third.release()
    finally:
        await one.aclose()
        await two.aclose()


async def test_the_upstream_rate_cap_holds_across_replicas(redis: RedisServer) -> None:
    settings = SharedSettings(redis_url=redis.url, key_prefix=f"t{uuid.uuid4().hex[:8]}", timeout=0.5)
    one, two = (open_shared_store(settings, local_store(), shaping=(0, 3, 0.1)) for _ in range(2))
    await one.start()
    await two.start()
    try:
        for store in (one, two, one):
            await store.upstream_slot()
        with pytest.raises(UpstreamCapacity, match="3 per minute") as refused:
            await two.upstream_slot()
        assert refused.value.retry_after is not None
        assert refused.value.retry_after > 50
    finally:
        await one.aclose()
        await two.aclose()
