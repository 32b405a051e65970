"""The simulated FlexAI upstream on its own: a real server on 127.0.0.1 driven by the openai SDK."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import logging
import math
import wave
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import openai
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from gateway.demo import DemoState, create_demo_upstream, default_catalog
from gateway.server.thread import LocalServer, serve_in_thread
from tests.helpers.gateway import wait_until

CATALOG_KEYS = {
    "slug", "model_name", "display_name", "description", "category", "context_window", "max_output",
    "input_per_mtok", "output_per_mtok", "supports", "pricing", "health_status", "provider",
}  # fmt: skip


def _fast_state() -> DemoState:
    return DemoState(token_delay=0.001, video_seconds=0.0)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[DemoState, LocalServer]]:
    state = _fast_state()
    with serve_in_thread(create_demo_upstream(state)) as server:
        yield state, server


@pytest.fixture
def state(served: tuple[DemoState, LocalServer]) -> DemoState:
    """The served state, reset to a fresh one (fast pacing) for each test."""
    current, fresh = served[0], _fast_state()
    for f in dataclasses.fields(DemoState):
        setattr(current, f.name, getattr(fresh, f.name))
    return current


@pytest.fixture
def url(served: tuple[DemoState, LocalServer], state: DemoState) -> str:
    """The server's URL; asking for it resets the state, so no test sees another's settings."""
    return served[1].url


@pytest.fixture
def client(url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=url + "/v1", api_key="demo", max_retries=0, timeout=10) as sdk:
        yield sdk


@pytest.fixture
def http(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=10) as session:
        yield session


# --------------------------------------------------------------------------- localserver


def test_serve_in_thread_binds_a_free_port_and_stops() -> None:
    async def hello(_request: Request) -> PlainTextResponse:
        return PlainTextResponse("hello")

    with serve_in_thread(Starlette(routes=[Route("/", hello)])) as server:
        assert server.host == "127.0.0.1"
        assert server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert httpx.get(server.url, timeout=5).text == "hello"
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url, timeout=2)


def test_serve_in_thread_reports_a_failed_startup() -> None:
    @asynccontextmanager
    async def broken(_app: Starlette) -> AsyncIterator[None]:
        raise RuntimeError("no database")
        yield

    with pytest.raises(RuntimeError, match="before it started"), serve_in_thread(Starlette(lifespan=broken)):
        pytest.fail("the body must not run")


def test_a_server_in_a_thread_logs_at_its_own_level(caplog: pytest.LogCaptureFixture) -> None:
    """uvicorn's logger is the process's: at INFO for another server, this one (log_level warning,
    the default) still keeps its INFO records to itself, and its errors are still seen."""

    @asynccontextmanager
    async def broken(_app: Starlette) -> AsyncIterator[None]:
        raise RuntimeError("no database")
        yield

    kept: dict[str, Any] = {"log_config": None}  # the logging as it is (the gateway's), not uvicorn's own handlers
    uvicorn_logger = logging.getLogger("uvicorn.error")
    with caplog.at_level(logging.INFO, logger="uvicorn.error"):
        with serve_in_thread(Starlette(), **kept):
            uvicorn_logger.setLevel(logging.INFO)  # as the gateway's server, started next, sets it
            uvicorn_logger.info("the other server's record")
        with pytest.raises(RuntimeError), serve_in_thread(Starlette(lifespan=broken), **kept):
            pytest.fail("the body must not run")
        with serve_in_thread(Starlette(), log_level="info", **kept):
            pass
    seen = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "uvicorn.error"]
    assert ("INFO", "the other server's record") in seen
    assert ("ERROR", "Application startup failed. Exiting.") in seen
    # Only the server that asked for INFO logged its start and shutdown.
    assert [m for _, m in seen if m.startswith("Application startup complete")] == ["Application startup complete."]
    assert [m for _, m in seen if m.startswith("Application shutdown complete")] == ["Application shutdown complete."]
    assert uvicorn_logger.filters == []  # each server's filter went with it


# --------------------------------------------------------------------------- catalog


def test_api_models_serves_the_catalog_and_counts_fetches(state: DemoState, http: httpx.Client) -> None:
    first = http.get("/api/models").json()
    http.get("/api/models")
    assert state.catalog_fetches == 2
    assert first == default_catalog()
    assert {m["category"] for m in first} == {
        "text", "code", "reasoning", "multimodal", "vision", "embedding", "image", "audio", "video",
    }  # fmt: skip
    for model in first:
        missing = CATALOG_KEYS - set(model)
        assert missing <= {"health_status"}, model["model_name"]
        assert isinstance(model["pricing"], list)


def test_default_catalog_is_a_fresh_copy() -> None:
    catalog = default_catalog()
    catalog[0]["supports"].append("mutated")
    assert "mutated" not in default_catalog()[0]["supports"]


def test_v1_models_lists_only_live_models(state: DemoState, client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert "Qwen2.5-32B-Instruct-FP8" in models
    assert "Phi-3.5-mini-instruct" in models  # no health_status at all counts as live
    assert not {
        "DeepSeek-R1-Distill-Qwen-32B",
        "Qwen2.5-Coder-32B-Instruct",
        "Mistral-7B-Instruct-v0.3",
    } & set(models)
    assert (models["bge-m3"].model_extra or {})["category"] == "embedding"


def test_api_status_is_derived_from_the_catalog(state: DemoState, http: httpx.Client) -> None:
    response = http.get("/api/status")
    body = response.json()
    assert response.headers["cache-control"] == "public, max-age=10, stale-while-revalidate=60"
    assert body["status"] == "degraded"
    statuses = {m["name"]: m["status"] for m in body["models"]}
    assert statuses["Mistral-7B-Instruct-v0.3"] == "maintenance"
    assert statuses["Phi-3.5-mini-instruct"] == "unknown"
    state.catalog = [m for m in state.catalog if m.get("health_status", "healthy") == "healthy"]
    assert http.get("/api/status").json()["status"] == "ok"


# --------------------------------------------------------------------------- chat and completions


def test_chat_completion_is_deterministic_and_recorded(state: DemoState, client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="Qwen2.5-32B-Instruct-FP8", messages=[{"role": "user", "content": "Hello there"}]
    )
    choice = completion.choices[0]
    assert choice.message.content == "This is a simulated reply to: Hello there"
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens >= 1
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert (completion.usage.model_extra or {})["cache_read_input_tokens"] == 0
    recorded = state.requests[-1]
    assert (recorded.method, recorded.path) == ("POST", "/v1/chat/completions")
    assert recorded.headers["authorization"] == "Bearer demo"
    assert orjson.loads(recorded.body)["messages"] == [{"role": "user", "content": "Hello there"}]


def test_chat_with_tools_calls_the_first_tool(client: openai.OpenAI) -> None:
    tools: Any = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
    ]
    completion = client.chat.completions.create(
        model="Qwen2.5-32B-Instruct-FP8", messages=[{"role": "user", "content": "Weather?"}], tools=tools
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert (call.function.name, call.function.arguments) == ("get_weather", "{}")


def test_chat_stream_paces_tokens_and_ends_with_usage(state: DemoState, client: openai.OpenAI) -> None:
    with client.chat.completions.create(
        model="Qwen2.5-32B-Instruct-FP8",
        messages=[{"role": "user", "content": "Stream me"}],
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "This is a simulated reply to: Stream me"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(text.split())
    assert wait_until(lambda: state.streams_completed == 1, interval=0.01)
    assert (state.streams_started, state.streams_cancelled) == (1, 0)


def test_stream_without_include_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    with client.chat.completions.create(
        model="Phi-3.5-mini-instruct", messages=[{"role": "user", "content": "hi"}], stream=True
    ) as stream:
        chunks = list(stream)
    assert all(c.usage is None and c.choices for c in chunks)


def test_disconnected_stream_counts_as_cancelled(state: DemoState, http: httpx.Client) -> None:
    state.token_delay = 0.2
    body = {
        "model": "Qwen2.5-32B-Instruct-FP8",
        "stream": True,
        "messages": [{"role": "user", "content": "x"}],
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        first = next(line for line in response.iter_lines() if line)
        assert first.startswith("data: {")
    assert wait_until(lambda: state.streams_cancelled == 1, interval=0.01)
    assert (state.streams_started, state.streams_completed) == (1, 0)


@pytest.mark.parametrize(
    ("model", "extra", "status", "code"),
    [
        ("no-such-model", {}, 400, "model_not_found"),
        ("bge-m3", {}, 400, "invalid_model_for_endpoint"),
        ("Qwen2.5-32B-Instruct-FP8", {"n": 2}, 400, "invalid_value"),
        ("Llama-3.2-11B-Vision-Instruct", {"stream": True}, 400, "unsupported_value"),
        ("Llama-3.1-8B-Instruct", {"max_tokens": 9000}, 400, "context_length_exceeded"),
        ("Mistral-7B-Instruct-v0.3", {}, 503, "model_unavailable"),
    ],
)
def test_chat_errors_use_the_flexai_envelope(
    http: httpx.Client, model: str, extra: dict[str, Any], status: int, code: str
) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"}
    assert error["code"] == code
    if "n" in extra:
        assert error["message"] == "multiple choices are not supported"


def test_sdk_sees_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "model_not_found"
    assert caught.value.type == "invalid_request_error"


def test_reasoning_model_returns_reasoning_content(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="DeepSeek-R1-Distill-Qwen-32B", messages=[{"role": "user", "content": "Why?"}], max_tokens=4
    )
    message = completion.choices[0].message
    assert (message.model_extra or {})["reasoning_content"] == "The user wrote: Why?. "
    assert message.content is None  # the budget went to reasoning
    assert completion.choices[0].finish_reason == "length"


def test_completions_plain_and_streamed(state: DemoState, client: openai.OpenAI) -> None:
    completion = client.completions.create(model="Llama-3.1-8B-Instruct", prompt="Once upon a time")
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "This is a simulated completion of: Once upon a time"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 4
    with client.completions.create(
        model="Llama-3.1-8B-Instruct", prompt="Once", stream=True, stream_options={"include_usage": True}
    ) as stream:
        chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "This is a simulated completion of: Once"
    assert chunks[-1].usage is not None


# --------------------------------------------------------------------------- embeddings, images, audio


def test_embeddings_base64_default_decodes_to_unit_vectors(state: DemoState, client: openai.OpenAI) -> None:
    result = client.embeddings.create(model="bge-m3", input=["alpha", "beta"])
    assert orjson.loads(state.requests[-1].body)["encoding_format"] == "base64"
    vectors = [item.embedding for item in result.data]
    assert [len(v) for v in vectors] == [8, 8]
    assert vectors[0] != vectors[1]
    assert math.isclose(math.fsum(x * x for x in vectors[0]), 1.0, rel_tol=1e-5)
    as_floats = client.embeddings.create(model="bge-m3", input="alpha", encoding_format="float", dimensions=8)
    assert as_floats.data[0].embedding == vectors[0]
    assert len(client.embeddings.create(model="bge-m3", input=[[1, 2, 3]], dimensions=32).data[0].embedding) == 32
    assert result.usage.prompt_tokens == result.usage.total_tokens >= 2


def test_images_are_b64_pngs(client: openai.OpenAI, http: httpx.Client) -> None:
    result = client.images.generate(model="FLUX.1-schnell", prompt="a red fox", n=2)
    assert result.data is not None
    assert len(result.data) == 2
    for image in result.data:
        assert image.b64_json is not None
        assert base64.b64decode(image.b64_json).startswith(b"\x89PNG\r\n\x1a\n")
    refused = http.post(
        "/v1/images/generations", json={"model": "FLUX.1-schnell", "prompt": "fox", "response_format": "url"}
    )
    assert refused.status_code == 400
    assert "b64_json" in refused.json()["error"]["message"]


def test_speech_returns_wav_audio(client: openai.OpenAI) -> None:
    speech = client.audio.speech.create(
        model="Kokoro-82M", voice="af_bella", input="Hello from the demo", response_format="wav"
    )
    audio = speech.content
    assert audio.startswith(b"RIFF")
    assert speech.response.headers["content-type"] == "audio/wav"
    with wave.open(io.BytesIO(audio)) as parsed:
        assert parsed.getnframes() > 0
    longer = client.audio.speech.create(model="Kokoro-82M", voice="am_adam", input="Hello from the demo" * 4)
    assert len(longer.content) > len(audio)


@pytest.mark.parametrize("response_format", [None, "mp3", "opus", "aac", "flac", "wav", "pcm"])
def test_speech_content_type_says_what_the_bytes_are(http: httpx.Client, response_format: str | None) -> None:
    """A RIFF/WAVE file is labelled audio/wav, raw samples audio/pcm, whatever format was asked for
    (the simulated upstream encodes no mp3, opus, aac or flac, and says so)."""
    body = {"model": "Kokoro-82M", "voice": "af_bella", "input": "Hello from the demo"}
    answer = http.post(
        "/v1/audio/speech", json=body | ({"response_format": response_format} if response_format else {})
    )
    assert answer.status_code == 200, answer.text
    audio = answer.content
    is_wav = audio[:4] == b"RIFF" and audio[8:12] == b"WAVE"
    if response_format == "pcm":
        assert not is_wav
        assert answer.headers["content-type"] == "audio/pcm"
        assert answer.headers["x-demo-audio-format"] == "pcm"
        wav = http.post("/v1/audio/speech", json=body | {"response_format": "wav"}).content
        with wave.open(io.BytesIO(wav)) as parsed:
            assert parsed.readframes(parsed.getnframes()) == audio  # the same samples, without the header
    else:
        assert is_wav
        assert answer.headers["content-type"] == "audio/wav"
        assert answer.headers["x-demo-audio-format"] == "wav"
        with wave.open(io.BytesIO(audio)) as parsed:
            assert (parsed.getnchannels(), parsed.getsampwidth()) == (1, 2)


def test_speech_refuses_an_unknown_format(http: httpx.Client) -> None:
    body = {"model": "Kokoro-82M", "voice": "af_bella", "input": "hi", "response_format": "ogg"}
    answer = http.post("/v1/audio/speech", json=body)
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == "'response_format' must be one of: mp3, opus, aac, flac, wav, pcm"


def test_speech_rejects_an_unknown_voice(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.speech.create(model="Kokoro-82M", voice="alloy", input="hi")
    assert "af_bella, am_adam, bf_emma" in str(caught.value.message)


def test_transcription_proves_the_file_arrived_intact(state: DemoState, client: openai.OpenAI) -> None:
    upload = bytes(range(256)) * 40 + b"\r\n--not-a-boundary\r\n"
    digest = hashlib.sha256(upload).hexdigest()
    raw = client.audio.transcriptions.with_raw_response.create(
        model="whisper-large-v3", file=("clip.wav", upload, "audio/wav")
    )
    assert raw.headers["x-demo-file-sha256"] == digest
    text = raw.parse().text
    assert f"{len(upload)} bytes" in text
    assert digest in text
    assert upload in state.requests[-1].body
    verbose = client.audio.transcriptions.create(
        model="whisper-large-v3", file=("clip.wav", upload), response_format="verbose_json"
    )
    assert verbose.duration > 0
    plain = client.audio.transcriptions.create(model="whisper-large-v3", file=("a.wav", b"abc"), response_format="text")
    assert hashlib.sha256(b"abc").hexdigest() in str(plain)


# --------------------------------------------------------------------------- videos


def test_video_job_lifecycle(state: DemoState, http: httpx.Client) -> None:
    created = http.post("/v1/videos/generations", json={"model": "Wan2.1-T2V-1.3B", "prompt": "waves"}).json()
    assert created["status"] == "queued"
    assert created["id"].startswith("video_")
    assert isinstance(created["created"], int)
    done = http.get(f"/v1/videos/generations/{created['id']}").json()
    assert done["status"] == "completed"
    assert base64.b64decode(done["data"][0]["b64_json"])[4:8] == b"ftyp"


def test_video_job_goes_through_processing(state: DemoState, http: httpx.Client) -> None:
    state.video_seconds = 60.0
    job_id = http.post("/v1/videos/generations", json={"model": "Wan2.1-T2V-1.3B", "prompt": "x"}).json()["id"]
    seen = [http.get(f"/v1/videos/generations/{job_id}").json()["status"]]
    for shift in (30.0, 31.0):
        state.video_jobs[job_id].started_at -= shift  # pretend that time passed
        seen.append(http.get(f"/v1/videos/generations/{job_id}").json()["status"])
    assert seen == ["queued", "processing", "completed"]


def test_unknown_video_job_is_404_job_not_found(http: httpx.Client) -> None:
    response = http.get("/v1/videos/generations/video_missing")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "job_not_found"
