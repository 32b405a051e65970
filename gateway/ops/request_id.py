"""ASGI middleware: every answer carries an X-Request-ID, the client's or a fresh one.

The id is stored in the scope (``scope["state"]["request_id"]``) so the proxy sends the same id
upstream, and added to the response headers of everything the app answers, errors included.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import MutableMapping
from typing import Any

from gateway.headers import REQUEST_ID, request_headers, request_id
from gateway.types import ASGIApp, Message, Receive, Scope, Send


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # Fresh ids: a random prefix per instance and a counter (unique without a syscall per request).
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(1)

    def _fresh(self) -> bytes:
        return f"{self._prefix}{next(self._counter):08x}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(request_headers(scope).get(REQUEST_ID), self._fresh)
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (REQUEST_ID, rid)]
            await send(message)

        await self.app(scope, receive, send_with_id)


def scope_request_id(scope: MutableMapping[str, Any]) -> bytes:
    """The id the middleware chose (or a fresh one when the app runs without it)."""
    state = scope.get("state") or {}
    rid = state.get("request_id")
    return rid if isinstance(rid, bytes) else request_id(request_headers(scope).get(REQUEST_ID))
