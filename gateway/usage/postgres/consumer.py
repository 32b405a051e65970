"""The consumer side of the ledger's Redis Stream: read batches (new ones, and those another
replica left unconfirmed for ``claim_after`` seconds), write them to PostgreSQL, confirm them.
Reads come every ``interval`` seconds (at once while full reads wait), so PostgreSQL sees a few
large transactions rather than one per request.

A batch stays pending with this consumer until PostgreSQL has committed it; while PostgreSQL does
not answer it is retried every second (and after ``claim_after`` seconds another replica may take
it over: the rows' primary key makes a second write a no-op). An entry that is not a batch of
records (written by something else) is dropped, counted and logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from gateway.usage.postgres.health import Health
from gateway.usage.postgres.stream import BadEntry, RecordStream, decode
from gateway.usage.postgres.write import Entry

logger = logging.getLogger("gateway.usage.postgres")

_BLOCK = 0.5  # seconds a read waits on the stream for new batches


class StreamConsumer:
    def __init__(
        self,
        stream: RecordStream,
        write: Callable[[list[Entry]], Awaitable[bool]],
        health: Health,
        *,
        errors: tuple[type[Exception], ...],
        claim_after: float,
        interval: float = 1.0,
    ) -> None:
        """``write``: to PostgreSQL, False when it did not answer; ``errors``: Redis's; ``interval``:
        seconds between two reads while less than a full read waits (fewer, larger transactions)."""
        self._stream = stream
        self._write = write
        self._health = health
        self._errors = errors
        self._claim_after = claim_after
        self._interval = interval
        self.dropped = 0  # stream entries that were not batches of records

    async def run(self) -> None:
        """Until the ledger closes (cancelled meanwhile: what it had read stays pending with it)."""
        stream, health = self._stream, self._health
        next_claim = 0.0
        grouped = False
        while not health.closing.is_set():
            try:
                if not grouped:  # at start, and after an error (Redis may have restarted empty)
                    await stream.create_group()
                    grouped = True
                claimed: list[tuple[bytes, bytes]] = []
                if time.monotonic() >= next_claim:
                    next_claim = time.monotonic() + self._claim_after / 2
                    claimed = await stream.claim()
                    await stream.forget_idle_consumers(max(3600.0, self._claim_after * 10))
                new = await stream.read(None if claimed else _BLOCK)
                items = claimed + new
                health.answered("Redis")
            except self._errors as exc:
                health.failed("Redis", exc)
                grouped = False
                await health.pause(1.0)
                continue
            try:
                while items and not health.closing.is_set() and not await self._write_items(items):
                    await health.pause(1.0)  # PostgreSQL does not answer: the batches stay pending here
            except Exception:  # a bug must not end the consuming for good: logged; the batches stay pending
                logger.exception("ledger: writing from the stream failed")
                await health.pause(1.0)
            if len(new) < stream.batch:  # the stream is drained: let the next batches gather
                await health.pause(self._interval)

    async def drain(self) -> None:
        """On the way out: write what this consumer holds, then what is waiting, then stop."""
        for _ in range(1000):
            items = await self._stream.read_own() or await self._stream.read(None)
            if not items or not await self._write_items(items):
                return

    async def _write_items(self, items: list[tuple[bytes, bytes]]) -> bool:
        """Write stream batches to PostgreSQL and confirm them; False when PostgreSQL failed."""
        entries: list[Entry] = []
        for entry_id, payload in items:
            try:
                entries.extend(decode(payload))
            except BadEntry as exc:
                logger.error("ledger: stream entry %r is not a batch of records; dropped (%s)", entry_id, exc)
                self.dropped += 1
        if entries and not await self._write(entries):
            return False
        try:
            await self._stream.done([entry_id for entry_id, _ in items])
        except self._errors as exc:  # written but unconfirmed: taken over and written again (a no-op) later
            self._health.failed("Redis", exc)
        return True
