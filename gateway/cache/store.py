"""The response cache's in-memory tier: entries by key, bounded in bytes, least recently used
evicted first, each gone once past its freshness lifetime plus a stale grace.

Built on cachetools' TLRUCache (the time-to-use of an entry is ``stored_at + ttl + stale_grace``,
its size ``Entry.size``). Not thread-safe, by design: the gateway serves from one event loop, and
nothing here awaits.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import Cache, TLRUCache

from gateway.types import Header
from gateway.usage.model import Usage

# What an entry costs besides its body and headers (the objects holding it, its key): an
# estimate, so that many tiny entries still count against the bound.
ENTRY_OVERHEAD = 256


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored answer: status, headers and body as the client is to get them, whether the body is
    an event stream, what it belongs to (for purges), when it was stored (``time.time()``), for
    how many seconds from then it is fresh, and the usage a whole (non-streamed) body reports, read
    once when it was stored so that a hit need not parse it again."""

    status: int
    headers: tuple[Header, ...]
    body: bytes
    event_stream: bool
    model: str
    namespace: str
    stored_at: float
    ttl: float
    usage: Usage | None = None

    @property
    def size(self) -> int:
        """The bytes this entry counts for: body, header names and values, and ``ENTRY_OVERHEAD``."""
        return len(self.body) + sum(len(name) + len(value) for name, value in self.headers) + ENTRY_OVERHEAD

    @property
    def expires(self) -> float:
        """When the entry stops being fresh (same clock as ``stored_at``)."""
        return self.stored_at + self.ttl


class _Entries(TLRUCache[str, Entry]):
    """A TLRUCache that counts what it evicts to make room and what it drops as expired."""

    def __init__(self, max_bytes: int, stale_grace: float, clock: Callable[[], float]) -> None:
        super().__init__(max_bytes, self._time_to_use, clock, _size_of)
        self.stale_grace = stale_grace
        self.evictions = 0
        self.expirations = 0

    def _time_to_use(self, _key: str, entry: Entry, _now: float) -> float:
        return entry.expires + self.stale_grace

    def popitem(self) -> tuple[str, Entry]:
        # Called by cachetools only to make room for a new item (after dropping expired ones).
        item = super().popitem()
        self.evictions += 1
        return item

    def expire(self, time: float | None = None) -> list[tuple[str, Entry]]:
        expired = super().expire(time)
        self.expirations += len(expired)
        return expired

    def peek(self, key: str) -> Entry:
        """The entry under ``key`` without making it the most recently used (KeyError if absent)."""
        return Cache.__getitem__(self, key)


def _size_of(entry: Entry) -> int:
    return entry.size


class MemoryStore:
    """Entries by cache key, at most ``max_bytes`` of them (by ``Entry.size``).

    An entry is gone ``stale_grace`` seconds after it stops being fresh (``stored_at + ttl``): the
    grace keeps it for requests that accept stale answers (``max-stale``). When a new entry needs
    room, the least recently used (by ``get`` or ``put``) go first. ``clock`` is the clock of
    ``Entry.stored_at`` (``time.time``: entries may come from another tier or process).
    """

    def __init__(self, max_bytes: int, *, stale_grace: float = 0.0, clock: Callable[[], float] = time.time) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        if stale_grace < 0:
            raise ValueError("stale_grace must not be negative")
        self._max_bytes = max_bytes
        self._clock = clock
        self._entries = _Entries(max_bytes, stale_grace, clock)

    def get(self, key: str) -> Entry | None:
        """The entry under ``key``, now the most recently used; None when absent or gone."""
        return self._entries.get(key)

    def put(self, key: str, entry: Entry) -> bool:
        """Store ``entry`` under ``key``, replacing any entry there, evicting others as needed.

        False, with nothing under ``key`` any more, when the entry can never fit (larger than
        ``max_bytes``) or is already gone by the clock (past its lifetime and grace): the previous
        entry is dropped either way, since a newer answer superseded it.
        """
        self.delete(key)
        if entry.size > self._max_bytes or not self._clock() < entry.expires + self._entries.stale_grace:
            return False
        try:
            self._entries[key] = entry
        except ValueError:  # cachetools' "value too large": checked above, kept as a guard
            return False
        return key in self._entries

    def delete(self, key: str) -> None:
        """Drop the entry under ``key``, if any."""
        with contextlib.suppress(KeyError):  # absent, or expired (cachetools removes it, then says so)
            del self._entries[key]

    def purge(self, *, model: str | None = None, namespace: str | None = None) -> int:
        """Drop the entries of ``model`` and/or ``namespace`` (every entry when both are None);
        how many live entries were dropped."""
        self._entries.expire()
        doomed = [
            key
            for key in list(self._entries)
            if (model is None or self._entries.peek(key).model == model)
            and (namespace is None or self._entries.peek(key).namespace == namespace)
        ]
        for key in doomed:
            self.delete(key)
        return len(doomed)

    @property
    def max_bytes(self) -> int:
        """The bound on ``bytes``."""
        return self._max_bytes

    @property
    def bytes(self) -> int:
        """The bytes the live entries count for."""
        self._entries.expire()
        return int(self._entries.currsize)

    @property
    def entries(self) -> int:
        """How many live entries there are."""
        self._entries.expire()
        return len(self._entries)

    @property
    def evictions(self) -> int:
        """Entries dropped to make room for others (not counting expiry, replacement or purges)."""
        return self._entries.evictions

    @property
    def expirations(self) -> int:
        """Entries dropped because their lifetime and grace had passed (counted when noticed)."""
        return self._entries.expirations
