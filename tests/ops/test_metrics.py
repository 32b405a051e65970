"""GET /metrics: Prometheus text with bounded labels; the overhead header."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.ops.metrics import Metrics, Snapshot
from gateway.server.thread import LocalServer
from tests.helpers.gateway import CHAT_MODEL, CHAT_PATH


def samples(gateway: LocalServer) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(gateway.url + "/metrics", timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_requests_refusals_usage_and_catalog(http: httpx.Client, gateway: LocalServer) -> None:
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]}
    ok = http.post(CHAT_PATH, json=body)
    assert ok.status_code == 200
    assert float(ok.headers["x-gateway-overhead-ms"]) >= 0
    assert http.post(CHAT_PATH, json={**body, "model": "no-such-model"}).status_code == 404
    assert http.post(CHAT_PATH, json={**body, "model": "bge-m3"}).status_code == 400
    found = samples(gateway)
    assert (
        value(found, "gateway_requests_total", endpoint=CHAT_PATH, model=CHAT_MODEL, status="200", outcome="completed")
        == 1
    )
    # An unknown name never becomes a label value: it is grouped as "unknown".
    unknown = value(
        found, "gateway_requests_total", endpoint=CHAT_PATH, model="unknown", status="404", outcome="refused"
    )
    assert unknown == 1
    assert not any("no-such-model" in str(key) for key in found)
    assert value(found, "gateway_refusals_total", endpoint=CHAT_PATH, code="model_endpoint_mismatch") == 1
    assert value(found, "gateway_usage_tokens_total", model=CHAT_MODEL, key="", kind="completion") > 0
    assert value(found, "gateway_usage_cost_usd_total", model=CHAT_MODEL, key="") > 0
    assert value(found, "gateway_request_duration_seconds_count", endpoint=CHAT_PATH) == 3
    assert value(found, "gateway_overhead_seconds_count", endpoint=CHAT_PATH) == 1
    assert value(found, "gateway_upstream_duration_seconds_count", endpoint=CHAT_PATH) == 1
    assert value(found, "gateway_catalog_loaded") == 1
    assert value(found, "gateway_catalog_models", state="total") == 13
    assert value(found, "gateway_catalog_models", state="routable") == 11
    assert value(found, "gateway_catalog_refreshes_total") >= 1
    assert value(found, "gateway_in_flight_requests") == 0
    assert value(found, "gateway_upstream_connections", state="active") == 0  # none in progress


def test_stream_metrics(http: httpx.Client, gateway: LocalServer) -> None:
    body = {"model": CHAT_MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with http.stream("POST", CHAT_PATH, json=body) as response:
        assert response.status_code == 200
        assert len(list(response.iter_lines())) > 3
    found = samples(gateway)
    assert value(found, "gateway_time_to_first_byte_seconds_count", endpoint=CHAT_PATH) == 1
    assert value(found, "gateway_open_streams") == 0


def test_histograms_and_counters_render_as_prometheus_text() -> None:
    """The per-request families are plain numbers rendered at scrape time: buckets are cumulative,
    a value equal to a bound falls in that bound's bucket, and counters add up per label values."""
    metrics = Metrics(lambda: None)
    endpoint = ("/v1/embeddings",)
    for seconds in (0.0001, 0.001, 0.0011, 7.0):  # two on bucket bounds, one past every bound
        metrics.overhead.observe(endpoint, seconds)
    metrics.tokens.inc(("m", "alice", "prompt"), 5)
    metrics.tokens.inc(("m", "alice", "prompt"), 7)
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    buckets = {
        s.labels["le"]: s.value for s in families["gateway_overhead_seconds"].samples if s.name.endswith("_bucket")
    }
    assert buckets["0.0001"] == 1
    assert buckets["0.00025"] == 1
    assert buckets["0.001"] == 2
    assert buckets["0.0025"] == 3
    assert buckets["0.25"] == 3
    assert buckets["+Inf"] == 4
    summed = {s.name: s.value for s in families["gateway_overhead_seconds"].samples}
    assert summed["gateway_overhead_seconds_count"] == 4
    assert summed["gateway_overhead_seconds_sum"] == pytest.approx(7.0022)
    (tokens,) = families["gateway_usage_tokens"].samples
    assert (tokens.labels, tokens.value) == ({"model": "m", "key": "alice", "kind": "prompt"}, 12)


def test_dropped_ledger_records_are_exported() -> None:
    state = Snapshot(
        catalog_loaded=True,
        catalog_age=1.0,
        catalog_models=1,
        catalog_routable=1,
        catalog_refreshes=1,
        catalog_refresh_failures=0,
        in_flight=0,
        open_streams=0,
        upstream_connections=None,
        open_circuits={},
        tasks=1,
        ledger_dropped=3,
    )
    text = Metrics(lambda: state).render().decode()
    found = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    assert found["gateway_ledger_dropped_total"] == 3
