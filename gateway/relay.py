"""Relay an upstream response to the ASGI client: status, headers, then raw chunks as they arrive.

Nothing is buffered: each chunk is sent on as soon as it is read. While relaying, a watcher waits on
``receive()`` for the client's disconnect and cancels the relay at once, so an abandoned stream stops
the upstream generation instead of running on. The upstream response is closed on every path.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from gateway.headers import Header, client_response_headers
from gateway.upstream import UpstreamResponse, UpstreamStreamError

logger = logging.getLogger("gateway.relay")

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class Outcome(enum.Enum):
    COMPLETED = "completed"
    CLIENT_DISCONNECTED = "client_disconnected"
    UPSTREAM_BROKEN = "upstream_broken"


async def relay(response: UpstreamResponse, receive: Receive, send: Send, extra_headers: list[Header]) -> Outcome:
    """Relay and close ``response``; returns how the relay ended."""
    task = asyncio.current_task()
    assert task is not None
    watch = _DisconnectWatch(receive, task)
    try:
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": client_response_headers(response.headers, extra_headers),
            }
        )
        async for chunk in response.iter_raw():
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        watch.stand_down()  # uvicorn reports a disconnect once the response is complete
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return Outcome.COMPLETED
    except asyncio.CancelledError:
        if not watch.disconnected:
            raise  # cancelled from outside (shutdown): let it propagate
        task.uncancel()
        return Outcome.CLIENT_DISCONNECTED
    except UpstreamStreamError as exc:
        logger.warning("upstream stream broke mid-response: %s", exc)
        watch.stand_down()
        await _end_body(send)
        return Outcome.UPSTREAM_BROKEN
    finally:
        watch.stand_down()
        await response.aclose()


class _DisconnectWatch:
    """Cancels the relay task when the client disconnects, until told to stand down."""

    __slots__ = ("_active", "_relay_task", "_task", "disconnected")

    def __init__(self, receive: Receive, relay_task: asyncio.Task[Any]) -> None:
        self._relay_task = relay_task
        self._active = True
        self.disconnected = False
        self._task = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        # The request body was fully read, so the next message can only be the disconnect.
        while (await receive())["type"] != "http.disconnect":
            pass
        if self._active:
            self.disconnected = True
            self._relay_task.cancel()

    def stand_down(self) -> None:
        self._active = False
        self._task.cancel()


async def _end_body(send: Send) -> None:
    # The status line is gone already; ending the body is the only signal left. Close it cleanly.
    with contextlib.suppress(Exception):  # the client may be gone too; nothing more to do
        await send({"type": "http.response.body", "body": b"", "more_body": False})
