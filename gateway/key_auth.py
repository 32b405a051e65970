"""ASGI middleware for keys mode: every /v1 and /admin request must carry a valid gateway key.

The authenticated Caller is put in ``scope["state"]["caller"]`` for the routes below. The key ring
is read from the runtime on each request, so a reload swaps it atomically.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

from gateway.errors import AuthenticationFailed, GatewayError, send_error
from gateway.keys import Caller, KeyRing

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

PROTECTED_PREFIXES = ("/v1/", "/admin/")


class HasKeyRing(Protocol):
    keys: KeyRing | None


class KeyAuthMiddleware:
    def __init__(self, app: ASGIApp, runtime: HasKeyRing) -> None:
        self.app = app
        self._runtime = runtime

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        ring = self._runtime.keys
        if scope["type"] == "http" and ring is not None and scope["path"].startswith(PROTECTED_PREFIXES):
            try:
                caller = ring.authenticate(scope["headers"])
                if scope["path"].startswith("/admin/") and not caller.admin:
                    raise AuthenticationFailed("This endpoint needs an admin key.", code="admin_key_required")
            except GatewayError as error:
                await send_error(send, error, [(b"www-authenticate", b"Bearer")])
                return
            scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)


def scope_caller(scope: MutableMapping[str, Any]) -> Caller | None:
    caller = (scope.get("state") or {}).get("caller")
    return caller if isinstance(caller, Caller) else None
