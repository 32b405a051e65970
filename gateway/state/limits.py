"""Per-key rate limits: requests and tokens per minute, over a sliding 60-second window.

Requests are counted when admitted, so a key never exceeds its RPM. Tokens are only known once the
upstream reports usage, so each admitted request reserves an estimate (the prompt's lower bound
plus max_tokens, or the key's recent average when larger) until it settles with the real count: a
key exceeds its TPM by at most the error of the estimates in flight.

The answers carry OpenAI's headers: x-ratelimit-limit-*, x-ratelimit-remaining-*,
x-ratelimit-reset-* (a duration such as "1.5s" or "2m3s": how long until the window has room for
another request, computed with this request counted) for requests and tokens, and Retry-After on a
429. State is in memory, per process (per replica).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.auth.keys import Caller
from gateway.errors import RateLimited
from gateway.types import Header

WINDOW = 60.0
# Tokens reserved for the completion of a request without max_tokens, before the key has history.
DEFAULT_COMPLETION_RESERVE = 256
EWMA_WEIGHT = 0.2


class SlidingWindow:
    """Amounts added over the last ``span`` seconds, with a running total."""

    __slots__ = ("_entries", "_span", "total")

    def __init__(self, span: float = WINDOW) -> None:
        self._span = span
        self._entries: deque[tuple[float, float]] = deque()
        self.total = 0.0

    def expire(self, now: float) -> None:
        entries = self._entries
        while entries and entries[0][0] <= now - self._span:
            self.total -= entries.popleft()[1]

    def add(self, now: float, amount: float) -> None:
        if amount > 0:
            self._entries.append((now, amount))
            self.total += amount

    def remove(self, ts: float, amount: float) -> None:
        """Take back ``amount`` added at ``ts`` (nothing if it has left the window)."""
        try:
            self._entries.remove((ts, amount))
        except ValueError:
            return
        self.total -= amount

    def seconds_until_below(self, now: float, limit: float) -> float:
        """How long until the total drops below ``limit`` (0 if it already is)."""
        total = self.total
        for ts, amount in self._entries:
            if total < limit:
                break
            total -= amount
            wait = ts + self._span - now
            if total < limit:
                return max(wait, 0.0)
        return 0.0


@dataclass(slots=True)
class _KeyState:
    requests: SlidingWindow = field(default_factory=SlidingWindow)
    tokens: SlidingWindow = field(default_factory=SlidingWindow)
    reserved: int = 0
    average_tokens: float = 0.0


@dataclass(slots=True)
class Ticket:
    """One admitted request's reservation, settled when its usage is known."""

    key: str
    reserved: int
    headers: list[Header]
    admitted_at: float = 0.0  # the limiter's clock when the request was counted
    settled: bool = False


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._state: dict[str, _KeyState] = {}

    def admit(self, caller: Caller, prompt_tokens: int, requested_tokens: int) -> Ticket | None:
        """Count the request, or raise RateLimited (429). None when the key has no limits.

        ``prompt_tokens`` is a lower bound of the prompt, ``requested_tokens`` its max_tokens (0 if
        none). Without max_tokens the reservation is the key's average request, or before there is
        one, the prompt plus DEFAULT_COMPLETION_RESERVE.
        """
        if caller.rpm is None and caller.tpm is None:
            return None
        now = self._clock()
        state = self._state.setdefault(caller.name, _KeyState())
        state.requests.expire(now)
        state.tokens.expire(now)
        if requested_tokens > 0:
            estimate = prompt_tokens + requested_tokens
        elif state.average_tokens > 0:
            estimate = max(prompt_tokens, math.ceil(state.average_tokens))
        else:
            estimate = prompt_tokens + DEFAULT_COMPLETION_RESERVE
        if caller.rpm is not None and state.requests.total + 1 > caller.rpm:
            reset = state.requests.seconds_until_below(now, caller.rpm)
            raise refusal(caller, "requests", caller.rpm, reset, ratelimit_headers("requests", caller.rpm, 0, reset))
        if caller.tpm is not None and state.tokens.total + state.reserved >= caller.tpm:
            reset = state.tokens.seconds_until_below(now, max(caller.tpm - state.reserved, 1))
            headers = (
                ratelimit_headers("requests", caller.rpm, caller.rpm - state.requests.total, 0.0) if caller.rpm else []
            )
            headers += ratelimit_headers("tokens", caller.tpm, 0, reset)
            raise refusal(caller, "tokens", caller.tpm, max(reset, 1.0), headers)
        # Admitted: count it first, so that the headers describe the window with this request in it.
        state.requests.add(now, 1)
        state.reserved += estimate
        headers = []
        if caller.rpm is not None:
            remaining = caller.rpm - state.requests.total
            reset = state.requests.seconds_until_below(now, caller.rpm)
            headers += ratelimit_headers("requests", caller.rpm, remaining, reset)
        if caller.tpm is not None:
            room = caller.tpm - state.reserved
            remaining = room - state.tokens.total
            reset = state.tokens.seconds_until_below(now, max(room, 1)) if remaining <= 0 else 0.0
            headers += ratelimit_headers("tokens", caller.tpm, remaining, reset)
        return Ticket(caller.name, estimate, headers, now)

    def cancel(self, ticket: Ticket | None) -> None:
        """Undo an admission whose request was refused by a later check (a budget): neither the
        request nor its reservation counts, so a refusal uses nothing of the key's limits."""
        if ticket is None or ticket.settled:
            return
        ticket.settled = True
        state = self._state.get(ticket.key)
        if state is not None:
            state.reserved -= ticket.reserved
            state.requests.remove(ticket.admitted_at, 1)

    def settle(self, ticket: Ticket | None, tokens: int) -> None:
        """Replace the reservation with the tokens really used (0 when unknown or failed)."""
        if ticket is None or ticket.settled:
            return
        ticket.settled = True
        state = self._state.get(ticket.key)
        if state is None:
            return
        state.reserved -= ticket.reserved
        state.tokens.add(self._clock(), tokens)
        if tokens > 0:
            if state.average_tokens == 0:
                state.average_tokens = float(tokens)
            else:
                state.average_tokens += EWMA_WEIGHT * (tokens - state.average_tokens)


def refusal(caller: Caller, what: str, limit: int, reset: float, headers: list[Header]) -> RateLimited:
    """The 429 of a key over its ``limit`` of ``what`` per minute, ``reset`` seconds from room."""
    return RateLimited(
        f"Rate limit reached for key {caller.name!r}: {limit} {what} per minute. Retry in {duration(reset)}.",
        retry_after=reset,
        headers=headers,
    )


def ratelimit_headers(what: str, limit: int, remaining: float, reset: float) -> list[Header]:
    return [
        (f"x-ratelimit-limit-{what}".encode(), str(limit).encode()),
        (f"x-ratelimit-remaining-{what}".encode(), str(max(0, int(remaining))).encode()),
        (f"x-ratelimit-reset-{what}".encode(), duration(reset).encode()),
    ]


def duration(seconds: float) -> str:
    """OpenAI's reset format: "0s", "1.5s", "2m3s"."""
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{round(rest):d}s"
