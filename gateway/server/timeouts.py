"""The two clocks of an HTTP/1 connection: ``[limits] header_timeout`` and ``body_timeout``.

- ``header_timeout``: seconds from the connection's start (then from a request's first byte on a
  kept-alive connection) to the end of the request's headers: 408 ``request_timeout``, or a
  plain close when nothing of a request arrived.
- ``body_timeout``: seconds a request body may stay silent between two pieces: 408
  ``request_timeout`` (the app, waiting for the body, sees a disconnect). The timer exists only
  while a body is unfinished at the end of a read, so a body that comes with its headers costs
  nothing; a pause while uvicorn itself stopped reading (the app is not reading yet) does not count.

Where the parser is (``_in_headers``, ``_message_started``) is kept by the parser callbacks of
``gateway.server.protocol.LimitedHttpToolsProtocol``, which starts these clocks as input arrives.
"""

from __future__ import annotations

import asyncio
import logging
from asyncio import TimerHandle
from typing import Any

from uvicorn.config import Config
from uvicorn.server import ServerState

from gateway.config import LimitsSettings
from gateway.errors import BodyTimeout, GatewayError, HeaderTimeout
from gateway.server.refusal import RefusingHttpToolsProtocol

logger = logging.getLogger("gateway.server")


class TimedHttpToolsProtocol(RefusingHttpToolsProtocol):
    """uvicorn's httptools protocol with the header and body timeouts of ``[limits]``."""

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
        self._header_timer: TimerHandle | None = None
        self._body_timer: TimerHandle | None = None
        self._body_seen = 0.0  # loop time of the last read inside an unfinished body
        # Where the parser is: between requests or in a header block (True), or in a request body.
        self._in_headers = True
        self._message_started = False  # some byte of the current request has been parsed

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

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
        """Stop this connection's clocks, then answer ``error`` and close (``RefusingHttpToolsProtocol``)."""
        self._cancel_header_timer()
        self._cancel_body_timer()
        super()._refuse(error)
