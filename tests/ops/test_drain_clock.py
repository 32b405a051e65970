"""The graceful drain in virtual time (see tests/helpers/clocks.py): the grace period and the
stop timeout pass on a fake clock, at once, and the tests read the exact instant of each step."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterator
from types import FrameType

import pytest

from gateway.ops.drain import DRAIN_SIGNALS, STOP_TIMEOUT, Drain, drain_on_signals
from tests.helpers.clocks import FakeClock, run_in_virtual_time, settle

GRACE = 10.0


class Request:
    """A proxied request as the handler runs it: tracked until it ends, however it ends."""

    def __init__(self, drain: Drain, clock: FakeClock, *, stubborn: bool = False) -> None:
        self.finish = asyncio.Event()
        self.cancelled_at: float | None = None
        self.ended_at: float | None = None
        self._drain, self._clock, self._stubborn = drain, clock, stubborn
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        tracked = self._drain.track()
        try:
            await self.finish.wait()
        except asyncio.CancelledError:
            self.cancelled_at = self._clock.elapsed
            if self._stubborn:  # ignores the stop and runs on for a long while
                self.task.uncancel()
                await asyncio.sleep(1000)
        finally:
            self.ended_at = self._clock.elapsed
            self._drain.untrack(tracked)


def start_drain(drain: Drain) -> asyncio.Task[None]:
    return asyncio.create_task(drain.run())


def test_without_requests_in_flight_the_drain_ends_at_once(clock: FakeClock) -> None:
    async def main() -> None:
        drain = Drain(GRACE, clock=clock)
        assert (drain.draining, drain.in_flight) == (False, 0)
        await drain.run()
        assert (drain.draining, drain.expired, clock.elapsed) == (True, False, 0)

    run_in_virtual_time(clock, main)


def test_requests_in_flight_are_tracked_and_waited_for(clock: FakeClock) -> None:
    async def main() -> None:
        drain = Drain(GRACE, clock=clock)
        first, second = Request(drain, clock), Request(drain, clock)
        await settle()
        assert drain.in_flight == 2
        assert not drain.draining
        running = start_drain(drain)
        await settle()
        assert drain.draining  # from the first step: new requests are refused from now on
        await asyncio.sleep(3.0)
        first.finish.set()
        await settle()
        assert (drain.in_flight, running.done()) == (1, False)
        await asyncio.sleep(GRACE - 3.0 - 0.25)  # a quarter of a second before the grace is over
        assert not drain.expired
        second.finish.set()
        await running
        assert clock.elapsed == GRACE - 0.25  # over as soon as the last one ended
        assert (drain.in_flight, drain.expired) == (0, False)
        assert (first.cancelled_at, second.cancelled_at) == (None, None)

    run_in_virtual_time(clock, main)


def test_requests_still_running_after_the_grace_are_stopped(clock: FakeClock) -> None:
    async def main() -> None:
        drain = Drain(GRACE, clock=clock)
        quick, slow = Request(drain, clock), Request(drain, clock)
        running = start_drain(drain)
        await asyncio.sleep(1.0)
        quick.finish.set()
        await running
        assert drain.expired
        assert (quick.ended_at, quick.cancelled_at) == (1.0, None)
        assert slow.cancelled_at == GRACE  # stopped exactly when the grace ran out
        assert clock.elapsed == GRACE  # and the drain ends once it has stopped
        assert drain.in_flight == 0

    run_in_virtual_time(clock, main)


def test_a_request_that_ignores_the_stop_gets_the_stop_timeout(clock: FakeClock) -> None:
    async def main() -> None:
        drain = Drain(GRACE, clock=clock)
        stubborn = Request(drain, clock, stubborn=True)
        await settle()
        await drain.run()
        assert clock.elapsed == GRACE + STOP_TIMEOUT
        assert (drain.expired, drain.in_flight, stubborn.cancelled_at) == (True, 1, GRACE)
        stubborn.task.cancel()  # tidy up: it would run on after the drain

    run_in_virtual_time(clock, main)


def test_a_hurry_ends_the_grace_at_once(clock: FakeClock) -> None:
    async def main() -> None:
        drain = Drain(GRACE, clock=clock)
        request = Request(drain, clock)
        running = start_drain(drain)
        await asyncio.sleep(2.0)
        assert not drain.expired
        drain.hurry()
        await running
        assert (clock.elapsed, request.cancelled_at, drain.expired) == (2.0, 2.0, True)

    run_in_virtual_time(clock, main)


def test_the_log_tells_how_long_the_drain_took(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        drain = Drain(GRACE, clock=clock)
        request = Request(drain, clock)
        running = start_drain(drain)
        await asyncio.sleep(2.5)
        request.finish.set()
        await running

    with caplog.at_level(logging.INFO, logger="gateway.ops.drain"):
        run_in_virtual_time(clock, main)
    assert caplog.messages[-1] == "drained in 2.5 s"


@pytest.fixture
def handed_over() -> Iterator[list[int]]:
    """Stands in for uvicorn's handlers (which drain_on_signals hands the signal to after the drain)."""
    received: list[int] = []

    def record(sig: int, frame: FrameType | None) -> None:
        received.append(sig)

    before = {sig: signal.signal(sig, record) for sig in DRAIN_SIGNALS}
    try:
        yield received
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_signals_start_the_drain_then_hurry_it_then_reach_the_server(clock: FakeClock, handed_over: list[int]) -> None:
    async def main() -> None:
        drain = Drain(GRACE, clock=clock)
        with drain_on_signals(drain):
            request = Request(drain, clock)
            signal.raise_signal(signal.SIGTERM)
            await settle()
            assert drain.draining
            assert handed_over == []  # the server shuts down only after the drain
            await asyncio.sleep(3.0)
            signal.raise_signal(signal.SIGINT)  # the second signal: stop waiting out the grace
            await settle()
            assert (drain.expired, request.cancelled_at, drain.in_flight) == (True, 3.0, 0)
            assert handed_over == [signal.SIGTERM]
            signal.raise_signal(signal.SIGINT)  # after the drain, signals are the server's again
            await settle()
            assert handed_over == [signal.SIGTERM, signal.SIGINT]
        assert clock.elapsed == 3.0

    run_in_virtual_time(clock, main)
