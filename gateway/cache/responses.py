"""The response cache's state: stored answers, the fetches in flight, and what it counted.

``ResponseCache`` is the one object the request path (``gateway.proxy.cached``), the admin purge and
the metrics share. It decides nothing about requests (``gateway.cache.policy`` does); it keeps
answers: ``lookup`` finds a stored one, ``begin`` opens a flight that others may join, and a flight
that completes is offered to ``keep``, which stores only what may be replayed: a complete 200
(an event stream through its ``data: [DONE]``), at most ``max_entry_bytes``, with its safe headers.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from gateway.cache.flights import Flight, Flights
from gateway.cache.redis_tier import RedisTier
from gateway.cache.store import Entry, MemoryStore
from gateway.config import CacheSettings
from gateway.headers import content_encoding, is_event_stream
from gateway.ops.metrics import CacheSnapshot
from gateway.types import Header
from gateway.upstream.base import Headers
from gateway.usage.meter import UsageMeter
from gateway.usage.model import Usage

# The upstream's headers a replay may repeat: what describes the body, nothing about the exchange
# (no request ids, rate-limit headers, cookies or dates; Content-Length is computed anew).
REPLAYED_HEADERS = frozenset({b"content-type", b"content-encoding", b"content-language", b"openai-version"})
SSE_DONE = b"data: [DONE]"


@dataclass(frozen=True, slots=True)
class Stored:
    """What ``keep`` needs besides the flight: where the answer belongs."""

    model: str
    namespace: str
    ttl: float


class ResponseCache:
    def __init__(
        self, settings: CacheSettings, *, remote: RedisTier | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        """``remote``: the second tier in Redis (``[shared] redis_url``), None without."""
        self.settings = settings
        self.remote = remote
        self._clock = clock
        self._store = MemoryStore(settings.max_bytes, clock=clock, stale_grace=settings.keep_stale)
        self._flights = Flights()
        self._stores = 0
        self._skips: Counter[str] = Counter()

    def now(self) -> float:
        return self._clock()

    def lookup(self, key: str) -> Entry | None:
        return self._store.get(key)

    async def lookup_remote(self, key: str) -> Entry | None:
        """The second tier's entry for ``key`` (kept in memory too), or None (a miss, or Redis down)."""
        if self.remote is None:
            return None
        entry = await self.remote.get(key)
        if entry is not None:
            self._store.put(key, entry)
        return entry

    def joinable(self, key: str) -> Flight | None:
        return self._flights.joinable(key)

    def begin(self, key: str, stored: Stored) -> Flight:
        """A flight for ``key`` whose complete answer is offered to ``keep``: one that identical
        requests may join, or, when collapsing is off or one is in flight already, a private one
        (it only captures)."""

        def on_end(flight: Flight) -> None:
            if not flight.shared:
                return  # declined: the request path counted why
            if flight.error is not None:
                self._skips["cut"] += 1  # broke off, or every reader left before the end
            elif not flight.capturing:
                self._skips["too-large"] += 1
            else:
                flight.stored = self.keep(flight.key, flight.status, flight.headers, flight.body, stored)

        limit = self.settings.max_entry_bytes
        flight = self._flights.begin(key, limit, on_end) if self.settings.collapse else None
        return flight if flight is not None else Flight(key, limit, on_end)

    def keep(self, key: str, status: int, headers: Headers, body: bytes, stored: Stored) -> bool:
        """Store a complete answer when it may be replayed; counts a skip (by reason) otherwise."""
        event_stream = is_event_stream(headers)
        reason = self._unstorable(status, body, event_stream)
        if reason is None:
            entry = Entry(
                status=status,
                headers=replayed_headers(headers, body, event_stream),
                body=body,
                event_stream=event_stream,
                model=stored.model,
                namespace=stored.namespace,
                stored_at=self._clock(),
                ttl=stored.ttl,
                usage=None if event_stream else usage_of(headers, body),
            )
            if self._store.put(key, entry):
                self._stores += 1
                if self.remote is not None:
                    self.remote.put(key, entry)
                return True
            reason = "too-large"
        self._skips[reason] += 1
        return False

    def skip(self, reason: str) -> None:
        """Count an answer that was not stored for a reason the request path saw."""
        self._skips[reason] += 1

    def purge(self, *, model: str | None = None, namespace: str | None = None) -> int:
        return self._store.purge(model=model, namespace=namespace)

    async def purge_remote(self, *, model: str | None = None, namespace: str | None = None) -> int | None:
        """Purge the second tier too (None when there is none)."""
        if self.remote is None:
            return None
        return await self.remote.purge(model=model, namespace=namespace)

    def stats(self) -> CacheSnapshot:
        store, remote = self._store, self.remote
        return CacheSnapshot(store.bytes, store.entries, store.evictions, self._stores, dict(self._skips),
                          len(self._flights), None if remote is None else remote.up,
                          0 if remote is None else remote.hits)  # fmt: skip

    def _unstorable(self, status: int, body: bytes, event_stream: bool) -> str | None:
        if status != 200:
            return "status"
        if len(body) > self.settings.max_entry_bytes:
            return "too-large"
        if event_stream and not body.rstrip().endswith(SSE_DONE):
            return "unfinished"
        return None


def usage_of(headers: Headers, body: bytes) -> Usage | None:
    """The usage a whole stored body reports (read as the relay's meter reads it)."""
    meter = UsageMeter(False, False, content_encoding=content_encoding(headers))
    meter.feed(body)
    return meter.finish()


def replayed_headers(headers: Headers, body: bytes, event_stream: bool) -> tuple[Header, ...]:
    kept = [(name.lower(), value) for name, value in headers if name.lower() in REPLAYED_HEADERS]
    if not event_stream:
        kept.append((b"content-length", str(len(body)).encode()))
    return tuple(kept)
