"""How the candidates of a request are ranked: ``ordered``, ``cheapest``, ``fastest``.

- ``ordered``: as listed (an alias's ``models``; the catalog's order for other models).
- ``cheapest``: by what this request would cost on each model at the catalog's live prices: the
  prompt's token estimate (a lower bound, ``gateway.catalog.bounds``) at the input price plus the
  requested completion tokens (``max_tokens`` / ``max_completion_tokens``, else
  ``NOMINAL_COMPLETION_TOKENS``) at the output price; per-unit endpoints (images, speech, video)
  by the request's units at the unit price. A model without the price it needs comes last.
- ``fastest``: by the gateway's own mean time to first byte of the model's latest requests
  (``Latencies``); a model not measured yet comes first (in listed order), so every candidate is
  measured once before the measures decide.

Ties keep the listed order (the sorts are stable).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.catalog.bounds import prompt_tokens_lower_bound, requested_completion_tokens
from gateway.catalog.entries import ModelEntry
from gateway.config import RoutingStrategy
from gateway.endpoints import EMBEDDINGS
from gateway.routing.latency import Latencies
from gateway.usage.model import Usage
from gateway.usage.pricing import TOKEN_ENDPOINTS, cost_usd, max_cost_usd

NOMINAL_COMPLETION_TOKENS = 256


def rank(
    entries: Sequence[ModelEntry],
    strategy: RoutingStrategy,
    path: str,
    fields: Mapping[str, Any],
    latencies: Latencies,
) -> list[ModelEntry]:
    """``entries`` in the order ``strategy`` prefers them for this request."""
    if strategy == "cheapest":
        return sorted(entries, key=lambda e: _cost_key(estimated_cost(e, path, fields)))
    if strategy == "fastest":
        return sorted(entries, key=lambda e: _speed_key(latencies.mean(e.model_name)))
    return list(entries)


def estimated_cost(entry: ModelEntry, path: str, fields: Mapping[str, Any]) -> float | None:
    """This request's cost on ``entry`` by the ``cheapest`` rule (None: a price is unknown)."""
    if path in TOKEN_ENDPOINTS:
        prompt = prompt_tokens_lower_bound(path, fields)
        completion = requested_completion_tokens(fields) or NOMINAL_COMPLETION_TOKENS
        usage = Usage(prompt_tokens=prompt, completion_tokens=0 if path == EMBEDDINGS else completion)
        return cost_usd(entry, path, usage, fields)
    return max_cost_usd(entry, path, fields)


def _cost_key(cost: float | None) -> float:
    return math.inf if cost is None else cost


def _speed_key(mean: float | None) -> float:
    return -1.0 if mean is None else mean
