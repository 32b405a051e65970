"""The shared store's way to Redis: its Lua scripts, pipelined.

Each call is still one script (``EVALSHA``) and one round trip for the request that makes it; what
the ``Batcher`` saves is the cost around it. Awaited calls (admissions, leases) made in the same
turn of the event loop go out in one write on one connection and come back in one read (a pipeline, no
transaction: each script is atomic on its own; ``redis_client.pipelined`` sends it). Calls nobody waits for (``post``:
settlements, lease releases) are off the request path: they wait ``linger`` seconds and go out
together in a write of their own (never in front of an admission, which would wait for them). At
most ``flights`` writes are in flight at once; calls made meanwhile go out together when one comes
back, so under load the batches grow instead of the connections (redis-py's pool refuses past
100). An awaited call whose caller gave up (its timeout) before it was written is not sent. A
posted call is never dropped while the store runs: ``drain`` sends what is waiting and waits for
what is in flight (shutdown).

A script unknown to the server (Redis restarted empty) is loaded and its calls sent again, once.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

# Commands in, one reply per command out (an error reply as its exception, not raised), on one
# connection in one write: ``redis_client.pipelined``.
Send = Callable[[list[tuple[Any, ...]]], Awaitable[list[Any]]]


@dataclass(frozen=True, slots=True)
class LuaScript:
    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> LuaScript:
        return cls(source, hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest())


@dataclass(slots=True)
class _Call:
    script: LuaScript
    command: tuple[Any, ...]  # EVALSHA, sha, the number of keys, the keys, the arguments
    future: asyncio.Future[Any] | None  # None: posted, nobody waits


class Batcher:
    def __init__(
        self,
        send: Send,
        *,
        timeout: float,
        errors: tuple[type[Exception], ...],
        on_posted: Callable[[BaseException | None], None],
        linger: float = 0.005,
        flights: int = 4,
    ) -> None:
        """``timeout``: a whole write and its read; ``errors``: what the client raises when Redis is
        unreachable; ``on_posted``: how each write with posted calls went (None: answered)."""
        self._send_commands = send
        self._timeout = timeout
        self._errors: tuple[type[BaseException], ...] = (*errors, TimeoutError, OSError)
        self._on_posted = on_posted
        self._linger = linger
        self._flights = flights
        self._waiting: list[_Call] = []  # awaited calls not sent yet: they go at the next turn
        self._posted: list[_Call] = []  # posted calls not sent yet: they go within linger
        self._soon: asyncio.Handle | None = None
        self._later: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def call(self, script: LuaScript, keys: list[str], args: list[Any]) -> Any:
        """Run ``script`` and answer its reply (an error reply is raised)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting.append(_Call(script, ("EVALSHA", script.sha, len(keys), *keys, *args), future))
        if self._soon is None:
            self._soon = loop.call_soon(self._send)
        return await future

    def post(self, script: LuaScript, keys: list[str], args: list[Any]) -> None:
        """Run ``script`` within ``linger`` seconds, nobody waiting (how it went: ``on_posted``)."""
        self._posted.append(_Call(script, ("EVALSHA", script.sha, len(keys), *keys, *args), None))
        if self._later is None:
            self._later = asyncio.get_running_loop().call_later(self._linger, self._send_posted)

    async def drain(self) -> None:
        """Send everything waiting and wait for every write in flight (each within its timeout)."""
        if self._soon is not None:
            self._soon.cancel()
        if self._later is not None:
            self._later.cancel()
            self._later = None
        for _ in range(100):  # bounded: each turn sends or waits for a write that ends by its timeout
            if self._waiting:
                self._send()
            if self._posted:
                self._send_posted()
            if not self._tasks:
                return
            await asyncio.wait(set(self._tasks))

    # ------------------------------------------------------------------------------ internals

    def _send(self) -> None:
        """The awaited calls made since the last write."""
        self._soon = None
        if not self._waiting or len(self._tasks) >= self._flights:
            return  # sent when a write in flight comes back
        batch = [call for call in self._waiting if call.future is not None and not call.future.done()]
        self._waiting = []
        if batch:
            self._start(batch)

    def _send_posted(self) -> None:
        """The posted calls made since the last write of posted calls."""
        self._later = None
        if not self._posted or len(self._tasks) >= self._flights:
            return  # sent when a write in flight comes back
        self._start(self._posted)
        self._posted = []

    def _start(self, batch: list[_Call]) -> None:
        task = asyncio.get_running_loop().create_task(self._write(batch))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._waiting:
            self._send()
        if self._posted and self._later is None:
            self._later = asyncio.get_running_loop().call_later(self._linger, self._send_posted)

    async def _write(self, batch: list[_Call]) -> None:
        failure: BaseException | None = None
        try:
            async with asyncio.timeout(self._timeout):
                replies = await self._pipeline(batch)
                unknown = {c.script for c, r in zip(batch, replies, strict=True) if _no_script(r)}
                if unknown:  # Redis restarted empty: load the scripts, send their calls again
                    await self._send_commands([("SCRIPT", "LOAD", script.source) for script in unknown])
                    again = [i for i, (c, r) in enumerate(zip(batch, replies, strict=True)) if _no_script(r)]
                    for i, reply in zip(again, await self._pipeline([batch[i] for i in again]), strict=True):
                        replies[i] = reply
        except self._errors as exc:
            failure = exc
            for call in batch:
                if call.future is not None and not call.future.done():
                    call.future.set_exception(exc)
        else:
            for call, reply in zip(batch, replies, strict=True):
                if call.future is None or call.future.done():
                    continue
                if isinstance(reply, BaseException):
                    call.future.set_exception(reply)
                else:
                    call.future.set_result(reply)
        if any(call.future is None for call in batch):
            self._on_posted(failure)

    async def _pipeline(self, batch: list[_Call]) -> list[Any]:
        return await self._send_commands([call.command for call in batch])


def _no_script(reply: Any) -> bool:
    """redis-py's ``NoScriptError`` (not imported here: redis-py is imported only when configured)."""
    return isinstance(reply, Exception) and type(reply).__name__ == "NoScriptError"
