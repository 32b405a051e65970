"""The /v1/* handler: one request's path through the gateway, read top to bottom.

    match endpoint -> read body once (bounded) -> find `model` -> catalog lookup -> admit
    -> validate against the catalog entry -> send upstream (the client's bytes, untouched)
    -> relay the response chunk by chunk

Every check that can refuse happens before the first response byte: afterwards an error can only
end the stream. ``POST /v1/validate/{path}`` runs the same steps up to the upstream call and answers
what the gateway would do (the exact refusal, or a 200 admission report).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

import orjson

from gateway import endpoints
from gateway.auth.jobs import JobOwners, created_job_id
from gateway.auth.keys import KeyRing
from gateway.auth.middleware import scope_caller
from gateway.catalog.admission import admit
from gateway.catalog.cache import Catalog
from gateway.catalog.entries import ModelEntry
from gateway.catalog.validation import CHECKS, Violation, alternatives, requested_completion_tokens, validate
from gateway.config.settings import Settings
from gateway.errors import (
    GatewayError,
    InternalError,
    InvalidRequest,
    JobNotFound,
    MethodNotAllowed,
    Overloaded,
    ShuttingDown,
    UpstreamError,
    send_error,
)
from gateway.headers import (
    Header,
    header_safe,
    header_value,
    is_event_stream,
    upstream_accept_encoding,
    upstream_request_headers,
)
from gateway.ops.drain import Drain
from gateway.ops.request_id import scope_request_id
from gateway.proxy.body import ClientDisconnected, model_of, parse_json_object, parse_multipart, read_body
from gateway.proxy.relay import MAX_LATE_HEADERS_BODY, Outcome, WholeBody, relay
from gateway.state.shaping import Slot, UpstreamShaper
from gateway.upstream.base import Upstream, UpstreamResponse
from gateway.upstream.breaker import Breakers, Pass
from gateway.upstream.credentials import UpstreamAuth
from gateway.upstream.redaction import Redactor
from gateway.usage.accounting import Accounting, Exchange

if TYPE_CHECKING:
    from gateway.ops.tracing import Tracing

logger = logging.getLogger("gateway.proxy.handler")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

SSE_NO_BUFFERING = (b"x-accel-buffering", b"no")
MODEL_HEALTH = b"x-gateway-model-health"
VALIDATION_WARNING = b"x-gateway-validation-warning"
OVERHEAD = b"x-gateway-overhead-ms"


class Runtime:
    """What the request path needs that only exists while the app runs (set up in the lifespan)."""

    catalog: Catalog
    upstream: Upstream
    upstream_open: bool = False

    accounting: Accounting
    tracing: Tracing | None = None  # None: tracing is off

    def __init__(
        self,
        breakers: Breakers,
        shaper: UpstreamShaper,
        drain: Drain,
        keys: KeyRing | None = None,
        jobs: JobOwners | None = None,
    ) -> None:
        self.keys = keys  # swapped whole on a reload
        self.breakers = breakers
        self.shaper = shaper
        self.drain = drain
        self.jobs = jobs or JobOwners()  # who created which video job (keys mode)
        self.open_streams = 0  # event streams being relayed now

    @property
    def in_flight(self) -> int:
        """Proxied requests being handled now (the drain tracks them)."""
        return self.drain.in_flight


@dataclass(slots=True)
class Admission:
    """What admission decided about one request."""

    endpoint: endpoints.Endpoint
    entry: ModelEntry | None = None
    warnings: list[Violation] = field(default_factory=list)
    requested_tokens: int = 0  # max_tokens / max_completion_tokens, 0 when not given


class Proxy:
    """ASGI app for every forwarded /v1 path (and, with ``dry_run``, for /v1/validate/*)."""

    def __init__(self, settings: Settings, runtime: Runtime, *, dry_run: bool = False) -> None:
        self._runtime = runtime
        self._dry_run = dry_run
        self._auth = UpstreamAuth(settings)
        # Open and keys modes send the organisation's key upstream: no client credential may follow
        # it, and the upstream's error bodies must not show it to clients.
        gateway_key = settings.auth_mode in ("open", "keys") and bool(settings.upstream.api_key)
        self._drop_client_credentials = gateway_key
        self._redactor = Redactor(settings.upstream.api_key, MAX_LATE_HEADERS_BODY) if gateway_key else None
        self._forward_client_ip = settings.upstream.forward_client_ip
        self._max_body = settings.limits.max_body_bytes
        self._max_in_flight = settings.limits.max_in_flight
        self._retries = settings.upstream.retries
        self._retry_max_wait = settings.upstream.retry_max_wait
        self._routable = frozenset(settings.catalog.routable_health)
        modes = {check: getattr(settings.validation, check) for check in CHECKS}
        self._modes = {check: mode for check, mode in modes.items() if mode != "off"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = Exchange(scope_request_id(scope).decode(), scope["method"], scope["path"])
        runtime = self._runtime
        refusal: GatewayError | None = None
        if runtime.drain.draining:
            refusal = ShuttingDown()
        elif self._max_in_flight and runtime.in_flight >= self._max_in_flight:
            refusal = Overloaded(
                f"The gateway is at its limit of {self._max_in_flight} requests in flight; retry shortly.",
                retry_after=1,
            )
        if refusal is not None:
            exchange.status, exchange.outcome, exchange.error_code = refusal.status, "refused", refusal.code
            await send_error(send, refusal, [])
            runtime.accounting.finish(exchange)
            return
        task = runtime.drain.track()
        try:
            await self._handle(scope, receive, send, exchange)
        finally:
            runtime.drain.untrack(task)
            runtime.accounting.finish(exchange)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, exchange: Exchange) -> None:
        extra: list[Header] = []
        breaker_pass: Pass | None = None
        slot: Slot | None = None
        try:
            try:
                admission, body = await self._receive_and_admit(scope, receive, exchange, extra)
                if self._dry_run:
                    exchange.status, exchange.outcome = 200, "dry_run"
                    await _send_json(send, _report(admission), extra)
                    return
                accounting = self._runtime.accounting
                if admission.entry is not None:
                    breaker_pass = self._runtime.breakers.allow(admission.entry.model_name)
                extra.extend(await accounting.admit(exchange, admission.requested_tokens))
                body, strip_usage = accounting.request_body(exchange, body)
                slot = await self._runtime.shaper.acquire()
                response = await self._forward(scope, admission.endpoint, body, exchange, breaker_pass)
            except GatewayError as error:
                exchange.status, exchange.outcome, exchange.error_code = error.status, "refused", error.code
                await send_error(send, error, extra)
                return
            except ClientDisconnected:
                exchange.outcome = "client_disconnected"
                return
            except asyncio.CancelledError:
                if not self._runtime.drain.expired:
                    raise
                _uncancel()  # the shutdown's grace is over: answer rather than vanish
                stopped = ShuttingDown()
                exchange.status, exchange.outcome, exchange.error_code = stopped.status, "shut_down", stopped.code
                await send_error(send, stopped, extra)
                return
            except Exception:
                logger.exception("unexpected error on %s %s (request %s)", exchange.method, exchange.path,
                                 exchange.request_id)  # fmt: skip
                internal = InternalError(f"Internal gateway error (request id {exchange.request_id}).")
                exchange.status, exchange.outcome, exchange.error_code = internal.status, "error", internal.code
                await send_error(send, internal, extra)
                return
            await self._respond(response, receive, send, exchange, extra, strip_usage)
            self._runtime.breakers.record(breaker_pass, exchange.outcome != Outcome.UPSTREAM_BROKEN.value)
        finally:
            self._runtime.breakers.record(breaker_pass, None)  # no verdict on paths that gave none
            if slot is not None:
                slot.release()

    async def _receive_and_admit(
        self, scope: Scope, receive: Receive, exchange: Exchange, extra: list[Header]
    ) -> tuple[Admission, bytes]:
        path = scope["path"]
        if self._dry_run:
            path = endpoints.dry_run_target(path)
        endpoint = endpoints.match("POST" if self._dry_run else scope["method"], path)
        if self._dry_run and scope["method"] != "POST":
            raise MethodNotAllowed(f"Use POST {scope['path']}.", headers=[(b"allow", b"POST")])
        exchange.caller = scope_caller(scope)
        body = await read_body(receive, _content_length(scope["headers"]), self._max_body)
        admission = await self._admit(endpoint, scope["headers"], body, exchange)
        extra.extend(_admission_headers(admission))
        return admission, body

    async def _respond(
        self,
        response: UpstreamResponse,
        receive: Receive,
        send: Send,
        exchange: Exchange,
        extra: list[Header],
        strip_usage: bool,
    ) -> None:
        accounting = self._runtime.accounting
        event_stream = is_event_stream(response.headers)
        accounting.start_response(exchange, response.status, response.headers, event_stream, strip_usage)
        extra.append((OVERHEAD, f"{exchange.mark_response_start() * 1000:.2f}".encode()))
        if event_stream:
            extra.append(SSE_NO_BUFFERING)
            self._runtime.open_streams += 1
        whole_body = None if event_stream else self._whole_body_step(exchange, response.status)
        try:
            result = await relay(
                response,
                receive,
                send,
                extra,
                event_stream=event_stream,
                meter=exchange.meter,
                whole_body=whole_body,
                length_may_change=exchange.meter is not None and exchange.meter.rewrites,
                shutdown=self._runtime.drain,
            )
        finally:
            if event_stream:
                self._runtime.open_streams -= 1
        exchange.outcome, exchange.first_byte = result.outcome.value, result.first_byte
        if result.status is not None:
            exchange.status = result.status

    def _whole_body_step(self, exchange: Exchange, status: int) -> WholeBody | None:
        """What to do with a whole non-streamed body before it goes out: its cost header (from its
        usage), the owner of a video job it creates, the upstream key redacted from an error."""
        accounting = self._runtime.accounting
        meter = exchange.meter
        records_job = exchange.caller is not None and exchange.path == endpoints.VIDEOS and 200 <= status < 300
        redactor = self._redactor if status >= 400 else None
        if meter is None and redactor is None:
            return None

        def step(headers: list[Header], body: bytes) -> tuple[list[Header], bytes]:
            if meter is not None:
                headers = headers + accounting.cost_headers(exchange, body)
                job = created_job_id(meter.document) if records_job else None
                if job is not None and exchange.caller is not None and exchange.entry is not None:
                    self._runtime.jobs.record(job, exchange.caller.name, exchange.entry.model_name)
            if redactor is not None:
                headers, body = redactor.redact(headers, body)
            return headers, body

        return step

    async def _admit(
        self, endpoint: endpoints.Endpoint, headers: list[Header], body: bytes, exchange: Exchange
    ) -> Admission:
        admission = Admission(endpoint)
        if endpoint is endpoints.VIDEO_JOB:
            await self._admit_job_poll(exchange)
            return admission
        if not endpoint.needs_model:
            return admission
        files: dict[str, int] = {}
        if endpoint.body == "multipart":
            form = parse_multipart(body, _header(headers, b"content-type"))
            fields: dict[str, Any] = dict(form.fields)
            files = form.files
        else:
            fields = parse_json_object(body)
        catalog = self._runtime.catalog
        entry = await catalog.lookup(model_of(fields))
        exchange.entry = entry  # known from here on: a refusal below is counted against this model
        exchange.fields = fields
        if exchange.caller is not None:
            exchange.caller.check_model(entry)
        admit(entry, endpoint, self._routable, catalog.seconds_until_refresh())
        admission.entry = entry
        admission.requested_tokens = requested_completion_tokens(fields)
        if self._modes:
            for violation in validate(endpoint.path, fields, files, entry):
                mode = self._modes.get(violation.check)
                if mode == "enforce":
                    raise self._refusal(violation, endpoint)
                if mode == "warn":
                    admission.warnings.append(violation)
                    logger.warning(
                        "validation warning (%s, %s): %s", violation.check, violation.code, violation.message
                    )
        return admission

    async def _admit_job_poll(self, exchange: Exchange) -> None:
        """Keys mode: only the key that created a video job (or an admin key) may poll it, under
        that key's policy for the job's model (allowlist here, rate limit and budget in ``admit``)."""
        caller = exchange.caller
        if caller is None:
            return  # pass-through and open modes: the upstream's own key decides
        job = endpoints.job_id(exchange.path)
        owner = self._runtime.jobs.owner(job)
        if owner is None or (owner.key_name != caller.name and not caller.admin):
            raise JobNotFound(f"No video job with id {job!r}.", param="id")
        snapshot = self._runtime.catalog.snapshot
        entry = snapshot.entries.get(owner.model) if snapshot is not None else None
        if entry is not None:
            exchange.entry = entry
            caller.check_model(entry)

    def _refusal(self, violation: Violation, endpoint: endpoints.Endpoint) -> InvalidRequest:
        message = violation.message
        snapshot = self._runtime.catalog.snapshot
        if snapshot is not None:
            healthy = (e for e in snapshot.entries.values() if e.health_status in (None, "healthy"))
            names = alternatives(violation, endpoint.path, healthy)
            if names:
                message += " Models that would accept this request: " + ", ".join(names) + "."
        return InvalidRequest(message, param=violation.param, code=violation.code)

    async def _forward(
        self, scope: Scope, endpoint: endpoints.Endpoint, body: bytes, exchange: Exchange, breaker_pass: Pass | None
    ) -> UpstreamResponse:
        """Send upstream, retrying only what is safe: connection failures before the request was
        sent, and 429/503 answers whose Retry-After is short. Nothing has reached the client yet."""
        target = self._upstream_target(scope, endpoint)
        upstream_headers = self._upstream_headers(scope, exchange)
        send = self._runtime.upstream.send
        tracing = self._runtime.tracing
        if tracing is not None:
            tracing.admitted()  # admission ends: the request goes upstream now
            send = partial(tracing.send_upstream, send)
        exchange.upstream_started = time.perf_counter()
        for attempt in range(self._retries + 1):
            last = attempt == self._retries
            try:
                response = await send(scope["method"], target, upstream_headers, body)
            except UpstreamError as error:
                if error.retryable and not last:
                    exchange.retries += 1
                    await asyncio.sleep(_backoff(attempt))
                    continue
                self._runtime.breakers.record(breaker_pass, False)
                raise
            wait = _retry_after(response) if response.status in (429, 503) else None
            if wait is not None and wait <= self._retry_max_wait and not last:
                await response.aclose()
                exchange.retries += 1
                await asyncio.sleep(wait + _backoff(attempt))
                continue
            exchange.upstream_answered = time.perf_counter()
            if response.status >= 500:
                self._runtime.breakers.record(breaker_pass, False)
            return response
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover

    def _upstream_target(self, scope: Scope, endpoint: endpoints.Endpoint) -> str:
        """Path and query for the upstream: the path the gateway matched (never the client's raw
        path, which a client library could normalise into another), the client's query, without
        an ``api_key`` parameter when the gateway's own key goes upstream."""
        target = endpoints.upstream_path(endpoint, scope["path"])
        query: bytes = scope["query_string"]
        if query and self._drop_client_credentials:
            query = b"&".join(p for p in query.split(b"&") if _query_name(p) != "api_key")
        return target + "?" + query.decode("latin-1") if query else target

    def _upstream_headers(self, scope: Scope, exchange: Exchange) -> list[Header]:
        headers: list[Header] = scope["headers"]
        forwarded: list[Header] = []
        client = scope.get("client")
        if self._forward_client_ip and client:
            scheme = str(scope.get("scheme", "http")).encode()
            forwarded = [(b"x-forwarded-for", str(client[0]).encode()), (b"x-forwarded-proto", scheme)]
        return upstream_request_headers(
            headers,
            self._auth.upstream_authorization(headers),
            exchange.request_id.encode(),
            accept_encoding=upstream_accept_encoding(
                header_value(headers, b"accept-encoding"), _streamed(exchange.fields)
            ),
            drop_api_key=self._drop_client_credentials,
            forwarded=forwarded,
        )


def _streamed(fields: Mapping[str, Any]) -> bool:
    """Whether the request asks for a stream (``"stream": true``, or ``stream=true`` in a form)."""
    stream = fields.get("stream")
    return stream is True or (isinstance(stream, str) and stream.strip().lower() == "true")


def _query_name(pair: bytes) -> str:
    return unquote_plus(pair.partition(b"=")[0].decode("latin-1"))


def _backoff(attempt: int) -> float:
    """Jittered exponential backoff: about 0.1 s, 0.2 s, 0.4 s, ..."""
    return 0.1 * (2.0**attempt) * random.uniform(0.5, 1.5)  # noqa: S311 - jitter, not cryptography


def _retry_after(response: UpstreamResponse) -> float | None:
    """The Retry-After of an upstream answer in seconds (delta-seconds or an HTTP date)."""
    for name, value in response.headers:
        if name.lower() == b"retry-after":
            text = value.decode("latin-1").strip()
            try:
                return max(0.0, float(text))
            except ValueError:
                pass
            try:
                return max(0.0, parsedate_to_datetime(text).timestamp() - time.time())
            except (TypeError, ValueError):
                return None
    return None


def _admission_headers(admission: Admission) -> list[Header]:
    out: list[Header] = []
    entry = admission.entry
    if entry is not None and entry.health_status is not None and entry.health_status != "healthy":
        out.append((MODEL_HEALTH, header_safe(entry.health_status)))
    if admission.warnings:
        value = ", ".join(f"{v.check}={v.code}" for v in admission.warnings)
        out.append((VALIDATION_WARNING, value.encode()))
    return out


def _report(admission: Admission) -> dict[str, Any]:
    warnings = [{"check": v.check, "code": v.code, "param": v.param, "message": v.message} for v in admission.warnings]
    entry = admission.entry
    if entry is not None and entry.health_status is not None and entry.health_status != "healthy":
        # Routed, but not healthy: the same fact as the x-gateway-model-health header of a real answer.
        warnings.append(
            {
                "check": "health",
                "code": "model_not_healthy",
                "param": "model",
                "message": f"Model {entry.model_name!r} is routed, but its health status is "
                f"{entry.health_status!r}: answers may be slow or fail.",
            }
        )
    return {
        "object": "validation",
        "admitted": True,
        "endpoint": admission.endpoint.path,
        "model": entry.model_name if entry else None,
        "warnings": warnings,
    }


async def _send_json(send: Send, data: dict[str, Any], extra: list[Header]) -> None:
    body = orjson.dumps(data)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _header(headers: list[Header], name: bytes) -> str:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return ""


def _content_length(headers: list[Header]) -> int | None:
    value = _header(headers, b"content-length")
    return int(value) if value.isdigit() else None


def _uncancel() -> None:
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
