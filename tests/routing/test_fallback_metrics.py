"""``gateway_fallbacks_total{from_model, to_model, reason}`` (docs/routing.md, docs/operations.md):
one count per model passed over, as ``x-gateway-fallback-from`` lists them, with the model that
served (``none`` when none did); dry runs are not counted."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.demo import DemoState
from gateway.server.thread import LocalServer
from tests.helpers.fronts import ResettingFront
from tests.helpers.gateway import CHAT_MODEL, UNHEALTHY_MODEL
from tests.routing.conftest import RoutedGateway, alias_table

LLAMA = "Llama-3.1-8B-Instruct"
WAIT = 15.0
HI: Any = [{"role": "user", "content": "Hi"}]


def fallbacks(gateway: LocalServer) -> dict[tuple[str, str, str], float]:
    """``gateway_fallbacks_total``: (from_model, to_model, reason) -> count."""
    text = httpx.get(gateway.url + "/metrics", timeout=WAIT).text
    return {
        (s.labels["from_model"], s.labels["to_model"], s.labels["reason"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "gateway_fallbacks_total"
    }


def sdk(gateway: LocalServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-client", max_retries=0, timeout=WAIT)


def test_fallbacks_are_counted_by_model_served_and_reason(routed_gateway: RoutedGateway, demo_state: DemoState) -> None:
    gateway = routed_gateway(
        alias_table("chat", [CHAT_MODEL, LLAMA], fallback=True) + alias_table("healthy", [UNHEALTHY_MODEL, LLAMA])
    )
    assert fallbacks(gateway) == {}
    demo_state.faults[CHAT_MODEL] = "503"
    with sdk(gateway) as client:
        for _ in range(2):
            raw = client.chat.completions.with_raw_response.create(model="chat", messages=HI)
            assert raw.headers["x-gateway-fallback-from"] == f"{CHAT_MODEL};reason=upstream_503"
        passed = client.chat.completions.with_raw_response.create(model="healthy", messages=HI)
        assert passed.headers["x-gateway-fallback-from"] == f"{UNHEALTHY_MODEL};reason=model_unavailable"
        direct = client.chat.completions.with_raw_response.create(model=LLAMA, messages=HI)
        assert "x-gateway-fallback-from" not in direct.headers
    # A dry run reports the route, and is not a fallback.
    dry = httpx.post(
        gateway.url + "/v1/validate/chat/completions",
        json={"model": "healthy", "messages": HI},
        headers={"authorization": "Bearer sk-client"},
        timeout=WAIT,
    )
    assert dry.status_code == 200, dry.text
    assert dry.json()["route"]["passed_over"][0]["model"] == UNHEALTHY_MODEL
    assert fallbacks(gateway) == {
        (CHAT_MODEL, LLAMA, "upstream_503"): 2.0,
        (UNHEALTHY_MODEL, LLAMA, "model_unavailable"): 1.0,
    }


def test_a_fallback_no_model_answered_counts_to_none(routed_gateway: RoutedGateway, upstream: LocalServer) -> None:
    with ResettingFront(upstream.url) as front:
        front.reset_models.update({CHAT_MODEL, LLAMA})
        gateway = routed_gateway(alias_table("chat", [CHAT_MODEL, LLAMA], fallback=True), upstream_url=front.url)
        with sdk(gateway) as client, pytest.raises(openai.APIStatusError) as failed:
            client.chat.completions.create(model="chat", messages=HI)
    assert failed.value.status_code == 502
    assert failed.value.response.headers["x-gateway-fallback-from"] == f"{CHAT_MODEL};reason=upstream_unavailable"
    assert fallbacks(gateway) == {(CHAT_MODEL, "none", "upstream_unavailable"): 1.0}
