"""Prometheus metrics: one registry per app (no global state), served on GET /metrics.

Per-request metrics are observed once, from the finished ``Exchange``; point-in-time values (the
catalog, in-flight requests, open streams, the upstream pool, open circuits) are read at scrape
time by a collector. Label values are bounded: endpoints come from the routing table, models from
the catalog ("unknown" otherwise) and the aliases' model lists, keys from the config, reasons from
the gateway's error codes and the upstream's 5xx/429 statuses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway import endpoints
from gateway.exchange import Exchange
from gateway.ops.families import Counter, Histogram
from gateway.state.store import SharedState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
UPSTREAM_ERROR_CODES = {"upstream_unavailable": "unavailable", "upstream_timeout": "timeout"}


@dataclass(frozen=True, slots=True)
class CacheSnapshot:
    """The response cache's state and counters (``gateway.cache.responses.ResponseCache.stats``)."""

    bytes: int
    entries: int
    evictions: int
    stores: int
    skips: dict[str, int]
    flights: int
    remote_up: bool | None = None
    remote_hits: int = 0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the collector reads at scrape time."""

    catalog_loaded: bool
    catalog_age: float | None
    catalog_models: int
    catalog_routable: int
    catalog_refreshes: int
    catalog_refresh_failures: int
    in_flight: int
    open_streams: int
    upstream_connections: int | None  # in use (the client's own count: see Upstream.connections)
    open_circuits: dict[str, float]
    tasks: int
    ledger_dropped: int = 0  # usage records the ledger could not write
    cache: CacheSnapshot | None = None  # None: the response cache is off
    shared_store: SharedState | None = None  # None: no shared state store ([shared] redis_url)
    # Each model's effective health and where it came from: (model, health, "catalog" | "status" | "breaker").
    model_health: tuple[tuple[str, str, str], ...] = ()
    status_feed: str = "off"  # live health from /api/status: off, waiting, live, failing, disabled
    status_reads: int = 0
    status_read_failures: int = 0


class _StateCollector(Collector):
    def __init__(self, read: Callable[[], Snapshot | None]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        state = self._read()
        if state is None:
            return
        yield _gauge("gateway_catalog_loaded", "1 when a model catalog is loaded.", int(state.catalog_loaded))
        if state.catalog_age is not None:
            yield _gauge("gateway_catalog_age_seconds", "Age of the catalog in use.", state.catalog_age)
        models = GaugeMetricFamily("gateway_catalog_models", "Models in the catalog.", labels=["state"])
        models.add_metric(["total"], state.catalog_models)
        models.add_metric(["routable"], state.catalog_routable)
        yield models
        yield CounterMetricFamily(
            "gateway_catalog_refreshes", "Successful catalog fetches.", value=state.catalog_refreshes
        )
        yield CounterMetricFamily(
            "gateway_catalog_refresh_failures", "Failed catalog fetches.", value=state.catalog_refresh_failures
        )
        yield CounterMetricFamily(
            "gateway_ledger_dropped",
            "Usage records the ledger dropped (a full queue, a record the database refused, a failed final write).",
            value=state.ledger_dropped,
        )
        yield _gauge("gateway_in_flight_requests", "Proxied requests being handled.", state.in_flight)
        yield _gauge("gateway_open_streams", "Event streams being relayed.", state.open_streams)
        yield _gauge("gateway_asyncio_tasks", "Tasks on the event loop (a leak shows as growth).", state.tasks)
        if state.upstream_connections is not None:
            # Only "active": idle pooled connections are not readable through aiohttp's or httpx's public API.
            pool = GaugeMetricFamily(
                "gateway_upstream_connections", "Upstream connections in use (or awaited).", labels=["state"]
            )
            pool.add_metric(["active"], state.upstream_connections)
            yield pool
        health = GaugeMetricFamily(
            "gateway_model_health",
            "1 for each model's effective health and its source.",
            labels=["model", "health", "source"],
        )
        for model, status, source in state.model_health:
            health.add_metric([model, status, source], 1)
        yield health
        feed = GaugeMetricFamily("gateway_status_feed", "1 for the state of the /api/status reader.", labels=["state"])
        feed.add_metric([state.status_feed], 1)
        yield feed
        yield CounterMetricFamily("gateway_status_reads", "Successful reads of /api/status.", value=state.status_reads)
        yield CounterMetricFamily(
            "gateway_status_read_failures", "Failed reads of /api/status.", value=state.status_read_failures
        )
        circuits = GaugeMetricFamily("gateway_circuit_open", "1 while a model's circuit is open.", labels=["model"])
        for model in state.open_circuits:
            circuits.add_metric([model], 1)
        yield circuits
        if state.cache is not None:
            yield from _cache_families(state.cache)
        shared = state.shared_store
        if shared is not None:
            yield _gauge("gateway_shared_store_up", "1 while the shared state store (Redis) answers.", int(shared.up))
            yield _gauge("gateway_shared_store_replicas", "Replicas seen alive by the shared store.", shared.replicas)
            yield CounterMetricFamily(
                "gateway_shared_store_fallbacks",
                "Admissions decided by the [shared] fallback policy while Redis did not answer.",
                value=shared.fallbacks,
            )


def _cache_families(cache: CacheSnapshot) -> Iterator[Metric]:
    yield _gauge("gateway_cache_bytes", "Bytes of answers the response cache holds.", cache.bytes)
    yield _gauge("gateway_cache_entries", "Answers the response cache holds.", cache.entries)
    yield _gauge("gateway_cache_flights", "Cacheable requests in flight that identical ones may join.", cache.flights)
    yield CounterMetricFamily(
        "gateway_cache_evictions", "Answers removed to make room (not expiry or purges).", value=cache.evictions
    )
    yield CounterMetricFamily("gateway_cache_stores", "Answers stored.", value=cache.stores)
    skips = CounterMetricFamily("gateway_cache_skips", "Answers not stored, by reason.", labels=["reason"])
    for reason, count in sorted(cache.skips.items()):
        skips.add_metric([reason], count)
    yield skips
    if cache.remote_up is not None:
        yield _gauge("gateway_cache_remote_up", "1 while the cache's Redis tier answers.", int(cache.remote_up))
        yield CounterMetricFamily(
            "gateway_cache_remote_hits", "Answers found in the Redis tier (not in memory).", value=cache.remote_hits
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class _RequestCollector(Collector):
    def __init__(self, families: Sequence[Counter | Histogram]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        for family in self._families:
            yield family.family()


class Metrics:
    def __init__(self, read_state: Callable[[], Snapshot | None]) -> None:
        self.requests = Counter(
            "gateway_requests", "Proxied requests by outcome.", ["endpoint", "model", "status", "outcome"]
        )
        self.refusals = Counter(
            "gateway_refusals", "Requests the gateway answered itself, by error code.", ["endpoint", "code"]
        )
        self.upstream_errors = Counter("gateway_upstream_errors", "Upstream failures by kind.", ["endpoint", "kind"])
        self.retries = Counter("gateway_upstream_retries", "Upstream attempts beyond the first.", ["endpoint"])
        self.duration = Histogram("gateway_request_duration_seconds", "Whole request.", ["endpoint"], LATENCY_BUCKETS)
        self.upstream_duration = Histogram(
            "gateway_upstream_duration_seconds", "Until the upstream's response headers.", ["endpoint"], LATENCY_BUCKETS
        )
        self.overhead = Histogram(
            "gateway_overhead_seconds",
            "The gateway's own time before the response starts (upstream wait excluded).",
            ["endpoint"],
            OVERHEAD_BUCKETS,
        )
        self.ttfb = Histogram(
            "gateway_time_to_first_byte_seconds",
            "Until the first body byte reached the client.",
            ["endpoint"],
            LATENCY_BUCKETS,
        )
        self.tokens = Counter("gateway_usage_tokens", "Tokens used.", ["model", "key", "kind"])
        self.cost = Counter("gateway_usage_cost_usd", "Cost in USD.", ["model", "key"])
        self.cache = Counter(
            "gateway_cache_requests",
            "What the response cache did per request: hit, collapsed, miss, refresh, bypass.",
            ["endpoint", "result"],
        )
        self.saved_tokens = Counter(
            "gateway_cache_saved_tokens", "Tokens served from the cache instead of the upstream.", ["model", "kind"]
        )
        self.saved_cost = Counter("gateway_cache_saved_usd", "What answers from the cache would have cost.", ["model"])
        self.fallbacks = Counter(
            "gateway_fallbacks",
            'Models passed over before the one that served (to_model "none": none did), by reason code.',
            ["from_model", "to_model", "reason"],
        )
        self.registry = CollectorRegistry()
        self.registry.register(
            _RequestCollector(
                [
                    self.requests,
                    self.refusals,
                    self.upstream_errors,
                    self.retries,
                    self.duration,
                    self.upstream_duration,
                    self.overhead,
                    self.ttfb,
                    self.tokens,
                    self.cost,
                    self.cache,
                    self.saved_tokens,
                    self.saved_cost,
                    self.fallbacks,
                ]
            )
        )
        self.registry.register(_StateCollector(read_state))

    def observe(self, exchange: Exchange) -> None:
        endpoint = (endpoint_label(exchange.path),)
        model = exchange.entry.model_name if exchange.entry else "unknown"
        key = exchange.caller.name if exchange.caller else ""
        # str(): the outcome's text as a plain str, at C speed (``.value`` is a Python-level property).
        self.requests.inc((endpoint[0], model, str(exchange.status), str(exchange.outcome)))
        if exchange.outcome == "refused" and exchange.error_code:
            self.refusals.inc((endpoint[0], exchange.error_code))
        kind = _upstream_error_kind(exchange)
        if kind is not None:
            self.upstream_errors.inc((endpoint[0], kind))
        if exchange.retries:
            self.retries.inc(endpoint, exchange.retries)
        self.duration.observe(endpoint, exchange.elapsed())
        if exchange.upstream_started is not None and exchange.upstream_answered is not None:
            self.upstream_duration.observe(endpoint, exchange.upstream_answered - exchange.upstream_started)
        if exchange.overhead is not None:
            self.overhead.observe(endpoint, exchange.overhead)
        if exchange.first_byte is not None:
            self.ttfb.observe(endpoint, exchange.first_byte - exchange.started)
        if exchange.usage is not None:
            self.tokens.inc((model, key, "prompt"), exchange.usage.prompt_tokens)
            self.tokens.inc((model, key, "completion"), exchange.usage.completion_tokens)
        if exchange.cost:
            self.cost.inc((model, key), exchange.cost)
        if exchange.cache is not None:
            self._observe_cache(exchange, endpoint[0], model)
        if exchange.fallbacks and exchange.outcome != "dry_run":
            for passed, reason, to in exchange.fallbacks:
                self.fallbacks.inc((passed, to, reason))

    def _observe_cache(self, exchange: Exchange, endpoint: str, model: str) -> None:
        self.cache.inc((endpoint, exchange.cache or ""))
        if exchange.from_cache and exchange.usage is not None:
            self.saved_tokens.inc((model, "prompt"), exchange.usage.prompt_tokens)
            self.saved_tokens.inc((model, "completion"), exchange.usage.completion_tokens)
        if exchange.saved_cost:
            self.saved_cost.inc((model,), exchange.saved_cost)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def endpoint_label(path: str) -> str:
    """The ``endpoint`` label: the route template (dry runs under their own), else "other"."""
    return endpoints.route(path) or "other"


def _upstream_error_kind(exchange: Exchange) -> str | None:
    if exchange.error_code in UPSTREAM_ERROR_CODES:
        return UPSTREAM_ERROR_CODES[exchange.error_code]
    if exchange.outcome == "upstream_broken":
        return "stream_broken"
    if exchange.outcome != "refused" and exchange.status >= 500:
        return "status_5xx"
    return None
