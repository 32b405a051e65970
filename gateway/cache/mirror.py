"""The leader's side of collapsing across replicas (``gateway.cache.remote_flights``): a
``FlightListener`` that writes its flight into the flight's Redis stream, in order, off the request
path: the status and headers (``h``), every chunk (``c``), the end (``end``). Entries go in
pipelined batches; the two questions for a script (the answer passed ``max_entry_bytes``; the
leader's own readers all left) are asked in their place in that order. A Redis failure stops the
mirror (joiners then time out or read the error)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Final

import orjson

from gateway.cache.fleet_link import ENDED_TTL_S, MAX_READ, FleetLink, FlightNames, ms
from gateway.upstream.base import Headers

_DECIDE: Final = b"?"  # a queue item that asks UNLESS_READ (its value: the marker), not an entry


class Mirror:
    """Writes one flight into its stream, in order, off the request path (a ``FlightListener``)."""

    def __init__(self, link: FleetLink, names: FlightNames) -> None:
        self._link = link
        self._stream, self._lead, self._readers = names.stream, names.lead, names.readers
        self._queue: deque[tuple[bytes, bytes, asyncio.Future[bool] | None]] = deque()
        self._size = 0
        self._past_limit = False
        self._stopped = False
        self._writer: asyncio.Task[None] | None = None

    def started(self, status: int, headers: Headers) -> None:
        pairs = [[name.decode("latin-1"), value.decode("latin-1")] for name, value in headers]
        self._push(b"h", orjson.dumps({"status": status, "headers": pairs}))

    def chunk(self, data: bytes) -> None:
        self._size += len(data)
        if not self._past_limit and self._size > self._link.capture_limit:
            self._past_limit = True  # the answer will not be stored: mirror on only for a joiner
            self._push(_DECIDE, b"too-large")
        self._push(b"c", data)

    def ended(self, outcome: str) -> None:
        self._push(b"end", outcome.encode())

    async def abandoned(self) -> bool:
        """The leader's own readers all left: True (stop the fetch) unless a joiner reads."""
        if self._stopped:
            return True
        decided: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._push(_DECIDE, b"error", decided)
        return not await decided

    def _push(self, field: bytes, value: bytes, decided: asyncio.Future[bool] | None = None) -> None:
        if self._stopped:
            if decided is not None:
                decided.set_result(False)
            return
        self._queue.append((field, value, decided))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write())
            self._link.spawn(_awaited(self._writer))

    async def _write(self) -> None:
        """Send what is queued, in order: entries in pipelined batches, each decision on its own."""
        link = self._link
        queue = self._queue
        for _ in range(1_000_000):  # bounded: each round takes at least one item
            if not queue or self._stopped:
                break
            decided = queue[0][2] if queue[0][0] == _DECIDE else None
            try:
                async with asyncio.timeout(link.timeout * 4):
                    if queue[0][0] == _DECIDE:
                        marker = queue.popleft()[1]
                        keys = [self._stream, self._readers, self._lead]
                        if not await link.unless_read(keys=keys, args=[ms(ENDED_TTL_S), marker]):
                            self._stopped = True
                        if decided is not None:
                            decided.set_result(not self._stopped)
                    else:
                        await self._send(queue)
            except link.errors as exc:
                link.guard.failed(exc)
                if decided is not None and not decided.done():
                    decided.set_result(False)
                self._stopped = True
                break
            link.guard.succeeded()
        if self._stopped:
            for _, _, waiting in queue:
                if waiting is not None and not waiting.done():
                    waiting.set_result(False)
            queue.clear()

    async def _send(self, queue: deque[tuple[bytes, bytes, asyncio.Future[bool] | None]]) -> None:
        pipe = self._link.client.pipeline(transaction=False)
        ended = False
        for _ in range(min(len(queue), MAX_READ)):
            if queue[0][0] == _DECIDE:
                break
            field, value, _ = queue.popleft()
            pipe.xadd(self._stream, {field: value})
            ended = ended or field == b"end"
        if ended:
            pipe.pexpire(self._stream, ms(ENDED_TTL_S))
            pipe.delete(self._lead)  # new requests find the stored answer, or lead anew
            self._stopped = True
        else:
            live = ms(self._link.idle_timeout + ENDED_TTL_S)
            pipe.pexpire(self._stream, live)
            pipe.pexpire(self._lead, live)
        await pipe.execute()


async def _awaited(task: asyncio.Task[None]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        await task
