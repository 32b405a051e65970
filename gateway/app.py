"""The composition root: ``create_app(settings)`` is the whole gateway as an ASGI app.

Nothing runs at import or construction but checks: the services (upstream client, catalog, ledger,
limits, tracing, ...) are opened when the server starts the app (the ASGI lifespan), and the
request stack is built on them by ``build_stack``, one function. Proxied /v1 traffic goes straight
to the proxy (which answers every error itself); everything else goes to a Starlette app of the
gateway's own routes. Keeping Starlette's router and error middlewares off the relay path roughly
halves its overhead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, Router

from gateway import endpoints
from gateway.auth.middleware import KeyAuthMiddleware
from gateway.config import Settings, load_settings, resolve_config_path
from gateway.console.routes import console_routes
from gateway.errors import (
    GatewayError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    ShuttingDown,
    UnknownPath,
    send_error,
)
from gateway.ops.drain import drain_on_signals
from gateway.ops.heap import freeze_startup_heap
from gateway.ops.logs import configure as configure_logging
from gateway.ops.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.ops.request_id import RequestIdMiddleware
from gateway.ops.spans import Tracing
from gateway.ops.tracing import build_tracing, traced
from gateway.proxy.cached import CachingSource
from gateway.proxy.forward import Forwarder, Source
from gateway.proxy.handler import Proxy
from gateway.proxy.local import LocalRoutes, key_refusal_recorder
from gateway.services import CATALOG_PATH, Services, open_services
from gateway.types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

logger = logging.getLogger("gateway")


def create_app(
    settings: Settings,
    transport: httpx.AsyncBaseTransport | None = None,
    config_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    *,
    span_exporter: SpanExporter | None = None,
) -> Gateway:
    """The gateway as an ASGI app.

    ``transport`` replaces the network under the upstream client (and selects the httpx client);
    ``config_path`` (with the ``env`` it was loaded with) is the file whose keys are reloaded on
    SIGHUP or change; ``span_exporter`` replaces the configured one when ``[tracing]`` is on (tests).
    """
    tracing = build_tracing(settings.tracing, settings.upstream.url, span_exporter)  # refuses early
    return Gateway(settings, tracing, transport=transport, config_path=config_path, env=env)


@dataclass(frozen=True, slots=True)
class Stack:
    """The request stack of a started gateway: the three ASGI apps a path can go to."""

    proxy: ASGIApp
    dry_run: ASGIApp
    local: ASGIApp


class Gateway:
    """The ASGI app: opens its services in the lifespan and serves on the stack built on them."""

    def __init__(
        self,
        settings: Settings,
        tracing: Tracing | None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        config_path: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._settings = settings
        self._tracing = tracing
        self._transport = transport
        self._config_path = config_path
        self._env = env
        self._lifespan_router = Router(lifespan=self._lifespan)
        self._stack: Stack | None = None  # set while the services are open (between start-up and shutdown)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan_router(scope, receive, send)
            return
        stack = self._stack
        if stack is None:  # not started, or shut down: nothing to serve with
            if scope["type"] == "http":
                await send_error(send, ShuttingDown("The gateway is not serving; retry the request."), [])
            return
        part = endpoints.front(scope.get("path", "")) if scope["type"] == "http" else "local"
        if part == "proxy":
            await stack.proxy(scope, receive, send)
        elif part == "dry_run":
            await stack.dry_run(scope, receive, send)
        else:
            await stack.local(scope, receive, send)

    @asynccontextmanager
    async def _lifespan(self, app: Any) -> AsyncIterator[None]:
        env = os.environ if self._env is None else self._env
        async with open_services(
            self._settings,
            transport=self._transport,
            tracing=self._tracing,
            config_path=self._config_path,
            env=env,
        ) as services:
            self._stack = build_stack(self._settings, services)
            try:
                with drain_on_signals(services.drain):  # SIGTERM: drain first, then uvicorn's shutdown
                    yield
            finally:
                self._stack = None


def build_stack(settings: Settings, services: Services, *, source: Source | None = None) -> Stack:
    """The middleware stacks on the services: request ids outermost, then tracing, then the keys.
    ``source`` replaces where proxied answers come from (default: the upstream)."""
    tracing = services.tracing

    on_refused = key_refusal_recorder(services)  # a 401 is counted and logged like any request

    def around(app: ASGIApp) -> ASGIApp:
        return RequestIdMiddleware(traced(KeyAuthMiddleware(app, services, on_refused=on_refused), tracing))

    if source is None and services.cache is not None:
        source = CachingSource(settings, services.cache, Forwarder(settings, services), services.tracing)
    return Stack(
        proxy=around(Proxy(settings, services, source=source)),
        dry_run=around(Proxy(settings, services, dry_run=True)),  # what would the gateway do? (never forwarded)
        local=_local_app(settings, services),
    )


def _local_app(settings: Settings, services: Services) -> ASGIApp:
    """The gateway's own routes: models, the raw catalog, health, metrics, admin, the console."""
    local = LocalRoutes(settings, services)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(services.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    routes: list[BaseRoute] = [
        Route("/healthz", local.healthz, methods=["GET"]),
        Route("/readyz", local.readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route(CATALOG_PATH, local.api_models, methods=["GET"]),
        Route("/admin/usage", local.admin_usage, methods=["GET"]),
        Route("/admin/cache/purge", local.admin_cache_purge, methods=["POST"]),
        Route("/v1/models", local.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", local.retrieve_model, methods=["GET"]),
    ]
    if settings.console.enabled:
        routes += console_routes(settings, services)  # the operator's pages (docs/console.md)
    return Starlette(
        routes=routes,
        middleware=[
            Middleware(RequestIdMiddleware),
            Middleware(
                KeyAuthMiddleware,
                runtime=services,
                metrics_public=settings.metrics.public,
                metrics_token_sha256=settings.metrics.token_sha256.lower(),
                on_refused=key_refusal_recorder(services),
            ),
        ],
        exception_handlers={
            GatewayError: _gateway_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
    )


def _error_response(error: GatewayError) -> Response:
    return Response(
        error.body(),
        status_code=error.status,
        headers={k.decode(): v.decode() for k, v in error.headers()},
    )


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return _error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    path = request.url.path
    if exc.status_code == 404:
        return _error_response(UnknownPath(f"Unknown endpoint {path}."))
    if exc.status_code == 405:
        # Starlette builds Allow from a set: sort it so the header does not change from run to run.
        allow = ", ".join(sorted(m.strip() for m in (exc.headers or {}).get("Allow", "").split(",") if m.strip()))
        return _error_response(
            MethodNotAllowed(
                f"{request.method} is not allowed on {path}; use {allow}.", headers=[(b"allow", allow.encode())]
            )
        )
    return _error_response(InvalidRequest(str(exc.detail), code=None))


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    logger.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return _error_response(InternalError("Internal gateway error."))


def create_app_from_env() -> Gateway:
    """The app for each worker of ``gateway serve --workers N`` (uvicorn imports it by name): the
    settings come from the environment the CLI prepared (GATEWAY_CONFIG and GATEWAY_* variables)."""
    path = resolve_config_path(None, os.environ)
    settings = load_settings(path, os.environ)
    configure_logging(settings.log_level, settings.log_format)  # a fresh process: set its logging up too
    app = create_app(settings, config_path=path)
    freeze_startup_heap()
    return app
