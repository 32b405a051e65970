"""A circuit breaker per model: stop sending traffic to a model the upstream keeps failing.

After ``failures`` consecutive upstream failures for one model (no connection, a timeout, a 5xx,
a stream broken mid-way), the circuit opens: requests for that model are answered 503
``circuit_open`` locally, with Retry-After, for ``cooldown`` seconds. Then one request is let
through as a probe (half-open): its success closes the circuit, its failure opens it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import ModelUnavailable


class CircuitOpen(ModelUnavailable):
    code = "circuit_open"


@dataclass(slots=True)
class _Circuit:
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False


@dataclass(slots=True)
class Pass:
    """Permission for one request to go upstream; report its result exactly once."""

    model: str
    probe: bool
    done: bool = False


class Breakers:
    def __init__(self, failures: int, cooldown: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._threshold = failures
        self._cooldown = cooldown
        self._clock = clock
        self._circuits: dict[str, _Circuit] = {}

    @property
    def enabled(self) -> bool:
        return self._threshold > 0

    def allow(self, model: str) -> Pass | None:
        """A pass to go upstream, or CircuitOpen (503). None when breakers are off."""
        if not self.enabled:
            return None
        circuit = self._circuits.get(model)
        if circuit is None or circuit.opened_at is None:
            return Pass(model, probe=False)
        waited = self._clock() - circuit.opened_at
        if waited < self._cooldown or circuit.probing:
            retry = max(1.0, self._cooldown - waited)
            raise CircuitOpen(
                f"Model {model!r} is failing upstream; the gateway stops sending it traffic for a while. "
                "Retry later or choose another model.",
                param="model",
                retry_after=retry,
            )
        circuit.probing = True
        return Pass(model, probe=True)

    def blocked(self, model: str) -> bool:
        """Whether ``allow`` would refuse ``model`` now (open and cooling down, or a probe out)."""
        circuit = self._circuits.get(model) if self.enabled else None
        if circuit is None or circuit.opened_at is None:
            return False
        return circuit.probing or self._clock() - circuit.opened_at < self._cooldown

    def record(self, ticket: Pass | None, ok: bool | None) -> None:
        """``ok`` True/False for an upstream success/failure, None when it says nothing (cancelled)."""
        if ticket is None or ticket.done:
            return
        ticket.done = True
        if ok:  # closes the circuit (a probe's included): nothing is kept of a model that answers
            self._circuits.pop(ticket.model, None)
            return
        circuit = self._circuits.get(ticket.model)
        if ok is None:  # no verdict: a probe may go out again
            if circuit is not None and ticket.probe:
                circuit.probing = False
            return
        if circuit is None:
            circuit = self._circuits[ticket.model] = _Circuit()
        if ticket.probe:
            circuit.probing = False
        circuit.failures += 1
        if ticket.probe or circuit.failures >= self._threshold:
            circuit.opened_at = self._clock()

    def open_circuits(self) -> dict[str, float]:
        """Models whose circuit is open, with the seconds until the next probe."""
        now = self._clock()
        return {
            model: round(max(0.0, self._cooldown - (now - c.opened_at)), 1)
            for model, c in self._circuits.items()
            if c.opened_at is not None
        }
