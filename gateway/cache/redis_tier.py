"""The response cache's second tier, in the Redis of ``[shared] redis_url``: answers stored by one
replica serve the others.

Every entry is one Redis string ``P:cache:<key>`` (a length-prefixed JSON header with the status,
headers and metadata, then the body) with a TTL of its freshness plus ``keep_stale``; sets
``P:cache:model:<model>`` and ``P:cache:ns:<namespace>`` name the entries of a model and of a
namespace, for purges. Reads wait at most ``[shared] timeout``; writes run off the request path.
The fleet's flights (collapsing across replicas, ``gateway.cache.remote_flights``) use the same
client and breaker. When Redis is slow or down the tier fails open: a lookup is a miss (memory and the upstream still
answer), a write is dropped, and a breaker stops asking for a while (``gateway.state.guard``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from typing import Any

import orjson

from gateway.cache.remote_flights import RemoteFlights
from gateway.cache.store import Entry
from gateway.config import CacheSettings, SharedSettings
from gateway.state.guard import Guard
from gateway.usage.model import Usage

logger = logging.getLogger("gateway.cache.redis_tier")

_FORMAT = 1
_PURGE_SCAN_LIMIT = 10_000  # SCAN batches at most, for a purge of everything


class RedisTier:
    def __init__(
        self,
        client: Any,
        errors: tuple[type[Exception], ...],
        settings: SharedSettings,
        cache: CacheSettings,
        *,
        idle_timeout: float,
    ) -> None:
        """``idle_timeout``: the upstream's, the longest a joiner of another replica's flight waits
        between two chunks."""
        self._client = client
        self._errors: tuple[type[Exception], ...] = (*errors, TimeoutError, OSError)
        self._prefix = f"{settings.key_prefix}:cache"
        self._timeout = settings.timeout
        self._keep_stale = cache.keep_stale
        self._guard = Guard(
            "response cache's Redis tier",
            logger,
            failures=settings.breaker_failures,
            cooldown=settings.breaker_cooldown,
            while_down=": memory and the upstream answer",
        )
        self._pending: set[asyncio.Task[None]] = set()
        self.hits = 0
        self.flights = RemoteFlights(
            client,
            self._errors,
            self._guard,
            prefix=self._prefix,
            timeout=settings.timeout,
            collapse_timeout=cache.collapse_timeout,
            idle_timeout=idle_timeout,
            capture_limit=cache.max_entry_bytes,
        )

    @property
    def up(self) -> bool:
        return self._guard.up

    async def get(self, key: str) -> Entry | None:
        if not self._guard.available():
            return None
        try:
            async with asyncio.timeout(self._timeout):
                blob = await self._client.get(f"{self._prefix}:{key}")
        except self._errors as exc:
            self._guard.failed(exc)
            return None
        self._guard.succeeded()
        entry = None if blob is None else decode(blob)
        if entry is not None:
            self.hits += 1
        return entry

    def put(self, key: str, entry: Entry) -> None:
        """Store ``entry`` in the background (dropped when Redis does not answer)."""
        if self._guard.available():
            self._spawn(self._put(key, entry))

    async def purge(self, *, model: str | None, namespace: str | None) -> int:
        """Remove the entries of ``model`` and/or ``namespace`` (both None: every entry)."""
        try:
            async with asyncio.timeout(self._timeout * 40):  # an admin's request: longer
                return await self._purge(model, namespace)
        except self._errors as exc:
            self._guard.failed(exc)
            return 0

    async def aclose(self) -> None:
        await self.flights.aclose()
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=self._timeout * 4)
        with contextlib.suppress(*self._errors):
            await self._client.aclose()

    async def _put(self, key: str, entry: Entry) -> None:
        name = f"{self._prefix}:{key}"
        ttl = max(1, math.ceil(entry.ttl + self._keep_stale))
        try:
            async with asyncio.timeout(self._timeout * 4):
                pipe = self._client.pipeline(transaction=False)
                pipe.set(name, encode(entry), ex=ttl)
                for index in (f"{self._prefix}:model:{entry.model}", f"{self._prefix}:ns:{entry.namespace}"):
                    pipe.sadd(index, name)
                    pipe.expire(index, ttl, gt=True)
                    pipe.expire(index, ttl, nx=True)
                await pipe.execute()
        except self._errors as exc:
            self._guard.failed(exc)
        else:
            self._guard.succeeded()

    async def _purge(self, model: str | None, namespace: str | None) -> int:
        client = self._client
        if model is None and namespace is None:
            removed = 0
            cursor = 0
            flights = f"{self._prefix}:fl:".encode()
            for _ in range(_PURGE_SCAN_LIMIT):
                cursor, names = await client.scan(cursor, match=f"{self._prefix}:*", count=500)
                names = [n for n in names if not n.startswith(flights)]  # answers in flight stay
                if names:
                    removed += sum(1 for n in names if b":model:" not in n and b":ns:" not in n)
                    await client.delete(*names)
                if cursor == 0:
                    break
            return removed
        sets = []
        if model is not None:
            sets.append(f"{self._prefix}:model:{model}")
        if namespace is not None:
            sets.append(f"{self._prefix}:ns:{namespace}")
        names = await (client.sinter(*sets) if len(sets) > 1 else client.smembers(sets[0]))
        if not names:
            return 0
        removed = int(await client.delete(*names))
        for index in sets:
            await client.srem(index, *names)
        return removed

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)


def encode(entry: Entry) -> bytes:
    header = orjson.dumps(
        {
            "v": _FORMAT,
            "status": entry.status,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in entry.headers],
            "event_stream": entry.event_stream,
            "model": entry.model,
            "namespace": entry.namespace,
            "stored_at": entry.stored_at,
            "ttl": entry.ttl,
            "usage": None if entry.usage is None else dataclasses.asdict(entry.usage),
        }
    )
    return len(header).to_bytes(4, "big") + header + entry.body


def decode(blob: bytes) -> Entry | None:
    """An entry written by ``encode``; None for anything else (another format, a damaged value)."""
    try:
        size = int.from_bytes(blob[:4], "big")
        header = orjson.loads(blob[4 : 4 + size])
        if header.get("v") != _FORMAT:
            return None
        return Entry(
            status=int(header["status"]),
            headers=tuple((k.encode("latin-1"), v.encode("latin-1")) for k, v in header["headers"]),
            body=blob[4 + size :],
            event_stream=bool(header["event_stream"]),
            model=str(header["model"]),
            namespace=str(header["namespace"]),
            stored_at=float(header["stored_at"]),
            ttl=float(header["ttl"]),
            usage=None if header.get("usage") is None else Usage(**header["usage"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError, orjson.JSONDecodeError):
        return None
