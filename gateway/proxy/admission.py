"""Admission: everything decided about a request before anything is forwarded.

``Admitter.admit`` reads the body once (bounded), finds the model, looks it up in the catalog,
applies the key's model policy, the endpoint/category/health rule and the validation checks, and
returns an ``Admission`` (or raises the refusal to answer). Polling a video job is admitted by who
created it (keys mode). The dry run answers the admission's ``report``.
"""

from __future__ import annotations

import logging
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
from gateway.errors import InvalidRequest, JobNotFound, MethodNotAllowed
from gateway.exchange import Exchange
from gateway.headers import header_safe, header_value
from gateway.proxy.body import model_of, parse_json_object, parse_multipart, read_body
from gateway.services import Services
from gateway.types import Header, Receive, Scope

logger = logging.getLogger("gateway.proxy.admission")

MODEL_HEALTH = b"x-gateway-model-health"
VALIDATION_WARNING = b"x-gateway-validation-warning"


@dataclass(slots=True)
class Admission:
    """What admission decided about one request."""

    endpoint: endpoints.Endpoint
    body: bytes = b""
    entry: ModelEntry | None = None
    warnings: list[Violation] = field(default_factory=list)
    requested_tokens: int = 0  # max_tokens / max_completion_tokens, 0 when not given

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
        return {
            "object": "validation",
            "admitted": True,
            "endpoint": self.endpoint.path,
            "model": entry.model_name if entry else None,
            "warnings": warnings,
        }


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
        headers: list[Header] = scope["headers"]
        body = await read_body(receive, _content_length(headers), self._max_body)
        admission = Admission(endpoint, body)
        if endpoint is endpoints.VIDEO_JOB:
            self._admit_job_poll(exchange)
        elif endpoint.needs_model:
            await self._admit_model(admission, headers, exchange)
        return admission

    async def _admit_model(self, admission: Admission, headers: list[Header], exchange: Exchange) -> None:
        endpoint = admission.endpoint
        files: dict[str, int] = {}
        if endpoint.body == "multipart":
            content_type = (header_value(headers, b"content-type") or b"").decode("latin-1")
            form = parse_multipart(admission.body, content_type)
            fields: dict[str, Any] = dict(form.fields)
            files = form.files
        else:
            fields = parse_json_object(admission.body)
        catalog = self._services.catalog
        entry = await catalog.lookup(model_of(fields))
        exchange.entry = entry  # known from here on: a refusal below is counted against this model
        exchange.fields = fields
        if exchange.caller is not None:
            exchange.caller.check_model(entry)
        admit(entry, endpoint, self._routable, catalog.seconds_until_refresh())
        admission.entry = entry
        admission.requested_tokens = requested_completion_tokens(fields)
        if not self._modes:
            return
        for violation in validate(endpoint.path, fields, files, entry):
            mode = self._modes.get(violation.check)
            if mode == "enforce":
                raise self._refusal(violation, endpoint)
            if mode == "warn":
                admission.warnings.append(violation)
                logger.warning("validation warning (%s, %s): %s", violation.check, violation.code, violation.message)

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


def _content_length(headers: list[Header]) -> int | None:
    value = header_value(headers, b"content-length")
    return int(value) if value is not None and value.isdigit() else None
