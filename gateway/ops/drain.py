"""Graceful shutdown: drain the gateway between SIGTERM and uvicorn's own shutdown.

On its own, uvicorn answers SIGTERM by closing its listening socket at once and waiting for open
connections; a stream that outlives its grace period is cut off mid-event. The drain puts a phase
in front of that:

1. SIGTERM (or SIGINT): draining begins. ``/readyz`` answers 503 so a load balancer stops sending,
   new proxied requests are refused with 503 ``shutting_down`` (Retry-After, Connection: close),
   and requests and streams in flight carry on.
2. Once no request is in flight, or ``[server] shutdown_grace`` seconds have passed, the ones still
   running are stopped cleanly: a stream ends with an SSE error event (code ``shutting_down``), a
   request still waiting for the upstream is answered 503 ``shutting_down``.
3. The signal is handed to the handler that was installed before (uvicorn's), whose shutdown then
   runs as usual: the socket and idle connections are closed, the lifespan ends (the ledger is
   flushed) and the process exits.

A second signal during the grace period moves on to step 2 at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

logger = logging.getLogger("gateway.ops.drain")

DRAIN_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
# How long requests stopped at the end of the grace period get to send their last bytes.
STOP_TIMEOUT: Final = 5.0


class Drain:
    """Which proxied requests are in flight, and whether the gateway is draining them."""

    def __init__(self, grace: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace = grace
        self._clock = clock  # for the log only: the grace and stop timeouts run on the event loop's time
        self.draining = False
        self.expired = False  # the grace period is over: requests still running are being stopped
        self._requests: set[asyncio.Task[Any]] = set()
        self._changed: asyncio.Event | None = None  # set while draining, when a request ends or on hurry()
        self._hurried = False

    @property
    def in_flight(self) -> int:
        """Requests tracked now."""
        return len(self._requests)

    def track(self) -> asyncio.Task[Any] | None:
        """Count the current task as a request in flight until ``untrack``."""
        task = asyncio.current_task()
        if task is not None:
            self._requests.add(task)
        return task

    def untrack(self, task: asyncio.Task[Any] | None) -> None:
        if task is not None:
            self._requests.discard(task)
            if self._changed is not None:
                self._changed.set()

    def hurry(self) -> None:
        """Stop waiting out the grace period (a second signal)."""
        self._hurried = True
        if self._changed is not None:
            self._changed.set()

    async def run(self) -> None:
        """Drain; returns when no request is in flight any more."""
        self.draining = True
        self._changed = asyncio.Event()
        started = self._clock()
        logger.info("shutting down: draining %d requests in flight (grace %g s)", len(self._requests), self.grace)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.grace):
                await self._settled(until_hurried=True)
        if self._requests:
            self.expired = True
            logger.warning("shutdown grace over: stopping %d requests still in flight", len(self._requests))
            for task in list(self._requests):
                task.cancel()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_TIMEOUT):
                    await self._settled(until_hurried=False)
        logger.info("drained in %.1f s", self._clock() - started)

    async def _settled(self, *, until_hurried: bool) -> None:
        """Until no request is in flight (or a hurry, if ``until_hurried``)."""
        assert self._changed is not None
        while self._requests and not (until_hurried and self._hurried):
            self._changed.clear()
            await self._changed.wait()


@contextlib.contextmanager
def drain_on_signals(drain: Drain) -> Iterator[None]:
    """While open (in the main thread only; elsewhere it does nothing), SIGTERM and SIGINT start
    ``drain`` and, once it is done, go on to the handler that was installed before (uvicorn's, which
    then shuts the server down). Call it inside the running loop; the handlers are restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in DRAIN_SIGNALS}
    handed_over = False
    runs: set[asyncio.Task[None]] = set()  # holds the drain task while it runs

    def hand_over(sig: int) -> None:
        nonlocal handed_over
        handed_over = True
        handler = previous[signal.Signals(sig)]
        if callable(handler):
            handler(sig, None)
        else:  # no Python handler before us: let the signal act as it would have
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            signal.raise_signal(sig)

    def start(sig: int) -> None:
        if handed_over:
            hand_over(sig)  # after the drain, signals are the server's again (a second Ctrl-C forces)
        elif drain.draining:
            drain.hurry()
        else:
            task = loop.create_task(drain.run())
            runs.add(task)
            task.add_done_callback(runs.discard)
            task.add_done_callback(lambda _: hand_over(sig))

    def on_signal(sig: int, frame: object) -> None:
        loop.call_soon_threadsafe(start, sig)

    for sig in DRAIN_SIGNALS:
        signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)
