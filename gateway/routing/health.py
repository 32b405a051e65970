"""What the gateway shows of a model's health: the effective health and where it came from.

Three sources, the gateway's own first: ``breaker`` (its circuit for the model is open: it sends
the model nothing for now, whatever the upstream says), then the fresher of ``status`` (the
upstream's /api/status) and ``catalog`` (the catalog's ``health_status``), see
``gateway.catalog.health``. /readyz, /v1/models and the metrics show this.
"""

from __future__ import annotations

from gateway.catalog.entries import ModelEntry
from gateway.catalog.health import LiveHealth
from gateway.upstream.breaker import Breakers

CIRCUIT_OPEN = "circuit_open"


def shown_health(entry: ModelEntry, health: LiveHealth, breakers: Breakers) -> tuple[ModelEntry, str | None, str]:
    """The entry with its effective health, the health to show, and its source."""
    effective, source = health.explain(entry)
    if breakers.blocked(entry.model_name):
        return effective, CIRCUIT_OPEN, "breaker"
    return effective, effective.health_status, source
