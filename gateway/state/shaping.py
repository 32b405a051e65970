"""Upstream-aware shaping: a cap on the gateway's own requests to the upstream.

FlexAI limits requests per minute per key, and many users share the gateway's one key. With
``[upstream] concurrency`` and/or ``[upstream] rpm`` set, a request waits up to ``queue_timeout``
seconds for room, then is answered 429 ``upstream_capacity`` with Retry-After, rather than bursting
into the upstream's own 429s. A request holds its in-flight slot until its response is closed
(a stream holds it while it streams). Per process (per replica).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from gateway.errors import RateLimited
from gateway.state.limits import WINDOW, SlidingWindow


class UpstreamCapacity(RateLimited):
    code = "upstream_capacity"


class Slot:
    """Held while one request is with the upstream; release it exactly once."""

    __slots__ = ("_release",)

    def __init__(self, release: Callable[[], None] | None) -> None:
        self._release = release

    @property
    def free(self) -> bool:
        """Nothing to give back (shaping is off, or it was given back already)."""
        return self._release is None

    def release(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()


class UpstreamShaper:
    def __init__(
        self, concurrency: int, rpm: int, queue_timeout: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._semaphore = asyncio.Semaphore(concurrency) if concurrency > 0 else None
        self._rpm = rpm
        self._window = SlidingWindow(WINDOW)
        self._queue_timeout = queue_timeout
        self._clock = clock

    @property
    def enabled(self) -> bool:
        return self._semaphore is not None or self._rpm > 0

    async def acquire(self) -> Slot:
        """Room for one more upstream request, waiting at most queue_timeout; else UpstreamCapacity."""
        if not self.enabled:
            return Slot(None)
        deadline = self._clock() + self._queue_timeout
        counted_at = await self._wait_for_rate(deadline) if self._rpm > 0 else None
        semaphore = self._semaphore
        if semaphore is None:
            return Slot(None)
        acquired = False
        try:
            async with asyncio.timeout(max(0.0, deadline - self._clock())):
                await semaphore.acquire()
            acquired = True
        except TimeoutError:
            raise UpstreamCapacity(
                "The gateway's requests to the upstream are at their concurrency cap; retry shortly.",
                retry_after=1,
            ) from None
        finally:
            if not acquired and counted_at is not None:
                self._window.remove(counted_at, 1)  # it never goes upstream: give its place in the minute back
        return Slot(semaphore.release)

    async def _wait_for_rate(self, deadline: float) -> float:
        """Count one request in the per-minute window once it has room; returns when it was counted."""
        for _ in range(1000):  # bounded: each turn waits for the oldest request to leave the window
            now = self._clock()
            self._window.expire(now)
            if self._window.total < self._rpm:
                self._window.add(now, 1)
                return now
            wait = self._window.seconds_until_below(now, self._rpm)
            if now + wait > deadline:
                raise UpstreamCapacity(
                    f"The gateway's requests to the upstream are at their cap of {self._rpm} per minute.",
                    retry_after=wait,
                )
            await asyncio.sleep(max(wait, 0.001))
        raise UpstreamCapacity("The upstream's request rate is saturated.", retry_after=1)  # pragma: no cover
