"""Sending a request to its model, and on to the next candidate when that one fails before the
first byte (docs/routing.md).

``Attempts.forward`` sends the request through the ``Source`` (the upstream, the cache in front of
it) to the model admission chose. With fallback on for the request, a failure before any response
byte reached the client (no connection, a timeout, a 5xx, a 429 left after the retry budget, an
open circuit) makes it go on to the route's next candidate that passes the same admission checks,
with the client's body where only ``model`` changed, at most ``[routing] max_attempts`` models and
never past the request's deadline. Once an answer is returned nothing is retried: the relay may
have started. Each model passed over is recorded on the route (``x-gateway-fallback-from``).
"""

from __future__ import annotations

import asyncio
from typing import NoReturn

from gateway.config import Settings
from gateway.errors import GatewayError, InvalidRequest, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from gateway.exchange import Exchange
from gateway.proxy.admission import Admission, Admitter
from gateway.proxy.forward import Source
from gateway.routing.body import with_model
from gateway.routing.route import Route
from gateway.services import Services
from gateway.types import Scope
from gateway.upstream.base import UpstreamResponse
from gateway.upstream.breaker import CircuitOpen, Pass


class Attempt:
    """The breaker pass of the model being tried (the proxy reports its result at the end)."""

    __slots__ = ("breaker_pass",)

    def __init__(self) -> None:
        self.breaker_pass: Pass | None = None


class Attempts:
    def __init__(self, settings: Settings, services: Services, source: Source, admitter: Admitter) -> None:
        self._services = services
        self._source = source
        self._admitter = admitter
        self._first_byte_timeout = settings.upstream.first_byte_timeout

    async def forward(
        self, scope: Scope, admission: Admission, body: bytes, exchange: Exchange, attempt: Attempt
    ) -> UpstreamResponse:
        """The answer of the first model that gives one (see the module docstring)."""
        route = admission.route
        if route is None or (not route.fallback and route.alias is None):  # the model the client named
            if admission.entry is not None:
                attempt.breaker_pass = self._services.breakers.allow(admission.entry.model_name)
            return await self._send(scope, admission, body, exchange, attempt, None)
        for _ in range(len(route.candidates)):  # each round that falls back moves on to a later candidate
            try:
                return await self._attempt(scope, admission, route, body, exchange, attempt)
            except _FellBack:
                continue
        raise route.refusal(UpstreamUnavailable("No candidate model answered."))  # pragma: no cover - bounded above

    async def _attempt(
        self, scope: Scope, admission: Admission, route: Route, body: bytes, exchange: Exchange, attempt: Attempt
    ) -> UpstreamResponse:
        services = self._services
        entry = admission.entry
        assert entry is not None
        try:
            attempt.breaker_pass = services.breakers.allow(entry.model_name)
        except CircuitOpen as error:
            self._fall_back(route, admission, exchange, error.code, error)
        sent = body
        if entry.model_name != exchange.fields.get("model"):
            rewritten = with_model(body, exchange.fields, entry.model_name, boundary=admission.boundary)
            if rewritten is None:
                unreadable = InvalidRequest("The request's model field could not be rewritten for another model.",
                                            param="model", code="model_not_rewritable")  # fmt: skip
                services.breakers.record(attempt.breaker_pass, None)
                self._fall_back(route, admission, exchange, unreadable.code, unreadable)
            else:
                sent = rewritten
        route.attempts += 1
        try:
            response = await self._send(scope, admission, sent, exchange, attempt, route)
        except UpstreamError as error:
            self._fall_back(route, admission, exchange, error.code, error)
        status = response.status
        if (status >= 500 or status == 429) and not exchange.from_cache and self._may_fall_back(route, exchange):
            marker = len(route.passed_over)
            route.failed(f"upstream_{status}", UpstreamError(f"The upstream answered HTTP {status}."))
            if self._admitter.next_candidate(admission, exchange):
                services.breakers.record(attempt.breaker_pass, None if status == 429 else False)
                await response.aclose()
                raise _FellBack
            del route.passed_over[marker]  # nothing else can serve: this answer is relayed as it is
        return response

    async def _send(
        self,
        scope: Scope,
        admission: Admission,
        body: bytes,
        exchange: Exchange,
        attempt: Attempt,
        route: Route | None,
    ) -> UpstreamResponse:
        """One model's attempt (a later one bounded by what is left of the deadline)."""
        forward = self._source.forward(scope, admission.endpoint, body, exchange, attempt.breaker_pass)
        if route is None or route.attempts <= 1:
            response = await forward
        else:
            deadline = self._deadline()
            left = deadline - exchange.elapsed()
            try:
                async with asyncio.timeout(max(0.0, left)):
                    response = await forward
            except TimeoutError:
                raise UpstreamTimeout(
                    f"No model answered within the request's deadline of {deadline:g} seconds."
                ) from None
        started, answered, entry = exchange.upstream_started, exchange.upstream_answered, admission.entry
        if not exchange.from_cache and started is not None and answered is not None and entry is not None:
            self._services.latencies.record(entry.model_name, answered - started)
        return response

    def _deadline(self) -> float:
        """``[routing] deadline`` (the router's: a config reload may change it)."""
        return self._services.router.settings.deadline or self._first_byte_timeout

    def _may_fall_back(self, route: Route, exchange: Exchange) -> bool:
        return route.fallback and route.may_fall_back() and exchange.elapsed() < self._deadline()

    def _fall_back(self, route: Route, admission: Admission, exchange: Exchange, reason: str | None,
                   error: GatewayError) -> NoReturn:  # fmt: skip
        """Go on to the next candidate (raises _FellBack), or raise ``error`` naming the ones passed over."""
        if self._may_fall_back(route, exchange):
            marker = len(route.passed_over)
            route.failed(reason or "failed", error)
            if self._admitter.next_candidate(admission, exchange):
                raise _FellBack
            del route.passed_over[marker]  # its own error is the answer
        raise route.refusal(error)


class _FellBack(Exception):
    """The attempt failed and the next candidate is set: try again."""
