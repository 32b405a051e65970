"""The spans of a traced request (``gateway.ops.tracing`` sets tracing up; it is off by default).

Each proxied request (``/v1/*`` and ``/v1/validate/*``) gets:

- a SERVER span ``POST /v1/chat/completions``, from its arrival until the relay's last byte, that
  continues the client's W3C ``traceparent``/``tracestate`` when it sent them;
- an INTERNAL child ``admission``: key check, body read, catalog lookup, validation, key policy,
  rate limits, budgets and the wait for upstream capacity; it ends when the request goes upstream;
- a CLIENT child per upstream attempt (a retry is one more span with ``http.request.resend_count``),
  from sending the request until its response headers arrived; its context goes upstream as
  ``traceparent``/``tracestate``, replacing any the client sent.

Attributes name the method, path, route, status, model, request id, outcome, error code, usage and
cost: never a key, never a body. ``Tracing`` starts and ends these spans on the request path and
starts and stops their export; nothing here imports ``opentelemetry`` at run time.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from gateway import endpoints
from gateway.errors import UpstreamError
from gateway.ops.request_id import scope_request_id
from gateway.types import ASGIApp, Header, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    from opentelemetry.util.types import AttributeValue

    from gateway.exchange import Exchange
    from gateway.upstream.base import UpstreamResponse

UpstreamSend = Callable[[str, str, Sequence[Header], bytes], Awaitable["UpstreamResponse"]]

TRACE_HEADERS = (b"traceparent", b"tracestate")
# gen_ai.operation.name for the endpoints OpenTelemetry's GenAI conventions name.
GEN_AI_OPERATIONS = {
    endpoints.CHAT: "chat",
    endpoints.COMPLETIONS: "text_completion",
    endpoints.EMBEDDINGS: "embeddings",
}
# Outcomes that make a request's span an error whatever the status said (a stream broken after its 200).
FAILED_OUTCOMES = frozenset({"upstream_broken", "error"})


@dataclass(frozen=True, slots=True)
class OtelApi:
    """The OpenTelemetry objects the request path uses (imported only by ``tracing.build_tracing``)."""

    tracer: Tracer
    propagator: TraceContextTextMapPropagator
    in_context: Callable[[Span], Context]
    kind: type[SpanKind]
    status: type[Status]
    status_code: type[StatusCode]


class RequestTrace:
    """One request's spans, found through the tracing's context variable by the code it calls."""

    __slots__ = ("admission", "attempts", "error_type", "failed", "name", "server", "status")

    def __init__(self, name: str, server: Span, admission: Span) -> None:
        self.name = name
        self.server = server
        self.admission: Span | None = admission  # None once ended
        self.attempts = 0  # upstream attempts so far
        self.status = 0  # the response status sent to the client (0: none)
        self.error_type: str | None = None  # the gateway's error code, or the exception's class
        self.failed = False  # an outcome that makes the request an error whatever its status


class Tracing:
    """The gateway's tracer: per-request spans, the upstream ``traceparent``, and the export."""

    def __init__(
        self,
        provider: TracerProvider,
        make_processor: Callable[[], SpanProcessor],
        api: OtelApi,
        upstream_url: str,
    ) -> None:
        self._provider = provider
        self._make_processor = make_processor
        self._api = api
        self._error = api.status(api.status_code.ERROR)
        self._current: contextvars.ContextVar[RequestTrace | None] = contextvars.ContextVar(
            "gateway_request_trace", default=None
        )
        url = urlsplit(upstream_url)
        # url.full of the upstream spans: the upstream's URL without any user:password@.
        self._upstream_base = url._replace(netloc=url.netloc.rpartition("@")[2]).geturl().rstrip("/")
        self._upstream_host = url.hostname or ""
        self._upstream_port = url.port or (443 if url.scheme == "https" else 80)

    def start(self) -> None:
        """Start exporting (a batch exporter runs a thread of its own from here on)."""
        self._provider.add_span_processor(self._make_processor())

    async def aclose(self) -> None:
        """Export the spans still queued, then stop (off the event loop: exporting blocks)."""
        await asyncio.to_thread(self._provider.shutdown)

    # --- the request path ------------------------------------------------------------------

    async def serve(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Run ``app`` for one request inside its SERVER span."""
        request = self._begin(scope)
        token = self._current.set(request)

        async def send_watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                request.status = message["status"]
            await send(message)

        try:
            await app(scope, receive, send_watched)
        except BaseException as exc:
            request.failed = True
            request.error_type = request.error_type or type(exc).__qualname__
            raise
        finally:
            self._current.reset(token)
            self._end(request)

    def admitted(self) -> None:
        """The request goes upstream now: its admission span ends."""
        request = self._current.get()
        if request is not None and request.admission is not None:
            request.admission.end()
            request.admission = None

    async def send_upstream(
        self, send: UpstreamSend, method: str, target: str, headers: Sequence[Header], body: bytes
    ) -> UpstreamResponse:
        """``send`` (``Upstream.send``) in a CLIENT span whose context goes upstream as traceparent."""
        request = self._current.get()
        if request is None:  # not inside a traced request
            return await send(method, target, headers, body)
        api = self._api
        attributes: dict[str, AttributeValue] = {
            "http.request.method": method,
            "server.address": self._upstream_host,
            "server.port": self._upstream_port,
            "url.full": self._upstream_base + target.split("?", 1)[0],
        }
        if request.attempts:
            attributes["http.request.resend_count"] = request.attempts
        request.attempts += 1
        span = api.tracer.start_span(
            request.name, context=api.in_context(request.server), kind=api.kind.CLIENT, attributes=attributes
        )
        carrier: dict[str, str] = {}
        api.propagator.inject(carrier, context=api.in_context(span))
        upstream_headers = [(name, value) for name, value in headers if name not in TRACE_HEADERS]
        upstream_headers.extend((name.encode("latin-1"), value.encode("latin-1")) for name, value in carrier.items())
        try:
            response = await send(method, target, upstream_headers, body)
        except UpstreamError as error:
            span.set_attribute("error.type", error.code or type(error).__name__)
            span.set_status(api.status(api.status_code.ERROR, error.code))
            raise
        except BaseException as exc:
            span.set_attribute("error.type", type(exc).__qualname__)
            span.set_status(self._error)
            raise
        else:
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 400:  # a client span's error, by the HTTP conventions
                span.set_attribute("error.type", str(response.status))
                span.set_status(self._error)
            return response
        finally:
            span.end()

    def finished(self, exchange: Exchange) -> None:
        """What the request came to (``Accounting.finish``'s hook): onto its span."""
        request = self._current.get()
        if request is None:
            return
        attributes: dict[str, AttributeValue] = {"gateway.outcome": exchange.outcome}
        if exchange.error_code is not None:
            request.error_type = exchange.error_code
        entry = exchange.entry
        if entry is not None:
            attributes["gen_ai.request.model"] = entry.model_name
            operation = GEN_AI_OPERATIONS.get(exchange.path)
            if operation is not None:
                attributes["gen_ai.operation.name"] = operation
        if exchange.caller is not None:  # the key's configured name, never the key
            attributes["gateway.key.name"] = exchange.caller.name
        usage = exchange.usage
        if usage is not None:
            attributes["gen_ai.usage.input_tokens"] = usage.prompt_tokens
            attributes["gen_ai.usage.output_tokens"] = usage.completion_tokens
        if exchange.cost is not None:
            attributes["gateway.cost_usd"] = exchange.cost
        if exchange.retries:
            attributes["gateway.upstream.retries"] = exchange.retries
        if exchange.requested_model is not None:  # an alias: the model that served is gen_ai.request.model
            attributes["gateway.requested_model"] = exchange.requested_model
        if exchange.fallback_from is not None:
            attributes["gateway.fallback_from"] = exchange.fallback_from
        if exchange.cache is not None:  # what the response cache did: hit, collapsed, miss, ...
            attributes["gateway.cache"] = exchange.cache
            if exchange.saved_cost is not None:
                attributes["gateway.cache.saved_usd"] = exchange.saved_cost
        request.server.set_attributes(attributes)
        if exchange.outcome in FAILED_OUTCOMES:
            request.failed = True
            request.error_type = request.error_type or exchange.outcome

    def _begin(self, scope: Scope) -> RequestTrace:
        api = self._api
        method: str = scope["method"]
        path: str = scope["path"]
        route = endpoints.route(path)
        name = f"{method} {route}" if route else method
        attributes: dict[str, AttributeValue] = {
            "http.request.method": method,
            "url.path": path,
            "url.scheme": scope.get("scheme", "http"),
            "gateway.request_id": scope_request_id(scope).decode("latin-1"),
        }
        if route:
            attributes["http.route"] = route
        parent = api.propagator.extract(_trace_carrier(scope["headers"]))
        server = api.tracer.start_span(name, context=parent, kind=api.kind.SERVER, attributes=attributes)
        admission = api.tracer.start_span("admission", context=api.in_context(server))
        return RequestTrace(name, server, admission)

    def _end(self, request: RequestTrace) -> None:
        server, status = request.server, request.status
        error_type = request.error_type or (str(status) if status >= 500 else None)
        failed = status >= 500 or request.failed  # 4xx are the client's errors, not the gateway's
        admission = request.admission
        if admission is not None:  # refused, answered by a dry run, or cut short before going upstream
            if error_type is not None:
                admission.set_attribute("error.type", error_type)
            if failed:
                admission.set_status(self._error)
            admission.end()
            request.admission = None
        if status:
            server.set_attribute("http.response.status_code", status)
        if error_type is not None:
            server.set_attribute("error.type", error_type)
        if failed:
            server.set_status(self._error)
        server.end()


def _trace_carrier(headers: Sequence[Header]) -> dict[str, list[str]]:
    """The client's traceparent and tracestate headers, as the W3C propagator reads them."""
    carrier: dict[str, list[str]] = {}
    for name, value in headers:
        if name in TRACE_HEADERS:
            carrier.setdefault(name.decode("latin-1"), []).append(value.decode("latin-1"))
    return carrier
