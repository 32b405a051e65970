"""The durable queue between the replicas and PostgreSQL: a Redis Stream with one consumer group.

Each replica appends its records to the stream in batches (``push``: one entry per batch, XADD)
and reads batches from the group (``read``: XREADGROUP), its own or any other replica's. A batch
read stays pending with its reader until the reader confirms it after the PostgreSQL commit
(``done``: XACK, then XDEL, so the stream keeps only what is not yet written). A batch pending
with a reader for ``claim_after`` seconds (the replica died, or its writes keep failing) is taken
over by another replica (``claim``: XAUTOCLAIM), which writes it: a replica killed with SIGKILL
loses none of the records it had pushed. A batch may so be written twice; the rows' primary key
makes the second write a no-op (``gateway.usage.postgres.write``).

Consumers are named ``host:pid:random`` (who holds what shows in XINFO CONSUMERS); consumers of
replicas long gone, with nothing pending, are removed from the group (``forget_idle_consumers``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any, Final

import orjson

from gateway.usage.postgres.write import Entry
from gateway.usage.schema import UsageRecord

FIELD: Final = b"records"
GROUP: Final = "ledger"


class BadEntry(ValueError):
    """A stream entry that is not a batch of usage records (written by something else)."""


def encode(entries: Sequence[Entry]) -> bytes:
    return orjson.dumps([[e.id, *e.record] for e in entries])


def decode(payload: bytes) -> list[Entry]:
    try:
        items = orjson.loads(payload)
        entries = [Entry(item[0], UsageRecord(*item[1:])) for item in items]
    except (orjson.JSONDecodeError, TypeError, IndexError, KeyError) as exc:
        raise BadEntry(str(exc)) from None
    if not all(isinstance(e.id, str) and isinstance(e.record.request_id, str) for e in entries):
        raise BadEntry("ids must be strings")
    return entries


def consumer_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


class RecordStream:
    """The stream ``key`` and its consumer group, as seen by the consumer ``consumer``."""

    def __init__(self, client: Any, key: str, consumer: str, *, claim_after: float, batch: int) -> None:
        """``client``: redis-py's asyncio client (its socket timeout longer than ``block``)."""
        self._client = client
        self.key = key
        self.consumer = consumer
        self._claim_after_ms = max(1, int(claim_after * 1000))
        self.batch = batch  # stream entries per read
        self._claim_cursor = "0-0"

    async def create_group(self) -> None:
        """The consumer group (and the stream), unless they exist."""
        try:
            await self._client.xgroup_create(self.key, GROUP, id="0", mkstream=True)
        except Exception as exc:  # redis-py's ResponseError: the group exists already
            if "BUSYGROUP" not in str(exc):
                raise

    async def push(self, entries: Sequence[Entry]) -> None:
        await self._client.xadd(self.key, {FIELD: encode(entries)})

    async def read(self, block: float | None) -> list[tuple[bytes, bytes]]:
        """New batches for this consumer (waiting at most ``block`` seconds; None: not at all)."""
        reply = await self._client.xreadgroup(
            GROUP,
            self.consumer,
            {self.key: ">"},
            count=self.batch,
            block=None if block is None else max(1, int(block * 1000)),
        )
        return [item for _, items in reply or () for item in _payloads(items)]

    async def read_own(self) -> list[tuple[bytes, bytes]]:
        """The batches pending with this consumer (read before, not yet confirmed)."""
        reply = await self._client.xreadgroup(GROUP, self.consumer, {self.key: "0"}, count=self.batch)
        return [item for _, items in reply or () for item in _payloads(items)]

    async def claim(self) -> list[tuple[bytes, bytes]]:
        """Batches pending with another consumer for ``claim_after`` seconds, now this one's."""
        reply = await self._client.xautoclaim(
            self.key, GROUP, self.consumer, self._claim_after_ms, start_id=self._claim_cursor, count=self.batch
        )
        cursor, items = reply[0], reply[1]
        self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        return list(_payloads(items))

    async def done(self, ids: Sequence[bytes]) -> None:
        """Confirm batches written (XACK) and drop them from the stream (XDEL)."""
        if not ids:
            return
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.xack(self.key, GROUP, *ids)
            pipe.xdel(self.key, *ids)
            await pipe.execute()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def forget_idle_consumers(self, idle: float) -> int:
        """Remove the consumers with nothing pending, idle for ``idle`` seconds (gone replicas)."""
        removed = 0
        for info in await self._client.xinfo_consumers(self.key, GROUP):
            name = info["name"].decode() if isinstance(info["name"], bytes) else str(info["name"])
            if name != self.consumer and int(info["pending"]) == 0 and int(info["idle"]) > idle * 1000:
                await self._client.xgroup_delconsumer(self.key, GROUP, name)
                removed += 1
        return removed


def _payloads(items: Any) -> list[tuple[bytes, bytes]]:
    """(entry id, payload) of each entry; an entry deleted meanwhile (no fields) is skipped."""
    out: list[tuple[bytes, bytes]] = []
    for entry_id, fields in items or ():
        if fields:
            out.append((entry_id, fields.get(FIELD, b"")))
    return out
