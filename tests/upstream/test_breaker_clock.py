"""The circuit breakers' time logic, on a fake clock advanced by hand (no real waits)."""

from __future__ import annotations

import pytest

from gateway.upstream.breaker import Breakers, CircuitOpen, Pass
from tests.helpers.clocks import FakeClock

FAILURES = 3
COOLDOWN = 30.0
MODEL = "model-a"
OTHER = "model-b"


@pytest.fixture
def breakers(clock: FakeClock) -> Breakers:
    return Breakers(FAILURES, COOLDOWN, clock=clock)


def passes(breakers: Breakers, model: str = MODEL) -> Pass:
    ticket = breakers.allow(model)
    assert ticket is not None
    return ticket


def refused(breakers: Breakers, model: str = MODEL) -> CircuitOpen:
    with pytest.raises(CircuitOpen) as refusal:
        breakers.allow(model)
    return refusal.value


def fail(breakers: Breakers, times: int = 1, model: str = MODEL) -> None:
    for _ in range(times):
        breakers.record(passes(breakers, model), False)


def test_opens_after_n_consecutive_failures(breakers: Breakers) -> None:
    fail(breakers, FAILURES - 1)
    assert passes(breakers).probe is False  # still closed one failure short
    assert breakers.open_circuits() == {}
    fail(breakers)  # the N-th in a row (the pass taken above never reported: it says nothing)
    error = refused(breakers)
    assert (error.status, error.code, error.param) == (503, "circuit_open", "model")
    assert error.retry_after == COOLDOWN
    assert breakers.open_circuits() == {MODEL: COOLDOWN}


def test_a_success_resets_the_count(breakers: Breakers) -> None:
    fail(breakers, FAILURES - 1)
    breakers.record(passes(breakers), True)
    fail(breakers, FAILURES - 1)
    assert passes(breakers).probe is False
    fail(breakers)
    refused(breakers)


def test_a_pass_reports_once_and_a_silent_one_counts_for_nothing(breakers: Breakers) -> None:
    ticket = passes(breakers)
    for _ in range(FAILURES):
        breakers.record(ticket, False)  # only the first report counts
    breakers.record(passes(breakers), None)  # cancelled: no verdict
    breakers.record(None, False)  # breakers off for that request
    assert passes(breakers).probe is False
    assert breakers.open_circuits() == {}


def test_stays_open_for_the_cooldown(clock: FakeClock, breakers: Breakers) -> None:
    fail(breakers, FAILURES)
    clock.advance(10.0)
    assert refused(breakers).retry_after == COOLDOWN - 10.0
    assert breakers.open_circuits() == {MODEL: 20.0}
    clock.advance(19.5)  # 0.5 s before its end: still open, Retry-After never below 1 s
    assert refused(breakers).retry_after == 1.0
    assert breakers.open_circuits() == {MODEL: 0.5}
    clock.advance(0.5)  # the cooldown is over to the second
    assert passes(breakers).probe is True


def test_exactly_one_probe_after_the_cooldown(clock: FakeClock, breakers: Breakers) -> None:
    fail(breakers, FAILURES)
    clock.advance(COOLDOWN)
    probe = passes(breakers)
    assert probe.probe is True
    assert breakers.open_circuits() == {MODEL: 0.0}
    assert refused(breakers).retry_after == 1.0  # everyone else waits for the probe's verdict
    clock.advance(10 * COOLDOWN)  # however long the probe takes
    assert refused(breakers).retry_after == 1.0
    assert breakers.open_circuits() == {MODEL: 0.0}


def test_a_successful_probe_closes_the_circuit(clock: FakeClock, breakers: Breakers) -> None:
    fail(breakers, FAILURES)
    clock.advance(COOLDOWN)
    breakers.record(passes(breakers), True)
    assert breakers.open_circuits() == {}
    assert passes(breakers).probe is False
    fail(breakers, FAILURES - 1)  # counting starts again from zero
    assert passes(breakers).probe is False


def test_a_failed_probe_opens_the_circuit_again_at_once(clock: FakeClock, breakers: Breakers) -> None:
    fail(breakers, FAILURES)
    clock.advance(COOLDOWN + 5.0)
    breakers.record(passes(breakers), False)  # one failure is enough, not N
    assert refused(breakers).retry_after == COOLDOWN  # a full cooldown from the probe's failure
    assert breakers.open_circuits() == {MODEL: COOLDOWN}
    clock.advance(COOLDOWN - 0.5)
    refused(breakers)
    clock.advance(0.5)
    assert passes(breakers).probe is True


def test_a_probe_without_verdict_leaves_room_for_another(clock: FakeClock, breakers: Breakers) -> None:
    fail(breakers, FAILURES)
    clock.advance(COOLDOWN)
    breakers.record(passes(breakers), None)  # the probe was cancelled (client gone)
    assert breakers.open_circuits() == {MODEL: 0.0}
    assert passes(breakers).probe is True


def test_models_are_independent(clock: FakeClock, breakers: Breakers) -> None:
    fail(breakers, FAILURES - 1, model=OTHER)
    fail(breakers, FAILURES)
    assert passes(breakers, OTHER).probe is False  # OTHER's count is its own
    clock.advance(12.0)
    fail(breakers, model=OTHER)
    refused(breakers, OTHER)
    assert breakers.open_circuits() == {MODEL: COOLDOWN - 12.0, OTHER: COOLDOWN}
    clock.advance(COOLDOWN - 12.0)
    breakers.record(passes(breakers), True)  # MODEL's probe closes MODEL only
    assert breakers.open_circuits() == {OTHER: 12.0}
    refused(breakers, OTHER)


def test_open_circuits_rounds_to_a_tenth(clock: FakeClock, breakers: Breakers) -> None:
    fail(breakers, FAILURES)
    clock.advance(0.26)
    assert breakers.open_circuits() == {MODEL: 29.7}


def test_disabled_breakers_pass_nothing() -> None:
    breakers = Breakers(0, COOLDOWN, clock=FakeClock())
    assert not breakers.enabled
    for _ in range(5):
        assert breakers.allow(MODEL) is None
        breakers.record(None, False)
    assert breakers.open_circuits() == {}
