"""A circuit breaker in front of a shared backend (Redis): stop asking after repeated failures.

``Guard.available()`` says whether to call; ``failed`` and ``succeeded`` report how a call went.
After ``failures`` failures in a row the guard stays open for ``cooldown`` seconds, then lets calls
through again (the first success closes it). It logs one line when the backend stops answering
and one when it answers again, never one per call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class Guard:
    def __init__(
        self,
        what: str,
        logger: logging.Logger,
        *,
        failures: int,
        cooldown: float,
        clock: Callable[[], float] = time.monotonic,
        while_down: str = "",
    ) -> None:
        """``what``: the backend, for the log lines; ``while_down``: what happens meanwhile."""
        self._what = what
        self._logger = logger
        self._limit = failures
        self.cooldown = cooldown
        self._clock = clock
        self._while_down = while_down
        self._failures = 0
        self._open_until = 0.0
        self.up = True  # the last call succeeded

    def available(self) -> bool:
        return self._failures < self._limit or self._clock() >= self._open_until

    def failed(self, exc: BaseException) -> None:
        self._failures += 1
        if self._failures >= self._limit:
            self._open_until = self._clock() + self.cooldown
        if self.up:
            self.up = False
            self._logger.warning("%s unreachable (%s)%s", self._what, type(exc).__name__, self._while_down)

    def succeeded(self) -> None:
        self._failures = 0
        if not self.up:
            self.up = True
            self._logger.warning("%s answers again", self._what)
