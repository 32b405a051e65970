"""Per-key rate limits and budgets shared by every replica, in Redis: the same sliding 60-second
windows and reservations as ``gateway.state.limits.RateLimiter`` and the same day and month
budgets as ``gateway.state.budgets.Budgets``, admitted and settled by server-side scripts.

One round trip admits (``ADMIT``: expire the windows, drop the reservations of replicas that died,
check RPM then TPM, count the request and reserve its estimate, all or nothing) and one settles
(``SETTLE``: idempotent by request id, replaces the reservations with the tokens used and the
cost). Money is integer micro-USD. Time is the
Redis server's (``TIME``), so replica clocks do not matter. Every reservation carries a deadline:
a replica that dies mid-request leaks nothing past it. Every key has a TTL, so idle keys vanish.

Keys, for a gateway key named K under the prefix P (one hash slot per key, ``{K}``):
``P:rl:{K}:req`` (ZSET, request id -> admitted at), ``P:rl:{K}:tok`` (ZSET, "id|tokens" ->
settled at), ``P:rl:{K}:res`` (HASH, request id -> reserved tokens), ``P:rl:{K}:dl`` (ZSET,
request id -> reservation deadline), ``P:rl:{K}:meta`` (HASH: tokens in the window, reserved,
the EWMA of a request's tokens), ``P:rl:{K}:done`` (ZSET, request ids settled in the window),
``P:rl:{K}:bg:daily:<start>`` and ``...:monthly:<start>`` (the spend of the period, micro-USD,
seeded from the ledger whenever it is missing, kept a day past the period). A missing counter (the
period's first request, or Redis restarted empty) is never taken for zero: ``ADMIT`` answers
"seed", the replica seeds it from the ledger (SET NX: the first replica wins) and asks again, and
``SETTLE`` leaves a missing counter alone (the ledger will count that request). A key with an RPM
or TPM whose window state is missing gets "seed" too: its window is seeded from the ledger
(``gateway.state.redis_seed``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

from gateway.auth.keys import Caller
from gateway.state.budgets import Period, budget_refusal
from gateway.state.limits import DEFAULT_COMPLETION_RESERVE, EWMA_WEIGHT, WINDOW, ratelimit_headers, refusal
from gateway.state.redis_client import text
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
  for i = 1, 6 do redis.call('PEXPIRE', KEYS[i], ttl) end
end
"""

# KEYS: the six limit keys, then the daily and monthly budget counters (micro-USD).
# ARGV: window, request id, rpm (0: none), tpm (0: none), prompt tokens, requested tokens,
# default completion reserve, reservation deadline (s), key ttl (ms), daily and monthly budget
# (micro-USD, 0: none), the request's minimum cost (micro-USD), the budget counters' ttl (s), and
# "1" to answer "seed" (refusing nothing, writing nothing) when a budget counter or the window state is missing.
# Returns {admitted (1/0), what refused ("requests", "tokens", "daily", "monthly", "seed" or ""), estimate,
#          requests in window, tokens in window, reserved, requests reset (s), tokens reset (s),
#          budget remaining (micro-USD)}; numbers as strings.
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
  return {0, 'requests', estimate, requests, tokens, reserved, tostring(requests_reset(requests)), '0', '0'}
end
if tpm > 0 and tokens + reserved >= tpm then
  local reset = tokens_reset(math.max(tpm - reserved, 1))
  return {0, 'tokens', estimate, requests, tokens, reserved, '0', tostring(reset), '0'}
end
local min_cost = tonumber(ARGV[12])
local budgets = {{7, tonumber(ARGV[10]), 'daily', 13}, {8, tonumber(ARGV[11]), 'monthly', 14}}
if ARGV[15] == '1' then
  -- no window state at all: idle past its ttl, or Redis restarted empty: the ledger seeds it first
  if (rpm > 0 or tpm > 0) and redis.call('EXISTS', KEYS[5]) == 0 then
    return {0, 'seed', estimate, requests, tokens, reserved, '0', '0', '0'}
  end
  for _, b in ipairs(budgets) do
    if b[2] > 0 and redis.call('EXISTS', KEYS[b[1]]) == 0 then
      return {0, 'seed', estimate, requests, tokens, reserved, '0', '0', '0'}
    end
  end
end
for _, b in ipairs(budgets) do
  if b[2] > 0 then
    local remaining = b[2] - tonumber(redis.call('GET', KEYS[b[1]]) or '0')
    if remaining <= 0 or min_cost > remaining then
      return {0, b[3], estimate, requests, tokens, reserved, '0', '0', tostring(remaining)}
    end
  end
end
for _, b in ipairs(budgets) do
  if b[2] > 0 then
    redis.call('INCRBY', KEYS[b[1]], min_cost)
    if redis.call('TTL', KEYS[b[1]]) < 0 then redis.call('EXPIRE', KEYS[b[1]], tonumber(ARGV[b[4]])) end
  end
end
redis.call('ZADD', KEYS[1], now, id)
redis.call('HSET', KEYS[3], id, estimate)
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[8]), id)
reserved = redis.call('HINCRBY', KEYS[5], 'reserved', estimate)
keep(tonumber(ARGV[9]))
local treset = 0
if tpm > 0 and tpm - reserved - tokens <= 0 then treset = tokens_reset(math.max(tpm - reserved, 1)) end
return {1, '', estimate, requests + 1, tokens, reserved, tostring(requests_reset(requests + 1)), tostring(treset), '0'}
"""
)

# KEYS: as ADMIT's. ARGV: window, request id, tokens used, key ttl (ms), "cancel" or "settle",
# ewma weight, and what to add to the budget counters the request reserved on (micro-USD: the real
# cost minus the reservation; minus the reservation to cancel), with 1/0 for each of them.
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
local spend = tonumber(ARGV[7])
if spend ~= 0 then
  -- a missing counter is seeded from the ledger later, which counts this request: never recreated here
  if ARGV[8] == '1' and redis.call('EXISTS', KEYS[7]) == 1 then redis.call('INCRBY', KEYS[7], spend) end
  if ARGV[9] == '1' and redis.call('EXISTS', KEYS[8]) == 1 then redis.call('INCRBY', KEYS[8], spend) end
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


MICRO = 1_000_000  # money in Redis: integer micro-USD, never floats


@dataclass(frozen=True, slots=True)
class Admission:
    """What one request asks of the shared store: its key, token bounds and budget periods."""

    caller: Caller
    request_id: str
    prompt_tokens: int
    requested_tokens: int
    min_cost: float | None
    periods: tuple[Period, Period]  # today and this month (UTC), for the budget counters
    now: float  # the replica's clock, for the budget refusal's reset time only


@dataclass(slots=True)
class SharedTicket:
    """One request admitted by the shared store: released by ``settle`` or ``cancel`` once."""

    key: str
    request_id: str
    reserved: int
    headers: list[Header]
    budget_keys: tuple[str, str]  # the daily and monthly counters it reserved on
    budgeted: tuple[bool, bool]
    reserved_micro: int  # the minimum cost it reserved on each budgeted counter
    settled: bool = False


def limit_keys(prefix: str, name: str, periods: tuple[Period, Period] | None = None) -> list[str]:
    """The keys of one gateway key's limits and budgets (one Redis Cluster hash slot): six for the
    windows, then the daily and monthly budget counters of ``periods`` (placeholders without)."""
    base = f"{prefix}:rl:{{{name}}}"
    daily, monthly = (f"{base}:bg:{p.kind}:{int(p.start)}" for p in periods) if periods else (
        f"{base}:bg:none", f"{base}:bg:none")  # fmt: skip
    return [f"{base}:req", f"{base}:tok", f"{base}:res", f"{base}:dl", f"{base}:meta", f"{base}:done",
            daily, monthly]  # fmt: skip


def admit_args(admission: Admission, deadline: float, *, seed_check: bool = True) -> list[Any]:
    """``seed_check``: answer "seed" when a budget counter is missing (else it counts from zero)."""
    caller = admission.caller
    ttl_ms = math.ceil((WINDOW + deadline) * 1000)
    daily, monthly = admission.periods
    return [WINDOW, admission.request_id, caller.rpm or 0, caller.tpm or 0, admission.prompt_tokens,
            admission.requested_tokens, DEFAULT_COMPLETION_RESERVE, deadline, ttl_ms,
            micro(caller.budget_usd_daily), micro(caller.budget_usd_monthly), micro(admission.min_cost),
            budget_ttl(daily, admission.now), budget_ttl(monthly, admission.now), int(seed_check)]  # fmt: skip


def settle_args(ticket: SharedTicket, tokens: int, cost: float | None, deadline: float, *, cancel: bool) -> list[Any]:
    """Release ``ticket``: the tokens used, and the cost replacing its reservation (unknown: the
    reservation stands; a cancel takes it back)."""
    ttl_ms = math.ceil((WINDOW + deadline) * 1000)
    unknown = cost is None and not cancel  # an unknown cost: the reservation stands
    spend = 0 if unknown else (0 if cancel else micro(cost)) - ticket.reserved_micro
    daily, monthly = ticket.budgeted
    return [WINDOW, ticket.request_id, max(0, tokens), ttl_ms, "cancel" if cancel else "settle", EWMA_WEIGHT,
            spend, int(daily), int(monthly)]  # fmt: skip


def micro(usd: float | None) -> int:
    return 0 if usd is None else max(0, round(usd * MICRO))


def budget_ttl(period: Period, now: float) -> int:
    """A budget counter outlives its period by a day (a settlement after midnight still finds it)."""
    return max(1, math.ceil(period.end - now + 86_400))


def needs_seed(reply: list[Any]) -> bool:
    """An ``ADMIT`` reply that asks for the window or budget counters to be seeded from the ledger first."""
    return text(reply[1]) == "seed"


def admitted(admission: Admission, reply: list[Any], prefix: str) -> SharedTicket:
    """The ticket of an ``ADMIT`` reply, or the refusal (429 RateLimited, 402 BudgetExceeded) with
    the same headers and message as the in-process limiter's and budgets'."""
    caller = admission.caller
    ok, what = int(reply[0]), text(reply[1])
    estimate, requests, tokens, reserved = (int(reply[i]) for i in range(2, 6))
    requests_reset, tokens_reset = float(text(reply[6])), float(text(reply[7]))
    if not ok:
        if what in ("daily", "monthly"):
            period = admission.periods[0 if what == "daily" else 1]
            budget = caller.budget_usd_daily if what == "daily" else caller.budget_usd_monthly
            assert budget is not None
            raise budget_refusal(caller, period, budget, float(text(reply[8])) / MICRO, admission.now)
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
    keys = limit_keys(prefix, caller.name, admission.periods)
    budgeted = (caller.budget_usd_daily is not None, caller.budget_usd_monthly is not None)
    reserved_micro = micro(admission.min_cost) if any(budgeted) else 0
    return SharedTicket(caller.name, admission.request_id, estimate, headers, (keys[6], keys[7]), budgeted,
                        reserved_micro)  # fmt: skip
