"""The state-store seam: every piece of state the request path shares across requests.

A request's accounting talks to a ``StateStore`` only, in four verbs:

- ``admit(claim)``: apply the key's rate limits (requests and tokens per minute) and budgets,
  all or nothing: a refusal (429 ``RateLimited``, 402 ``BudgetExceeded``) reserves nothing; an
  admission returns a ``Hold`` (the reservations, and the ``x-ratelimit-*`` headers to answer with);
- ``settle(hold, tokens, cost)``: replace the reservations with what the request really used,
  exactly once, on every exit path;
- ``record(record)``: keep the request's usage record (the ledger);
- ``upstream_slot()``: room for one more request to the upstream (the gateway's own shaping).

``LocalStore`` is the in-process backend (one process, one replica): the sliding-window limiter,
the budgets seeded from the ledger, the upstream shaper, and the ledger (SQLite, or PostgreSQL:
``gateway.usage.postgres``). The shared backend (``gateway.state.shared``: the counters in Redis)
implements the same protocol around it, so the request path does not change when it is added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gateway.auth.keys import Caller
from gateway.state.budgets import Budgets, Reservation
from gateway.state.limits import RateLimiter, Ticket
from gateway.state.redis_limits import SharedTicket
from gateway.state.shaping import Slot, UpstreamShaper
from gateway.types import Header
from gateway.usage.schema import UsageRecord


class UsageLedger(Protocol):
    """Where ``record`` keeps usage: the SQLite ledger, or the PostgreSQL ledger of record."""

    def record(self, r: UsageRecord) -> None: ...

    @property
    def dropped(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Claim:
    """What a request asks of its key's limits before it is forwarded."""

    caller: Caller
    prompt_tokens: int  # a lower bound of the prompt's tokens (0 when the key has no token limit)
    requested_tokens: int  # max_tokens / max_completion_tokens, 0 when not given
    min_cost: float | None  # a cost the request certainly reaches if served (None: unknown)
    # Whether the key's budgets apply (a key with no budget skips the lookups).
    budgeted: bool


@dataclass(frozen=True, slots=True)
class SharedState:
    """A shared backend's health, for the metrics: whether it answers, how many admissions its
    fallback policy decided, how many replicas it sees."""

    up: bool
    fallbacks: int
    replicas: int


@dataclass(slots=True)
class Hold:
    """What ``admit`` reserved for one request; ``settle`` releases it once."""

    ticket: Ticket | SharedTicket | None
    reservation: Reservation | None
    headers: list[Header]

    @property
    def reserved_tokens(self) -> int:
        return self.ticket.reserved if self.ticket is not None else 0


class StateStore(Protocol):
    async def admit(self, claim: Claim) -> Hold: ...

    def settle(self, hold: Hold | None, tokens: int, cost: float | None) -> None: ...

    def record(self, record: UsageRecord) -> None: ...

    async def upstream_slot(self) -> Slot: ...

    @property
    def records_dropped(self) -> int:
        """Usage records that could not be kept (exported as ``gateway_ledger_dropped_total``)."""
        ...

    def shared_state(self) -> SharedState | None:
        """A shared backend's health (None: in-process, nothing shared)."""
        ...


class LocalStore:
    """The in-process backend: this process's counters and the ledger (``ledger`` None: off)."""

    def __init__(
        self, limiter: RateLimiter, budgets: Budgets, shaper: UpstreamShaper, ledger: UsageLedger | None
    ) -> None:
        self._limiter = limiter
        self._budgets = budgets
        self._shaper = shaper
        self._ledger = ledger

    async def admit(self, claim: Claim) -> Hold:
        ticket = self._limiter.admit(claim.caller, claim.prompt_tokens, claim.requested_tokens)
        reservation = None
        if claim.budgeted:
            try:
                reservation = await self._budgets.admit(claim.caller, claim.min_cost)
            except BaseException:
                self._limiter.cancel(ticket)  # all or nothing: a refusal uses nothing
                raise
        return Hold(ticket, reservation, ticket.headers if ticket is not None else [])

    def settle(self, hold: Hold | None, tokens: int, cost: float | None) -> None:
        if hold is None:
            return
        ticket = hold.ticket
        self._limiter.settle(ticket if isinstance(ticket, Ticket) else None, tokens)
        self._budgets.settle(hold.reservation, cost)

    def record(self, record: UsageRecord) -> None:
        if self._ledger is not None:
            self._ledger.record(record)

    async def upstream_slot(self) -> Slot:
        return await self._shaper.acquire()

    @property
    def records_dropped(self) -> int:
        return 0 if self._ledger is None else self._ledger.dropped

    def shared_state(self) -> SharedState | None:
        return None
