"""The official openai SDK against the gateway, as a drop-in replacement for the upstream.

Every endpoint FlexAI serves is called through the gateway with the SDK (httpx where the SDK has
no method), and every refusal the gateway answers itself must surface as the SDK exception a user
would catch, with the gateway's message and code, without the upstream seeing the call.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageFunctionToolCall

from gateway.demo import DemoState, default_catalog
from gateway.server.thread import LocalServer
from tests.helpers.gateway import (
    CHAT_MODEL,
    CHAT_PATH,
    DEGRADED_MODEL,
    EMBEDDING_MODEL,
    IMAGE_MODEL,
    MAINTENANCE_MODEL,
    NO_HEALTH_MODEL,
    STT_MODEL,
    TTS_MODEL,
    TTS_VOICE,
    UNHEALTHY_MODEL,
    VIDEO_MODEL,
    StartGateway,
    assert_upstream_untouched,
    module_server_fixtures,
    requests_on,
    sdk_error,
)

USER_TEXT = "Tell me something about gateways"
MESSAGES: list[Any] = [{"role": "user", "content": USER_TEXT}]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROUTABLE_HEALTH = ("healthy", "degraded", None)


# One upstream and one gateway for the module, overriding conftest's fixtures of the same names, the
# upstream's state reset before each test (so `client` and `http` talk to the shared gateway).
_servers, demo_state, upstream, gateway = module_server_fixtures()


@pytest.fixture
def direct(upstream: LocalServer) -> Iterator[httpx.Client]:
    """Plain HTTP straight to the simulated upstream, to compare with what the gateway relays."""
    with httpx.Client(base_url=upstream.url, timeout=10, headers={"authorization": "Bearer sk-client"}) as c:
        yield c


# --------------------------------------------------------------------------- chat and completions


def test_chat_completion(client: openai.OpenAI, demo_state: DemoState) -> None:
    completion = client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES)
    assert completion.model == CHAT_MODEL
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content == f"This is a simulated reply to: {USER_TEXT}"
    assert completion.usage is not None
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert len(requests_on(demo_state, CHAT_PATH)) == 1


def test_chat_completion_with_tools_returns_tool_calls(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=MESSAGES,
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Weather for a city",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ],
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    (call,) = choice.message.tool_calls
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert call.function.name == "get_weather"
    assert orjson.loads(call.function.arguments) == {}
    assert call.id.startswith("call_")


def test_chat_streaming_with_usage(client: openai.OpenAI, demo_state: DemoState) -> None:
    stream = client.chat.completions.create(
        model=CHAT_MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert len(chunks) > 3
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == f"This is a simulated reply to: {USER_TEXT}"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    *_, last = chunks
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == len(text.split())
    assert all(c.usage is None for c in chunks[:-1])
    assert demo_state.streams_completed == 1


def test_completion_plain_and_streamed(client: openai.OpenAI) -> None:
    plain = client.completions.create(model=CHAT_MODEL, prompt="Once upon a time")
    assert plain.choices[0].text == "This is a simulated completion of: Once upon a time"
    assert plain.usage is not None

    stream = client.completions.create(
        model=CHAT_MODEL, prompt="Once upon a time", stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert len(chunks) > 3
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


# --------------------------------------------------------------------------- embeddings, images


def test_embeddings_default_base64_path(client: openai.OpenAI, demo_state: DemoState) -> None:
    result = client.embeddings.create(model=EMBEDDING_MODEL, input=["first text", "second text"], dimensions=16)
    # The SDK asks for base64 by default and decodes it back to floats.
    (sent,) = requests_on(demo_state, "/v1/embeddings")
    assert orjson.loads(sent.body)["encoding_format"] == "base64"
    assert [d.index for d in result.data] == [0, 1]
    for item in result.data:
        assert len(item.embedding) == 16
        assert all(isinstance(v, float) for v in item.embedding)
        assert abs(sum(v * v for v in item.embedding) - 1.0) < 1e-3  # the demo returns unit vectors
    assert result.data[0].embedding != result.data[1].embedding


def test_embeddings_float_format_matches_base64(client: openai.OpenAI) -> None:
    floats = client.embeddings.create(model=EMBEDDING_MODEL, input="same text", encoding_format="float")
    decoded = client.embeddings.create(model=EMBEDDING_MODEL, input="same text")
    assert len(floats.data[0].embedding) == 8  # the demo's default dimensions
    assert floats.data[0].embedding == pytest.approx(decoded.data[0].embedding, abs=1e-6)
    assert floats.usage.prompt_tokens > 0


def test_images_generate_b64_png(client: openai.OpenAI) -> None:
    result = client.images.generate(model=IMAGE_MODEL, prompt="a red square", n=2)
    assert result.data is not None
    assert len(result.data) == 2
    images = []
    for image in result.data:
        assert image.url is None
        assert image.b64_json is not None
        png = base64.b64decode(image.b64_json)
        assert png.startswith(PNG_SIGNATURE)
        images.append(png)
    assert images[0] != images[1]


# --------------------------------------------------------------------------- audio


def test_speech_bytes_identical_to_upstream(client: openai.OpenAI, direct: httpx.Client, demo_state: DemoState) -> None:
    request = {
        "model": TTS_MODEL,
        "voice": TTS_VOICE,
        "input": "Hello from the gateway",
        "response_format": "wav",
    }
    speech = client.audio.speech.create(
        model=TTS_MODEL, voice=TTS_VOICE, input="Hello from the gateway", response_format="wav"
    )
    audio = speech.content
    assert audio.startswith(b"RIFF")
    assert audio[8:12] == b"WAVE"
    expected = direct.post("/v1/audio/speech", json=request)
    assert expected.status_code == 200
    assert audio == expected.content
    assert speech.response.headers["content-type"] == "audio/wav"
    assert len(requests_on(demo_state, "/v1/audio/speech")) == 2


def test_transcription_upload_arrives_byte_for_byte(client: openai.OpenAI, demo_state: DemoState) -> None:
    # Random bytes, plus the bytes a multipart parser could trip on.
    data = os.urandom(100_000) + b"\r\n--boundary\r\n\x00\xff" + os.urandom(1000)
    digest = hashlib.sha256(data).hexdigest()
    raw = client.audio.transcriptions.with_raw_response.create(model=STT_MODEL, file=("clip.wav", data, "audio/wav"))
    assert raw.status_code == 200
    assert raw.headers["x-demo-file-sha256"] == digest
    transcription = raw.parse()
    assert transcription.text == f"Simulated transcription of {len(data)} bytes (sha256 {digest})."
    (sent,) = requests_on(demo_state, "/v1/audio/transcriptions")
    assert data in sent.body


# --------------------------------------------------------------------------- models


def test_models_list_only_routable_with_category(client: openai.OpenAI) -> None:
    catalog = {m["model_name"]: m for m in default_catalog()}
    expected = {name for name, m in catalog.items() if m.get("health_status") in ROUTABLE_HEALTH}
    models = list(client.models.list())
    ids = [m.id for m in models]
    assert sorted(ids) == sorted(expected)
    assert {DEGRADED_MODEL, NO_HEALTH_MODEL} <= set(ids)
    assert UNHEALTHY_MODEL not in ids
    assert MAINTENANCE_MODEL not in ids
    for model in models:
        assert model.object == "model"
        extra = model.model_extra or {}
        assert extra["category"] == catalog[model.id]["category"]


def test_models_retrieve_and_unknown(client: openai.OpenAI) -> None:
    model = client.models.retrieve(CHAT_MODEL)
    assert model.id == CHAT_MODEL
    assert (model.model_extra or {})["category"] == "text"

    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    body = sdk_error(caught.value, 404, "model_not_found")
    assert "no-such-model" in body["message"]

    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve(CHAT_MODEL.lower())
    body = sdk_error(caught.value, 404, "model_not_found")
    assert f"Did you mean '{CHAT_MODEL}'?" in body["message"]


# --------------------------------------------------------------------------- video jobs


def test_video_job_polled_until_completed(gateway: LocalServer, demo_state: DemoState) -> None:
    headers = {"authorization": "Bearer sk-client"}
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=10) as http:
        created = http.post("/v1/videos/generations", json={"model": VIDEO_MODEL, "prompt": "a cat", "seconds": 2})
        assert created.status_code == 200, created.text
        job = created.json()
        assert job["status"] == "queued"
        job_id = job["id"]

        status = job["status"]
        polled: dict[str, Any] = {}
        deadline = time.monotonic() + 5
        for _ in range(100):
            response = http.get(f"/v1/videos/generations/{job_id}")
            assert response.status_code == 200, response.text
            polled = response.json()
            status = polled["status"]
            if status == "completed" or time.monotonic() > deadline:
                break
            time.sleep(0.02)
    assert status == "completed"
    assert polled["id"] == job_id
    assert polled["model"] == VIDEO_MODEL
    assert base64.b64decode(polled["data"][0]["b64_json"])[4:8] == b"ftyp"  # an MP4 header
    assert len(requests_on(demo_state, f"/v1/videos/generations/{job_id}")) >= 1


def test_video_unknown_job_404_passes_through(gateway: LocalServer, direct: httpx.Client) -> None:
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        response = http.get("/v1/videos/generations/video_does_not_exist")
    expected = direct.get("/v1/videos/generations/video_does_not_exist")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "job_not_found"
    assert response.content == expected.content


# --------------------------------------------------------------------------- gateway refusals


def test_unknown_model_is_not_found(client: openai.OpenAI, demo_state: DemoState) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    body = sdk_error(caught.value, 404, "model_not_found")
    assert body["param"] == "model"
    assert "'no-such-model'" in body["message"]
    assert_upstream_untouched(demo_state, CHAT_PATH)


# The same name in another case, and the catalog's slug (the dashboard's URL form, not the API name).
@pytest.mark.parametrize("wrong", [CHAT_MODEL.lower(), CHAT_MODEL.upper(), "qwen-qwen2-5-32b-instruct"])
def test_wrong_name_suggests_the_right_one(client: openai.OpenAI, demo_state: DemoState, wrong: str) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model=wrong, messages=MESSAGES)
    body = sdk_error(caught.value, 404, "model_not_found")
    assert f"Did you mean '{CHAT_MODEL}'?" in body["message"]
    assert_upstream_untouched(demo_state, CHAT_PATH)


def test_embedding_model_on_chat_is_a_mismatch(client: openai.OpenAI, demo_state: DemoState) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=EMBEDDING_MODEL, messages=MESSAGES)
    body = sdk_error(caught.value, 400, "model_endpoint_mismatch")
    assert "/v1/embeddings" in body["message"]
    assert body["param"] == "model"
    assert_upstream_untouched(demo_state, CHAT_PATH)


def test_tts_model_on_transcriptions_is_a_mismatch(client: openai.OpenAI, demo_state: DemoState) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(model=TTS_MODEL, file=("clip.wav", b"RIFF0000WAVE", "audio/wav"))
    body = sdk_error(caught.value, 400, "model_endpoint_mismatch")
    assert "POST /v1/audio/speech" in body["message"]
    assert_upstream_untouched(demo_state, "/v1/audio/transcriptions")


def test_stt_model_on_speech_is_a_mismatch(client: openai.OpenAI, demo_state: DemoState) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.speech.create(model=STT_MODEL, voice=TTS_VOICE, input="hello")
    body = sdk_error(caught.value, 400, "model_endpoint_mismatch")
    assert "POST /v1/audio/transcriptions" in body["message"]
    assert_upstream_untouched(demo_state, "/v1/audio/speech")


@pytest.mark.parametrize("model", [UNHEALTHY_MODEL, MAINTENANCE_MODEL])
def test_unroutable_model_is_unavailable_with_retry_after(
    client: openai.OpenAI, demo_state: DemoState, model: str
) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model=model, messages=MESSAGES)
    body = sdk_error(caught.value, 503, "model_unavailable")
    assert model in body["message"]
    retry_after = caught.value.response.headers["retry-after"]
    assert re.fullmatch(r"[1-9][0-9]*", retry_after), retry_after
    assert int(retry_after) <= 60  # the catalog TTL: health may change at the next refresh
    assert_upstream_untouched(demo_state, CHAT_PATH)


def test_wrong_endpoint_wins_over_bad_health(client: openai.OpenAI, demo_state: DemoState) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=UNHEALTHY_MODEL, input="hello")
    body = sdk_error(caught.value, 400, "model_endpoint_mismatch")
    assert "POST /v1/chat/completions" in body["message"]
    assert_upstream_untouched(demo_state, "/v1/embeddings")


def test_degraded_model_is_served_with_health_header(client: openai.OpenAI, demo_state: DemoState) -> None:
    raw = client.chat.completions.with_raw_response.create(model=DEGRADED_MODEL, messages=MESSAGES)
    assert raw.status_code == 200
    assert raw.headers["x-gateway-model-health"] == "degraded"
    assert raw.parse().choices[0].message.content == f"This is a simulated reply to: {USER_TEXT}"
    assert len(requests_on(demo_state, CHAT_PATH)) == 1


@pytest.mark.parametrize("model", [NO_HEALTH_MODEL, CHAT_MODEL])
def test_model_without_bad_health_is_admitted_without_health_header(
    client: openai.OpenAI, demo_state: DemoState, model: str
) -> None:
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)
    assert raw.status_code == 200
    assert "x-gateway-model-health" not in raw.headers
    assert raw.parse().model == model
    assert len(requests_on(demo_state, CHAT_PATH)) == 1


# --------------------------------------------------------------------------- upstream errors


@pytest.fixture
def unchecked_client(start_gateway: StartGateway) -> Iterator[openai.OpenAI]:
    """The SDK against a gateway whose request-shape checks are off, so requests the gateway would
    refuse itself (n > 1, response_format "url") reach the upstream and the upstream answers."""
    gateway = start_gateway(env={"GATEWAY_VALIDATION_SHAPE": "off"})
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-client", max_retries=0, timeout=10) as sdk:
        yield sdk


def test_upstream_error_passes_through_unchanged_n2(
    unchecked_client: openai.OpenAI, direct: httpx.Client, demo_state: DemoState
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        unchecked_client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, n=2)
    expected = direct.post(CHAT_PATH, json={"model": CHAT_MODEL, "messages": MESSAGES, "n": 2})
    assert expected.status_code == 400
    assert caught.value.status_code == 400
    assert caught.value.response.content == expected.content
    assert caught.value.message.endswith("multiple choices are not supported")
    # FlexAI's envelope has no "param": the gateway did not rewrite it.
    assert caught.value.body == orjson.loads(expected.content)["error"]
    assert "param" not in orjson.loads(caught.value.response.content)["error"]
    assert len(requests_on(demo_state, CHAT_PATH)) == 2


def test_upstream_error_passes_through_unchanged_image_url(
    unchecked_client: openai.OpenAI, direct: httpx.Client, demo_state: DemoState
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        unchecked_client.images.generate(model=IMAGE_MODEL, prompt="a cat", response_format="url")
    expected = direct.post(
        "/v1/images/generations", json={"model": IMAGE_MODEL, "prompt": "a cat", "response_format": "url"}
    )
    assert expected.status_code == 400
    assert caught.value.response.content == expected.content
    assert caught.value.code == "unsupported_value"
    assert "b64_json" in caught.value.message
    assert len(requests_on(demo_state, "/v1/images/generations")) == 2


def test_upstream_context_length_error_passes_through(
    client: openai.OpenAI, direct: httpx.Client, demo_state: DemoState
) -> None:
    """With default settings: a prompt the gateway's lower bound admits (one long word) but the
    upstream's tokenizer finds too long for the 8k window: the upstream's refusal reaches the SDK."""
    messages: list[Any] = [{"role": "user", "content": "x" * 40_000}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="Llama-3.1-8B-Instruct", messages=messages)
    expected = direct.post(CHAT_PATH, json={"model": "Llama-3.1-8B-Instruct", "messages": messages})
    assert expected.status_code == 400
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.response.content == expected.content
    assert len(requests_on(demo_state, CHAT_PATH)) == 2
