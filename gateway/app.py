"""The composition root: ``create_app(settings)`` builds the whole gateway; nothing runs at import."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import endpoints
from gateway.auth.keys import KeyRing
from gateway.auth.middleware import KeyAuthMiddleware
from gateway.auth.reload import KeyReloader
from gateway.catalog.admission import is_routable
from gateway.catalog.cache import Catalog
from gateway.config.settings import Settings, load_settings, resolve_config_path
from gateway.errors import GatewayError, InternalError, InvalidRequest, MethodNotAllowed, UnknownPath
from gateway.ops.drain import Drain, drain_on_signals
from gateway.ops.heap import freeze_startup_heap
from gateway.ops.logs import configure as configure_logging
from gateway.ops.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.ops.metrics import Metrics
from gateway.ops.metrics import Snapshot as MetricsSnapshot
from gateway.ops.request_id import RequestIdMiddleware
from gateway.ops.tracing import build_tracing, traced
from gateway.proxy.handler import Proxy, Runtime
from gateway.proxy.local import LocalRoutes
from gateway.state.budgets import Budgets
from gateway.state.limits import RateLimiter
from gateway.state.shaping import UpstreamShaper
from gateway.upstream.aiohttp_client import AiohttpUpstream
from gateway.upstream.base import HttpxUpstream, Upstream
from gateway.upstream.breaker import Breakers
from gateway.usage.accounting import Accounting, Exchange
from gateway.usage.ledger import Ledger

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

logger = logging.getLogger("gateway")

CATALOG_PATH = "/api/models"


def create_app(
    settings: Settings,
    transport: httpx.AsyncBaseTransport | None = None,
    config_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    *,
    span_exporter: SpanExporter | None = None,
) -> Front:
    """The gateway as an ASGI app.

    ``transport`` replaces the network under the upstream client (and selects the httpx client);
    ``config_path`` (with the ``env`` it was loaded with) is the file whose keys are reloaded on
    SIGHUP or change; ``span_exporter`` replaces the configured one when ``[tracing]`` is on (tests).
    """
    keys_mode = settings.auth_mode == "keys"
    breakers = Breakers(settings.upstream.breaker_failures, settings.upstream.breaker_cooldown)
    up = settings.upstream
    shaper = UpstreamShaper(up.concurrency, up.rpm, up.queue_timeout)
    drain = Drain(settings.server.shutdown_grace)
    runtime = Runtime(breakers, shaper, drain, KeyRing(settings.keys) if keys_mode else None)
    local = LocalRoutes(settings, runtime)
    routable = frozenset(settings.catalog.routable_health)

    def metrics_state() -> MetricsSnapshot | None:
        if not runtime.upstream_open:  # before start-up or after shutdown
            return None
        catalog, snapshot = runtime.catalog, runtime.catalog.snapshot
        entries = snapshot.entries.values() if snapshot else ()
        return MetricsSnapshot(
            catalog_loaded=snapshot is not None,
            catalog_age=catalog.age(),
            catalog_models=len(entries),
            catalog_routable=sum(1 for e in entries if is_routable(e, routable)),
            catalog_refreshes=catalog.refreshes,
            catalog_refresh_failures=catalog.refresh_failures,
            in_flight=runtime.in_flight,
            open_streams=runtime.open_streams,
            upstream_connections=runtime.upstream.connections(),
            open_circuits=runtime.breakers.open_circuits(),
            tasks=len(asyncio.all_tasks()),
            ledger_dropped=runtime.accounting.ledger_dropped,
        )

    metrics = Metrics(metrics_state)
    tracing = runtime.tracing = build_tracing(settings.tracing, settings.upstream.url, span_exporter)
    # Each request's outcome goes to the metrics, and with tracing on onto its span too.
    on_finish = metrics.observe if tracing is None else _both(metrics.observe, tracing.finished)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        upstream: Upstream = (
            HttpxUpstream(settings.upstream, transport)
            if transport is not None or settings.upstream.client == "httpx"
            else AiohttpUpstream(settings.upstream)
        )
        runtime.upstream = upstream
        runtime.catalog = Catalog(lambda: upstream.get_bytes(CATALOG_PATH), settings.catalog)
        runtime.catalog.start()
        usage = settings.usage
        ledger = Ledger(Path(usage.path), flush_interval=usage.flush_interval) if usage.path else None
        if ledger is not None:
            await ledger.start()
        runtime.accounting = Accounting(
            RateLimiter(),
            Budgets(ledger.spend_usd if ledger else None),
            ledger,
            include_usage=usage.include_usage,
            stream_cost=usage.stream_cost,
            access_log=settings.access_log,
            on_finish=on_finish,
        )
        if tracing is not None:
            tracing.start()
        runtime.upstream_open = True  # started: readiness and metrics may read the runtime
        watcher = None
        if keys_mode and config_path is not None:
            reloader = KeyReloader(config_path, os.environ if env is None else env, settings, runtime)
            watcher = asyncio.create_task(reloader.watch(settings.auth.reload_interval))
        try:
            with drain_on_signals(drain):  # SIGTERM: drain first, then uvicorn's shutdown
                yield
        finally:
            runtime.upstream_open = False
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
            await runtime.catalog.aclose()
            await upstream.aclose()
            if ledger is not None:
                await ledger.aclose()  # writes what is still queued
            if tracing is not None:
                await tracing.aclose()  # exports the spans still queued

    routes = [
        Route("/healthz", local.healthz, methods=["GET"]),
        Route("/readyz", local.readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route(CATALOG_PATH, local.api_models, methods=["GET"]),
        Route("/admin/usage", local.admin_usage, methods=["GET"]),
        Route("/v1/models", local.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", local.retrieve_model, methods=["GET"]),
    ]
    local_app = Starlette(
        routes=routes,
        middleware=[
            Middleware(RequestIdMiddleware),
            Middleware(
                KeyAuthMiddleware,
                runtime=runtime,
                metrics_public=settings.metrics.public,
                metrics_token_sha256=settings.metrics.token_sha256.lower(),
            ),
        ],
        lifespan=lifespan,
        exception_handlers={
            GatewayError: _gateway_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
    )
    return Front(
        local_app,
        proxy=RequestIdMiddleware(traced(KeyAuthMiddleware(Proxy(settings, runtime), runtime), tracing)),
        # Dry run: what would the gateway do with this request? (never forwarded)
        dry_run=RequestIdMiddleware(
            traced(KeyAuthMiddleware(Proxy(settings, runtime, dry_run=True), runtime), tracing)
        ),
    )


class Front:
    """The top of the ASGI stack: proxied /v1 traffic goes straight to the proxy (which answers every
    error itself), everything else (and the lifespan) to the Starlette app of the local routes.
    Keeping Starlette's router and error middlewares off the relay path roughly halves its overhead."""

    def __init__(self, local: ASGIApp, *, proxy: ASGIApp, dry_run: ASGIApp) -> None:
        self._local = local
        self._proxy = proxy
        self._dry_run = dry_run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        part = endpoints.front(scope.get("path", "")) if scope["type"] == "http" else "local"
        if part == "proxy":
            await self._proxy(scope, receive, send)
        elif part == "dry_run":
            await self._dry_run(scope, receive, send)
        else:
            await self._local(scope, receive, send)


def _both(first: Callable[[Exchange], None], then: Callable[[Exchange], None]) -> Callable[[Exchange], None]:
    def both(exchange: Exchange) -> None:
        first(exchange)
        then(exchange)

    return both


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


def create_app_from_env() -> Front:
    """The app for each worker of ``gateway serve --workers N`` (uvicorn imports it by name): the
    settings come from the environment the CLI prepared (GATEWAY_CONFIG and GATEWAY_* variables)."""
    path = resolve_config_path(None, os.environ)
    settings = load_settings(path, os.environ)
    configure_logging(settings.log_level, settings.log_format)  # a fresh process: set its logging up too
    app = create_app(settings, config_path=path)
    freeze_startup_heap()
    return app
