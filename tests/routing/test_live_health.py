"""Live health (docs/routing.md#live-health): the upstream's /api/status read in the background;
a model's effective health is the fresher of it and the catalog, the gateway's own open circuit
first; /readyz, /v1/models and the metrics show it and its source; a missing, malformed or hanging
status endpoint never blocks a request."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.demo import DemoState
from gateway.server.thread import LocalServer
from tests.helpers.gateway import CHAT_MODEL, CHAT_PATH, UNHEALTHY_MODEL, StartGateway, assert_gateway_error, wait_until

WAIT = 15.0
HI: Any = [{"role": "user", "content": "Hi"}]
LIVE = {"GATEWAY_CATALOG_STATUS_INTERVAL": "0.1"}  # read /api/status every 0.1 s


def model_health(gateway: LocalServer) -> dict[str, tuple[str, str]]:
    """``gateway_model_health``: model -> (health, source)."""
    text = httpx.get(gateway.url + "/metrics", timeout=WAIT).text
    return {
        s.labels["model"]: (s.labels["health"], s.labels["source"])
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "gateway_model_health"
    }


def readyz(gateway: LocalServer, *, ready: bool = True) -> dict[str, Any]:
    """/readyz's ``live_health`` (``ready=False``: also while the catalog's first fetch is under way,
    503 "not ready", whose body has it too)."""
    answer = httpx.get(gateway.url + "/readyz", timeout=WAIT)
    assert answer.status_code in ((200,) if ready else (200, 503)), answer.text
    live: dict[str, Any] = answer.json()["live_health"]
    return live


def health_source(gateway: LocalServer, model: str) -> str | None:
    """``model``'s ``health_source`` in /v1/models (None: not listed, or no catalog yet)."""
    answer = httpx.get(gateway.url + "/v1/models", timeout=WAIT)
    if answer.status_code != 200:
        return None
    return next((m.get("health_source") for m in answer.json()["data"] if m["id"] == model), None)


def listed(gateway: LocalServer) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in httpx.get(gateway.url + "/v1/models", timeout=WAIT).json()["data"]}


def test_a_model_unhealthy_in_the_status_only_is_not_routed(start_gateway: StartGateway, demo_state: DemoState) -> None:
    gateway = start_gateway(LIVE)
    # At start-up the catalog's first fetch and the status's first read race: whichever lands later
    # is the fresher source (docs/routing.md), so the status decides from its first read after the
    # catalog's fetch, not necessarily from the feed's first read ("live").
    assert wait_until(lambda: health_source(gateway, CHAT_MODEL) == "status", WAIT)
    demo_state.status_health[CHAT_MODEL] = "down"  # the catalog still says healthy
    assert wait_until(lambda: model_health(gateway).get(CHAT_MODEL) == ("down", "status"), WAIT)
    assert readyz(gateway)["not_healthy"][CHAT_MODEL] == {"health": "down", "source": "status"}
    assert CHAT_MODEL not in listed(gateway)
    with httpx.Client(base_url=gateway.url, timeout=WAIT) as http:
        refused = http.post(CHAT_PATH, json={"model": CHAT_MODEL, "messages": HI})
        assert_gateway_error(refused, 503, "model_unavailable")
        served = http.post(
            CHAT_PATH, json={"model": CHAT_MODEL, "messages": HI}, headers={"x-gateway-fallback": "auto"}
        )
    assert served.status_code == 200
    assert served.headers["x-gateway-fallback-from"] == f"{CHAT_MODEL};reason=model_unavailable"


def test_a_model_healthy_again_in_the_status_is_routed_before_the_catalog_says_so(
    start_gateway: StartGateway, demo_state: DemoState
) -> None:
    demo_state.status_health[UNHEALTHY_MODEL] = "ok"  # the catalog still says unhealthy
    gateway = start_gateway(LIVE)
    assert wait_until(lambda: model_health(gateway).get(UNHEALTHY_MODEL) == ("healthy", "status"), WAIT)
    assert listed(gateway)[UNHEALTHY_MODEL]["health_status"] == "healthy"
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk", max_retries=0, timeout=WAIT) as client:
        raw = client.chat.completions.with_raw_response.create(model=UNHEALTHY_MODEL, messages=HI)
    assert raw.headers["x-gateway-model"] == UNHEALTHY_MODEL


@pytest.mark.parametrize(("fault", "state"), [("404", "disabled"), ("malformed", "disabled"), ("hang", "waiting")])
def test_status_faults_never_block_a_request(
    start_gateway: StartGateway, demo_state: DemoState, caplog: pytest.LogCaptureFixture, fault: str, state: str
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.catalog.status")
    demo_state.status_fault = fault
    gateway = start_gateway({**LIVE, "GATEWAY_CATALOG_FETCH_TIMEOUT": "60"})  # a hanging read stays one read
    try:
        assert wait_until(lambda: demo_state.status_reads >= 1, WAIT)
        assert wait_until(lambda: readyz(gateway, ready=False)["status_feed"] == state, WAIT)
        with httpx.Client(base_url=gateway.url, timeout=WAIT) as http:  # while the read hangs too
            for _ in range(3):
                answer = http.post(CHAT_PATH, json={"model": CHAT_MODEL, "messages": HI})
                assert answer.status_code == 200, answer.text
        assert model_health(gateway)[CHAT_MODEL] == ("healthy", "catalog")
        off = [r for r in caplog.records if "live health is off" in r.getMessage()]
        if state == "disabled":
            assert len(off) == 1  # one line, and no more reads
            assert demo_state.status_reads == 1
        else:
            assert off == []
            assert demo_state.status_reads == 1  # the one read still pending: never a second one
    finally:
        demo_state.status_fault = None  # a hanging read answers now


def test_an_open_circuit_shows_as_the_breakers_health(start_gateway: StartGateway, demo_state: DemoState) -> None:
    demo_state.faults[CHAT_MODEL] = "500"
    gateway = start_gateway({**LIVE, "GATEWAY_UPSTREAM_BREAKER_FAILURES": "1"})
    with httpx.Client(base_url=gateway.url, timeout=WAIT) as http:
        assert http.post(CHAT_PATH, json={"model": CHAT_MODEL, "messages": HI}).status_code == 500
    assert model_health(gateway)[CHAT_MODEL] == ("circuit_open", "breaker")
    assert readyz(gateway)["not_healthy"][CHAT_MODEL] == {"health": "circuit_open", "source": "breaker"}
    assert CHAT_MODEL not in listed(gateway)
