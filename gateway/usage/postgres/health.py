"""What the ledger's writers tell the operator about PostgreSQL and Redis: one log line when one of
them stops answering, one when it answers again, never one per batch or per request; and a pause
that ends early when the ledger closes."""

from __future__ import annotations

import asyncio
import contextlib
import logging

logger = logging.getLogger("gateway.usage.postgres")


class Health:
    def __init__(self) -> None:
        self._down: set[str] = set()  # "PostgreSQL", "Redis": what does not answer now
        self.closing = asyncio.Event()

    def failed(self, what: str, exc: BaseException) -> None:
        if what not in self._down:
            self._down.add(what)
            logger.warning("ledger: %s unreachable (%s); usage records wait until it answers", what,
                           type(exc).__name__)  # fmt: skip

    def down(self, what: str) -> bool:
        """Whether the last call to ``what`` failed."""
        return what in self._down

    def answered(self, what: str) -> None:
        if what in self._down:
            self._down.discard(what)
            logger.warning("ledger: %s answers again", what)

    async def pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less when the ledger begins to close."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closing.wait(), seconds)
