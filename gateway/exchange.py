"""One request's record, from arrival to the last byte, and the one ``Outcome`` every part shares.

The proxy opens an ``Exchange`` per request and passes it down; each step records what it decided
on it through a transition (``refuse``, ``fail``, ``answered_dry_run``, ``relayed``), so the
status, outcome and error code are written in one place. Accounting settles from it, and metrics,
tracing, the ledger and the access log read it when it is finished.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.auth.keys import Caller
from gateway.catalog.entries import ModelEntry
from gateway.errors import GatewayError
from gateway.state.store import Hold
from gateway.types import Header
from gateway.usage.meter import UsageMeter
from gateway.usage.model import Usage


class Outcome(enum.StrEnum):
    """How a request ended (its value is the ``outcome`` of metrics, the ledger and the access log)."""

    UNKNOWN = "unknown"  # not finished yet
    COMPLETED = "completed"  # the whole answer was relayed (a stream through its [DONE])
    CACHE_HIT = "cache_hit"  # the whole answer came from the response cache (or an identical request's)
    REFUSED = "refused"  # the gateway answered an error itself (refusals, and the upstream's 502/504)
    DRY_RUN = "dry_run"  # POST /v1/validate/*: the admission report, never forwarded
    CLIENT_DISCONNECTED = "client_disconnected"  # the client went away before the end
    UPSTREAM_BROKEN = "upstream_broken"  # the upstream's answer broke off after it started
    SHUT_DOWN = "shut_down"  # stopped at the end of the shutdown grace period
    ERROR = "error"  # an unexpected error in the gateway (answered 500)


@dataclass(slots=True)
class Exchange:
    """One request: who asked for what, what was decided, and what it used."""

    request_id: str
    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    arrived: float = field(default_factory=time.time)
    caller: Caller | None = None
    entry: ModelEntry | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)
    hold: Hold | None = None  # what the state store reserved for it (rate limits, budgets)
    meter: UsageMeter | None = None
    status: int = 0
    outcome: Outcome = Outcome.UNKNOWN
    error_code: str | None = None
    error_message: str | None = None  # the message of the gateway's own error answer
    first_byte: float | None = None
    upstream_started: float | None = None  # perf_counter() when the request went upstream
    upstream_answered: float | None = None  # ... and when its response headers arrived
    retries: int = 0  # upstream attempts beyond the first
    overhead: float | None = None  # seconds of the gateway's own time before the response started
    usage: Usage | None = None
    cost: float | None = None
    upstream_status: int | None = None  # the upstream's answer, when one arrived
    unmetered: bool = False  # the answer came in an encoding the meter cannot read
    finished: bool = False
    # What the response cache did (None: not consulted): "hit", "collapsed" (served by an identical
    # request's upstream answer), "miss", "stored", "refresh" (told to go upstream), "bypass". Set
    # with ``cached``, which keeps ``from_cache`` in step.
    cache: str | None = None
    # The answer did not come from an upstream request of this one's own ("hit" or "collapsed"). A
    # field, not a property: read ~5 times a request, and a property is a Python call each time.
    from_cache: bool = False
    cache_headers: tuple[Header, ...] = ()  # Cache-Status, and Age on a hit
    saved_cost: float | None = None  # what a cached answer would have cost from the upstream
    requested_model: str | None = None  # the name the client sent, when another model serves (an alias)
    fallback_from: str | None = None  # the models passed over, as x-gateway-fallback-from says
    # The same as (model passed over, why, the model that served or "none") for the metrics.
    fallbacks: tuple[tuple[str, str, str], ...] = ()

    def cached(self, what: str) -> None:
        """What the response cache did (see ``cache``)."""
        self.cache = what
        self.from_cache = what == "hit" or what == "collapsed"

    def refuse(self, error: GatewayError) -> None:
        """The gateway answers ``error`` itself."""
        self.fail(error, Outcome.REFUSED)

    def fail(self, error: GatewayError, outcome: Outcome) -> None:
        """The gateway answers ``error`` because the request ended as ``outcome``."""
        self.status, self.outcome, self.error_code = error.status, outcome, error.code
        self.error_message = error.message

    def answered_dry_run(self) -> None:
        self.status, self.outcome = 200, Outcome.DRY_RUN

    def relayed(self, outcome: Outcome, first_byte: float | None, status: int | None) -> None:
        """The relay ended: how, when its first body byte went out, and the status it answered when
        that is not the upstream's (an error answer of its own)."""
        self.outcome, self.first_byte = outcome, first_byte
        if status is not None:
            self.status = status

    def mark_response_start(self) -> float:
        """Record the gateway's own time until now (upstream wait excluded); returns it in seconds."""
        now = time.perf_counter()
        upstream = 0.0
        if self.upstream_started is not None:
            upstream = (self.upstream_answered or now) - self.upstream_started
        self.overhead = now - self.started - upstream
        return self.overhead

    def elapsed(self) -> float:
        return time.perf_counter() - self.started
