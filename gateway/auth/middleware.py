"""ASGI middleware for keys mode: every /v1 and /admin request must carry a valid gateway key.

The authenticated Caller is put in ``scope["state"]["caller"]`` for the routes below. The key ring
is read from the runtime on each request, so a reload swaps it atomically. ``/metrics`` names every
key with its spend, so in keys mode it needs an admin key or the scrape token (``[metrics]``),
unless the operator made it public.

A request the key check refuses (401) never reaches the app below, so the middleware reports it to
``on_refused`` once the answer is sent: the composition root turns it into a finished request
(metrics, access log) like any other refusal. The presented key is never part of the report.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.auth.keys import Caller, KeyRing, bearer_token
from gateway.errors import AuthenticationFailed, GatewayError, send_error
from gateway.types import ASGIApp, Receive, Send

PROTECTED_PREFIXES = ("/v1/", "/admin/")
METRICS_PATH = "/metrics"


class HasKeyRing(Protocol):
    keys: KeyRing | None


@dataclass(frozen=True, slots=True)
class KeyRefusal:
    """A request the key check answered itself: the request's scope (its headers hold the key: never
    log them), the error it was answered with, and when it arrived."""

    scope: MutableMapping[str, Any]
    error: GatewayError
    started: float  # time.perf_counter() when the check began
    arrived: float  # time.time() likewise


OnRefused = Callable[[KeyRefusal], None]


class KeyAuthMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        runtime: HasKeyRing,
        *,
        metrics_public: bool = False,
        metrics_token_sha256: str = "",
        on_refused: OnRefused | None = None,
    ) -> None:
        self.app = app
        self._runtime = runtime
        self._metrics_public = metrics_public
        self._metrics_token = bytes.fromhex(metrics_token_sha256) if metrics_token_sha256 else None
        self._on_refused = on_refused

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        ring = self._runtime.keys
        if scope["type"] == "http" and ring is not None:
            started = time.perf_counter()
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
                try:
                    await send_error(send, error, [(b"www-authenticate", b"Bearer")])
                finally:  # counted even when the client left before the answer went out
                    if self._on_refused is not None:
                        arrived = time.time() - (time.perf_counter() - started)
                        self._on_refused(KeyRefusal(scope, error, started, arrived))
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
