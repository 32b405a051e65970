"""Collapsing across replicas: one upstream fetch per cache key for the whole fleet, relayed live.

``gateway.cache.flights`` collapses identical requests within one process. With the Redis tier on
(``[shared] redis_url``), a replica about to go upstream for a storable answer first claims the
key's lead in Redis (``SET NX`` with a lease). The replica that wins fetches, and mirrors its
flight into a Redis stream as it arrives: the answer's status and headers, then every chunk, then
an end marker. A replica that loses joins instead: it reads the stream from its start with
``XREAD BLOCK``, so its client sees a stream's events while they are generated, not once
generation ends (Helicone's way), and the fleet pays for one upstream call. A joiner never waits
longer than ``collapse_timeout`` for the headers nor the upstream's ``idle_timeout`` between
chunks; a leader that dies mid-answer leaves its joiners a cleanly broken stream.

The leader's side is ``gateway.cache.mirror``, a joiner's ``gateway.cache.remote_reader``, what
they share ``gateway.cache.fleet_link``. Keys (under one hash tag per cache key), each with a TTL:
``P:cache:fl:{key}`` the stream, ``P:cache:fl:{key}:lead`` the lease, ``P:cache:fl:{key}:readers``
how many replicas read. Entries: ``h`` (the JSON status and headers), ``c`` (a chunk), ``end``
(``ok``, ``error``, ``declined`` or ``too-large``).

An answer over ``max_entry_bytes`` will not be stored; its mirror stops there (``too-large``)
unless a joiner is reading already, atomically decided by a script against the joiners' own
atomic join, so a joiner is never cut off by the limit. A joiner finds nothing to join when the
lead's answer was declined (an error: it goes upstream on its own, never sent another's error).
Redis slow or down: the tier's breaker (``gateway.state.guard``) says so, and every replica goes
upstream on its own, as without collapsing.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any, Final

from gateway.cache.fleet_link import ENDED_TTL_S, FleetLink, FlightNames, ms
from gateway.cache.mirror import Mirror
from gateway.cache.remote_reader import RemoteReader
from gateway.state.guard import Guard

logger = logging.getLogger("gateway.cache.remote_flights")


class Elsewhere:
    """``RemoteFlights.lead``'s answer when another replica leads the fleet's fetch: join it."""

    __slots__ = ()


ELSEWHERE: Final = Elsewhere()


class RemoteFlights:
    """The fleet's flights, in the Redis of the cache's second tier."""

    def __init__(
        self,
        client: Any,
        errors: tuple[type[Exception], ...],
        guard: Guard,
        *,
        prefix: str,
        timeout: float,
        collapse_timeout: float,
        idle_timeout: float,
        capture_limit: int,
    ) -> None:
        self._link = FleetLink(client, errors, guard, timeout, idle_timeout, capture_limit)
        self._prefix = f"{prefix}:fl"
        self._collapse_timeout = collapse_timeout
        # Reading a flight's headers: Redis failing, or an entry this version cannot read.
        self._head_errors: tuple[type[Exception], ...] = (*errors, ValueError, KeyError, TypeError)
        self.joined = 0  # answers this replica relayed from another's flight

    async def lead(self, key: str) -> Mirror | Elsewhere | None:
        """The mirror of this replica's flight for ``key`` when it leads the fleet's; ``ELSEWHERE``
        when another replica leads (then ``join`` it); None when Redis does not answer."""
        link = self._link
        if not link.guard.available():
            return None
        names = FlightNames.of(self._prefix, key)
        lease = ms(self._collapse_timeout + link.idle_timeout)
        try:
            async with asyncio.timeout(link.timeout):
                won = await link.client.set(names.lead, secrets.token_hex(8), nx=True, px=lease)
        except link.errors as exc:
            link.guard.failed(exc)
            return None
        link.guard.succeeded()
        return Mirror(link, names) if won else ELSEWHERE

    async def join(self, key: str) -> RemoteReader | None:
        """A reader of another replica's flight for ``key``, once its headers are in; None when
        there is none, it was declined or stopped at the size limit, or ``collapse_timeout`` passed."""
        link = self._link
        if not link.guard.available():
            return None
        names = FlightNames.of(self._prefix, key)
        try:
            async with asyncio.timeout(link.timeout):
                keys = [names.stream, names.lead, names.readers]
                joined = await link.join(keys=keys, args=[ms(link.idle_timeout + ENDED_TTL_S)])
        except link.errors as exc:
            link.guard.failed(exc)
            return None
        link.guard.succeeded()
        if not joined:
            return None
        reader = RemoteReader(link, names)
        try:
            ready = await reader.read_head(self._collapse_timeout)
        except self._head_errors as exc:
            logger.debug("cache: could not join the flight of another replica: %s", exc)
            ready = False
        if not ready:
            await reader.aclose()
            return None
        self.joined += 1
        return reader

    async def aclose(self) -> None:
        await self._link.aclose()
