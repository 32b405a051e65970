"""The live panel's numbers, from what the gateway already counts (``gateway.ops.metrics``) and
its running parts: rates over the last ``WINDOW_S`` seconds from samples taken when the panel is
read (at most one a second, kept ``KEEP_S`` seconds), and the state of now."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from gateway.ops.metrics import Metrics
from gateway.services import Services

WINDOW_S: Final = 60.0
KEEP_S: Final = 120.0


@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    requests: float  # every finished request (refusals included)
    errors: float  # answered 5xx (not by a refusal of the gateway's own)
    refusals: dict[str, float]  # by error code
    overhead: list[float]  # per-bucket counts
    cache: dict[str, float]  # by result
    saved_usd: float


def take_sample(metrics: Metrics, at: float) -> Sample:
    requests = errors = 0.0
    for (_endpoint, _model, status, outcome), n in metrics.requests.values().items():
        requests += n
        if outcome != "refused" and status.isdigit() and int(status) >= 500:
            errors += n
    refusals: dict[str, float] = {}
    for (_endpoint, code), n in metrics.refusals.values().items():
        refusals[code] = refusals.get(code, 0.0) + n
    cache: dict[str, float] = {}
    for (_endpoint, result), n in metrics.cache.values().items():
        cache[result] = cache.get(result, 0.0) + n
    saved = sum(metrics.saved_cost.values().values())
    return Sample(at, requests, errors, refusals, metrics.overhead.counts(), cache, saved)


def quantile(q: float, bounds: Sequence[float], counts: Sequence[float]) -> float | None:
    """The q-quantile of a histogram (per-bucket counts, the last +Inf), interpolated within its
    bucket as Prometheus' histogram_quantile does; None without observations."""
    total = sum(counts)
    if total <= 0:
        return None
    rank, seen = q * total, 0.0
    for i, count in enumerate(counts):
        if seen + count >= rank and count > 0:
            if i >= len(bounds):
                return bounds[-1]  # in +Inf: the largest finite bound is all that is known
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * (rank - seen) / count
        seen += count
    return bounds[-1]


class LiveStats:
    """Samples the counters per read; one per app, read on the event loop's thread."""

    def __init__(self, services: Services, clock: Callable[[], float] = time.monotonic) -> None:
        self._services = services
        self._clock = clock
        self._samples: deque[Sample] = deque()

    def read(self) -> dict[str, Any]:
        s = self._services
        now = take_sample(s.metrics, self._clock())
        while self._samples and now.at - self._samples[0].at > KEEP_S:
            self._samples.popleft()
        base = next((x for x in self._samples if now.at - x.at <= WINDOW_S), None)
        if not self._samples or now.at - self._samples[-1].at >= 1.0:
            self._samples.append(now)
        span = now.at - base.at if base is not None else 0.0
        requests = now.requests - (base.requests if base else 0.0)
        hits = sum(now.cache.get(r, 0.0) - (base.cache.get(r, 0.0) if base else 0.0) for r in ("hit", "collapsed"))
        looked = sum(now.cache.values()) - (sum(base.cache.values()) if base else 0.0)
        overhead = now.overhead if base is None else [a - b for a, b in zip(now.overhead, base.overhead, strict=True)]
        if sum(overhead) <= 0:
            overhead = now.overhead  # nothing in the window: since start
        refusals = {code: n - (base.refusals.get(code, 0.0) if base else 0.0) for code, n in now.refusals.items()}
        bounds = s.metrics.overhead.bounds
        cache = s.cache.stats() if s.cache is not None else None
        shared = s.store.shared_state()
        return {
            "window_s": round(span, 1),
            "requests_per_s": requests / span if span > 0 else None,
            "requests_total": int(now.requests),
            "error_rate": (now.errors - (base.errors if base else 0.0)) / requests if requests > 0 else None,
            "refusal_rate": sum(refusals.values()) / requests if requests > 0 else None,
            "refusals_by_code": sorted(((c, int(n)) for c, n in refusals.items() if n > 0), key=lambda x: -x[1]),
            "overhead_ms": {f"p{int(q * 100)}": _ms(quantile(q, bounds, overhead)) for q in (0.5, 0.9, 0.99)},
            "open_streams": s.open_streams,
            "in_flight": s.in_flight,
            "open_circuits": sorted(s.breakers.open_circuits().items()),
            "breakers_enabled": s.breakers.enabled,
            "cache_enabled": cache is not None,
            "cache_hit_ratio": hits / looked if looked > 0 else None,
            "cache_saved_usd": now.saved_usd,
            "cache_entries": cache.entries if cache else None,
            "cache_bytes": cache.bytes if cache else None,
            "shared_store": None if shared is None else {"up": shared.up, "replicas": shared.replicas},
            "catalog_age_s": s.catalog.age(),
            "catalog_models": len(s.catalog.snapshot.entries) if s.catalog.snapshot else 0,
            "ledger_dropped": s.accounting.ledger_dropped,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
