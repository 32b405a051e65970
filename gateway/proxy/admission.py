"""Admission: everything decided about a request before anything is forwarded.

``Admitter.admit`` reads the body once (bounded), finds the model, looks it up in the catalog,
applies the key's model policy, the endpoint/category/health rule and the validation checks, and
returns an ``Admission`` (or raises the refusal to answer). The model named may be an alias, and
with fallback on other models are candidates too: the request's ``Route``
(``gateway.routing.route``) walks them with these same checks, here at admission and, after an
upstream failure before the first byte, from ``next_candidate``. Polling a video job is admitted
by who created it (keys mode). The dry run answers the admission's ``report``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway import endpoints
from gateway.auth.middleware import scope_caller
from gateway.catalog.admission import admit
from gateway.catalog.bounds import requested_completion_tokens
from gateway.catalog.checks import Violation
from gateway.catalog.entries import ModelEntry
from gateway.catalog.validation import CHECKS, alternatives, validate
from gateway.config import Settings
from gateway.errors import GatewayError, InvalidRequest, JobNotFound, MethodNotAllowed
from gateway.exchange import Exchange
from gateway.headers import header_safe, request_headers
from gateway.proxy.body import model_of, parse_json_object, parse_multipart, read_body
from gateway.routing.route import RequestCheck, Route, RouteCheck
from gateway.services import Services
from gateway.types import Header, Receive, Scope

logger = logging.getLogger("gateway.proxy.admission")

MODEL_HEALTH = b"x-gateway-model-health"
FALLBACK_HEADER = b"x-gateway-fallback"
VALIDATION_WARNING = b"x-gateway-validation-warning"


@dataclass(slots=True)
class Admission:
    """What admission decided about one request."""

    endpoint: endpoints.Endpoint
    body: bytes = b""
    entry: ModelEntry | None = None
    warnings: list[Violation] = field(default_factory=list)
    requested_tokens: int = 0  # max_tokens / max_completion_tokens, 0 when not given
    route: Route | None = None  # the candidate models (None: the request names no model)
    files: Mapping[str, int] = field(default_factory=dict)  # multipart: the file fields and their sizes
    boundary: bytes | None = None  # multipart: the body's boundary

    def headers(self) -> list[Header]:
        """What every answer to the request carries: the model's health when not healthy, warnings."""
        out: list[Header] = []
        entry = self.entry
        if entry is not None and entry.health_status is not None and entry.health_status != "healthy":
            out.append((MODEL_HEALTH, header_safe(entry.health_status)))
        if self.warnings:
            out.append((VALIDATION_WARNING, ", ".join(f"{v.check}={v.code}" for v in self.warnings).encode()))
        return out

    def report(self) -> dict[str, Any]:
        """The dry run's answer: what the gateway would do with this request."""
        warnings = [{"check": v.check, "code": v.code, "param": v.param, "message": v.message} for v in self.warnings]
        entry = self.entry
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
        report: dict[str, Any] = {
            "object": "validation",
            "admitted": True,
            "endpoint": self.endpoint.path,
            "model": entry.model_name if entry else None,
            "warnings": warnings,
        }
        if self.route is not None:
            report["route"] = self.route.report()
        return report


class Admitter:
    def __init__(self, settings: Settings, services: Services, *, dry_run: bool = False) -> None:
        self._services = services
        self._dry_run = dry_run
        self._max_body = settings.limits.max_body_bytes
        self._routable = frozenset(settings.catalog.routable_health)
        modes = {check: getattr(settings.validation, check) for check in CHECKS}
        self._modes = {check: mode for check, mode in modes.items() if mode != "off"}

    async def admit(self, scope: Scope, receive: Receive, exchange: Exchange) -> Admission:
        """Match the endpoint, read the body, admit the model: the Admission, or a GatewayError."""
        path = scope["path"]
        if self._dry_run:
            path = endpoints.dry_run_target(path)
        endpoint = endpoints.match("POST" if self._dry_run else scope["method"], path)
        if self._dry_run and scope["method"] != "POST":
            raise MethodNotAllowed(f"Use POST {scope['path']}.", headers=[(b"allow", b"POST")])
        exchange.caller = scope_caller(scope)
        headers = request_headers(scope)
        body = await read_body(receive, _content_length(headers), self._max_body)
        admission = Admission(endpoint, body)
        if endpoint is endpoints.VIDEO_JOB:
            self._admit_job_poll(exchange)
        elif endpoint.needs_model:
            await self._admit_model(admission, headers, exchange)
        return admission

    async def _admit_model(self, admission: Admission, headers: Mapping[bytes, bytes], exchange: Exchange) -> None:
        endpoint = admission.endpoint
        files: dict[str, int] = {}
        if endpoint.body == "multipart":
            content_type = headers.get(b"content-type", b"").decode("latin-1")
            form = parse_multipart(admission.body, content_type)
            fields: dict[str, Any] = dict(form.fields)
            files = form.files
            admission.boundary = form.boundary
        else:
            fields = parse_json_object(admission.body)
        services = self._services
        catalog, router, caller = services.catalog, services.router, exchange.caller
        name = model_of(fields)
        exchange.fields = fields
        fallback = _fallback_choice(headers)
        if fallback is None and caller is not None:
            fallback = caller.fallback
        alias = router.alias(name) if router.aliases else None
        if alias is not None:
            if caller is not None:
                caller.check_name(name)
            route = router.for_alias(alias, await catalog.current(), endpoint.path, fields, fallback)
            if route.candidates:
                exchange.entry = route.candidates[0]
        else:
            entry = await catalog.lookup(name)
            exchange.entry = entry  # known from here on: a refusal below is counted against this model
            route = router.for_model(entry, catalog.snapshot, endpoint.path, fields, fallback)
        admission.route = route
        admission.files = files
        self._take(admission, exchange, *self._next(admission, exchange))
        admission.requested_tokens = requested_completion_tokens(fields)

    def _take(self, admission: Admission, exchange: Exchange, entry: ModelEntry, warnings: list[Violation]) -> None:
        """The request goes to ``entry`` now (with its effective health), with ``warnings``."""
        entry = self._services.health.effective(entry)
        admission.entry = exchange.entry = entry
        admission.warnings = warnings
        for violation in warnings:
            logger.warning("validation warning (%s, %s): %s", violation.check, violation.code, violation.message)

    def next_candidate(self, admission: Admission, exchange: Exchange) -> bool:
        """After an upstream failure: go on to the route's next candidate; False when none is left."""
        if admission.route is None:
            return False
        try:
            self._take(admission, exchange, *self._next(admission, exchange))
        except GatewayError:
            exchange.entry = admission.entry  # the model that failed stays the one that answered
            return False
        return True

    def _next(self, admission: Admission, exchange: Exchange) -> tuple[ModelEntry, list[Violation]]:
        route = admission.route
        assert route is not None
        try:
            return route.next(self._route_check(route, admission.endpoint, exchange),
                              self._request_check(route, admission, exchange))  # fmt: skip
        except GatewayError:
            exchange.entry = route.candidates[0] if route.candidates else None  # counted against the one asked for
            raise

    def _route_check(self, route: Route, endpoint: endpoints.Endpoint, exchange: Exchange) -> RouteCheck:
        """The key's allowlist, the endpoint and the effective health (and, when a candidate may be
        passed over, its open circuit)."""
        services = self._services
        caller, health, breakers, catalog = exchange.caller, services.health, services.breakers, services.catalog
        skippable = route.fallback or route.alias is not None

        def check(entry: ModelEntry) -> GatewayError | None:
            exchange.entry = entry  # a refusal is counted against the model it concerns
            try:
                if caller is not None:
                    caller.check_model(entry)
                admit(health.effective(entry), endpoint, self._routable, catalog.seconds_until_refresh())
                if skippable and breakers.blocked(entry.model_name):
                    breakers.allow(entry.model_name)  # raises CircuitOpen with its Retry-After
            except GatewayError as error:
                return error
            return None

        return check

    def _request_check(self, route: Route, admission: Admission, exchange: Exchange) -> RequestCheck:
        """The validation checks: raise the refusal of an enforced one, return the warnings."""
        modes, fields, files, endpoint = self._modes, exchange.fields, admission.files, admission.endpoint
        single = len(route.candidates) == 1

        def check(entry: ModelEntry) -> list[Violation]:
            warnings: list[Violation] = []
            if not modes:
                return warnings
            for violation in validate(endpoint.path, fields, files, entry):
                mode = modes.get(violation.check)
                if mode == "enforce":
                    if single:  # the one model asked for: name the ones that would accept the request
                        raise self._refusal(violation, endpoint)
                    raise InvalidRequest(violation.message, param=violation.param, code=violation.code)
                if mode == "warn":
                    warnings.append(violation)
            return warnings

        return check

    def _admit_job_poll(self, exchange: Exchange) -> None:
        """Keys mode: only the key that created a video job (or an admin key) may poll it, under
        that key's policy for the job's model (allowlist here, rate limit and budget in accounting)."""
        caller = exchange.caller
        if caller is None:
            return  # pass-through and open modes: the upstream's own key decides
        job = endpoints.job_id(exchange.path)
        owner = self._services.jobs.owner(job)
        if owner is None or (owner.key_name != caller.name and not caller.admin):
            raise JobNotFound(f"No video job with id {job!r}.", param="id")
        snapshot = self._services.catalog.snapshot
        entry = snapshot.entries.get(owner.model) if snapshot is not None else None
        if entry is not None:
            exchange.entry = entry
            caller.check_model(entry)

    def _refusal(self, violation: Violation, endpoint: endpoints.Endpoint) -> InvalidRequest:
        message = violation.message
        snapshot = self._services.catalog.snapshot
        if snapshot is not None:
            healthy = (e for e in snapshot.entries.values() if e.health_status in (None, "healthy"))
            names = alternatives(violation, endpoint.path, healthy)
            if names:
                message += " Models that would accept this request: " + ", ".join(names) + "."
        return InvalidRequest(message, param=violation.param, code=violation.code)


def _fallback_choice(headers: Mapping[bytes, bytes]) -> bool | None:
    """The request's ``x-gateway-fallback``: True (auto), False (off), None (not sent)."""
    value = headers.get(FALLBACK_HEADER)
    if value is None:
        return None
    word = value.strip().lower()
    if word in (b"auto", b"off"):
        return word == b"auto"
    raise InvalidRequest('The x-gateway-fallback header takes "auto" or "off".', param="x-gateway-fallback",
                         code="invalid_header")  # fmt: skip


def _content_length(headers: Mapping[bytes, bytes]) -> int | None:
    value = headers.get(b"content-length")
    return int(value) if value is not None and value.isdigit() else None
