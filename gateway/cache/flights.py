"""Collapsing: one upstream fetch per cache key at a time, shared by every request that asks for it.

The first request for a key (the leader) opens a ``Flight``; identical requests that arrive while
it is in flight (followers) join it instead of going upstream. Once the answer's headers are in,
the leader either shares it (``share``: a 200 the cache may store) or not (``decline``: followers
then go upstream on their own, never sent the leader's error). A shared answer is read off the
upstream by a task of its own into the flight's buffer, and every participant, the leader
included, reads that buffer from its start: what arrived so far, then live. So a leader that hangs
up does not break its followers; when the last reader leaves before the end, the fetch stops (the
upstream generation is abandoned, as for any request).

The buffer keeps the whole answer while it may still be stored (up to ``capture_limit`` bytes);
past that the flight stops taking followers and keeps only what its slowest reader has not read.
A complete answer is handed to ``on_complete`` (the cache stores it). One event loop, no locks.
A ``listener`` (``gateway.cache.remote_flights``: other replicas join through Redis) is told the
answer's headers, each chunk and how the flight ended, as they happen.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from gateway.upstream.base import Headers, UpstreamResponse, UpstreamStreamError


class FlightListener(Protocol):
    """Told what a flight shares, as it happens (never awaited: it must not block)."""

    def started(self, status: int, headers: Headers) -> None: ...

    def chunk(self, data: bytes) -> None: ...

    def ended(self, outcome: str) -> None:
        """``ok``, ``error`` (broke off, or every reader left) or ``declined`` (not shared)."""

    async def abandoned(self) -> bool:
        """Every reader of this process left before the end: True to stop the fetch (nobody else
        reads it either), False to read on (the flight then completes for the others)."""


class Flight:
    """One upstream answer being fetched for a cache key."""

    def __init__(self, key: str, capture_limit: int, on_end: Callable[[Flight], None]) -> None:
        self.key = key
        self.status = 0
        self.headers: Headers = ()
        self.capturing = True  # the whole answer is still in the buffer (it may be stored)
        self.done = False
        self.shared = False  # the answer was shared (else declined, or not decided yet)
        self.stored = False  # the complete answer went to the store (set by the flight's owner)
        self.error: UpstreamStreamError | None = None
        self._ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._capture_limit = capture_limit
        self._on_end = on_end
        self._chunks: list[bytes] = []
        self._base = 0  # the index of self._chunks[0] among all the chunks received
        self._size = 0
        self._readers: set[FlightReader] = set()
        self._waiting = 0  # followers waiting for the answer's headers (about to become readers)
        self._more: asyncio.Future[None] | None = None
        self._pump: asyncio.Task[None] | None = None
        self.listener: FlightListener | None = None
        self._abandoning: asyncio.Task[None] | None = None  # asking the listener (kept referenced)

    @property
    def joinable(self) -> bool:
        """A new request may still join (and be sent the whole answer)."""
        return self.capturing and not self.done and not (self._ready.done() and not self._ready.result())

    @property
    def body(self) -> bytes:
        """The whole answer (meaningful once ``done`` without error while ``capturing``)."""
        return b"".join(self._chunks)

    async def wait_ready(self, patience: float) -> bool:
        """For a follower: True once the answer is shared, False when declined or after ``patience`` s."""
        self._waiting += 1
        try:
            async with asyncio.timeout(patience):
                return await asyncio.shield(self._ready)
        except TimeoutError:
            return False
        finally:
            self._waiting -= 1

    def decline(self) -> None:
        """The leader's answer will not be shared (an error, not storable, or no answer at all)."""
        if not self._ready.done():
            self._ready.set_result(False)
        if not self.done:
            self.done = True
            if self.listener is not None:
                self.listener.ended("declined")
            self._on_end(self)

    def share(self, response: UpstreamResponse) -> FlightReader:
        """Share ``response`` (its headers are in): returns the leader's reader."""
        self.status, self.headers = response.status, response.headers
        self.shared = True
        if self.listener is not None:
            self.listener.started(self.status, self.headers)
        reader = self.reader()
        self._pump = asyncio.create_task(self._read_upstream(response))
        self._ready.set_result(True)
        return reader

    def share_whole(self, status: int, headers: Headers, body: bytes) -> FlightReader:
        """Share an answer whose whole body has arrived already: no task, done at once."""
        self.status, self.headers, self.shared = status, headers, True
        if self.listener is not None:
            self.listener.started(status, headers)
        reader = self.reader()
        self._append(body)
        self.done = True
        if self.listener is not None:
            self.listener.ended("ok")
        self._ready.set_result(True)
        self._on_end(self)
        return reader

    def reader(self) -> FlightReader:
        reader = FlightReader(self)
        self._readers.add(reader)
        return reader

    async def _read_upstream(self, response: UpstreamResponse) -> None:
        try:
            async for chunk in response.iter_raw():
                self._append(chunk)
        except UpstreamStreamError as exc:
            self.error = exc
        except asyncio.CancelledError:
            self.error = UpstreamStreamError("every reader of the answer left before its end")
            raise
        finally:
            self.done = True
            if self.listener is not None:
                self.listener.ended("ok" if self.error is None else "error")
            self._wake()
            with contextlib.suppress(Exception):
                await response.aclose()
            self._on_end(self)

    def _append(self, chunk: bytes) -> None:
        if not chunk:
            return
        self._chunks.append(chunk)
        self._size += len(chunk)
        if self.listener is not None:
            self.listener.chunk(chunk)
        if self.capturing and self._size > self._capture_limit:
            self.capturing = False  # too big to store: keep only what a reader still needs
        if not self.capturing:
            self._trim()
        self._wake()

    def _trim(self) -> None:
        lowest = min((r.position for r in self._readers), default=self._base + len(self._chunks))
        drop = lowest - self._base
        if drop > 0:
            del self._chunks[:drop]
            self._base = lowest

    def _wake(self) -> None:
        more, self._more = self._more, None
        if more is not None and not more.done():
            more.set_result(None)

    async def _wait(self) -> None:
        if self._more is None:
            self._more = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._more)

    def _chunk(self, index: int) -> bytes | None:
        """Chunk ``index`` (counted from the answer's start), or None when it has not arrived yet."""
        offset = index - self._base
        if offset < 0:
            raise UpstreamStreamError("the reader fell behind what the flight kept")  # pragma: no cover
        return self._chunks[offset] if offset < len(self._chunks) else None

    def _leave(self, reader: FlightReader) -> None:
        self._readers.discard(reader)
        if not self._readers and not self._waiting and not self.done and self._pump is not None:
            if self.listener is None:
                self._pump.cancel()  # nobody reads on: stop the upstream generation
            else:
                self._abandoning = asyncio.create_task(self._abandon(self.listener, self._pump))
        elif not self.capturing:
            self._trim()

    async def _abandon(self, listener: FlightListener, pump: asyncio.Task[None]) -> None:
        """Stop the fetch unless the listener's side reads on or a reader came meanwhile."""
        if await listener.abandoned() and not self._readers and not self._waiting:
            pump.cancel()
        elif not self.capturing:
            self._trim()


class FlightReader:
    """One participant's view of a flight: an ``UpstreamResponse`` the proxy relays as any other."""

    __slots__ = ("_closed", "_flight", "position")

    def __init__(self, flight: Flight) -> None:
        self._flight = flight
        self.position = flight._base  # the next chunk to read, counted from the answer's start
        self._closed = False

    @property
    def status(self) -> int:
        return self._flight.status

    @property
    def headers(self) -> Headers:
        return self._flight.headers

    def iter_raw(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        flight = self._flight
        while True:
            chunk = flight._chunk(self.position)
            if chunk is not None:
                self.position += 1
                yield chunk
                continue
            if flight.done:
                if flight.error is not None:
                    raise UpstreamStreamError(str(flight.error), timed_out=flight.error.timed_out)
                return
            await flight._wait()

    def arrived_size(self) -> int | None:
        flight = self._flight
        if flight.done and flight.error is None and flight.capturing and self.position == 0:
            return flight._size
        return None

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._flight._leave(self)


class Flights:
    """The flights in progress, by cache key."""

    def __init__(self) -> None:
        self._by_key: dict[str, Flight] = {}

    def joinable(self, key: str) -> Flight | None:
        flight = self._by_key.get(key)
        return flight if flight is not None and flight.joinable else None

    def begin(self, key: str, capture_limit: int, on_end: Callable[[Flight], None]) -> Flight | None:
        """A new flight for ``key``, or None when one is in progress already (the caller then goes
        upstream without collapsing). ``on_end`` is called once the flight is over (done, failed,
        declined or abandoned), after it stopped taking followers."""
        if key in self._by_key:
            return None

        def ended(flight: Flight) -> None:
            if self._by_key.get(flight.key) is flight:
                del self._by_key[flight.key]
            on_end(flight)

        flight = Flight(key, capture_limit, ended)
        self._by_key[key] = flight
        return flight

    def __len__(self) -> int:
        return len(self._by_key)
