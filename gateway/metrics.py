"""Prometheus metrics: one registry per app (no global state), served on GET /metrics.

Per-request metrics are observed once, from the finished ``Exchange``; point-in-time values (the
catalog, in-flight requests, open streams, the upstream pool, open circuits) are read at scrape
time by a collector. Label values are bounded: endpoints come from the routing table, models from
the catalog ("unknown" otherwise), keys from the config.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway import routing
from gateway.accounting import Exchange

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
UPSTREAM_ERROR_CODES = {"upstream_unavailable": "unavailable", "upstream_timeout": "timeout"}


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
    upstream_connections: tuple[int, int] | None  # (all, idle)
    open_circuits: dict[str, float]
    tasks: int


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
        yield _gauge("gateway_in_flight_requests", "Proxied requests being handled.", state.in_flight)
        yield _gauge("gateway_open_streams", "Event streams being relayed.", state.open_streams)
        yield _gauge("gateway_asyncio_tasks", "Tasks on the event loop (a leak shows as growth).", state.tasks)
        if state.upstream_connections is not None:
            pool = GaugeMetricFamily("gateway_upstream_connections", "Upstream pool connections.", labels=["state"])
            total, idle = state.upstream_connections
            pool.add_metric(["active"], total - idle)
            pool.add_metric(["idle"], idle)
            yield pool
        circuits = GaugeMetricFamily("gateway_circuit_open", "1 while a model's circuit is open.", labels=["model"])
        for model in state.open_circuits:
            circuits.add_metric([model], 1)
        yield circuits


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class Metrics:
    def __init__(self, read_state: Callable[[], Snapshot | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gateway_requests", "Proxied requests by outcome.", ["endpoint", "model", "status", "outcome"], registry=r
        )
        self.refusals = Counter(
            "gateway_refusals", "Requests the gateway answered itself, by error code.", ["endpoint", "code"], registry=r
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors", "Upstream failures by kind.", ["endpoint", "kind"], registry=r
        )
        self.retries = Counter(
            "gateway_upstream_retries", "Upstream attempts beyond the first.", ["endpoint"], registry=r
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds", "Whole request.", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.upstream_duration = Histogram(
            "gateway_upstream_duration_seconds",
            "Until the upstream's response headers.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "gateway_overhead_seconds",
            "The gateway's own time before the response starts (upstream wait excluded).",
            ["endpoint"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "gateway_time_to_first_byte_seconds",
            "Until the first body byte reached the client.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("gateway_usage_tokens", "Tokens used.", ["model", "key", "kind"], registry=r)
        self.cost = Counter("gateway_usage_cost_usd", "Cost in USD.", ["model", "key"], registry=r)
        self.registry.register(_StateCollector(read_state))
        # Bounded like the label values themselves (endpoints x catalog models x statuses x outcomes).
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def observe(self, exchange: Exchange) -> None:
        child = self._child
        endpoint = endpoint_label(exchange.path)
        model = exchange.entry.model_name if exchange.entry else "unknown"
        key = exchange.caller.name if exchange.caller else ""
        child(self.requests, endpoint, model, str(exchange.status), exchange.outcome).inc()
        if exchange.outcome == "refused" and exchange.error_code:
            child(self.refusals, endpoint, exchange.error_code).inc()
        kind = _upstream_error_kind(exchange)
        if kind is not None:
            child(self.upstream_errors, endpoint, kind).inc()
        if exchange.retries:
            child(self.retries, endpoint).inc(exchange.retries)
        child(self.duration, endpoint).observe(exchange.elapsed())
        if exchange.upstream_started is not None and exchange.upstream_answered is not None:
            child(self.upstream_duration, endpoint).observe(exchange.upstream_answered - exchange.upstream_started)
        if exchange.overhead is not None:
            child(self.overhead, endpoint).observe(exchange.overhead)
        if exchange.first_byte is not None:
            child(self.ttfb, endpoint).observe(exchange.first_byte - exchange.started)
        if exchange.usage is not None:
            child(self.tokens, model, key, "prompt").inc(exchange.usage.prompt_tokens)
            child(self.tokens, model, key, "completion").inc(exchange.usage.completion_tokens)
        if exchange.cost:
            child(self.cost, model, key).inc(exchange.cost)

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once per combination (labels() validates and locks)."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def render(self) -> bytes:
        return generate_latest(self.registry)


def endpoint_label(path: str) -> str:
    if path in routing.ENDPOINTS:
        return path
    if path.startswith(routing.VIDEO_JOB_PREFIX):
        return routing.VIDEO_JOB.path
    return "other"


def _upstream_error_kind(exchange: Exchange) -> str | None:
    if exchange.error_code in UPSTREAM_ERROR_CODES:
        return UPSTREAM_ERROR_CODES[exchange.error_code]
    if exchange.outcome == "upstream_broken":
        return "stream_broken"
    if exchange.outcome != "refused" and exchange.status >= 500:
        return "status_5xx"
    return None
