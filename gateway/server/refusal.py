"""How a connection refused by the limits is answered: the error, then a lingering close.

Every answer of ``gateway.server.protocol``'s limits (400 ``invalid_http_request``, 408, 431, 503)
is a ``GatewayError`` in the OpenAI error envelope, written straight to the transport with
``Connection: close``, and followed by a lingering close: the gateway half-closes, discards what the
client still sends for ``LINGER_SECONDS`` at most, then closes, so the client reads the answer
instead of a connection reset. While uvicorn still answers an earlier request of the connection,
that answer comes first (``RefusingHttpToolsProtocol._refuse`` says how). Which requests are
refused is ``gateway.server.protocol``'s and ``gateway.server.timeouts``'.
"""

from __future__ import annotations

import asyncio
from asyncio import TimerHandle
from typing import Any, Final

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from gateway.errors import GatewayError

# Most seconds a refused connection is kept half-closed, its input discarded, before it is closed.
LINGER_SECONDS: Final = 2.0


class RefusingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that can refuse a request: answer an error, then close lingering.

    Once refused (``_refused``), a connection's input is to be discarded; what decides to refuse is
    the subclass's (``gateway.server.protocol.LimitedHttpToolsProtocol``).
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._linger_timer: TimerHandle | None = None
        self._refused = False  # answered and closing: input is discarded

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)

    def _refuse(self, error: GatewayError) -> None:
        """Answer ``error`` and close the connection (lingering). When a complete earlier request is
        still being answered, close after that answer instead; when the refused request is one the
        app already has (its body broke off), the app sees a disconnect and its answer is dropped."""
        self._refused = True
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
        """The client, as the log lines of its refusals name it."""
        return f"{self.client[0]}:{self.client[1]} - " if self.client else ""
