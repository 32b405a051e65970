"""The /v1/* handler: one request's path through the gateway, read top to bottom.

    admission (match endpoint, read body once, find model, catalog, key policy, admit, validate)
    -> limits and budgets (``Accounting.admit``) -> the request body to send (usage asked for)
    -> upstream shaping -> the answer's source (``Forwarder``: the upstream; a cache may stand in
    front of it, ``proxy.forward.Source``) -> respond (``Responder``: relay, metered)
    -> settle and record (``Accounting.finish``), on every path

Every check that can refuse happens before the first response byte: afterwards an error can only
end the stream. ``POST /v1/validate/{path}`` runs admission and answers what the gateway would do
(the exact refusal, or a 200 admission report), never forwarding.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.cancellation import take_back_cancellation
from gateway.config import Settings
from gateway.errors import GatewayError, InternalError, Overloaded, ShuttingDown, send_error
from gateway.exchange import Exchange, Outcome
from gateway.headers import header_safe
from gateway.ops.request_id import scope_request_id
from gateway.proxy.admission import Admission, Admitter
from gateway.proxy.body import ClientDisconnected
from gateway.proxy.fallback import Attempt, Attempts
from gateway.proxy.forward import Forwarder, Source
from gateway.proxy.respond import Responder, send_json
from gateway.services import Services
from gateway.types import Header, Receive, Scope, Send

SERVING_MODEL = b"x-gateway-model"
FALLBACK_FROM = b"x-gateway-fallback-from"

logger = logging.getLogger("gateway.proxy.handler")


class Proxy:
    """ASGI app for every forwarded /v1 path (and, with ``dry_run``, for /v1/validate/*)."""

    def __init__(
        self, settings: Settings, services: Services, *, dry_run: bool = False, source: Source | None = None
    ) -> None:
        """``source``: where answers come from (default: the upstream, ``Forwarder``)."""
        self._services = services
        self._dry_run = dry_run
        self._max_in_flight = settings.limits.max_in_flight
        self._admitter = Admitter(settings, services, dry_run=dry_run)
        self._attempts = Attempts(settings, services, source or Forwarder(settings, services), self._admitter)
        self._responder = Responder(settings, services)
        # x-gateway-model's value per catalog model name (bounded by the catalog: only its names serve).
        self._model_values: dict[str, bytes] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = Exchange(scope_request_id(scope).decode(), scope["method"], scope["path"])
        services = self._services
        refusal = self._refusal_at_the_door()
        if refusal is not None:
            exchange.refuse(refusal)
            await send_error(send, refusal, [])
            services.accounting.finish(exchange)
            return
        task = services.drain.track()
        try:
            await self._handle(scope, receive, send, exchange)
        finally:
            services.drain.untrack(task)
            services.accounting.finish(exchange)

    def _refusal_at_the_door(self) -> GatewayError | None:
        """Shutting down, or at the cap of requests in flight: answered before anything is read."""
        if self._services.drain.draining:
            return ShuttingDown()
        if self._max_in_flight and self._services.in_flight >= self._max_in_flight:
            return Overloaded(
                f"The gateway is at its limit of {self._max_in_flight} requests in flight; retry shortly.",
                retry_after=1,
            )
        return None

    async def _handle(self, scope: Scope, receive: Receive, send: Send, exchange: Exchange) -> None:
        services = self._services
        limits: list[Header] = []  # the rate-limit headers, once the limits admitted the request
        attempt = Attempt()
        admission: Admission | None = None
        try:
            try:
                admission = await self._admitter.admit(scope, receive, exchange)
                if self._dry_run:
                    exchange.answered_dry_run()
                    await send_json(
                        send, admission.report(), admission.headers() + self._routing_headers(admission, exchange)
                    )
                    return
                limits = await services.accounting.admit(exchange, admission.requested_tokens)
                body, strip_usage = services.accounting.request_body(exchange, admission.body)
                response = await self._attempts.forward(scope, admission, body, exchange, attempt)
                # Known now: the model that serves (after a fallback, its health and warnings are its own).
                headers = admission.headers() + limits + self._routing_headers(admission, exchange)
            except GatewayError as error:
                exchange.refuse(error)
                await send_error(send, error, self._error_headers(admission, limits, exchange))
                return
            except ClientDisconnected:
                exchange.outcome = Outcome.CLIENT_DISCONNECTED
                return
            except asyncio.CancelledError:
                if not services.drain.expired:
                    raise
                take_back_cancellation()  # the shutdown's grace is over: answer rather than vanish
                stopped = ShuttingDown()
                exchange.fail(stopped, Outcome.SHUT_DOWN)
                await send_error(send, stopped, self._error_headers(admission, limits, exchange))
                return
            except Exception:
                logger.exception("unexpected error on %s %s (request %s)", exchange.method, exchange.path,
                                 exchange.request_id)  # fmt: skip
                internal = InternalError(f"Internal gateway error (request id {exchange.request_id}).")
                exchange.fail(internal, Outcome.ERROR)
                await send_error(send, internal, self._error_headers(admission, limits, exchange))
                return
            await self._responder.respond(response, receive, send, exchange, headers, strip_usage)
            if not exchange.from_cache:  # an answer from the cache says nothing of the model's health
                services.breakers.record(attempt.breaker_pass, exchange.outcome is not Outcome.UPSTREAM_BROKEN)
        finally:
            services.breakers.record(attempt.breaker_pass, None)  # no verdict on paths that gave none

    def _error_headers(self, admission: Admission | None, limits: list[Header], exchange: Exchange) -> list[Header]:
        """What an error answer carries: the admission's headers, the rate limits', the models passed over."""
        if admission is None:
            return []
        return admission.headers() + limits + self._routing_headers(admission, exchange, serving=False)

    def _routing_headers(self, admission: Admission, exchange: Exchange, *, serving: bool = True) -> list[Header]:
        """``x-gateway-model`` (the model that serves) and ``x-gateway-fallback-from`` (the ones passed
        over); both recorded on the exchange for the ledger, the access log and the trace."""
        out: list[Header] = []
        entry, route = admission.entry or exchange.entry, admission.route  # a video job poll: the job's model
        if route is not None and route.passed_over:
            passed = route.header()
            exchange.fallback_from = passed.decode("latin-1")
            to = entry.model_name if entry is not None and serving else "none"
            exchange.fallbacks = tuple((p.model, p.reason, to) for p in route.passed_over)
            out.append((FALLBACK_FROM, passed))
        if entry is not None and serving:
            name = entry.model_name
            served = self._model_values.get(name)
            if served is None:
                served = self._model_values[name] = header_safe(name)
            out.append((SERVING_MODEL, served))
            if route is not None and route.requested != name:
                exchange.requested_model = route.requested
        return out
