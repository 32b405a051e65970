"""Forwarding: the request the gateway sends upstream, and the retries that are safe.

``Forwarder.forward`` builds the target (the path the gateway matched, the client's query without a
client credential) and the headers (``gateway.headers`` rules, the credential of the auth mode,
only meterable encodings), then sends, retrying only what certainly did not reach the upstream
(connection failures) or what it refused with a short Retry-After (429/503). Nothing has reached
the client yet, so every failure here can still be a clean error answer. The gateway's own upstream
shaping is taken here, so only what goes upstream draws on it: the slot is held until the answer
is closed.

``Source`` is the seam in front of it: what gives the proxy a request's answer. ``Forwarder`` is the
upstream; a layer in front of it (a response cache) can answer without the upstream, returning an
``UpstreamResponse`` of its own, and tap what is relayed by wrapping the one the inner source
returned. The proxy relays, meters and accounts whatever the source returns, the same way.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Mapping
from email.utils import parsedate_to_datetime
from functools import partial
from typing import Any, Protocol
from urllib.parse import unquote_plus

from gateway import endpoints
from gateway.config import Settings
from gateway.errors import UpstreamError
from gateway.exchange import Exchange
from gateway.headers import header_value, request_headers, upstream_accept_encoding, upstream_request_headers
from gateway.services import Services
from gateway.state.shaping import Slot
from gateway.types import Header, Scope
from gateway.upstream.base import UpstreamResponse
from gateway.upstream.breaker import Pass
from gateway.upstream.credentials import UpstreamAuth


class Source(Protocol):
    """Where a request's answer comes from (see the module docstring)."""

    async def forward(
        self, scope: Scope, endpoint: endpoints.Endpoint, body: bytes, exchange: Exchange, breaker_pass: Pass | None
    ) -> UpstreamResponse:
        """The answer once its headers are known (raises a GatewayError for a clean error answer)."""
        ...


class Forwarder:
    def __init__(self, settings: Settings, services: Services) -> None:
        self._services = services
        self._auth = UpstreamAuth(settings)
        # Open and keys modes send the organisation's key upstream: no client credential may follow it.
        self._drop_client_credentials = settings.sends_gateway_key
        self._forward_client_ip = settings.upstream.forward_client_ip
        self._retries = settings.upstream.retries
        self._retry_max_wait = settings.upstream.retry_max_wait

    async def forward(
        self, scope: Scope, endpoint: endpoints.Endpoint, body: bytes, exchange: Exchange, breaker_pass: Pass | None
    ) -> UpstreamResponse:
        """Send upstream (with the safe retries); the response once its headers arrived."""
        services = self._services
        target = self._target(scope, endpoint)
        upstream_headers = self._headers(scope, exchange)
        # The gateway's own shaping: a slot held until the answer is closed (only what goes upstream).
        slot = await services.store.upstream_slot()
        send = services.upstream.send
        tracing = services.tracing
        if tracing is not None:
            tracing.admitted()  # admission ends: the request goes upstream now
            send = partial(tracing.send_upstream, send)
        exchange.upstream_started = time.perf_counter()
        try:
            for attempt in range(self._retries + 1):
                last = attempt == self._retries
                try:
                    response = await send(scope["method"], target, upstream_headers, body)
                except UpstreamError as error:
                    if error.retryable and not last:
                        exchange.retries += 1
                        await asyncio.sleep(backoff(attempt))
                        continue
                    services.breakers.record(breaker_pass, False)
                    raise
                wait = retry_after(response) if response.status in (429, 503) else None
                if wait is not None and wait <= self._retry_max_wait and not last:
                    await response.aclose()
                    exchange.retries += 1
                    await asyncio.sleep(wait + backoff(attempt))
                    continue
                exchange.upstream_answered = time.perf_counter()
                if response.status >= 500:
                    services.breakers.record(breaker_pass, False)
                return response if slot.free else _Slotted(response, slot)
        except BaseException:
            slot.release()
            raise
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover

    def _target(self, scope: Scope, endpoint: endpoints.Endpoint) -> str:
        """Path and query for the upstream: the path the gateway matched (never the client's raw
        path, which a client library could normalise into another), the client's query, without
        an ``api_key`` parameter when the gateway's own key goes upstream."""
        target = endpoints.upstream_path(endpoint, scope["path"])
        query: bytes = scope["query_string"]
        if query and self._drop_client_credentials:
            query = b"&".join(p for p in query.split(b"&") if _query_name(p) != "api_key")
        return target + "?" + query.decode("latin-1") if query else target

    def _headers(self, scope: Scope, exchange: Exchange) -> list[Header]:
        by_name = request_headers(scope)
        forwarded: list[Header] = []
        client = scope.get("client")
        if self._forward_client_ip and client:
            scheme = str(scope.get("scheme", "http")).encode()
            forwarded = [(b"x-forwarded-for", str(client[0]).encode()), (b"x-forwarded-proto", scheme)]
        return upstream_request_headers(
            scope["headers"],
            self._auth.upstream_authorization(by_name),
            exchange.request_id.encode(),
            accept_encoding=upstream_accept_encoding(by_name.get(b"accept-encoding"), streamed(exchange.fields)),
            drop_api_key=self._drop_client_credentials,
            forwarded=forwarded,
        )


class _Slotted:
    """An upstream answer that gives its shaping slot back when it is closed (a stream holds it
    while it streams)."""

    __slots__ = ("_response", "_slot", "headers", "status")

    def __init__(self, response: UpstreamResponse, slot: Slot) -> None:
        self._response = response
        self._slot = slot
        self.status = response.status
        self.headers = response.headers

    def iter_raw(self) -> AsyncIterator[bytes]:
        return self._response.iter_raw()

    def arrived_size(self) -> int | None:
        return self._response.arrived_size()

    async def aclose(self) -> None:
        try:
            await self._response.aclose()
        finally:
            self._slot.release()


def backoff(attempt: int) -> float:
    """Jittered exponential backoff: about 0.1 s, 0.2 s, 0.4 s, ..."""
    return 0.1 * (2.0**attempt) * random.uniform(0.5, 1.5)  # noqa: S311 - jitter, not cryptography


def retry_after(response: UpstreamResponse) -> float | None:
    """The Retry-After of an upstream answer in seconds (delta-seconds or an HTTP date)."""
    value = header_value(response.headers, b"retry-after")
    if value is None:
        return None
    text = value.decode("latin-1").strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(text).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def streamed(fields: Mapping[str, Any]) -> bool:
    """Whether the request asks for a stream (``"stream": true``, or ``stream=true`` in a form)."""
    stream = fields.get("stream")
    return stream is True or (isinstance(stream, str) and stream.strip().lower() == "true")


def _query_name(pair: bytes) -> str:
    return unquote_plus(pair.partition(b"=")[0].decode("latin-1"))
