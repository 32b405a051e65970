"""The state store shared by every replica (``[shared] redis_url``): per-key limits and budgets in Redis.

``SharedStore`` is a ``StateStore`` (``gateway.state.store``): the request path does not know
which one it talks to. What is shared: each key's requests and tokens per minute and its day and
month budgets (``gateway.state.redis_limits``: one script to admit, one to settle, idempotent),
and the upstream shaping (``gateway.state.redis_shaping``: leases with deadlines). The ledger is
still this replica's (the in-process ``LocalStore`` it wraps).

When Redis is slow or down, each call gives up after ``timeout``; after ``breaker_failures``
failures in a row the store stops asking for ``breaker_cooldown`` seconds, then tries one request.
Meanwhile the ``fallback`` policy decides: ``local`` (each replica enforces its share of each
limit: the limit divided by the replicas seen alive in the last heartbeats, so the fleet stays at
or under it), ``open`` (no rate limit), ``closed`` (503 ``shared_state_unavailable``). One log line
per change of state, never one per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
import uuid
from collections.abc import Callable

from gateway.auth.keys import Caller
from gateway.config import SharedSettings
from gateway.state.budgets import Period, SpendSince, periods
from gateway.state.guard import Guard
from gateway.state.limits import WINDOW
from gateway.state.redis_batch import Batcher, LuaScript
from gateway.state.redis_client import RedisClient, SharedStateUnavailable, part, pipelined, redis_client
from gateway.state.redis_limits import (
    ADMIT,
    SETTLE,
    Admission,
    SharedTicket,
    admit_args,
    admitted,
    budget_ttl,
    limit_keys,
    micro,
    needs_seed,
    settle_args,
)
from gateway.state.redis_seed import SEED, RecentSince, seed_args
from gateway.state.redis_shaping import SharedShaper
from gateway.state.shaping import Slot
from gateway.state.store import Claim, Hold, LocalStore, SharedState
from gateway.usage.schema import UsageRecord

logger = logging.getLogger("gateway.state.shared")

# Lua: this replica is alive (a score of server time), and how many are.
HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000))
return redis.call('ZCARD', KEYS[1])
"""


class SharedStore:
    def __init__(
        self,
        client: RedisClient,
        settings: SharedSettings,
        local: LocalStore,
        *,
        errors: tuple[type[Exception], ...],
        shaping: tuple[int, int, float] = (0, 0, 0.0),
        spend_since: SpendSince | None = None,
        recent_since: RecentSince | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``errors``: what the client raises when Redis is unreachable (redis-py's RedisError)."""
        self._client = client
        self._settings = settings
        self._local = local
        self._errors: tuple[type[Exception], ...] = (*errors, TimeoutError, OSError)
        self._clock = clock
        self._wall_clock = wall_clock
        self._spend_since = spend_since  # the ledger's spend, to seed a period's shared counter
        self._recent_since = recent_since  # the ledger's recent requests, to seed a key's window
        self._admit = LuaScript.of(ADMIT)
        self._seed_window = LuaScript.of(SEED)
        self._settle = LuaScript.of(SETTLE)
        self._heartbeat = LuaScript.of(HEARTBEAT)
        self._replica = uuid.uuid4().hex
        self._periods: tuple[Period, Period] | None = None
        self._ids = itertools.count()  # request ids: this replica's id and a count
        self.replicas = 1  # replicas seen alive at the last heartbeat (this one included)
        self.fallbacks = 0  # admissions decided by the fallback policy
        self._guard = Guard(
            "shared state store",
            logger,
            failures=settings.breaker_failures,
            cooldown=settings.breaker_cooldown,
            clock=clock,
            while_down=f": fallback policy {settings.fallback!r} until it answers again",
        )
        # Every script goes through the batcher (one write for the calls of one turn of the loop);
        # settlements and lease releases are posted: off the request path, sent within 5 ms.
        self._batcher = Batcher(
            pipelined(client), timeout=settings.timeout * 4, errors=self._errors, on_posted=self._posted
        )
        self._shaper = SharedShaper(self._batcher, settings, shaping, self._guard, self._errors,
                                    lambda: self.replicas, clock)  # fmt: skip
        self._beat: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Begin the heartbeat (it also tells whether Redis answers at start-up)."""
        await self._beat_once()
        self._beat = asyncio.create_task(self._beat_forever())

    async def aclose(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
            await asyncio.gather(self._beat, return_exceptions=True)
        await self._batcher.drain()  # settlements not sent yet go now; each write has its timeout
        with contextlib.suppress(*self._errors):
            await self._client.aclose()

    # ------------------------------------------------------------------------------ the store

    async def admit(self, claim: Claim) -> Hold:
        caller = claim.caller
        if caller.rpm is None and caller.tpm is None and not claim.budgeted:
            return await self._local.admit(claim)
        if self._guard.available():
            now = self._wall_clock()
            request_id = f"{self._replica}{next(self._ids):x}"  # unique across replicas, no syscall (uuid4 has one)
            admission = Admission(caller, request_id, claim.prompt_tokens, claim.requested_tokens,
                                  claim.min_cost if claim.budgeted else None, self._periods_at(now), now)  # fmt: skip
            prefix = self._settings.key_prefix
            keys = limit_keys(prefix, caller.name, admission.periods)
            deadline = self._settings.reservation_deadline
            try:
                async with asyncio.timeout(self._settings.timeout):
                    reply = await self._batcher.call(self._admit, keys, admit_args(admission, deadline))
                if needs_seed(reply):  # window state or a budget counter missing: from the ledger, then again
                    await self._seed(admission, keys)
                    async with asyncio.timeout(self._settings.timeout):
                        args = admit_args(admission, deadline, seed_check=False)
                        reply = await self._batcher.call(self._admit, keys, args)
            except self._errors as exc:
                self._guard.failed(exc)
            else:
                self._guard.succeeded()
                ticket = admitted(admission, reply, prefix)  # raises RateLimited or BudgetExceeded
                return Hold(ticket, None, ticket.headers)
        return await self._fallback(claim)

    def settle(self, hold: Hold | None, tokens: int, cost: float | None) -> None:
        if hold is None:
            return
        ticket = hold.ticket
        if isinstance(ticket, SharedTicket):
            self._release(ticket, tokens, cost, cancel=False)
        else:
            self._local.settle(hold, tokens, cost)

    def record(self, record: UsageRecord) -> None:
        self._local.record(record)

    async def upstream_slot(self) -> Slot:
        return await self._shaper.slot()

    @property
    def records_dropped(self) -> int:
        return self._local.records_dropped

    @property
    def up(self) -> bool:
        """The last call to Redis succeeded."""
        return self._guard.up

    def shared_state(self) -> SharedState:
        return SharedState(self._guard.up, self.fallbacks, self.replicas)

    # ------------------------------------------------------------------------------ internals

    async def _seed(self, admission: Admission, keys: list[str]) -> None:
        """Start the key's window (``gateway.state.redis_seed``) and a period's shared spend from the
        ledger (the first replica to write either wins). Reading the ledger is not bounded by the
        Redis timeout (it has its own; ``LedgerUnavailable``)."""
        caller = admission.caller
        if (caller.rpm is not None or caller.tpm is not None) and self._recent_since is not None:
            recent = await self._recent_since(caller.name, admission.now - WINDOW)
            async with asyncio.timeout(self._settings.timeout):
                await self._batcher.call(self._seed_window, keys[:6],
                                         seed_args(recent, self._settings.reservation_deadline))  # fmt: skip
        budgets = (caller.budget_usd_daily, caller.budget_usd_monthly)
        for period, key, budget in zip(admission.periods, keys[6:], budgets, strict=True):
            if budget is None:
                continue
            spent = await self._spend_since(caller.name, period.start) if self._spend_since else 0.0
            async with asyncio.timeout(self._settings.timeout):
                await self._client_set_nx(key, micro(spent), budget_ttl(period, admission.now))

    def _periods_at(self, now: float) -> tuple[Period, Period]:
        """Today and this month, computed once a day (a calendar computation per request showed in profiles)."""
        cached = self._periods
        if cached is None or not cached[0].start <= now < cached[0].end:
            cached = self._periods = periods(now)
        return cached

    def _posted(self, failure: BaseException | None) -> None:
        """How a write with settlements or releases went (a lost one ends at its deadline)."""
        if failure is None:
            self._guard.succeeded()
        else:
            self._guard.failed(failure)

    async def _fallback(self, claim: Claim) -> Hold:
        self.fallbacks += 1
        policy = self._settings.fallback
        if policy == "closed":
            raise SharedStateUnavailable(
                "The gateway's shared rate-limit store is unavailable; retry shortly.",
                retry_after=self._settings.breaker_cooldown,
            )
        caller = _unlimited(claim.caller) if policy == "open" else _share(claim.caller, self.replicas)
        return await self._local.admit(dataclasses.replace(claim, caller=caller))

    def _release(self, ticket: SharedTicket, tokens: int, cost: float | None, *, cancel: bool) -> None:
        if ticket.settled:
            return
        ticket.settled = True
        # Off the request path, idempotent by request id; if it is lost (Redis down), the reservation
        # is released at its deadline and the tokens of this request are lost to the window.
        keys = [*limit_keys(self._settings.key_prefix, ticket.key)[:6], *ticket.budget_keys]
        args = settle_args(ticket, tokens, cost, self._settings.reservation_deadline, cancel=cancel)
        self._batcher.post(self._settle, keys, args)

    async def _client_set_nx(self, key: str, value: int, ttl: int) -> None:
        await self._client.set(key, value, ex=ttl, nx=True)

    async def _beat_once(self) -> None:
        key = f"{self._settings.key_prefix}:replicas"
        horizon = self._settings.heartbeat_interval * 3
        try:
            async with asyncio.timeout(self._settings.timeout * 4):
                count = await self._batcher.call(self._heartbeat, [key], [self._replica, horizon])
        except self._errors as exc:
            self._guard.failed(exc)
        else:
            self._guard.succeeded()
            self.replicas = max(1, int(count))

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.heartbeat_interval)
            await self._beat_once()


def open_shared_store(
    settings: SharedSettings,
    local: LocalStore,
    spend_since: SpendSince | None = None,
    *,
    recent_since: RecentSince | None = None,
    shaping: tuple[int, int, float] = (0, 0, 0.0),
    clock: Callable[[], float] = time.monotonic,
) -> SharedStore:
    """A ``SharedStore`` on its own redis-py client."""
    client, errors = redis_client(settings)
    return SharedStore(client, settings, local, errors=errors, shaping=shaping, spend_since=spend_since,
                       recent_since=recent_since, clock=clock)  # fmt: skip


def _unlimited(caller: Caller) -> Caller:
    return dataclasses.replace(caller, rpm=None, tpm=None)


def _share(caller: Caller, replicas: int) -> Caller:
    """This replica's share of the key's limits: the fleet stays at or under them."""
    rpm = None if caller.rpm is None else part(caller.rpm, replicas)
    tpm = None if caller.tpm is None else part(caller.tpm, replicas)
    return dataclasses.replace(caller, rpm=rpm, tpm=tpm)
