"""The validation layer: refusals derived from the catalog entry, before anything costs money."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from gateway import endpoints
from gateway.catalog.checks import Violation
from gateway.catalog.entries import ModelEntry, parse_entry
from gateway.catalog.validation import alternatives, validate
from gateway.demo import DemoState, default_catalog
from gateway.server.thread import LocalServer
from tests.helpers.gateway import CHAT_MODEL, StartGateway

SMALL = "Llama-3.1-8B-Instruct"  # chat + streaming, no tools; context 8192, max_output 2048
NO_STREAM_VISION = "Llama-3.2-11B-Vision-Instruct"  # chat + vision, no streaming
VISION = "Qwen2.5-VL-7B-Instruct"
USER = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


def catalog_entry(name: str) -> ModelEntry:
    raw = next(m for m in default_catalog() if m["model_name"] == name)
    entry, _ = parse_entry(raw)
    assert entry is not None
    return entry


def violations(path: str, fields: dict[str, Any], model: str, files: tuple[str, ...] = ()) -> list[Violation]:
    return list(validate(path, fields, files, catalog_entry(model)))


def first(path: str, fields: dict[str, Any], model: str) -> tuple[str, str, str | None]:
    found = violations(path, fields, model)
    assert found, f"expected a violation for {fields}"
    return found[0].check, found[0].code, found[0].param


# --- the checks, one by one (pure) -------------------------------------------------------------


def test_a_plain_chat_request_passes() -> None:
    assert (
        violations(endpoints.CHAT, {"model": CHAT_MODEL, "messages": USER, "tools": TOOLS, "stream": True}, CHAT_MODEL)
        == []
    )


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": TOOLS}, "tools"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"tool_choice": "auto"}, "tool_choice"),
    ],
)
def test_tools_need_tool_use(extra: dict[str, Any], param: str) -> None:
    assert first(endpoints.CHAT, {"messages": USER, **extra}, SMALL) == ("tools", "tools_not_supported", param)


def test_tool_choice_none_is_fine_without_tool_use() -> None:
    assert violations(endpoints.CHAT, {"messages": USER, "tool_choice": "none"}, SMALL) == []


def test_image_parts_need_vision_and_name_the_part() -> None:
    messages = [
        USER[0],
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "see"}, IMAGE]},
    ]
    assert first(endpoints.CHAT, {"messages": messages}, SMALL) == (
        "vision",
        "vision_not_supported",
        "messages[2].content[1]",
    )
    assert violations(endpoints.CHAT, {"messages": messages}, VISION) == []
    input_image = [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]
    assert first(endpoints.CHAT, {"messages": input_image}, SMALL)[2] == "messages[0].content[0]"


def test_stream_needs_streaming() -> None:
    assert first(endpoints.CHAT, {"messages": USER, "stream": True}, NO_STREAM_VISION) == (
        "streaming",
        "streaming_not_supported",
        "stream",
    )
    assert violations(endpoints.CHAT, {"messages": USER, "stream": False}, NO_STREAM_VISION) == []


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_above_max_output_names_both_numbers(name: str) -> None:
    found = violations(endpoints.CHAT, {"messages": USER, name: 3000}, SMALL)
    assert (found[0].check, found[0].code, found[0].param) == ("max_output", "max_tokens_exceeded", name)
    assert "3000" in found[0].message
    assert "2048" in found[0].message
    assert violations(endpoints.CHAT, {"messages": USER, name: 2048}, SMALL) == []


def test_context_window_refuses_only_a_certain_overflow() -> None:
    words = "word " * 8193  # at least 8193 tokens by any mainstream tokenizer
    assert first(endpoints.CHAT, {"messages": [{"role": "user", "content": words}]}, SMALL) == (
        "context_window",
        "context_length_exceeded",
        "messages",
    )
    # One huge "word" might be few tokens in theory: never refused on a guess.
    assert violations(endpoints.CHAT, {"messages": [{"role": "user", "content": "x" * 100_000}]}, SMALL) == []
    # The requested completion counts too.
    fits_alone = {"messages": [{"role": "user", "content": "word " * 7000}]}
    assert violations(endpoints.CHAT, fits_alone, SMALL) == []
    assert first(endpoints.CHAT, {**fits_alone, "max_tokens": 1500}, SMALL)[1] == "context_length_exceeded"


def test_completions_and_embeddings_bounds_count_token_arrays_exactly() -> None:
    assert first(endpoints.COMPLETIONS, {"prompt": [1] * 8193}, SMALL)[1] == "context_length_exceeded"
    assert violations(endpoints.COMPLETIONS, {"prompt": [1] * 8000}, SMALL) == []
    found = violations(endpoints.EMBEDDINGS, {"input": ["short", "w " * 9000]}, "bge-m3")
    assert (found[0].code, found[0].param) == ("context_length_exceeded", "input[1]")


@pytest.mark.parametrize(
    ("path", "fields", "model", "param", "code"),
    [
        (endpoints.CHAT, {}, SMALL, "messages", "missing_required_parameter"),
        (endpoints.CHAT, {"messages": []}, SMALL, "messages", "invalid_type"),
        (endpoints.CHAT, {"messages": "hi"}, SMALL, "messages", "invalid_type"),
        (endpoints.CHAT, {"messages": [1]}, SMALL, "messages[0]", "invalid_type"),
        (endpoints.CHAT, {"messages": [{"role": "robot", "content": "x"}]}, SMALL, "messages[0].role", "invalid_value"),
        (endpoints.CHAT, {"messages": [{"role": "user", "content": 5}]}, SMALL, "messages[0].content", "invalid_type"),
        (endpoints.CHAT, {"messages": USER, "n": 2}, SMALL, "n", "multiple_choices_not_supported"),
        (endpoints.CHAT, {"messages": USER, "n": 0}, SMALL, "n", "invalid_value"),
        (endpoints.CHAT, {"messages": USER, "temperature": 2.5}, SMALL, "temperature", "invalid_value"),
        (endpoints.CHAT, {"messages": USER, "top_p": "high"}, SMALL, "top_p", "invalid_value"),
        (endpoints.CHAT, {"messages": USER, "max_tokens": 0}, SMALL, "max_tokens", "invalid_value"),
        (endpoints.CHAT, {"messages": USER, "stream": "yes"}, SMALL, "stream", "invalid_type"),
        (endpoints.COMPLETIONS, {}, SMALL, "prompt", "missing_required_parameter"),
        (endpoints.COMPLETIONS, {"prompt": {"a": 1}}, SMALL, "prompt", "invalid_type"),
        (endpoints.EMBEDDINGS, {"input": []}, "bge-m3", "input", "invalid_type"),
        (endpoints.EMBEDDINGS, {"input": [1, "a"]}, "bge-m3", "input", "invalid_type"),
        (endpoints.EMBEDDINGS, {}, "bge-m3", "input", "missing_required_parameter"),
        (endpoints.IMAGES, {"prompt": ""}, "FLUX.1-schnell", "prompt", "missing_required_parameter"),
        (endpoints.IMAGES, {"prompt": "cat", "n": 11}, "FLUX.1-schnell", "n", "invalid_value"),
        (
            endpoints.IMAGES,
            {"prompt": "cat", "response_format": "url"},
            "FLUX.1-schnell",
            "response_format",
            "invalid_value",
        ),
        (endpoints.VIDEOS, {}, "Wan2.1-T2V-1.3B", "prompt", "missing_required_parameter"),
        (endpoints.SPEECH, {"voice": "af_bella"}, "Kokoro-82M", "input", "missing_required_parameter"),
        (endpoints.SPEECH, {"input": "hi"}, "Kokoro-82M", "voice", "missing_required_parameter"),
        (endpoints.SPEECH, {"input": "hi", "voice": "alloy"}, "Kokoro-82M", "voice", "invalid_value"),
        (endpoints.SPEECH, {"input": "hi", "voice": "am_adam", "speed": 9}, "Kokoro-82M", "speed", "invalid_value"),
        (
            endpoints.TRANSCRIPTIONS,
            {"model": "whisper-large-v3"},
            "whisper-large-v3",
            "file",
            "missing_required_parameter",
        ),
    ],
)
def test_request_shape(path: str, fields: dict[str, Any], model: str, param: str, code: str) -> None:
    assert first(path, fields, model) == ("shape", code, param)


def test_unknown_extra_fields_are_allowed() -> None:
    fields = {"messages": USER, "top_k": 40, "repetition_penalty": 1.1, "chat_template_kwargs": {"x": 1}}
    assert violations(endpoints.CHAT, fields, SMALL) == []


def test_alternatives_have_the_missing_capability_and_fit_the_endpoint() -> None:
    entries = [catalog_entry(m["model_name"]) for m in default_catalog()]
    tools = violations(endpoints.CHAT, {"messages": USER, "tools": TOOLS}, SMALL)[0]
    names = alternatives(tools, endpoints.CHAT, entries)
    assert names == [CHAT_MODEL, VISION]  # both chat models with tool_use
    big = violations(endpoints.CHAT, {"messages": USER, "max_tokens": 10000}, SMALL)[0]
    assert alternatives(big, endpoints.CHAT, entries) == ["DeepSeek-R1-Distill-Qwen-32B"]
    shape = violations(endpoints.CHAT, {"messages": []}, SMALL)[0]
    assert alternatives(shape, endpoints.CHAT, entries) == []  # another model would not help


# --- end to end: the SDK raises BadRequestError with the gateway's message ---------------------


@pytest.fixture
def sdk(gateway: LocalServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-x", max_retries=0, timeout=10) as client:
        yield client


def _refused(call: Any) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    return caught.value


def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.body
    assert isinstance(body, dict)
    if "error" in body:  # the SDK may hand over the envelope or its content
        body = body["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


def test_sdk_tools_refusal_suggests_models(sdk: openai.OpenAI, demo_state: DemoState) -> None:
    exc = _refused(lambda: sdk.chat.completions.create(model=SMALL, messages=USER, tools=TOOLS))  # type: ignore[arg-type]
    error = _error(exc)
    assert (error["code"], error["param"], error["type"]) == ("tools_not_supported", "tools", "invalid_request_error")
    assert f"Models that would accept this request: {CHAT_MODEL}, {VISION}." in error["message"]
    assert not [r for r in demo_state.requests if r.path == endpoints.CHAT]


def test_sdk_vision_streaming_max_output_and_context(sdk: openai.OpenAI, demo_state: DemoState) -> None:
    with_image: Any = [{"role": "user", "content": [IMAGE]}]
    vision = _refused(lambda: sdk.chat.completions.create(model=SMALL, messages=with_image))
    assert _error(vision)["param"] == "messages[0].content[0]"
    stream = _refused(lambda: sdk.chat.completions.create(model=NO_STREAM_VISION, messages=USER, stream=True))  # type: ignore[arg-type]
    assert _error(stream)["code"] == "streaming_not_supported"
    big = _refused(lambda: sdk.chat.completions.create(model=SMALL, messages=USER, max_completion_tokens=4096))  # type: ignore[arg-type]
    assert "4096" in big.message
    assert "2048" in big.message
    too_long: Any = [{"role": "user", "content": "w " * 9000}]
    long = _refused(lambda: sdk.chat.completions.create(model=SMALL, messages=too_long))
    assert (_error(long)["code"], _error(long)["param"]) == ("context_length_exceeded", "messages")
    assert not [r for r in demo_state.requests if r.path == endpoints.CHAT]


def test_warn_mode_forwards_with_a_header(start_gateway: StartGateway, demo_state: DemoState) -> None:
    gateway = start_gateway({"GATEWAY_VALIDATION_TOOLS": "warn"})
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        answer = client.post(endpoints.CHAT, json={"model": SMALL, "messages": USER, "tools": TOOLS})
        still_enforced = client.post(endpoints.CHAT, json={"model": SMALL, "messages": USER, "max_tokens": 5000})
    assert answer.headers["x-gateway-validation-warning"] == "tools=tools_not_supported"
    assert [r.path for r in demo_state.requests if r.method == "POST"] == [endpoints.CHAT]
    assert answer.status_code != 400 or answer.json()["error"]["code"] != "tools_not_supported"
    assert still_enforced.status_code == 400


def test_off_mode_forwards_silently(start_gateway: StartGateway, demo_state: DemoState) -> None:
    gateway = start_gateway({"GATEWAY_VALIDATION_SHAPE": "off"})
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        answer = client.post(endpoints.CHAT, json={"model": CHAT_MODEL, "messages": USER, "n": 2})
    assert "x-gateway-validation-warning" not in answer.headers
    assert answer.json()["error"]["message"] == "multiple choices are not supported"  # the upstream's own answer


def test_dry_run_answers_without_forwarding(http: httpx.Client, demo_state: DemoState) -> None:
    ok = http.post("/v1/validate/chat/completions", json={"model": CHAT_MODEL, "messages": USER, "tools": TOOLS})
    assert ok.status_code == 200
    assert ok.json() == {
        "object": "validation",
        "admitted": True,
        "endpoint": endpoints.CHAT,
        "model": CHAT_MODEL,
        "warnings": [],
        "route": {  # the model named, no fallback: the one candidate (docs/routing.md)
            "requested": CHAT_MODEL,
            "alias": False,
            "strategy": None,
            "fallback": False,
            "candidates": [CHAT_MODEL],
            "chosen": CHAT_MODEL,
            "passed_over": [],
        },
    }
    refused = http.post("/v1/validate/chat/completions", json={"model": SMALL, "messages": USER, "tools": TOOLS})
    real = http.post(endpoints.CHAT, json={"model": SMALL, "messages": USER, "tools": TOOLS})
    assert (refused.status_code, refused.json()) == (real.status_code, real.json())  # the exact error
    mismatch = http.post("/v1/validate/embeddings", json={"model": CHAT_MODEL, "input": "x"})
    assert mismatch.json()["error"]["code"] == "model_endpoint_mismatch"
    assert http.post("/v1/validate/nope", json={}).json()["error"]["code"] == "unknown_url"
    assert http.get("/v1/validate/chat/completions").status_code == 405
    assert not [r for r in demo_state.requests if r.method == "POST"]


def test_sdk_shape_refusals(sdk: openai.OpenAI, demo_state: DemoState) -> None:
    n_two = _refused(lambda: sdk.chat.completions.create(model=CHAT_MODEL, messages=USER, n=2))  # type: ignore[arg-type]
    assert (_error(n_two)["code"], _error(n_two)["param"]) == ("multiple_choices_not_supported", "n")
    hot = _refused(lambda: sdk.chat.completions.create(model=CHAT_MODEL, messages=USER, temperature=3))  # type: ignore[arg-type]
    assert (_error(hot)["code"], _error(hot)["param"]) == ("invalid_value", "temperature")
    voice = _refused(lambda: sdk.audio.speech.create(model="Kokoro-82M", voice="alloy", input="hi"))
    assert "af_bella" in voice.message  # the message lists the voices that would work
    empty = _refused(lambda: sdk.embeddings.create(model="bge-m3", input=[]))
    assert _error(empty)["param"] == "input"
    assert not [r for r in demo_state.requests if r.method == "POST"]
