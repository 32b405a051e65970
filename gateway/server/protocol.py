"""HTTP/1 connection limits: what a client may hold before its request reaches the app.

uvicorn's httptools protocol accepts a header block of any size and count, for as long as the
client takes to send it, on as many connections as the process can open, and a kept-alive
connection stays open while anything at all trickles in. All of that happens before any key is
checked. ``LimitedHttpToolsProtocol`` (given to uvicorn as ``http=`` by ``gateway.cli``) bounds it,
per ``[limits]``:

- ``max_header_bytes`` and ``max_headers``: the header block (request line and headers), counted
  while it arrives, so an unfinished header never grows past the bound: 431
  ``request_header_too_large`` / ``too_many_headers``.
- ``header_timeout`` and ``body_timeout``: how long the headers may take, and a body may stay
  silent: 408 ``request_timeout`` (the clocks are ``gateway.server.timeouts``').
- ``max_connections``: open connections per process; beyond it a new connection is answered at
  once with 503 ``too_many_connections`` (Retry-After) without reading its request.
- ``keepalive_timeout`` (uvicorn's ``timeout_keep_alive``): an idle kept-alive connection is closed;
  only the start of a new request stops that clock (uvicorn's own stops on any byte).
- ``max_keepalive_requests``: the answer to a connection's last allowed request says
  ``Connection: close``.

Each request's response cycle writes through a ``gateway.server.cork.HeadCork``: the head and the
body of a whole answer go out in one system call. A malformed request is answered 400
``invalid_http_request``. How each refusal is answered (the error envelope, then a lingering close)
is ``gateway.server.refusal``'s. Everything else (pipelining, flow control, graceful shutdown,
disconnect detection) is uvicorn's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import httptools
from uvicorn.config import Config
from uvicorn.server import ServerState

from gateway.config import LimitsSettings
from gateway.errors import (
    GatewayError,
    HeaderTooLarge,
    MalformedRequest,
    TooManyConnections,
    TooManyHeaders,
)
from gateway.server.cork import HeadCork
from gateway.server.timeouts import TimedHttpToolsProtocol

logger = logging.getLogger("gateway.server")


class _Refused(Exception):
    """Raised in a parser callback to stop parsing a request the limits refuse."""


class LimitedHttpToolsProtocol(TimedHttpToolsProtocol):
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
        super().__init__(config, server_state, app_state, _loop, limits=limits)
        self._max_header_bytes = limits.max_header_bytes
        self._max_headers = limits.max_headers
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
            cycle.transport = cast("asyncio.Transport", HeadCork(self.transport, self.loop))  # head + body: one write
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
