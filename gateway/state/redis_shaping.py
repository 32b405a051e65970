"""The gateway's own upstream shaping, shared by every replica in Redis: at most ``[upstream]
concurrency`` requests with the upstream at once and ``rpm`` per minute, fleet-wide.

``ACQUIRE`` (one script, Redis's clock): drop the leases past their deadline (a replica that died
with requests in flight) and the window's old entries, then, all or nothing, count the request in
the sliding minute and take a lease; else answer how long to wait. ``RELEASE`` gives a lease back
(idempotent). The caller waits and retries within ``queue_timeout``, as the in-process shaper does.

Keys under the prefix P: ``P:up:leases`` (ZSET, lease id -> deadline), ``P:up:rpm`` (ZSET, lease
id -> when counted).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from functools import partial
from typing import Final

from gateway.config import SharedSettings
from gateway.state.guard import Guard
from gateway.state.limits import WINDOW
from gateway.state.redis_batch import Batcher, LuaScript
from gateway.state.redis_client import SharedStateUnavailable, part, text
from gateway.state.shaping import Slot, UpstreamCapacity, UpstreamShaper

# ARGV: lease id, concurrency (0: none), rpm (0: none), lease deadline (s), window (s).
# Returns {1} when acquired, else {0, "concurrency" or "rpm", seconds to wait (string)}.
ACQUIRE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local id, cap, rpm = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local deadline, window = tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
if rpm > 0 and redis.call('ZCARD', KEYS[2]) >= rpm then
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  return {0, 'rpm', tostring(math.max(tonumber(oldest[2]) + window - now, 0.001))}
end
if cap > 0 then
  if redis.call('ZCARD', KEYS[1]) >= cap then return {0, 'concurrency', '0.01'} end
  redis.call('ZADD', KEYS[1], now + deadline, id)
  redis.call('PEXPIRE', KEYS[1], math.ceil((deadline + window) * 1000))
end
if rpm > 0 then
  redis.call('ZADD', KEYS[2], now, id)
  redis.call('PEXPIRE', KEYS[2], math.ceil(window * 1000))
end
return {1}
"""

# ARGV: lease id. Returns 1 when the lease was held.
RELEASE: Final = """
return redis.call('ZREM', KEYS[1], ARGV[1])
"""


def shaping_keys(prefix: str) -> list[str]:
    # One hash slot for both (Redis Cluster): the braces name it.
    return [f"{prefix}:up:{{shaping}}:leases", f"{prefix}:up:{{shaping}}:rpm"]


class SharedShaper:
    """``upstream_slot`` of the shared store: a lease in Redis, or the fallback policy's answer."""

    def __init__(
        self,
        batcher: Batcher,
        settings: SharedSettings,
        shaping: tuple[int, int, float],
        guard: Guard,
        errors: tuple[type[Exception], ...],
        replicas: Callable[[], int],
        clock: Callable[[], float],
    ) -> None:
        """``shaping``: ``[upstream]`` concurrency, rpm and queue_timeout, fleet-wide."""
        self._batcher = batcher
        self._acquire = LuaScript.of(ACQUIRE)
        self._release = LuaScript.of(RELEASE)
        self._settings = settings
        self._shaping = shaping
        self._guard = guard
        self._errors = errors
        self._replicas = replicas
        self._clock = clock
        self._fallback_shaper: tuple[int, UpstreamShaper] | None = None

    async def slot(self) -> Slot:
        """Room under the fleet-wide caps: a lease held until the answer is closed, waiting at most
        ``queue_timeout`` (429 ``upstream_capacity``)."""
        concurrency, rpm, queue_timeout = self._shaping
        if concurrency <= 0 and rpm <= 0:
            return Slot(None)
        deadline = self._clock() + queue_timeout
        lease = uuid.uuid4().hex
        args = [lease, concurrency, rpm, self._settings.reservation_deadline, WINDOW]
        keys = shaping_keys(self._settings.key_prefix)
        for _ in range(10_000):  # bounded: each turn waits at least 1 ms, within queue_timeout
            if not self._guard.available():
                return await self._fallback_slot()
            try:
                async with asyncio.timeout(self._settings.timeout):
                    reply = await self._batcher.call(self._acquire, keys, args)
            except self._errors as exc:
                self._guard.failed(exc)
                return await self._fallback_slot()
            self._guard.succeeded()
            if int(reply[0]) == 1:
                return Slot(partial(self._give_back, lease)) if concurrency > 0 else Slot(None)
            reason, wait = text(reply[1]), float(text(reply[2]))
            if self._clock() + wait > deadline:
                raise _capacity(reason, rpm, wait)
            await asyncio.sleep(wait)
        raise _capacity("concurrency", rpm, 1.0)  # pragma: no cover

    async def _fallback_slot(self) -> Slot:
        policy = self._settings.fallback
        if policy == "open":
            return Slot(None)
        if policy == "closed":
            raise SharedStateUnavailable(
                "The gateway's shared state store is unavailable; retry shortly.",
                retry_after=self._settings.breaker_cooldown,
            )
        concurrency, rpm, queue_timeout = self._shaping
        replicas = self._replicas()
        if self._fallback_shaper is None or self._fallback_shaper[0] != replicas:
            share = UpstreamShaper(part(concurrency, replicas), part(rpm, replicas), queue_timeout)
            self._fallback_shaper = (replicas, share)
        return await self._fallback_shaper[1].acquire()

    def _give_back(self, lease: str) -> None:
        """Posted, off the request path (lost: the lease ends at its deadline)."""
        self._batcher.post(self._release, shaping_keys(self._settings.key_prefix), [lease])


def _capacity(reason: str, rpm: int, wait: float) -> UpstreamCapacity:
    if reason == "rpm":
        return UpstreamCapacity(
            f"The gateway's requests to the upstream are at their cap of {rpm} per minute.", retry_after=wait
        )
    return UpstreamCapacity(
        "The gateway's requests to the upstream are at their concurrency cap; retry shortly.", retry_after=1
    )
