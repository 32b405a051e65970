"""Optional OpenTelemetry tracing of proxied requests (``[tracing]``; off by default): its setup.

Off, none of this runs and no ``opentelemetry`` module is ever imported: ``build_tracing`` returns
None, the proxy is not wrapped, and the request path pays one ``is None`` test. On, ``build_tracing``
imports OpenTelemetry and builds the app's own tracer provider (the process-wide one is left
alone), its sampler and its exporter (OTLP, or JSON lines on stderr), and ``traced`` wraps the app
so that each proxied request runs inside its spans. Spans are exported in batches from a thread and
flushed when the app stops. Which spans a request gets, and what they say, is
``gateway.ops.spans``'s.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from gateway.config import TRACING_INSTALL, SettingsError, TracingSettings
from gateway.ops.spans import OtelApi, Tracing
from gateway.types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
    from opentelemetry.sdk.trace.export import SpanExporter


def build_tracing(settings: TracingSettings, upstream_url: str, exporter: SpanExporter | None = None) -> Tracing | None:
    """The app's tracing, or None when ``[tracing] enabled`` is false (nothing is imported then).

    ``exporter`` replaces the configured exporter, and its spans are exported as each one ends
    (tests pass an ``InMemorySpanExporter``); it does not turn tracing on.
    """
    if not settings.enabled:
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError as exc:
        raise SettingsError(f"[tracing] enabled: OpenTelemetry is not installed ({exc}): {TRACING_INSTALL}") from exc

    provider = TracerProvider(
        sampler=ParentBasedTraceIdRatio(settings.sample_ratio),
        resource=Resource.create({SERVICE_NAME: settings.service_name}),
        shutdown_on_exit=False,  # the app's lifespan shuts it down
    )
    make_processor: Callable[[], SpanProcessor]
    if exporter is not None:
        make_processor = partial(SimpleSpanProcessor, exporter)
    elif settings.exporter == "console":
        console = ConsoleSpanExporter(settings.service_name, out=sys.stderr, formatter=_json_line)
        make_processor = partial(BatchSpanProcessor, console)
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise SettingsError(
                f"[tracing] exporter: the OTLP exporter is not installed ({exc}): {TRACING_INSTALL}"
            ) from exc
        make_processor = partial(BatchSpanProcessor, OTLPSpanExporter(endpoint=settings.endpoint or None))
    api = OtelApi(
        tracer=provider.get_tracer("gateway"),
        propagator=TraceContextTextMapPropagator(),
        in_context=trace.set_span_in_context,
        kind=trace.SpanKind,
        status=trace.Status,
        status_code=trace.StatusCode,
    )
    return Tracing(provider, make_processor, api, upstream_url)


def traced(app: ASGIApp, tracing: Tracing | None) -> ASGIApp:
    """``app`` with a span per request when tracing is on; ``app`` itself when it is off."""
    return app if tracing is None else _TracingMiddleware(app, tracing)


class _TracingMiddleware:
    __slots__ = ("_app", "_tracing")

    def __init__(self, app: ASGIApp, tracing: Tracing) -> None:
        self._app = app
        self._tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        await self._tracing.serve(self._app, scope, receive, send)


def _json_line(span: ReadableSpan) -> str:
    """A span as one JSON line, like the gateway's log lines (the SDK's default spans many lines)."""
    return str(span.to_json(indent=None)) + "\n"
