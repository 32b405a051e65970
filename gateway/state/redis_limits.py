"""Per-key rate limits shared by every replica, in Redis: the same sliding 60-second windows and
reservations as ``gateway.state.limits.RateLimiter``, admitted and settled by server-side scripts.

One round trip admits (``ADMIT``: expire the windows, drop the reservations of replicas that died,
check RPM then TPM, count the request and reserve its estimate, all or nothing) and one settles
(``SETTLE``: idempotent by request id, replaces the reservation with the tokens used). Time is the
Redis server's (``TIME``), so replica clocks do not matter. Every reservation carries a deadline:
a replica that dies mid-request leaks nothing past it. Every key has a TTL, so idle keys vanish.

Keys, for a gateway key named K under the prefix P (one hash slot per key, ``{K}``):
``P:rl:{K}:req`` (ZSET, request id -> admitted at), ``P:rl:{K}:tok`` (ZSET, "id|tokens" ->
settled at), ``P:rl:{K}:res`` (HASH, request id -> reserved tokens), ``P:rl:{K}:dl`` (ZSET,
request id -> reservation deadline), ``P:rl:{K}:meta`` (HASH: tokens in the window, reserved,
the EWMA of a request's tokens), ``P:rl:{K}:done`` (ZSET, request ids settled in the window).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

from gateway.auth.keys import Caller
from gateway.state.limits import DEFAULT_COMPLETION_RESERVE, EWMA_WEIGHT, WINDOW, ratelimit_headers, refusal
from gateway.types import Header

# Lua: the window's expiry and the reservations' deadlines, shared by both scripts.
_SWEEP: Final = """
local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) + tonumber(now_t[2]) / 1000000
local window = tonumber(ARGV[1])
local function sweep()
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - window)
  if #old > 0 then
    local dropped = 0
    for _, member in ipairs(old) do dropped = dropped + tonumber(string.match(member, '|(%d+)$')) end
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
    redis.call('HINCRBY', KEYS[5], 'tokens', -dropped)
  end
  local dead = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)
  if #dead > 0 then
    local freed = 0
    for _, id in ipairs(dead) do
      local reserved = redis.call('HGET', KEYS[3], id)
      if reserved then
        freed = freed + tonumber(reserved)
        redis.call('HDEL', KEYS[3], id)
      end
    end
    redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
    redis.call('HINCRBY', KEYS[5], 'reserved', -freed)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now - window)
end
local function keep(ttl)
  for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ttl) end
end
"""

# ARGV: window, request id, rpm (0: none), tpm (0: none), prompt tokens, requested tokens,
# default completion reserve, reservation deadline (s), key ttl (ms).
# Returns {admitted (1/0), what refused ("requests"/"tokens"/""), estimate, requests in window,
#          tokens in window, reserved, requests reset (s), tokens reset (s)}; numbers as strings.
ADMIT: Final = (
    _SWEEP
    + """
sweep()
local id, rpm, tpm = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local prompt, requested = tonumber(ARGV[5]), tonumber(ARGV[6])
local requests = redis.call('ZCARD', KEYS[1])
local meta = redis.call('HMGET', KEYS[5], 'tokens', 'reserved', 'avg')
local tokens, reserved, avg = tonumber(meta[1] or '0'), tonumber(meta[2] or '0'), tonumber(meta[3] or '0')
local estimate
if requested > 0 then estimate = prompt + requested
elseif avg > 0 then estimate = math.max(prompt, math.ceil(avg))
else estimate = prompt + tonumber(ARGV[7]) end

local function requests_reset(count)
  -- seconds until fewer than rpm requests are in the window (0 if there already are)
  if rpm <= 0 or count < rpm then return 0 end
  local entry = redis.call('ZRANGE', KEYS[1], count - rpm, count - rpm, 'WITHSCORES')
  if #entry == 0 then return 0 end
  return math.max(tonumber(entry[2]) + window - now, 0)
end
local function tokens_reset(limit)
  -- seconds until the tokens in the window drop below limit (0 if they already are)
  local total = tokens
  if total < limit then return 0 end
  local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  for i = 1, #entries, 2 do
    total = total - tonumber(string.match(entries[i], '|(%d+)$'))
    if total < limit then return math.max(tonumber(entries[i + 1]) + window - now, 0) end
  end
  return 0
end

if rpm > 0 and requests + 1 > rpm then
  return {0, 'requests', estimate, requests, tokens, reserved, tostring(requests_reset(requests)), '0'}
end
if tpm > 0 and tokens + reserved >= tpm then
  return {0, 'tokens', estimate, requests, tokens, reserved, '0', tostring(tokens_reset(math.max(tpm - reserved, 1)))}
end
redis.call('ZADD', KEYS[1], now, id)
redis.call('HSET', KEYS[3], id, estimate)
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[8]), id)
reserved = redis.call('HINCRBY', KEYS[5], 'reserved', estimate)
keep(tonumber(ARGV[9]))
local treset = 0
if tpm > 0 and tpm - reserved - tokens <= 0 then treset = tokens_reset(math.max(tpm - reserved, 1)) end
return {1, '', estimate, requests + 1, tokens, reserved, tostring(requests_reset(requests + 1)), tostring(treset)}
"""
)

# ARGV: window, request id, tokens used, key ttl (ms), "cancel" or "settle", ewma weight.
# Returns 1 when this call settled the request, 0 when it had been settled already (idempotent).
SETTLE: Final = (
    _SWEEP
    + """
sweep()
local id, used = ARGV[2], tonumber(ARGV[3])
if redis.call('ZSCORE', KEYS[6], id) then return 0 end  -- settled already: once only
local reserved = redis.call('HGET', KEYS[3], id)
if reserved then  -- else its deadline passed: the tokens still count
  redis.call('HDEL', KEYS[3], id)
  redis.call('ZREM', KEYS[4], id)
  redis.call('HINCRBY', KEYS[5], 'reserved', -tonumber(reserved))
end
if ARGV[5] == 'cancel' then
  redis.call('ZREM', KEYS[1], id)
elseif used > 0 then
  redis.call('ZADD', KEYS[2], now, id .. '|' .. used)
  redis.call('HINCRBY', KEYS[5], 'tokens', used)
  local avg = tonumber(redis.call('HGET', KEYS[5], 'avg') or '0')
  if avg == 0 then avg = used else avg = avg + tonumber(ARGV[6]) * (used - avg) end
  redis.call('HSET', KEYS[5], 'avg', tostring(avg))
end
redis.call('ZADD', KEYS[6], now, id)
keep(tonumber(ARGV[4]))
return 1
"""
)


@dataclass(slots=True)
class SharedTicket:
    """One request admitted by the shared limiter: released by ``settle`` or ``cancel`` once."""

    key: str
    request_id: str
    reserved: int
    headers: list[Header]
    settled: bool = False


def limit_keys(prefix: str, name: str) -> list[str]:
    """The six keys of one gateway key's limits (one Redis Cluster hash slot)."""
    base = f"{prefix}:rl:{{{name}}}"
    return [f"{base}:req", f"{base}:tok", f"{base}:res", f"{base}:dl", f"{base}:meta", f"{base}:done"]


def admit_args(
    request_id: str, caller: Caller, prompt_tokens: int, requested_tokens: int, deadline: float
) -> list[Any]:
    ttl_ms = math.ceil((WINDOW + deadline) * 1000)
    return [WINDOW, request_id, caller.rpm or 0, caller.tpm or 0, prompt_tokens, requested_tokens,
            DEFAULT_COMPLETION_RESERVE, deadline, ttl_ms]  # fmt: skip


def settle_args(request_id: str, tokens: int, deadline: float, *, cancel: bool) -> list[Any]:
    ttl_ms = math.ceil((WINDOW + deadline) * 1000)
    return [WINDOW, request_id, max(0, tokens), ttl_ms, "cancel" if cancel else "settle", EWMA_WEIGHT]


def admitted(caller: Caller, request_id: str, reply: list[Any]) -> SharedTicket:
    """The ticket of an ``ADMIT`` reply, or RateLimited (429) with the same headers and message as
    the in-process limiter's."""
    ok, what = int(reply[0]), _text(reply[1])
    estimate, requests, tokens, reserved = (int(reply[i]) for i in range(2, 6))
    requests_reset, tokens_reset = float(_text(reply[6])), float(_text(reply[7]))
    if not ok:
        if what == "requests":
            assert caller.rpm is not None
            raise refusal(caller, "requests", caller.rpm, requests_reset,
                           ratelimit_headers("requests", caller.rpm, 0, requests_reset))  # fmt: skip
        assert caller.tpm is not None
        refused = ratelimit_headers("requests", caller.rpm, caller.rpm - requests, 0.0) if caller.rpm else []
        refused += ratelimit_headers("tokens", caller.tpm, 0, tokens_reset)
        raise refusal(caller, "tokens", caller.tpm, max(tokens_reset, 1.0), refused)
    headers: list[Header] = []
    if caller.rpm is not None:
        headers += ratelimit_headers("requests", caller.rpm, caller.rpm - requests, requests_reset)
    if caller.tpm is not None:
        room = caller.tpm - reserved
        headers += ratelimit_headers("tokens", caller.tpm, room - tokens, tokens_reset)
    return SharedTicket(caller.name, request_id, estimate, headers)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
