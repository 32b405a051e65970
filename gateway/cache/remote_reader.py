"""A joiner's side of collapsing across replicas (``gateway.cache.remote_flights``): another
replica's flight, read from its Redis stream (``XREAD BLOCK``) as it is written, as an
``UpstreamResponse`` the proxy relays, meters and accounts like any other. It waits at most the
upstream's ``idle_timeout`` between two chunks; an ``end`` other than ``ok`` (or a Redis failure)
ends it as a broken upstream stream does."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

import orjson

from gateway.cache.fleet_link import MAX_READ, FleetLink, FlightNames, ms
from gateway.upstream.base import Headers, UpstreamStreamError


class RemoteReader:
    """A joiner's view of another replica's flight: an ``UpstreamResponse`` relayed as any other."""

    def __init__(self, link: FleetLink, names: FlightNames) -> None:
        self._link = link
        self._stream, self._readers = names.stream, names.readers
        self._after = b"0-0"
        self._ahead: deque[tuple[bytes, bytes]] = deque()  # entries read but not yet relayed
        self._closed = False
        self.status = 0
        self.headers: Headers = ()

    async def read_head(self, patience: float) -> bool:
        """Wait at most ``patience`` s for the flight's headers: True once they are in."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        for _ in range(100_000):
            left = deadline - loop.time()
            if left <= 0:
                return False
            entry = await self._next(left)
            if entry is None:
                continue
            field, value = entry
            if field != b"h":
                return False  # ended before any header: declined, or stopped
            head = orjson.loads(value)
            self.status = int(head["status"])
            self.headers = tuple((k.encode("latin-1"), v.encode("latin-1")) for k, v in head["headers"])
            return True
        return False  # pragma: no cover - bounded by the deadline above

    async def _next(self, wait: float) -> tuple[bytes, bytes] | None:
        if not self._ahead:
            for entry_id, fields in await self._xread(wait):
                self._after = entry_id
                self._ahead.extend(fields.items())
        return self._ahead.popleft() if self._ahead else None

    async def _xread(self, wait: float) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """The stream's entries after the last read, waiting at most ``wait`` s for the first one."""
        link = self._link
        block = ms(min(wait, link.block))
        async with asyncio.timeout(block / 1000 + link.timeout * 4):
            answer = await link.client.xread({self._stream: self._after}, count=MAX_READ, block=block)
        return [] if not answer else list(answer[0][1])

    def iter_raw(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        idle = self._link.idle_timeout
        errors: tuple[type[Exception], ...] = (*self._link.errors, TimeoutError)
        deadline = loop.time() + idle
        for _ in range(100_000_000):  # bounded by the deadline: every round reads or waits
            left = deadline - loop.time()
            if left <= 0:
                raise UpstreamStreamError("the replica fetching this answer sent nothing for a while", timed_out=True)
            try:
                entry = await self._next(left)
            except errors as exc:
                raise UpstreamStreamError(f"the shared answer could not be read: {type(exc).__name__}") from exc
            if entry is None:
                continue
            field, value = entry
            if field == b"c":
                deadline = loop.time() + idle
                yield value
            elif field == b"end":
                if value == b"ok":
                    return
                raise UpstreamStreamError(f"the shared answer broke off ({value.decode('latin-1')})")

    def arrived_size(self) -> int | None:
        return None

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._link.spawn(self._leave())

    async def _leave(self) -> None:
        link = self._link
        with contextlib.suppress(*link.errors, TimeoutError):
            async with asyncio.timeout(link.timeout * 4):
                await link.client.decr(self._readers)
