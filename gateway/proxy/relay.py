"""Relay an upstream response to the ASGI client: status, headers, then raw chunks as they arrive.

Nothing is buffered: each chunk is sent on as soon as it is read. While relaying, a watcher waits on
``receive()`` for the client's disconnect and cancels the relay at once, so an abandoned stream stops
the upstream generation instead of running on. The upstream response is closed on every path.

A small body that had arrived whole with the response headers (most non-streamed answers) is relayed
without a watcher: the relay then never waits, neither on the upstream nor on the client's socket,
so a watcher could never run before the relay ends (it would only cost a task per request).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from gateway.cancellation import take_back_cancellation
from gateway.errors import ShuttingDown, UpstreamTimeout, UpstreamUnavailable, send_error
from gateway.exchange import Outcome
from gateway.headers import client_response_headers
from gateway.types import Header, Receive, Send
from gateway.upstream.base import UpstreamResponse, UpstreamStreamError

logger = logging.getLogger("gateway.proxy.relay")


class Shutdown(Protocol):
    """Whether a cancellation of the relay is the shutdown stopping it (see ``gateway.ops.drain``)."""

    @property
    def expired(self) -> bool: ...


# Given the response headers and the whole body: the headers and body to send instead.
WholeBody = Callable[[list[Header], bytes], tuple[list[Header], bytes]]


class Meter(Protocol):
    """Watches (and may trim) the relayed bytes: see ``gateway.usage.meter.UsageMeter``."""

    def feed(self, chunk: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


SSE_DONE = b"data: [DONE]"

# A body is read whole before its headers go out (for headers computed from it) only up to this size.
MAX_LATE_HEADERS_BODY = 1 << 20
# A body that arrived whole is relayed without a disconnect watcher up to this size: one transport
# write buffer (uvloop's high-water mark is 64 KiB), so that sending it does not wait on the client.
MAX_UNWATCHED_BODY = 1 << 16


@dataclass(slots=True)
class RelayResult:
    outcome: Outcome
    first_byte: float | None  # perf_counter() when the first body byte went to the client
    status: int | None = None  # when the relay answered another status than the upstream's
    done_sent: bool = False  # an event stream's `data: [DONE]` went to the client
    started: bool = False  # the response's headers went to the client


@dataclass(frozen=True, slots=True)
class RelayOptions:
    """How to relay one response.

    ``event_stream``: the response is SSE (a break then ends it with an error event).
    ``meter`` sees every chunk and returns what to send on (``length_may_change`` when it may drop or
    rewrite bytes: Content-Length is then not relayed). ``whole_body``, for bodies that are not
    streamed: the body is read whole first (up to MAX_LATE_HEADERS_BODY) and the headers and body
    it returns are sent instead (headers computed from the body, a redaction); a larger body is
    relayed as it comes, without it (and fed to ``meter``). ``shutdown``: a cancellation while it
    says ``expired`` ends the response cleanly.
    """

    event_stream: bool = False
    meter: Meter | None = None
    whole_body: WholeBody | None = None
    length_may_change: bool = False
    shutdown: Shutdown | None = None


async def relay(
    response: UpstreamResponse,
    receive: Receive,
    send: Send,
    extra_headers: list[Header],
    options: RelayOptions = RelayOptions(),
) -> RelayResult:
    """Relay and close ``response``: the whole-body path when asked and the body is small, else the
    streaming path. A cancellation at the end of the shutdown grace ends the response cleanly: an
    error answer if nothing was sent yet, else an error event for a stream, else an unfinished body.
    """
    size = response.arrived_size()
    watch = _DisconnectWatch(receive, active=size is None or size > MAX_UNWATCHED_BODY)
    result = RelayResult(Outcome.COMPLETED, None)
    headers = client_response_headers(response.headers, extra_headers)
    if options.length_may_change:  # the meter may drop or rewrite bytes: the upstream's length would be wrong
        headers = [(name, value) for name, value in headers if name != b"content-length"]
    chunks = response.iter_raw()
    try:
        pending = b""
        if options.whole_body is not None:
            whole, pending = await _read_whole_or_refuse(chunks, send, extra_headers, watch, result)
            if result.outcome is Outcome.UPSTREAM_BROKEN:
                return result  # answered with an error: nothing had been sent
            if whole is not None:
                await _send_whole(send, response.status, *options.whole_body(headers, whole), result)
                return result
        await _send_stream(send, response.status, headers, pending, chunks, options, watch, result)
        return result
    except asyncio.CancelledError:
        if watch.disconnected:
            take_back_cancellation()  # the watcher's own: the client is gone
            # A client that hangs up after the stream's [DONE] (as the SDKs do) received all of it.
            result.outcome = Outcome.COMPLETED if result.done_sent else Outcome.CLIENT_DISCONNECTED
            return result
        if options.shutdown is None or not options.shutdown.expired:
            raise  # cancelled from outside: let it propagate
        take_back_cancellation()  # the grace is over: end the response cleanly
        watch.stand_down()
        result.outcome = Outcome.SHUT_DOWN
        if not result.started:
            stopped = ShuttingDown()
            await send_error(send, stopped, extra_headers)
            result.status = stopped.status
        elif options.event_stream:
            message = "The gateway is shutting down and ended the stream before its end"
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": _stream_error_event(message, "shutting_down"),
                            "more_body": True})  # fmt: skip
            await _end_body(send)
        return result
    except UpstreamStreamError as exc:
        logger.warning("upstream stream broke mid-response: %s", exc)
        watch.stand_down()
        result.outcome = Outcome.UPSTREAM_BROKEN
        if not options.event_stream:
            # Leave the body unfinished: the server then closes the connection without the final
            # chunk (or short of Content-Length), so the client sees a truncated body, never a whole one.
            return result
        # The status is gone already: end the stream with an error event the SDKs raise on.
        error_event = _stream_error_event(f"The upstream stream broke: {exc}", "upstream_stream_error")
        with contextlib.suppress(Exception):
            await send({"type": "http.response.body", "body": error_event, "more_body": True})
        await _end_body(send)
        return result
    finally:
        watch.stand_down()
        await response.aclose()


async def _read_whole_or_refuse(
    chunks: AsyncIterator[bytes], send: Send, extra_headers: list[Header], watch: _DisconnectWatch, result: RelayResult
) -> tuple[bytes | None, bytes]:
    """(the whole body, b"") or (None, what was read of a longer one); a body that breaks before
    its end is answered with an error (nothing was sent yet) and the result says UPSTREAM_BROKEN."""
    try:
        return await _read_whole(chunks, MAX_LATE_HEADERS_BODY)
    except UpstreamStreamError as exc:
        logger.warning("upstream body broke before its end: %s", exc)
        watch.stand_down()
        error = (UpstreamTimeout if exc.timed_out else UpstreamUnavailable)(f"The upstream's answer broke off: {exc}.")
        await send_error(send, error, extra_headers)
        result.outcome, result.status = Outcome.UPSTREAM_BROKEN, error.status
        return None, b""


async def _send_whole(send: Send, status: int, headers: list[Header], body: bytes, result: RelayResult) -> None:
    """The whole-body path: headers, then the body in one message."""
    await send({"type": "http.response.start", "status": status, "headers": headers})
    result.started = True
    if body:
        result.first_byte = time.perf_counter()
    # One message for the whole body: still watched while it is written (a disconnect cancels the
    # send); uvicorn reports a disconnect only once the body is complete, and the watcher is stood
    # down before the relay next waits.
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_stream(
    send: Send,
    status: int,
    headers: list[Header],
    pending: bytes,
    chunks: AsyncIterator[bytes],
    options: RelayOptions,
    watch: _DisconnectWatch,
    result: RelayResult,
) -> None:
    """The streaming path: headers, then each chunk as it arrives (through the meter), then the end."""
    meter = options.meter
    await send({"type": "http.response.start", "status": status, "headers": headers})
    result.started = True
    if pending:
        await _send_chunk(send, meter.feed(pending) if meter else pending, result)
    event_stream = options.event_stream
    async for chunk in chunks:
        if event_stream and not result.done_sent and SSE_DONE in chunk:
            result.done_sent = True
        await _send_chunk(send, meter.feed(chunk) if meter else chunk, result)
    if meter is not None:
        await _send_chunk(send, meter.flush(), result)
    watch.stand_down()  # uvicorn reports a disconnect once the response is complete
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _stream_error_event(message: str, code: str) -> bytes:
    """OpenAI's stream error shape; the leading blank line ends any event the upstream left half-sent."""
    error = {"message": f"{message}.", "type": "server_error", "param": None, "code": code}
    return b"\n\ndata: " + orjson.dumps({"error": error}) + b"\n\n"


async def _read_whole(chunks: AsyncIterator[bytes], limit: int) -> tuple[bytes | None, bytes]:
    """(the whole body, b"") when it ends within ``limit`` bytes, else (None, what was read)."""
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            return None, b"".join(parts)
    return b"".join(parts), b""


async def _send_chunk(send: Send, chunk: bytes, result: RelayResult) -> None:
    if chunk:
        if result.first_byte is None:
            result.first_byte = time.perf_counter()
        await send({"type": "http.response.body", "body": chunk, "more_body": True})


class _DisconnectWatch:
    """Cancels the relay task when the client disconnects, until told to stand down."""

    __slots__ = ("_relay_task", "_task", "disconnected")

    def __init__(self, receive: Receive, *, active: bool = True) -> None:
        """Watches for the current task (the relay's); ``active=False``: watch nothing (for a relay
        that never waits), at no cost."""
        # The task to cancel on a disconnect; None: nothing to watch for, or told to stand down.
        self._relay_task: asyncio.Task[Any] | None = asyncio.current_task() if active else None
        self.disconnected = False
        self._task = asyncio.create_task(self._watch(receive)) if active else None

    async def _watch(self, receive: Receive) -> None:
        # The request body was fully read, so the next message can only be the disconnect.
        while (await receive())["type"] != "http.disconnect":
            pass
        if self._relay_task is not None:
            self.disconnected = True
            self._relay_task.cancel()

    def stand_down(self) -> None:
        self._relay_task = None
        if self._task is not None:
            self._task.cancel()


async def _end_body(send: Send) -> None:
    # The status line is gone already; ending the body is the only signal left. Close it cleanly.
    with contextlib.suppress(Exception):  # the client may be gone too; nothing more to do
        await send({"type": "http.response.body", "body": b"", "more_body": False})
