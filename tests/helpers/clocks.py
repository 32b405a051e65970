"""Fake clocks for the time logic (breakers, limits, budgets, the catalog cache, shaping, the drain),
and a virtual-time event loop: its time is a fake clock, and it never sleeps: when nothing is
ready it jumps the clock to its next timer. So ``asyncio.sleep``/``asyncio.timeout`` under it take
no real time, and a test can read the exact (virtual) instant something happened."""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
T0 = 1000.0


class FakeClock:
    """A clock (monotonic, or unix time when started there) that only moves when the test (or the
    virtual-time loop) says so."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def at(self, offset: float) -> None:
        """Set the time to ``offset`` seconds after T0."""
        self.now = T0 + offset

    @property
    def elapsed(self) -> float:
        return self.now - T0


class _VirtualTimeSelector(selectors.DefaultSelector):
    """Polls without blocking; where the loop would block until its next timer, the clock jumps."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = super().select(0)
        if events or (timeout is not None and timeout <= 0):
            return events
        if timeout is None:  # no timer and nothing ready: the test would hang for real
            raise RuntimeError("deadlock: every task waits and no timer is due")
        self._clock.advance(timeout)
        return events


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__(_VirtualTimeSelector(clock))
        self._fake_clock = clock

    def time(self) -> float:
        return self._fake_clock()


def run_in_virtual_time(clock: FakeClock, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    with asyncio.Runner(loop_factory=lambda: VirtualTimeLoop(clock)) as runner:
        return runner.run(main())


async def settle() -> None:
    """Let every ready task run (no time passes)."""
    for _ in range(10):
        await asyncio.sleep(0)
