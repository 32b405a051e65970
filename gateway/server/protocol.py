"""HTTP/1 connection limits: what a client may hold before its request reaches the app.

uvicorn's httptools protocol accepts a header block of any size and count, for as long as the
client takes to send it, on as many connections as the process can open, and a kept-alive
connection stays open while anything at all trickles in. All of that happens before any key is
checked. ``LimitedHttpToolsProtocol`` (given to uvicorn as ``http=`` by ``gateway.cli``) bounds it,
per ``[limits]``:

- ``max_header_bytes`` and ``max_headers``: the header block (request line and headers), counted
  while it arrives, so an unfinished header never grows past the bound: 431
  ``request_header_too_large`` / ``too_many_headers``.
- ``header_timeout``: seconds from the connection's start (then from a request's first byte on a
  kept-alive connection) to the end of the request's headers: 408 ``request_timeout``, or a
  plain close when nothing of a request arrived.
- ``body_timeout``: seconds a request body may stay silent between two pieces: 408
  ``request_timeout`` (the app, waiting for the body, sees a disconnect). The timer exists only
  while a body is unfinished at the end of a read, so a body that comes with its headers costs
  nothing; a pause while uvicorn itself stopped reading (the app is not reading yet) does not count.
- ``max_connections``: open connections per process; beyond it a new connection is answered at
  once with 503 ``too_many_connections`` (Retry-After) without reading its request.
- ``keepalive_timeout`` (uvicorn's ``timeout_keep_alive``): an idle kept-alive connection is closed;
  only the start of a new request stops that clock (uvicorn's own stops on any byte).
- ``max_keepalive_requests``: the answer to a connection's last allowed request says
  ``Connection: close``.

A malformed request is answered 400 ``invalid_http_request``. Every answer from here is in the
OpenAI error envelope and followed by a lingering close: the gateway half-closes, discards what the
client still sends for ``LINGER_SECONDS`` at most, then closes, so the client reads the answer
instead of a connection reset. Everything else (pipelining, flow control, graceful shutdown,
disconnect detection) is uvicorn's.
"""

from __future__ import annotations

import asyncio
import logging
from asyncio import TimerHandle
from typing import Any, Final

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from gateway.config import LimitsSettings
from gateway.errors import (
    BodyTimeout,
    GatewayError,
    HeaderTimeout,
    HeaderTooLarge,
    MalformedRequest,
    TooManyConnections,
    TooManyHeaders,
)

logger = logging.getLogger("gateway.server")

# Most seconds a refused connection is kept half-closed, its input discarded, before it is closed.
LINGER_SECONDS: Final = 2.0


class _Refused(Exception):
    """Raised in a parser callback to stop parsing a request the limits refuse."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the connection limits of ``[limits]`` (one per connection).

    The header block is measured without a callback per header: each chunk of input that begins
    inside a header block (or between requests) and does not finish it is header from end to end,
    so such chunks are added up exactly; only where a block begins or ends inside a chunk are the
    URL and headers the parser reported summed instead, and then only when that chunk could hold
    more than the bound. What is parsed but not stored (whitespace, a chunk's framing) may thus go
    uncounted by at most one chunk of input; what is stored never exceeds the bound by more.
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: LimitsSettings,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._limits = limits
        self._max_header_bytes = limits.max_header_bytes
        self._max_headers = limits.max_headers
        self._header_timer: TimerHandle | None = None
        self._body_timer: TimerHandle | None = None
        self._body_seen = 0.0  # loop time of the last read inside an unfinished body
        self._linger_timer: TimerHandle | None = None
        # Where the parser is: between requests or in a header block (True), or in a request body.
        self._in_headers = True
        self._message_started = False  # some byte of the current request has been parsed
        # The chunk being parsed: its length, and whether a header block ended in it.
        self._chunk_length = 0
        self._block_ended = False
        # Bytes of the current header block in whole chunks before this one.
        self._header_bytes = 0
        # In a chunked body: whether the parser reported anything in this chunk, and the bytes of
        # the chunks in a row where it did not (a chunk's size line, or trailers: a header block).
        self._body_progress = False
        self._silent_bytes = 0
        self._requests = 0  # on this connection
        self._refusal: GatewayError | None = None  # set by a callback before it raises _Refused
        self._refused = False  # answered and closing: input is discarded

    # --- connection -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limit = self._limits.max_connections
        if limit and len(self.connections) > limit:
            # Not counted as open: it holds no parser state and goes away within LINGER_SECONDS.
            self.connections.discard(self)
            logger.info("%srefused: %d connections open (max_connections)", self._peer(), limit)
            self._refuse(
                TooManyConnections(
                    f"The gateway has too many open connections ({limit}); retry shortly.", retry_after=1
                )
            )
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self._cancel_body_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: the answer is sent, the rest is discarded
        chunk_in_headers = self._in_headers
        self._chunk_length = len(data)
        self._block_ended = self._body_progress = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            refusal, self._refusal = self._refusal, None
            if refusal is None:
                logger.info("%sinvalid HTTP request: %s", self._peer(), exc)
                refusal = MalformedRequest(f"Invalid HTTP request: {exc}.")
            self._refuse(refusal)
            return
        if self._in_headers:
            if self._message_started:  # a header block is unfinished at the end of this chunk
                if chunk_in_headers and not self._block_ended:
                    self._header_bytes += len(data)
                else:
                    self._header_bytes = self._reported_size()
                refusal = self._header_refusal(self._header_bytes)
                if refusal is not None:
                    self._refuse(refusal)
                elif self._header_timer is None:
                    # Its clock starts now, with its first bytes (a block that comes whole needs none).
                    self._arm_header_timer()
        else:
            if self._body_progress:
                self._silent_bytes = 0
            else:
                self._silent_bytes += len(data)
                refusal = self._header_refusal(self._silent_bytes)
                if refusal is not None:
                    self._refuse(refusal)
                    return
            self._watch_body()  # a body is unfinished at the end of this read

    # --- parser callbacks -------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._message_started = True
        self._header_bytes = 0
        self._unset_keepalive_if_required()  # a request began: the connection is not idle any more

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        self._unset_keepalive_if_required()
        known = self._header_bytes
        if known + self._chunk_length > self._max_header_bytes:  # this chunk could take it over
            known = max(known, self._reported_size())
        self._refusal = self._header_refusal(known)
        if self._refusal is not None:
            raise _Refused
        self._in_headers = False
        self._block_ended = True
        self._silent_bytes = 0
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:  # a new request (not an upgrade)
            self._requests += 1
            limit = self._limits.max_keepalive_requests
            if limit and self._requests >= limit:
                cycle.keep_alive = False  # its answer says Connection: close, then uvicorn closes

    def on_body(self, body: bytes) -> None:
        self._body_progress = True
        super().on_body(body)

    def on_chunk_header(self) -> None:
        self._body_progress = True

    def on_message_complete(self) -> None:
        self._cancel_body_timer()
        super().on_message_complete()
        self._in_headers = True
        self._message_started = False

    # --- limits -----------------------------------------------------------------------------------

    def _reported_size(self) -> int:
        """The URL and headers the parser reported for the current request, as sent (name, ": ",
        value, CRLF), trailers included."""
        headers = self.headers
        return len(self.url) + sum(len(name) + len(value) for name, value in headers) + 4 * len(headers)

    def _header_refusal(self, size: int) -> HeaderTooLarge | None:
        """The 431 for a header block of ``size`` bytes and the headers reported so far, if any."""
        if size > self._max_header_bytes:
            logger.info("%srefused: header block over %d bytes", self._peer(), self._max_header_bytes)
            return HeaderTooLarge(
                f"The request's header block is larger than this gateway accepts ({self._max_header_bytes} bytes)."
            )
        if len(self.headers) > self._max_headers:
            logger.info("%srefused: more than %d headers", self._peer(), self._max_headers)
            return TooManyHeaders(f"The request has more headers than this gateway accepts ({self._max_headers}).")
        return None

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self._limits.header_timeout, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self._refused or self.transport.is_closing():
            return
        if self.flow.read_paused:
            # uvicorn stopped reading (a pipelined request waits for the one before): not the
            # client's delay. Check again later.
            self._arm_header_timer()
            return
        if not self._message_started:
            # Nothing of a request arrived: close, as for an idle kept-alive connection.
            self._refused = True
            self.transport.close()
            return
        timeout = self._limits.header_timeout
        logger.info("%srefused: headers not complete within %g s", self._peer(), timeout)
        self._refuse(HeaderTimeout(f"The request's headers did not arrive within {timeout:g} seconds."))

    def _watch_body(self) -> None:
        """Note that part of a body arrived now; one timer per unfinished body, moved lazily."""
        self._body_seen = self.loop.time()
        if self._body_timer is None:
            self._body_timer = self.loop.call_later(self._limits.body_timeout, self._body_check)

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_check(self) -> None:
        self._body_timer = None
        if self._refused or self._in_headers or self.transport.is_closing():
            return
        timeout = self._limits.body_timeout
        now = self.loop.time()
        if self.flow.read_paused:
            self._body_seen = now  # uvicorn stopped reading (the app is behind): not the client's delay
        if now - self._body_seen < timeout:
            self._body_timer = self.loop.call_at(self._body_seen + timeout, self._body_check)
            return
        logger.info("%srefused: request body silent for %g s", self._peer(), timeout)
        self._refuse(BodyTimeout(timeout))

    def _refuse(self, error: GatewayError) -> None:
        """Answer ``error`` and close the connection (lingering). When a complete earlier request is
        still being answered, close after that answer instead; when the refused request is one the
        app already has (its body broke off), the app sees a disconnect and its answer is dropped."""
        self._refused = True
        self._cancel_header_timer()
        self._cancel_body_timer()
        cycle = self.cycle  # the newest request whose headers were complete
        if cycle is not None and not cycle.response_complete:
            if not cycle.more_body:
                cycle.keep_alive = False  # uvicorn closes once it is answered
                return
            if cycle.response_started or self.pipeline:
                self.transport.close()  # its answer began (or waits behind another): nothing to add
                return
            cycle.disconnected = True  # uvicorn's own flag: receive() says so, send() writes nothing
            cycle.message_event.set()
        body = error.body()
        headers = [
            *self.server_state.default_headers,
            *error.headers(),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        head = [STATUS_LINE[error.status], *(name + b": " + value + b"\r\n" for name, value in headers), b"\r\n"]
        self.transport.write(b"".join(head) + body)
        self._linger()

    def _linger(self) -> None:
        """Half-close (the client reads the answer, then end of stream) and close for good once the
        client closes too or after LINGER_SECONDS; closing at once with unread input would reset the
        connection and could lose the answer."""
        transport = self.transport
        if transport.is_closing():
            return
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._linger_timer = self.loop.call_later(LINGER_SECONDS, transport.close)

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]} - " if self.client else ""
