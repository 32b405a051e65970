"""Seeding a key's shared rate-limit window from the ledger (``gateway.state.redis_limits``).

A key's window state in Redis (its requests and tokens of the last 60 s, ``P:rl:{K}:*``) vanishes
when the key was idle past the keys' TTL, or when Redis restarted empty. In the second case the
requests of the last minute are lost from Redis but not from the ledger: ``ADMIT`` answers "seed"
when the state is missing, the replica reads the key's requests of the last window from the ledger
(``recent_requests``: rows and records still queued) and ``SEED`` writes them into the window as
if they had been admitted then, unless another replica did first (the state exists again). Then
the request is admitted as usual: a restart does not give a key a fresh minute.

What the ledger has not seen yet (other replicas' records still queued: up to a flush interval,
or the stream's lag) is not seeded: the window may admit that many more, once.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from gateway.state.limits import WINDOW

# (key name, since unix time) -> the key's requests since then the rate limiter counted, (time, tokens)
RecentSince = Callable[[str, float], Awaitable[list[tuple[float, int]]]]

# KEYS: ADMIT's six limit keys. ARGV: key ttl (ms), then (time, tokens) pairs.
# Returns 1 when seeded, 0 when the window state exists already (another replica seeded it).
SEED: Final = """
if redis.call('EXISTS', KEYS[5]) == 1 then return 0 end
local total = 0
for i = 2, #ARGV, 2 do
  local at, used = ARGV[i], tonumber(ARGV[i + 1])
  local id = 'seed:' .. (i / 2)
  redis.call('ZADD', KEYS[1], at, id)
  if used > 0 then
    redis.call('ZADD', KEYS[2], at, id .. '|' .. used)
    total = total + used
  end
end
redis.call('HSET', KEYS[5], 'tokens', total, 'reserved', 0)
for i = 1, 6 do redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
return 1
"""


def seed_args(recent: Sequence[tuple[float, int]], deadline: float) -> list[Any]:
    """``SEED``'s arguments: the keys' ttl as ``ADMIT`` sets it, then each request's time and tokens."""
    args: list[Any] = [math.ceil((WINDOW + deadline) * 1000)]
    for at, tokens in recent:
        args += [repr(at), max(0, int(tokens))]
    return args
