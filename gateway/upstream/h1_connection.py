"""One HTTP/1.1 connection to the upstream for the builtin client: an asyncio protocol on httptools.

``Connection`` carries one exchange at a time: ``start`` writes a request and returns the future
of the response head; httptools' callbacks fill in the status, the headers and the body's chunks
(``body`` yields them as they arrive, pausing the socket past ``HIGH_WATER`` buffered bytes and
resuming below ``LOW_WATER``); ``complete``, ``error``, ``lost`` and ``spoiled`` say what became of
it. A body without a length ends with the connection; an interim answer (1xx) is skipped; bytes
that no request asked for (beyond an answer, or while the connection is idle) spoil it, so the
pool (``gateway.upstream.builtin_client``) never reuses it.
"""

from __future__ import annotations

import asyncio
import select
from collections import deque
from collections.abc import AsyncIterator
from typing import Final, cast

import httptools

HIGH_WATER: Final = 1 << 16  # body bytes buffered before reading from the upstream pauses
LOW_WATER: Final = 1 << 14  # ... and below which it resumes
MAX_JOINED: Final = 1 << 16  # a request body up to this size goes out in one write with its head


class UpstreamClosed(ConnectionError):
    """The upstream closed the connection before its response was complete."""


class UpstreamProtocolError(Exception):
    """The upstream's response is not valid HTTP/1.1."""


class Connection(asyncio.Protocol):
    """One connection to the upstream and the one exchange on it at a time (parser callbacks)."""

    __slots__ = (
        "_body_waiter",
        "_head_waiter",
        "_length_known",
        "_loop",
        "_parser",
        "_paused",
        "_poll",
        "buffered",
        "chunks",
        "complete",
        "error",
        "head_only",
        "headers",
        "idle_since",
        "in_exchange",
        "keep_alive",
        "lost",
        "received",
        "spoiled",
        "status",
        "transport",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self._poll: select.poll | None = None  # the socket, for a look before the connection is reused
        self.lost = False  # connection_lost was called
        self.spoiled = False  # bytes came that no request asked for: never reused
        self.in_exchange = False  # a request was written and its response not given back yet
        self.idle_since = 0.0
        self._head_waiter: asyncio.Future[None] | None = None
        self._body_waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._reset(head_only=False)

    def _reset(self, *, head_only: bool) -> None:
        self.head_only = head_only
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = False
        self.chunks: deque[bytes] = deque()
        self.buffered = 0  # bytes in ``chunks``
        self.received = 0  # body bytes received in all
        self.complete = False
        self.error: BaseException | None = None
        self._length_known = False  # Content-Length or chunked: the body does not end with the connection

    # --- the exchange -------------------------------------------------------------------------

    def start(self, request: tuple[bytes, bytes], *, head_only: bool) -> asyncio.Future[None]:
        """Write ``request``; returns the future that completes with the response head."""
        assert self.transport is not None
        self._reset(head_only=head_only)
        self.in_exchange = True
        waiter = self._head_waiter = self._loop.create_future()
        head, body = request
        if len(body) <= MAX_JOINED:
            self.transport.write(head + body)  # one system call
        else:  # a large upload is not copied onto its head
            self.transport.write(head)
            self.transport.write(body)
        return waiter

    def time_out(self) -> None:
        """The first-byte timer: no response head in time."""
        self._fail(TimeoutError())

    async def body(self) -> AsyncIterator[bytes]:
        """The body's chunks as they arrive; raises what broke it."""
        chunks = self.chunks
        while True:
            if chunks:
                chunk = chunks.popleft()
                self.buffered -= len(chunk)
                if self._paused and self.buffered <= LOW_WATER and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                yield chunk
            elif self.complete:
                return
            elif self.error is not None:
                raise self.error
            else:
                waiter = self._body_waiter = self._loop.create_future()
                await waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def gone(self) -> bool:
        """Whether the idle connection has something to read: the upstream's close (or stray bytes)."""
        try:
            return self.lost or self.spoiled or self._poll is None or bool(self._poll.poll(0))
        except (OSError, ValueError):
            return True

    # --- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # (uvloop's are not asyncio.Transport subclasses)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._poll = select.poll()
            self._poll.register(sock.fileno(), select.POLLIN)

    def data_received(self, data: bytes) -> None:
        if not self.in_exchange or self.complete:  # nobody asked: not HTTP we can trust any more
            self.spoiled = True
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(f"invalid HTTP response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.complete or (self._head_waiter is None and not self.status):
            return  # idle, or done: nothing was waiting on this connection
        if self.status and not self._length_known and not self.head_only:
            self._complete()  # a body without a length ends with its connection
            return
        self._fail(UpstreamClosed("the upstream closed the connection before the end of its response"))

    # --- httptools callbacks ----------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.complete:  # a second answer in the bytes of the first: the connection is spoiled
            self.spoiled = True
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (100 Continue, 103 Early Hints): the real one follows
            self.headers = []
            return
        self.status = status
        self.keep_alive = self._parser.should_keep_alive()
        self._length_known = any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in self.headers)
        if self.head_only:
            self.keep_alive = False  # the parser expects a body a HEAD answer does not have: not reused
            self._complete()
        waiter, self._head_waiter = self._head_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        self.received += len(body)
        if self.buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status and not self.complete:  # (an interim answer's end is not the response's)
            self._complete()

    # --- internals ------------------------------------------------------------------------------

    def _complete(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if self.complete or self.error is not None:
            return
        self.error = error
        waiter, self._head_waiter = self._head_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self._wake()

    def _wake(self) -> None:
        waiter, self._body_waiter = self._body_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
