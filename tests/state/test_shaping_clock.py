"""Upstream shaping in virtual time (tests.helpers.clocks): the shaper's clock is a fake one, which
is also the event loop's time, and the loop never sleeps: when nothing is ready it jumps the clock to
its next timer. So ``asyncio.sleep``/``asyncio.timeout`` in the shaper take no real time, and a test
can read the exact (virtual) instant something happened."""

from __future__ import annotations

import asyncio

import pytest

from gateway.state.shaping import Slot, UpstreamCapacity, UpstreamShaper
from tests.helpers.clocks import FakeClock, run_in_virtual_time, settle


def test_the_virtual_loop_takes_no_real_time(clock: FakeClock) -> None:
    async def main() -> float:
        await asyncio.sleep(3600)
        return clock.elapsed

    assert run_in_virtual_time(clock, main) == 3600


def test_a_disabled_shaper_never_waits(clock: FakeClock) -> None:
    async def main() -> None:
        shaper = UpstreamShaper(0, 0, 1.0, clock=clock)
        assert not shaper.enabled
        slots = [await shaper.acquire() for _ in range(1000)]
        for slot in slots:
            slot.release()
        assert clock.elapsed == 0

    run_in_virtual_time(clock, main)


def test_the_concurrency_cap_queues_then_refuses_after_the_queue_timeout(clock: FakeClock) -> None:
    async def main() -> None:
        shaper = UpstreamShaper(2, 0, 2.0, clock=clock)
        held = [await shaper.acquire(), await shaper.acquire()]
        assert clock.elapsed == 0
        waiting = asyncio.create_task(shaper.acquire())
        await asyncio.sleep(1.5)
        assert not waiting.done()
        held.pop().release()  # a slot frees up after 1.5 s: the waiting request takes it at once
        await settle()
        assert waiting.done()
        held.append(waiting.result())
        assert clock.elapsed == 1.5
        with pytest.raises(UpstreamCapacity) as refusal:
            await shaper.acquire()  # both slots held: gives up after exactly the queue timeout
        assert clock.elapsed == 3.5
        error = refusal.value
        assert (error.status, error.code, error.retry_after) == (429, "upstream_capacity", 1)
        assert (b"retry-after", b"1") in error.headers()
        for slot in held:
            slot.release()
        await shaper.acquire()
        await shaper.acquire()
        assert clock.elapsed == 3.5

    run_in_virtual_time(clock, main)


def test_a_slot_is_released_once(clock: FakeClock) -> None:
    async def main() -> None:
        shaper = UpstreamShaper(1, 0, 1.0, clock=clock)
        slot = await shaper.acquire()
        slot.release()
        slot.release()  # no second slot appears
        await shaper.acquire()
        with pytest.raises(UpstreamCapacity):
            await shaper.acquire()
        Slot(None).release()

    run_in_virtual_time(clock, main)


def test_the_rpm_cap_waits_for_the_oldest_request_to_leave(clock: FakeClock) -> None:
    async def main() -> None:
        shaper = UpstreamShaper(0, 2, 5.0, clock=clock)
        await shaper.acquire()
        clock.advance(10.0)
        await shaper.acquire()
        clock.advance(10.0)  # 20: the first leaves at 60, further away than the queue timeout
        with pytest.raises(UpstreamCapacity) as refusal:
            await shaper.acquire()
        assert clock.elapsed == 20.0  # refused at once, without waiting in vain
        error = refusal.value
        assert (error.status, error.code, error.retry_after) == (429, "upstream_capacity", 40.0)
        assert (b"retry-after", b"40") in error.headers()
        clock.advance(34.75)  # 54.75: 5.25 s to wait, more than the queue timeout
        with pytest.raises(UpstreamCapacity) as refusal:
            await shaper.acquire()
        assert refusal.value.retry_after == 5.25
        clock.advance(0.25)  # 55: exactly the queue timeout to wait
        await shaper.acquire()
        assert clock.elapsed == 60.0  # admitted the moment the first one left
        clock.advance(9.5)  # 69.5: the second (at 10) leaves at 70
        await shaper.acquire()
        assert clock.elapsed == 70.0

    run_in_virtual_time(clock, main)


def test_the_rpm_cap_is_never_exceeded_by_waiting_requests(clock: FakeClock) -> None:
    async def main() -> list[float]:
        shaper = UpstreamShaper(0, 3, 120.0, clock=clock)
        admitted: list[float] = []

        async def request() -> None:
            await shaper.acquire()
            admitted.append(clock.elapsed)

        async with asyncio.TaskGroup() as group:
            for _ in range(7):
                group.create_task(request())
        for _ in range(3):
            await request()  # the three of 60 left at 120 exactly: two more then, the third at 180
        return admitted

    assert run_in_virtual_time(clock, main) == [0, 0, 0, 60, 60, 60, 120, 120, 120, 180]


def test_the_queue_timeout_covers_both_waits(clock: FakeClock) -> None:
    async def main() -> None:
        shaper = UpstreamShaper(1, 1, 5.0, clock=clock)
        held = await shaper.acquire()
        clock.advance(57.0)
        with pytest.raises(UpstreamCapacity) as refusal:
            await shaper.acquire()  # 3 s for the rate, then 2 s (not 5) for the slot
        assert clock.elapsed == 62.0
        assert refusal.value.retry_after == 1
        held.release()

    run_in_virtual_time(clock, main)


def test_a_request_refused_at_the_concurrency_cap_does_not_use_up_the_rpm(clock: FakeClock) -> None:
    """It never went upstream: its place in the per-minute window is given back (on a refusal
    after the queue timeout, and when it is cancelled while it waits for a slot)."""

    async def main() -> None:
        shaper = UpstreamShaper(1, 2, 1.0, clock=clock)
        held = await shaper.acquire()  # the first of the minute, at 0
        with pytest.raises(UpstreamCapacity):
            await shaper.acquire()  # the rate had room; the slot did not
        assert clock.elapsed == 1.0
        held.release()
        held = await shaper.acquire()  # the second of the minute, at 1
        assert clock.elapsed == 1.0
        clock.advance(58.5)  # 59.5
        waiting = asyncio.create_task(shaper.acquire())
        await asyncio.sleep(0.75)  # 60.25: counted at 60 when the first left; still waits for the slot
        assert not waiting.done()
        waiting.cancel()
        await settle()
        assert waiting.cancelled()
        held.release()
        (await shaper.acquire()).release()  # at once: the cancelled one gave its place back
        assert clock.elapsed == 60.25

    run_in_virtual_time(clock, main)
