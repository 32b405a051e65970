"""What the fleet's flights share (``gateway.cache.remote_flights``): the Redis client, its errors
and breaker, the timeouts, the two scripts, the names of a flight's keys, and the tasks that run
off the request path."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Final

from gateway.state.guard import Guard

# A joiner's one XREAD blocks at most this share of the client's socket timeout (redis-py would
# otherwise take a long block for a dead connection); it blocks again until its own deadline.
BLOCK_SHARE: Final = 0.6
# How long the stream stays after its end: joiners still reading finish, late ones find it whole.
ENDED_TTL_S: Final = 60.0
MAX_READ: Final = 256  # stream entries per XREAD, or per pipelined write

# Join: only a flight that is led or streaming, not declined and not stopped at the size limit.
JOIN = """
if redis.call('EXISTS', KEYS[1]) == 0 and redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last > 0 and last[1][2][1] == 'end' and last[1][2][2] ~= 'ok' then return 0 end
redis.call('INCR', KEYS[3])
redis.call('PEXPIRE', KEYS[3], ARGV[1])
return 1
"""
# Stop mirroring unless a joiner reads (the answer passed max_entry_bytes, or the leader's own
# readers all left): the end marker ARGV[2] makes the flight unjoinable, in one step with the check.
UNLESS_READ = """
if tonumber(redis.call('GET', KEYS[2]) or '0') > 0 then return 1 end
redis.call('XADD', KEYS[1], '*', 'end', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[3])
return 0
"""


@dataclass(frozen=True, slots=True)
class FlightNames:
    """A flight's keys, under one hash tag (a cluster keeps them on one slot)."""

    stream: str
    lead: str
    readers: str

    @classmethod
    def of(cls, prefix: str, key: str) -> FlightNames:
        stream = f"{prefix}:{{{key}}}"
        return cls(stream, f"{stream}:lead", f"{stream}:readers")


@dataclass(slots=True)
class FleetLink:
    client: Any
    errors: tuple[type[Exception], ...]  # Redis failing (timeouts included)
    guard: Guard
    timeout: float  # one Redis call ([shared] timeout)
    idle_timeout: float  # the longest a joiner waits between two chunks
    capture_limit: int  # max_entry_bytes
    join: Any = None  # the registered scripts
    unless_read: Any = None
    pending: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.join = self.client.register_script(JOIN)
        self.unless_read = self.client.register_script(UNLESS_READ)

    @property
    def block(self) -> float:
        """The longest one XREAD blocks (the client's socket timeout is ``timeout * 4``)."""
        return max(0.001, self.timeout * 4 * BLOCK_SHARE)

    def spawn(self, work: Any) -> None:
        """Run ``work`` off the request path (awaited, within bounds, by ``aclose``)."""
        task = asyncio.get_running_loop().create_task(work)
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def aclose(self) -> None:
        if self.pending:
            await asyncio.wait(set(self.pending), timeout=self.timeout * 4)


def ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
