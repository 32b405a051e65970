"""The /v1/* handler: one request's path through the gateway, read top to bottom.

    match endpoint -> read body once (bounded) -> find `model` -> catalog lookup -> admit
    -> send upstream (the client's bytes, untouched) -> relay the response chunk by chunk

Every check that can refuse happens before the first response byte: afterwards an error can only
end the stream.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from gateway import routing
from gateway.auth import UpstreamAuth
from gateway.body import ClientDisconnected, model_of, parse_json_object, parse_multipart, read_body
from gateway.catalog import Catalog
from gateway.errors import GatewayError, InternalError, send_error
from gateway.headers import Header, is_event_stream, request_id, upstream_request_headers
from gateway.relay import relay
from gateway.settings import Settings
from gateway.upstream import Upstream, UpstreamResponse

logger = logging.getLogger("gateway.pipeline")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

SSE_NO_BUFFERING = (b"x-accel-buffering", b"no")
MODEL_HEALTH = b"x-gateway-model-health"


class Runtime:
    """What the request path needs that only exists while the app runs (set up in the lifespan)."""

    catalog: Catalog
    upstream: Upstream
    upstream_open: bool = False


class Proxy:
    """ASGI app for every forwarded /v1 path."""

    def __init__(self, settings: Settings, runtime: Runtime) -> None:
        self._runtime = runtime
        self._auth = UpstreamAuth(settings)
        self._max_body = settings.limits.max_body_bytes
        self._routable = frozenset(settings.catalog.routable_health)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: list[Header] = scope["headers"]
        rid = request_id(headers)
        extra: list[Header] = [(b"x-request-id", rid)]
        try:
            response = await self._admit_and_forward(scope, receive, headers, rid, extra)
        except GatewayError as error:
            await send_error(send, error, extra)
            return
        except ClientDisconnected:
            return
        except Exception:
            logger.exception(
                "unexpected error handling %s %s (request %s)", scope["method"], scope["path"], rid.decode()
            )
            await send_error(
                send, InternalError(f"Internal gateway error (request id {rid.decode()})."), extra
            )
            return
        await relay(response, receive, send, extra)

    async def _admit_and_forward(
        self, scope: Scope, receive: Receive, headers: list[Header], rid: bytes, extra: list[Header]
    ) -> UpstreamResponse:
        endpoint = routing.match(scope["method"], scope["path"])
        body = await read_body(receive, _content_length(headers), self._max_body)
        if endpoint.needs_model:
            await self._admit(endpoint, headers, body, extra)
        target = scope.get("raw_path") or scope["path"].encode()
        if scope["query_string"]:
            target += b"?" + scope["query_string"]
        response = await self._runtime.upstream.send(
            scope["method"],
            target.decode("latin-1"),
            upstream_request_headers(headers, self._auth.upstream_authorization(headers), rid),
            body,
        )
        if is_event_stream(response.headers):
            extra.append(SSE_NO_BUFFERING)
        return response

    async def _admit(
        self, endpoint: routing.Endpoint, headers: list[Header], body: bytes, extra: list[Header]
    ) -> None:
        if endpoint.body == "multipart":
            fields: dict[str, Any] = dict(parse_multipart(body, _header(headers, b"content-type")).fields)
        else:
            fields = parse_json_object(body)
        model = model_of(fields)
        catalog = self._runtime.catalog
        entry = await catalog.lookup(model)
        routing.admit(entry, endpoint, self._routable, catalog.seconds_until_refresh())
        if entry.health_status is not None and entry.health_status != "healthy":
            extra.append((MODEL_HEALTH, entry.health_status.encode()))


def _header(headers: list[Header], name: bytes) -> str:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return ""


def _content_length(headers: list[Header]) -> int | None:
    value = _header(headers, b"content-length")
    return int(value) if value.isdigit() else None
