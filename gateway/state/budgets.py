"""Per-key spend limits in USD per UTC day and per UTC month.

Spend is kept in memory per (key, period), seeded from the usage ledger the first time a key is
seen in a period (so a restart does not forget today's spend). A request is refused (402
budget_exceeded) when the key's budget is used up, or when the request's certain minimum cost
(``pricing.min_cost_usd``) is more than what remains; while it runs, that minimum is reserved,
then replaced by the real cost when it settles.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from gateway.auth.keys import Caller
from gateway.errors import BudgetExceeded

SpendSince = Callable[[str, float], Awaitable[float]]  # (key name, since unix time) -> USD


@dataclass(frozen=True, slots=True)
class Period:
    kind: str  # "daily" | "monthly"
    start: float
    end: float


def periods(now: float) -> tuple[Period, Period]:
    today = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    month = today.replace(day=1)
    next_month = (month + timedelta(days=32)).replace(day=1)
    return (
        Period("daily", today.timestamp(), (today + timedelta(days=1)).timestamp()),
        Period("monthly", month.timestamp(), next_month.timestamp()),
    )


@dataclass(slots=True)
class Reservation:
    caller: Caller
    amount: float
    periods: tuple[Period, ...]


def budget_refusal(caller: Caller, period: Period, budget: float, remaining: float, now: float) -> BudgetExceeded:
    """The 402 of a key whose ``period`` budget cannot cover a request (``remaining`` USD left)."""
    reset = datetime.fromtimestamp(period.end, UTC).strftime("%Y-%m-%d %H:%M UTC")
    return BudgetExceeded(
        f"The {period.kind} budget of key {caller.name!r} (${budget:.2f}) "
        + ("is used up" if remaining <= 0 else f"cannot cover this request (${remaining:.4f} left)")
        + f"; it resets at {reset}.",
        retry_after=period.end - now,
    )


class Budgets:
    def __init__(self, spend_since: SpendSince | None, clock: Callable[[], float] = time.time) -> None:
        self._spend_since = spend_since
        self._clock = clock
        self._spent: dict[tuple[str, str, float], float] = {}

    async def admit(self, caller: Caller, min_cost: float | None) -> Reservation | None:
        """Refuse (402) when the budget cannot cover this request; else reserve its minimum cost."""
        limits = {"daily": caller.budget_usd_daily, "monthly": caller.budget_usd_monthly}
        if not any(limits.values()):
            return None
        now = self._clock()
        active = tuple(p for p in periods(now) if limits[p.kind] is not None)
        self._forget_old(now)
        for period in active:
            budget = limits[period.kind]
            assert budget is not None
            spent = await self._spent_in(caller.name, period)
            remaining = budget - spent
            if remaining <= 0 or (min_cost is not None and min_cost > remaining):
                raise budget_refusal(caller, period, budget, remaining, now)
        amount = min_cost or 0.0
        self._add(caller.name, active, amount)
        return Reservation(caller, amount, active)

    def settle(self, reservation: Reservation | None, cost: float | None) -> None:
        """Replace the reservation with the real cost (the reservation stands when the cost is unknown)."""
        if reservation is None:
            return
        if cost is not None:
            self._add(reservation.caller.name, reservation.periods, cost - reservation.amount)

    async def _spent_in(self, key: str, period: Period) -> float:
        slot = (key, period.kind, period.start)
        if slot not in self._spent:
            seeded = await self._spend_since(key, period.start) if self._spend_since else 0.0
            self._spent.setdefault(slot, seeded)
        return self._spent[slot]

    def _add(self, key: str, active: tuple[Period, ...], amount: float) -> None:
        for period in active:
            slot = (key, period.kind, period.start)
            self._spent[slot] = self._spent.get(slot, 0.0) + amount

    def _forget_old(self, now: float) -> None:
        starts = {p.start for p in periods(now)}
        for slot in [s for s in self._spent if s[2] not in starts]:
            del self._spent[slot]
