"""Fallback (docs/routing.md): a request whose model cannot serve, or fails before the first
response byte, goes to the next candidate that passes the same checks for this very request;
never after the first byte, never to a model that lacks what the request needs."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import openai
import orjson
import pytest

from gateway.demo import DemoState
from gateway.server.thread import LocalServer
from tests.helpers.fronts import ResettingFront
from tests.helpers.gateway import (
    CHAT_MODEL,
    CHAT_PATH,
    NO_HEALTH_MODEL,
    UNHEALTHY_MODEL,
    assert_gateway_error,
    requests_on,
    wait_until,
)
from tests.routing.conftest import RoutedGateway, alias_table

LLAMA = "Llama-3.1-8B-Instruct"  # text, no tools, no vision, an 8192-token window
VISION_MODEL = "Qwen2.5-VL-7B-Instruct"  # multimodal: vision and tools
WAIT = 15.0
HI: Any = [{"role": "user", "content": "Hi"}]


def sdk(gateway: LocalServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-client", max_retries=0, timeout=WAIT)


def sent_models(state: DemoState) -> list[str]:
    """The model of each chat request the upstream received, in order."""
    return [orjson.loads(r.body)["model"] for r in requests_on(state, CHAT_PATH)]


@pytest.mark.parametrize(
    ("fault", "reason", "tries"),
    [("500", "upstream_500", 1), ("503", "upstream_503", 1), ("429", "upstream_429", 3)],  # 429: 2 retries first
)
def test_an_upstream_error_before_the_first_byte_falls_back(
    routed_gateway: RoutedGateway,
    demo_state: DemoState,
    caplog: pytest.LogCaptureFixture,
    fault: str,
    reason: str,
    tries: int,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    demo_state.faults[CHAT_MODEL] = fault
    gateway = routed_gateway(alias_table("chat", [CHAT_MODEL, LLAMA], fallback=True))
    with sdk(gateway) as client:
        raw = client.chat.completions.with_raw_response.create(model="chat", messages=HI)
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-gateway-model"] == LLAMA
    assert raw.headers["x-gateway-fallback-from"] == f"{CHAT_MODEL};reason={reason}"
    assert sent_models(demo_state) == [CHAT_MODEL] * tries + [LLAMA]

    def access_lines() -> list[dict[str, Any]]:
        return [r.__dict__["access"] for r in caplog.records if r.name == "gateway.access"]

    assert wait_until(lambda: any(line["endpoint"] == CHAT_PATH for line in access_lines()), WAIT)
    (line,) = [line for line in access_lines() if line["endpoint"] == CHAT_PATH]
    assert (line["model"], line["requested_model"]) == (LLAMA, "chat")
    assert line["fallback_from"] == f"{CHAT_MODEL};reason={reason}"


def test_a_connection_reset_before_the_first_byte_falls_back(
    routed_gateway: RoutedGateway, demo_state: DemoState, upstream: LocalServer
) -> None:
    with ResettingFront(upstream.url) as front:
        front.reset_models.add(CHAT_MODEL)
        gateway = routed_gateway(alias_table("chat", [CHAT_MODEL, LLAMA], fallback=True), upstream_url=front.url)
        with sdk(gateway) as client:
            stream = client.chat.completions.with_raw_response.create(model="chat", messages=HI, stream=True)
            chunks = list(stream.parse())
        assert front.resets >= 1
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    assert stream.headers["x-gateway-model"] == LLAMA
    assert stream.headers["x-gateway-fallback-from"] == f"{CHAT_MODEL};reason=upstream_unavailable"
    assert sent_models(demo_state) == [LLAMA]  # the reset requests never reached the upstream


def test_an_unroutable_model_falls_back_when_the_request_asks(
    routed_gateway: RoutedGateway, demo_state: DemoState
) -> None:
    gateway = routed_gateway("")
    with sdk(gateway) as client:
        with pytest.raises(openai.InternalServerError) as refused:  # no fallback asked: refused as always
            client.chat.completions.create(model=UNHEALTHY_MODEL, messages=HI)
        assert refused.value.status_code == 503
        raw = client.chat.completions.with_raw_response.create(
            model=UNHEALTHY_MODEL, messages=HI, extra_headers={"x-gateway-fallback": "auto"}
        )
    # The catalog's other chat models, cheapest first: Llama and Phi cost the same, Llama is listed first.
    assert raw.headers["x-gateway-model"] == LLAMA
    assert raw.headers["x-gateway-fallback-from"] == f"{UNHEALTHY_MODEL};reason=model_unavailable"
    assert sent_models(demo_state) == [LLAMA]


def test_no_fallback_after_the_first_byte(routed_gateway: RoutedGateway, demo_state: DemoState) -> None:
    demo_state.faults[CHAT_MODEL] = "midstream"
    gateway = routed_gateway(alias_table("chat", [CHAT_MODEL, LLAMA], fallback=True))
    body = {"model": "chat", "messages": HI, "stream": True}
    with httpx.stream("POST", gateway.url + CHAT_PATH, json=body, timeout=WAIT) as answer:
        raw = b"".join(answer.iter_bytes())
    assert answer.status_code == 200
    assert answer.headers["x-gateway-model"] == CHAT_MODEL
    events = [orjson.loads(line[6:]) for line in raw.split(b"\n\n") if line.startswith(b"data: {")]
    assert events[0]["choices"][0]["delta"]["content"]  # the stream had started ...
    assert events[-1]["error"]["code"] == "upstream_stream_error"  # ... and ends with an error event
    assert raw.endswith(b"\n\n")
    assert sent_models(demo_state) == [CHAT_MODEL]  # never sent again, to no other model


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
LONG_PROMPT = "word " * 9000  # more than Llama's 8192-token window, fits Phi's 131072


@pytest.mark.parametrize(
    ("first", "second", "extra", "code"),
    [
        (
            CHAT_MODEL,
            LLAMA,
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
            "tools_not_supported",
        ),
        (
            VISION_MODEL,
            LLAMA,
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is this?"},
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                        ],
                    }
                ]
            },
            "vision_not_supported",
        ),
        (NO_HEALTH_MODEL, LLAMA, {"messages": [{"role": "user", "content": LONG_PROMPT}]}, "context_length_exceeded"),
    ],
)
def test_no_fallback_to_a_model_lacking_what_the_request_needs(
    routed_gateway: RoutedGateway, demo_state: DemoState, first: str, second: str, extra: dict[str, Any], code: str
) -> None:
    demo_state.faults[first] = "500"
    gateway = routed_gateway(alias_table("chat", [first, second], fallback=True))
    with httpx.Client(base_url=gateway.url, timeout=WAIT) as http:
        answer = http.post(CHAT_PATH, json={"model": "chat", "messages": HI, **extra})
    assert answer.status_code == 500  # the first model's own answer: nothing else could take the request
    assert answer.headers["x-gateway-model"] == first
    assert answer.headers["x-gateway-fallback-from"] == f"{second};reason={code}"  # checked, passed over
    assert sent_models(demo_state) == [first]


def test_the_refusal_lists_every_model_tried_and_why(
    routed_gateway: RoutedGateway, demo_state: DemoState, upstream: LocalServer
) -> None:
    with ResettingFront(upstream.url) as front:
        front.reset_models.update({CHAT_MODEL, LLAMA})
        gateway = routed_gateway(
            alias_table("chat", [UNHEALTHY_MODEL, CHAT_MODEL, LLAMA], fallback=True), upstream_url=front.url
        )
        with httpx.Client(base_url=gateway.url, timeout=WAIT) as http:
            answer = http.post(CHAT_PATH, json={"model": "chat", "messages": HI})
    error = assert_gateway_error(answer, 502, "upstream_unavailable")
    assert f"{UNHEALTHY_MODEL} (model_unavailable:" in error["message"]
    assert f"{CHAT_MODEL} (upstream_unavailable:" in error["message"]
    assert answer.headers["x-gateway-fallback-from"] == (
        f"{UNHEALTHY_MODEL};reason=model_unavailable, {CHAT_MODEL};reason=upstream_unavailable"
    )


def test_at_most_max_attempts_models_are_tried(routed_gateway: RoutedGateway, demo_state: DemoState) -> None:
    for model in (CHAT_MODEL, LLAMA, NO_HEALTH_MODEL):
        demo_state.faults[model] = "503"
    toml = "[routing]\nmax_attempts = 2\n" + alias_table("chat", [CHAT_MODEL, LLAMA, NO_HEALTH_MODEL], fallback=True)
    gateway = routed_gateway(toml)
    with httpx.Client(base_url=gateway.url, timeout=WAIT) as http:
        answer = http.post(CHAT_PATH, json={"model": "chat", "messages": HI})
    assert answer.status_code == 503  # the second model's own answer
    assert answer.headers["x-gateway-model"] == LLAMA
    assert answer.headers["x-gateway-fallback-from"] == f"{CHAT_MODEL};reason=upstream_503"
    assert sent_models(demo_state) == [CHAT_MODEL, LLAMA]


def test_the_request_header_turns_fallback_off_or_is_refused_when_unknown(
    routed_gateway: RoutedGateway, demo_state: DemoState
) -> None:
    demo_state.faults[CHAT_MODEL] = "500"
    gateway = routed_gateway(alias_table("chat", [CHAT_MODEL, LLAMA], fallback=True))
    with httpx.Client(base_url=gateway.url, timeout=WAIT) as http:
        body = {"model": "chat", "messages": HI}
        off = http.post(CHAT_PATH, json=body, headers={"x-gateway-fallback": "off"})
        assert off.status_code == 500
        assert off.headers["x-gateway-model"] == CHAT_MODEL
        unknown = http.post(CHAT_PATH, json=body, headers={"x-gateway-fallback": "sometimes"})
        error = assert_gateway_error(unknown, 400, "invalid_header")
        assert error["param"] == "x-gateway-fallback"
    assert sent_models(demo_state) == [CHAT_MODEL]


def test_a_key_may_turn_fallback_on(start_gateway: Any, demo_state: DemoState, tmp_path: Any) -> None:
    from tests.helpers.gateway import key_secret, key_table, keys_config

    demo_state.faults[CHAT_MODEL] = "500"
    tables = key_table("resilient", "fallback = true") + key_table("plain")
    config = keys_config(tmp_path / "gateway.toml", tables)
    gateway = start_gateway({"GATEWAY_UPSTREAM_API_KEY": "sk-org"}, config=config)
    for key, expected in (("resilient", 200), ("plain", 500)):
        with httpx.Client(base_url=gateway.url, timeout=WAIT) as http:
            answer = http.post(
                CHAT_PATH,
                json={"model": CHAT_MODEL, "messages": HI},
                headers={"authorization": f"Bearer {key_secret(key)}"},
            )
        assert answer.status_code == expected, answer.text
    assert sent_models(demo_state)[:2] == [CHAT_MODEL, LLAMA]


def test_no_other_model_is_tried_past_the_requests_deadline(
    routed_gateway: RoutedGateway, demo_state: DemoState
) -> None:
    demo_state.delays[CHAT_MODEL] = 0.5  # fails only after the deadline of 0.2 s has passed
    demo_state.faults[CHAT_MODEL] = "503"
    gateway = routed_gateway("[routing]\ndeadline = 0.2\n" + alias_table("chat", [CHAT_MODEL, LLAMA], fallback=True))
    with httpx.Client(base_url=gateway.url, timeout=WAIT) as http:
        answer = http.post(CHAT_PATH, json={"model": "chat", "messages": HI})
    assert answer.status_code == 503  # the first model's own answer, relayed
    assert answer.headers["x-gateway-model"] == CHAT_MODEL
    assert "x-gateway-fallback-from" not in answer.headers
    assert sent_models(demo_state) == [CHAT_MODEL]


def test_the_trace_names_the_serving_model_and_the_ones_passed_over(upstream: LocalServer) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from gateway.app import create_app
    from gateway.config import load_settings
    from gateway.server.thread import serve_in_thread
    from tests.helpers.gateway import gateway_env

    exporter = InMemorySpanExporter()
    settings = load_settings(None, gateway_env(upstream.url, {"GATEWAY_TRACING_ENABLED": "true"}))
    with serve_in_thread(create_app(settings, span_exporter=exporter)) as gateway:
        with httpx.Client(base_url=gateway.url, timeout=WAIT) as http:
            body = {"model": UNHEALTHY_MODEL, "messages": HI}
            answer = http.post(CHAT_PATH, json=body, headers={"x-gateway-fallback": "auto"})
        assert answer.status_code == 200, answer.text

        def server_attributes() -> dict[str, Any]:
            spans = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
            return dict(spans[-1].attributes or {}) if spans else {}

        assert wait_until(lambda: bool(server_attributes()), WAIT)
    found = server_attributes()
    assert found["gen_ai.request.model"] == LLAMA
    assert found["gateway.requested_model"] == UNHEALTHY_MODEL
    assert found["gateway.fallback_from"] == f"{UNHEALTHY_MODEL};reason=model_unavailable"
