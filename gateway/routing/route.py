"""Which model serves a request: the candidates, in order, and the ones passed over and why.

``Router.route`` makes a request's ``Route``:

- a name of ``[[aliases]]``: the alias's models found in the catalog, ranked by its strategy;
- a catalog model name: that model, then, with fallback on, the catalog's other models of the same
  endpoint ranked by ``[routing] strategy``.

``Route.next`` walks the candidates with the admission's checks of this very request. Two kinds:
``route`` checks (the key's allowlist, the endpoint, the effective health) and ``request`` checks
(validation: tools, vision, context window, ...). An alias always passes over a candidate that
fails a route check (that is how ``ordered`` means "first routable"); with fallback on, a
candidate failing any check is passed over, and ``Route.failed`` lets the caller go on to the next
one after an upstream failure before the first byte, at most ``max_attempts`` models in all. A
catalog model name without fallback has one candidate and is refused exactly as before routing
existed. When nothing is left, the first candidate's refusal is raised, its message listing every
model passed over and why.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.catalog.admission import fits
from gateway.catalog.cache import Snapshot
from gateway.catalog.checks import Violation
from gateway.catalog.entries import ModelEntry
from gateway.config import AliasSettings, RoutingSettings, RoutingStrategy
from gateway.errors import GatewayError, ModelNotFound
from gateway.headers import header_safe
from gateway.routing.latency import Latencies
from gateway.routing.strategies import rank

# Raise the refusal of a candidate (route checks), or return it (None: it passes).
RouteCheck = Callable[[ModelEntry], GatewayError | None]
# The request checks of a candidate: its warnings, or raise its refusal.
RequestCheck = Callable[[ModelEntry], list[Violation]]


@dataclass(frozen=True, slots=True)
class PassedOver:
    """A candidate that did not serve: its name, a code for why (an error code), the message."""

    model: str
    reason: str
    message: str
    error: GatewayError | None = field(default=None, compare=False, repr=False)


@dataclass(slots=True)
class Route:
    requested: str  # the name the client sent
    alias: AliasSettings | None
    strategy: RoutingStrategy | None  # None: a catalog model without fallback (no ranking)
    fallback: bool
    candidates: list[ModelEntry]
    max_attempts: int
    passed_over: list[PassedOver] = field(default_factory=list)
    position: int = -1  # the candidate serving now
    attempts: int = 0  # models sent upstream
    _first_error: GatewayError | None = None

    @property
    def current(self) -> ModelEntry | None:
        return self.candidates[self.position] if 0 <= self.position < len(self.candidates) else None

    def next(self, route_check: RouteCheck, request_check: RequestCheck) -> tuple[ModelEntry, list[Violation]]:
        """The next candidate that passes the checks, and its warnings; else the refusal to answer."""
        skip_unroutable = self.fallback or self.alias is not None
        while self.position + 1 < len(self.candidates):
            self.position += 1
            entry = self.candidates[self.position]
            error = route_check(entry)
            if error is None:
                try:
                    return entry, request_check(entry)
                except GatewayError as refused:
                    if not self.fallback:
                        raise self._refusal(refused) from None
                    error = refused
            elif not skip_unroutable:
                raise self._refusal(error)
            self._pass_over(entry.model_name, error)
        raise self._refusal(self._first_error or ModelNotFound(f"No model can serve {self.requested!r}.",
                                                               param="model"))  # fmt: skip

    def may_fall_back(self) -> bool:
        """Whether another model may be tried after the current one failed upstream."""
        return self.fallback and self.attempts < self.max_attempts and self.position + 1 < len(self.candidates)

    def failed(self, reason: str, error: GatewayError) -> None:
        """The current candidate failed upstream (before the first byte) for ``reason``."""
        current = self.current
        if current is not None:
            self.passed_over.append(PassedOver(current.model_name, reason, error.message, error))

    def refusal(self, error: GatewayError) -> GatewayError:
        """``error`` with the models passed over listed in its message (the last answer when no
        other model could serve)."""
        return self._refusal(error)

    def header(self) -> bytes:
        """``x-gateway-fallback-from``: ``model;reason=code`` for each model passed over, in order."""
        return header_safe(", ".join(f"{p.model};reason={p.reason}" for p in self.passed_over), limit=4096)

    def report(self) -> dict[str, Any]:
        """What the dry run says of the route."""
        current = self.current
        return {
            "requested": self.requested,
            "alias": self.alias is not None,
            "strategy": self.strategy,
            "fallback": self.fallback,
            "candidates": [e.model_name for e in self.candidates],
            "chosen": current.model_name if current is not None else None,
            "passed_over": [{"model": p.model, "reason": p.reason, "message": p.message} for p in self.passed_over],
        }

    def _pass_over(self, model: str, error: GatewayError) -> None:
        if self._first_error is None:
            self._first_error = error
        self.passed_over.append(PassedOver(model, error.code or type(error).__name__, error.message, error))

    def _refusal(self, error: GatewayError) -> GatewayError:
        tried = [p for p in self.passed_over if p.error is not error]  # its own message says why already
        if tried:
            error.message += " Models passed over: " + "; ".join(f"{p.model} ({p.reason}: {p.message})" for p in tried)
        return error


class Router:
    def __init__(self, settings: RoutingSettings, aliases: tuple[AliasSettings, ...], latencies: Latencies) -> None:
        self._settings = settings
        self._aliases: Mapping[str, AliasSettings] = {a.name: a for a in aliases}
        self._latencies = latencies

    @property
    def settings(self) -> RoutingSettings:
        return self._settings

    @property
    def aliases(self) -> Mapping[str, AliasSettings]:
        return self._aliases

    def alias(self, name: str) -> AliasSettings | None:
        return self._aliases.get(name)

    def for_alias(
        self, alias: AliasSettings, snapshot: Snapshot, path: str, fields: Mapping[str, Any], fallback: bool | None
    ) -> Route:
        """The route of a request to ``alias`` (``fallback``: the key's or the request's word, if any)."""
        found = [snapshot.entries[m] for m in alias.models if m in snapshot.entries]
        route = Route(
            requested=alias.name,
            alias=alias,
            strategy=alias.strategy,
            fallback=fallback if fallback is not None else _first_set(alias.fallback, self._settings.fallback),
            candidates=rank(found, alias.strategy, path, fields, self._latencies),
            max_attempts=self._settings.max_attempts,
        )
        for missing in (m for m in alias.models if m not in snapshot.entries):
            route.passed_over.append(PassedOver(missing, "model_not_found", "not in the upstream's catalog"))
        return route

    def for_model(
        self, entry: ModelEntry, snapshot: Snapshot | None, path: str, fields: Mapping[str, Any], fallback: bool | None
    ) -> Route:
        """The route of a request naming a catalog model."""
        enabled = _first_set(fallback, self._settings.fallback)
        candidates = [entry]
        strategy: RoutingStrategy | None = None
        if enabled and snapshot is not None:
            strategy = self._settings.strategy
            others = [e for e in snapshot.entries.values() if e.model_name != entry.model_name and fits(e, path)]
            candidates += rank(others, strategy, path, fields, self._latencies)
        return Route(entry.model_name, None, strategy, enabled, candidates, self._settings.max_attempts)


def _first_set(choice: bool | None, otherwise: bool) -> bool:
    """``choice`` when it is said, else ``otherwise`` (on every request: kept to one comparison)."""
    return otherwise if choice is None else choice
