"""Per-key budgets on a fake wall clock: UTC day and month boundaries, reservations, ledger seeding."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from gateway.auth.keys import Caller
from gateway.errors import BudgetExceeded
from gateway.state.budgets import Budgets, Period, Reservation, periods
from tests.helpers.clocks import FakeClock


class FakeLedger:
    """``spend_since``: the ledger's spend per (key, since), recording each question."""

    def __init__(self, spend: dict[tuple[str, float], float] | None = None) -> None:
        self.spend = spend or {}
        self.asked: list[tuple[str, float]] = []
        self.gate: asyncio.Event | None = None  # when set, answers wait for it

    async def __call__(self, key: str, since: float) -> float:
        self.asked.append((key, since))
        if self.gate is not None:
            await self.gate.wait()
        return self.spend.get((key, since), 0.0)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC).timestamp()


def caller(daily: float | None = None, monthly: float | None = None, name: str = "alice") -> Caller:
    return Caller(
        name=name,
        team=None,
        models=None,
        categories=None,
        rpm=None,
        tpm=None,
        budget_usd_daily=daily,
        budget_usd_monthly=monthly,
        admin=False,
    )


async def admitted(budgets: Budgets, key: Caller, min_cost: float | None) -> Reservation:
    reservation = await budgets.admit(key, min_cost)
    assert reservation is not None
    return reservation


async def refused(budgets: Budgets, key: Caller, min_cost: float | None) -> BudgetExceeded:
    with pytest.raises(BudgetExceeded) as refusal:
        await budgets.admit(key, min_cost)
    return refusal.value


@pytest.mark.parametrize(
    ("now", "day", "month"),
    [
        (utc(2025, 3, 14, 23, 59, 59, micro=999_999), (utc(2025, 3, 14), utc(2025, 3, 15)), (3, 4)),
        (utc(2025, 3, 15), (utc(2025, 3, 15), utc(2025, 3, 16)), (3, 4)),
        (utc(2025, 1, 31, 23, 59, 59, micro=999_999), (utc(2025, 1, 31), utc(2025, 2, 1)), (1, 2)),
        (utc(2025, 2, 1), (utc(2025, 2, 1), utc(2025, 2, 2)), (2, 3)),
        (utc(2024, 2, 29, 12), (utc(2024, 2, 29), utc(2024, 3, 1)), (2, 3)),  # leap day
        (utc(2025, 12, 31, 23, 59, 59), (utc(2025, 12, 31), utc(2026, 1, 1)), (12, 13)),
    ],
)
def test_periods_are_utc_days_and_months(now: float, day: tuple[float, float], month: tuple[int, int]) -> None:
    year = datetime.fromtimestamp(now, UTC).year
    month_start = utc(year, month[0], 1)
    month_end = utc(year + 1, 1, 1) if month[1] == 13 else utc(year, month[1], 1)
    assert periods(now) == (Period("daily", *day), Period("monthly", month_start, month_end))


async def test_no_budget_no_reservation() -> None:
    budgets = Budgets(FakeLedger(), clock=FakeClock(utc(2025, 3, 14)))
    assert await budgets.admit(caller(), 1000.0) is None


async def test_the_minimum_cost_is_reserved_then_replaced_by_the_real_cost() -> None:
    budgets = Budgets(FakeLedger(), clock=FakeClock(utc(2025, 3, 14, 12)))
    key = caller(daily=1.0)
    first = await admitted(budgets, key, 0.25)
    assert first.amount == 0.25
    error = await refused(budgets, key, 0.875)  # 0.75 left while the first runs
    assert (error.status, error.code) == (402, "budget_exceeded")
    assert "cannot cover this request ($0.7500 left)" in error.message
    budgets.settle(first, 0.125)  # it cost less than its minimum estimate
    second = await admitted(budgets, key, 0.875)  # exactly what remains: admitted
    budgets.settle(second, None)  # cost unknown: the reservation stands
    error = await refused(budgets, key, None)
    assert "is used up" in error.message
    budgets.settle(None, 5.0)  # no budget for that request: nothing to do


async def test_a_request_without_minimum_cost_reserves_nothing() -> None:
    budgets = Budgets(FakeLedger(), clock=FakeClock(utc(2025, 3, 14, 12)))
    key = caller(daily=1.0)
    for _ in range(3):
        assert (await admitted(budgets, key, None)).amount == 0.0
    budgets.settle(await admitted(budgets, key, 0.0), 0.5)
    assert (await admitted(budgets, key, 0.5)).amount == 0.5


async def test_the_day_turns_at_midnight_utc() -> None:
    clock = FakeClock(utc(2025, 3, 14, 23, 59, 59))
    budgets = Budgets(FakeLedger(), clock=clock)
    key = caller(daily=1.0)
    budgets.settle(await admitted(budgets, key, 0.5), 0.9375)
    clock.now = utc(2025, 3, 14, 23, 59, 59, micro=750_000)  # a quarter of a second before midnight
    error = await refused(budgets, key, 0.125)
    assert error.retry_after == pytest.approx(0.25)
    assert "it resets at 2025-03-15 00:00 UTC" in error.message
    assert error.headers()[-1] == (b"retry-after", b"1")
    clock.now = utc(2025, 3, 15)  # midnight UTC: a new day, a new budget
    assert (await admitted(budgets, key, 0.875)).periods == (Period("daily", utc(2025, 3, 15), utc(2025, 3, 16)),)


async def test_the_month_turns_at_its_last_midnight_utc() -> None:
    clock = FakeClock(utc(2025, 1, 31, 23, 59))
    budgets = Budgets(FakeLedger(), clock=clock)
    key = caller(daily=100.0, monthly=10.0)
    budgets.settle(await admitted(budgets, key, None), 10.0)
    error = await refused(budgets, key, None)
    assert "monthly budget" in error.message
    assert "it resets at 2025-02-01 00:00 UTC" in error.message
    assert error.retry_after == 60.0
    clock.now = utc(2025, 2, 1)
    reservation = await admitted(budgets, key, 9.5)
    assert [p.kind for p in reservation.periods] == ["daily", "monthly"]
    await refused(budgets, key, 0.75)  # the new month's 10 minus 9.5 reserved


async def test_the_ledger_seeds_each_period_once() -> None:
    day, month = utc(2025, 3, 14), utc(2025, 3, 1)
    ledger = FakeLedger({("alice", day): 0.5, ("alice", month): 3.0})
    clock = FakeClock(utc(2025, 3, 14, 9))
    budgets = Budgets(ledger, clock=clock)
    key = caller(daily=1.0, monthly=4.0)
    await refused(budgets, key, 0.75)  # 0.5 left today (spent before a restart)
    for _ in range(3):
        budgets.settle(await admitted(budgets, key, 0.125), 0.125)
    assert ledger.asked == [("alice", day), ("alice", month)]  # asked once per period, not per request
    await refused(budgets, key, 0.25)  # 0.875 spent today
    clock.now = utc(2025, 3, 15, 0, 0, 1)
    budgets.settle(await admitted(budgets, key, 0.5), 0.5)  # 3.875 this month, nothing yet today
    assert ledger.asked[2:] == [("alice", utc(2025, 3, 15))]  # a new day: only it is asked for
    error = await refused(budgets, key, 0.25)
    assert "monthly budget" in error.message
    await admitted(budgets, caller(daily=1.0, monthly=4.0, name="bob"), 1.0)
    assert ledger.asked[3:] == [("bob", utc(2025, 3, 15)), ("bob", month)]


async def test_concurrent_first_requests_seed_once_and_keep_both_reservations() -> None:
    ledger = FakeLedger({("alice", utc(2025, 3, 14)): 0.25})
    budgets = Budgets(ledger, clock=FakeClock(utc(2025, 3, 14, 9)))
    key = caller(daily=1.0)
    ledger.gate = asyncio.Event()
    first = asyncio.create_task(budgets.admit(key, 0.25))
    second = asyncio.create_task(budgets.admit(key, 0.25))
    await asyncio.sleep(0)
    ledger.gate.set()
    await asyncio.gather(first, second)
    await refused(budgets, key, 0.5)  # 0.25 seeded + 2 x 0.25 reserved: 0.25 left
    await admitted(budgets, key, 0.25)


async def test_old_periods_are_forgotten() -> None:
    clock = FakeClock(utc(2025, 1, 31, 12))
    budgets = Budgets(FakeLedger(), clock=clock)
    await admitted(budgets, caller(daily=1.0, monthly=5.0), 0.5)
    await admitted(budgets, caller(daily=1.0, name="bob"), 0.5)
    clock.now = utc(2025, 2, 1, 0, 0, 1)
    await admitted(budgets, caller(daily=1.0, monthly=5.0), 0.25)
    # Only February's periods are kept, for every key (bob's January 31 too).
    assert budgets._spent == {("alice", "daily", utc(2025, 2, 1)): 0.25, ("alice", "monthly", utc(2025, 2, 1)): 0.25}
