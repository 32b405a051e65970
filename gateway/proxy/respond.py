"""The response: the upstream's answer relayed to the client, metered, with the gateway's headers.

``Responder.respond`` opens the usage meter (``Accounting.start_response``), adds the gateway's
own headers (its overhead, the cache's ``Cache-Status`` and ``Age``, ``X-Accel-Buffering: no`` on
event streams), decides what is done to a whole non-streamed body before it goes out (its cost
header, the owner of a video job it creates, the organisation's key redacted from an error) and
hands everything to ``relay``. What the relay did is recorded on the exchange; an answer the cache
gave ends as ``Outcome.CACHE_HIT``.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway import endpoints
from gateway.auth.jobs import created_job_id
from gateway.config import Settings
from gateway.exchange import Exchange, Outcome
from gateway.headers import is_event_stream
from gateway.proxy.relay import MAX_LATE_HEADERS_BODY, RelayOptions, WholeBody, relay
from gateway.services import Services
from gateway.types import Header, Receive, Send
from gateway.upstream.base import UpstreamResponse
from gateway.upstream.redaction import Redactor

SSE_NO_BUFFERING = (b"x-accel-buffering", b"no")
OVERHEAD = b"x-gateway-overhead-ms"


class Responder:
    def __init__(self, settings: Settings, services: Services) -> None:
        self._services = services
        # Open and keys modes send the organisation's key upstream: its error bodies must not show it.
        sends_key = settings.sends_gateway_key
        self._redactor = Redactor(settings.upstream.api_key, MAX_LATE_HEADERS_BODY) if sends_key else None

    async def respond(
        self,
        response: UpstreamResponse,
        receive: Receive,
        send: Send,
        exchange: Exchange,
        headers: list[Header],
        strip_usage: bool,
    ) -> None:
        """Relay ``response`` with ``headers`` (the admission's and the rate limits') added."""
        services = self._services
        event_stream = is_event_stream(response.headers)
        services.accounting.start_response(exchange, response.status, response.headers, event_stream, strip_usage)
        overhead = (OVERHEAD, f"{exchange.mark_response_start() * 1000:.2f}".encode())
        headers = [*headers, *exchange.cache_headers, overhead]
        if event_stream:
            headers.append(SSE_NO_BUFFERING)
        if exchange.meter is None and exchange.usage is not None and exchange.from_cache:
            # A stored whole body whose usage is known: its cost header needs no pass over it.
            headers += services.accounting.cost_headers(exchange, b"")
        whole_body = None if event_stream else self._whole_body_step(exchange, response.status)
        if event_stream:
            services.open_streams += 1
        try:
            options = RelayOptions(
                event_stream=event_stream,
                meter=exchange.meter,
                whole_body=whole_body,
                length_may_change=exchange.meter is not None and exchange.meter.rewrites,
                shutdown=services.drain,
            )
            result = await relay(response, receive, send, headers, options)
        finally:
            if event_stream:
                services.open_streams -= 1
        outcome = result.outcome
        if outcome is Outcome.COMPLETED and exchange.from_cache:
            outcome = Outcome.CACHE_HIT
        exchange.relayed(outcome, result.first_byte, result.status)

    def _whole_body_step(self, exchange: Exchange, status: int) -> WholeBody | None:
        """What to do with a whole non-streamed body before it goes out: its cost header (from its
        usage), the owner of a video job it creates, the upstream key redacted from an error."""
        services = self._services
        meter = exchange.meter
        records_job = exchange.caller is not None and exchange.path == endpoints.VIDEOS and 200 <= status < 300
        redactor = self._redactor if status >= 400 else None
        if meter is None and redactor is None:
            return None

        def step(headers: list[Header], body: bytes) -> tuple[list[Header], bytes]:
            if meter is not None:
                headers = headers + services.accounting.cost_headers(exchange, body)
                job = created_job_id(meter.document) if records_job else None
                if job is not None and exchange.caller is not None and exchange.entry is not None:
                    services.jobs.record(job, exchange.caller.name, exchange.entry.model_name)
            if redactor is not None:
                headers, body = redactor.redact(headers, body)
            return headers, body

        return step


async def send_json(send: Send, data: dict[str, Any], headers: list[Header]) -> None:
    """A 200 JSON answer of the gateway's own (the dry run's report)."""
    body = orjson.dumps(data)
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": 200, "headers": start})
    await send({"type": "http.response.body", "body": body, "more_body": False})
