"""ASGI middleware for keys mode: every /v1 and /admin request must carry a valid gateway key.

The authenticated Caller is put in ``scope["state"]["caller"]`` for the routes below. The key ring
is read from the runtime on each request, so a reload swaps it atomically. ``/metrics`` names every
key with its spend, so in keys mode it needs an admin key or the scrape token (``[metrics]``),
unless the operator made it public.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

from gateway.auth.keys import Caller, KeyRing, bearer_token
from gateway.errors import AuthenticationFailed, GatewayError, send_error

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

PROTECTED_PREFIXES = ("/v1/", "/admin/")
METRICS_PATH = "/metrics"


class HasKeyRing(Protocol):
    keys: KeyRing | None


class KeyAuthMiddleware:
    def __init__(
        self, app: ASGIApp, runtime: HasKeyRing, *, metrics_public: bool = False, metrics_token_sha256: str = ""
    ) -> None:
        self.app = app
        self._runtime = runtime
        self._metrics_public = metrics_public
        self._metrics_token = bytes.fromhex(metrics_token_sha256) if metrics_token_sha256 else None

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        ring = self._runtime.keys
        if scope["type"] == "http" and ring is not None:
            path: str = scope["path"]
            try:
                if path.startswith(PROTECTED_PREFIXES):
                    caller = ring.authenticate(scope["headers"])
                    if path.startswith("/admin/") and not caller.admin:
                        raise AuthenticationFailed("This endpoint needs an admin key.", code="admin_key_required")
                    scope.setdefault("state", {})["caller"] = caller
                elif path == METRICS_PATH and not self._metrics_public:
                    self._check_metrics_reader(ring, scope["headers"])
            except GatewayError as error:
                await send_error(send, error, [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)

    def _check_metrics_reader(self, ring: KeyRing, headers: list[tuple[bytes, bytes]]) -> None:
        """The scrape token, or an admin key; else AuthenticationFailed."""
        token = bearer_token(headers)
        expected = self._metrics_token
        if token is not None and expected is not None and hmac.compare_digest(hashlib.sha256(token).digest(), expected):
            return
        if not ring.authenticate(headers).admin:
            raise AuthenticationFailed(
                "/metrics needs an admin key or the metrics scrape token.", code="admin_key_required"
            )


def scope_caller(scope: MutableMapping[str, Any]) -> Caller | None:
    caller = (scope.get("state") or {}).get("caller")
    return caller if isinstance(caller, Caller) else None
