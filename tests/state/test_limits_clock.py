"""Per-key rate limits on a fake clock advanced by hand: the sliding window, reservations, headers."""

from __future__ import annotations

import pytest

from gateway.auth.keys import Caller
from gateway.errors import RateLimited
from gateway.state.limits import DEFAULT_COMPLETION_RESERVE, RateLimiter, Ticket
from gateway.types import Header
from tests.helpers.clocks import FakeClock


def caller(rpm: int | None = None, tpm: int | None = None, name: str = "alice") -> Caller:
    return Caller(
        name=name,
        team=None,
        models=None,
        categories=None,
        rpm=rpm,
        tpm=tpm,
        budget_usd_daily=None,
        budget_usd_monthly=None,
        admin=False,
    )


def values(headers: list[Header]) -> dict[str, str]:
    return {name.decode(): value.decode() for name, value in headers}


def rate(headers: list[Header], what: str) -> tuple[str, str, str]:
    """(limit, remaining, reset) of the x-ratelimit-*-``what`` headers."""
    got = values(headers)
    return got[f"x-ratelimit-limit-{what}"], got[f"x-ratelimit-remaining-{what}"], got[f"x-ratelimit-reset-{what}"]


@pytest.fixture
def limiter(clock: FakeClock) -> RateLimiter:
    return RateLimiter(clock=clock)


def admitted(limiter: RateLimiter, key: Caller, prompt: int = 0, requested: int = 0) -> Ticket:
    ticket = limiter.admit(key, prompt, requested)
    assert ticket is not None
    return ticket


def refused(limiter: RateLimiter, key: Caller, prompt: int = 0, requested: int = 0) -> RateLimited:
    with pytest.raises(RateLimited) as refusal:
        limiter.admit(key, prompt, requested)
    return refusal.value


def retry_after(error: RateLimited) -> str:
    return values(error.headers())["retry-after"]


def test_a_key_without_limits_is_not_counted(limiter: RateLimiter) -> None:
    for _ in range(100):
        assert limiter.admit(caller(), 10, 10) is None


def test_requests_leave_the_window_exactly_60_s_later(clock: FakeClock, limiter: RateLimiter) -> None:
    key = caller(rpm=2)
    assert rate(admitted(limiter, key).headers, "requests") == ("2", "1", "0s")
    clock.at(10.0)
    # The last one of the window: reset is when the oldest (at 0) leaves, 50 s on.
    assert rate(admitted(limiter, key).headers, "requests") == ("2", "0", "50s")
    clock.at(20.0)
    error = refused(limiter, key)
    assert (error.status, error.code) == (429, "rate_limit_exceeded")
    assert error.retry_after == 40.0
    assert rate(error.extra_headers, "requests") == ("2", "0", "40s")
    assert retry_after(error) == "40"
    clock.at(59.75)  # a quarter of a second early
    error = refused(limiter, key)
    assert rate(error.extra_headers, "requests") == ("2", "0", "0.25s")
    assert retry_after(error) == "1"  # never 0
    clock.at(60.0)  # the first request leaves exactly now
    assert rate(admitted(limiter, key).headers, "requests") == ("2", "0", "10s")
    clock.at(69.5)
    assert refused(limiter, key).retry_after == 0.5
    clock.at(70.0)
    assert rate(admitted(limiter, key).headers, "requests") == ("2", "0", "50s")


def test_reset_is_the_whole_window_when_one_request_fills_it(clock: FakeClock, limiter: RateLimiter) -> None:
    key = caller(rpm=1)
    assert rate(admitted(limiter, key).headers, "requests") == ("1", "0", "1m0s")
    clock.at(0.5)
    assert rate(refused(limiter, key).extra_headers, "requests") == ("1", "0", "59.5s")


def test_rpm_is_never_exceeded_and_never_refused_below_it(clock: FakeClock, limiter: RateLimiter) -> None:
    """Bursts at uneven times over ten minutes: a request is admitted exactly when fewer than
    RPM requests were admitted in the 60 s before it (a request at t leaves at t + 60)."""
    rpm = 5
    key = caller(rpm=rpm)
    admitted_at: list[float] = []
    now = 0.0
    for step in range(400):
        now += (0.25, 1.5, 4.0, 0.5)[step % 4]
        clock.at(now)
        for _ in range(1 + step % 3):
            in_window = sum(1 for t in admitted_at if t > now - 60.0)
            ticket = limiter.admit(key, 0, 0) if in_window < rpm else None
            if in_window < rpm:
                assert ticket is not None
                admitted_at.append(now)
                assert rate(ticket.headers, "requests")[1] == str(rpm - in_window - 1)
            else:
                refused(limiter, key)
    assert len(admitted_at) > 40  # the scenario did exercise the window
    for t in admitted_at:
        assert sum(1 for other in admitted_at if t - 60.0 < other <= t) <= rpm


def test_tokens_reserve_prompt_plus_max_tokens_then_settle(clock: FakeClock, limiter: RateLimiter) -> None:
    key = caller(tpm=1000)
    first = admitted(limiter, key, prompt=100, requested=200)
    assert first.reserved == 300
    assert rate(first.headers, "tokens") == ("1000", "700", "0s")
    limiter.settle(first, 250)  # the real usage replaces the reservation
    limiter.settle(first, 999)  # once only
    clock.at(1.0)
    second = admitted(limiter, key, prompt=10, requested=90)
    assert rate(second.headers, "tokens") == ("1000", "650", "0s")  # 1000 - 250 used - 100 reserved


def test_without_max_tokens_the_estimate_is_the_default_then_the_average(limiter: RateLimiter) -> None:
    key = caller(tpm=100_000)
    first = admitted(limiter, key, prompt=40)
    assert first.reserved == 40 + DEFAULT_COMPLETION_RESERVE  # no history yet
    limiter.settle(first, 500)  # the first usage is the average
    assert admitted(limiter, key, prompt=10).reserved == 500
    limiter.settle(admitted(limiter, key, prompt=10), 1000)  # EWMA: 500 + 0.2 * (1000 - 500)
    assert admitted(limiter, key, prompt=10).reserved == 600
    assert admitted(limiter, key, prompt=700).reserved == 700  # the prompt alone is larger
    assert admitted(limiter, key, prompt=10, requested=20).reserved == 30  # max_tokens wins over history
    limiter.settle(admitted(limiter, key), 0)  # unknown usage does not move the average
    limiter.settle(admitted(limiter, key), 601)  # 600.2: rounded up
    assert admitted(limiter, key).reserved == 601


def test_averages_are_per_key(limiter: RateLimiter) -> None:
    alice, bob = caller(tpm=100_000), caller(tpm=100_000, name="bob")
    limiter.settle(admitted(limiter, alice, prompt=1), 5000)
    assert admitted(limiter, bob, prompt=1).reserved == 1 + DEFAULT_COMPLETION_RESERVE


def test_tpm_refuses_while_used_plus_reserved_reach_the_limit(clock: FakeClock, limiter: RateLimiter) -> None:
    key = caller(rpm=10, tpm=1000)
    limiter.settle(admitted(limiter, key, prompt=100, requested=500), 600)  # 600 tokens at 0
    clock.at(10.0)
    in_flight = admitted(limiter, key, prompt=100, requested=300)  # reserves the last 400
    # Counted with this request: no room left until the 600 tokens of 0 leave, at 60.
    assert rate(in_flight.headers, "tokens") == ("1000", "0", "50s")
    assert rate(in_flight.headers, "requests") == ("10", "8", "0s")
    clock.at(20.0)
    error = refused(limiter, key, prompt=1, requested=1)
    assert error.retry_after == 40.0
    assert rate(error.extra_headers, "tokens") == ("1000", "0", "40s")
    assert rate(error.extra_headers, "requests") == ("10", "8", "0s")  # the refused one is not counted
    assert retry_after(error) == "40"
    clock.at(59.75)
    error = refused(limiter, key, prompt=1, requested=1)
    assert rate(error.extra_headers, "tokens") == ("1000", "0", "0.25s")
    assert error.retry_after == 1.0  # a token refusal asks for at least a second
    clock.at(60.0)  # the 600 left; the 400 reserved still count
    assert rate(admitted(limiter, key, prompt=1, requested=99).headers, "tokens") == ("1000", "500", "0s")


def test_settling_below_the_reservation_frees_tokens_at_once(clock: FakeClock, limiter: RateLimiter) -> None:
    key = caller(tpm=1000)
    big = admitted(limiter, key, prompt=0, requested=1000)
    assert rate(big.headers, "tokens") == ("1000", "0", "0s")  # all reserved, nothing used yet
    refused(limiter, key, prompt=1, requested=1)
    clock.at(5.0)
    limiter.settle(big, 100)
    assert rate(admitted(limiter, key, prompt=0, requested=100).headers, "tokens") == ("1000", "800", "0s")
    clock.at(64.75)  # the 100 used at 5 are still in the window
    assert rate(admitted(limiter, key, prompt=0, requested=800).headers, "tokens") == ("1000", "0", "0.25s")


def test_a_cancelled_admission_uses_nothing_of_the_limits() -> None:
    """A request refused after the limiter counted it (by its budget) gives its place back."""
    clock = FakeClock()
    limiter = RateLimiter(clock)
    alice = caller(rpm=1, tpm=1000)
    ticket = limiter.admit(alice, 10, 100)
    limiter.cancel(ticket)
    again = limiter.admit(alice, 10, 100)  # the one request a minute is still free
    assert again is not None
    assert dict(again.headers)[b"x-ratelimit-remaining-requests"] == b"0"
    assert dict(again.headers)[b"x-ratelimit-remaining-tokens"] == b"890"
