"""The built-in simulated FlexAI upstream: a Starlette app that answers like tokens.flex.ai.

``create_demo_upstream()`` builds the app; everything it knows and counts lives in one
``DemoState`` that tests read and change while the server runs (catalog, token pacing, video
job duration, counters, the last requests received). Replies are deterministic functions of
the request; no network, no model, stdlib-only media (PNG via zlib, WAV via ``wave``).

What it serves (FlexAI's surface, see docs and shared notes):

- ``GET /api/models`` (the catalog), ``GET /api/status``, ``GET /v1/models`` (live models only),
  ``GET /v1/models/{model}``.
- ``POST /v1/chat/completions`` and ``POST /v1/completions``, streamed (SSE, paced by
  ``token_delay``) or not; tool calls; ``reasoning_content`` for reasoning models.
- ``POST /v1/embeddings`` (float or base64), ``POST /v1/images/generations`` (b64_json only),
  ``POST /v1/audio/speech`` (WAV), ``POST /v1/audio/transcriptions`` (multipart),
  ``POST /v1/videos/generations`` + ``GET /v1/videos/generations/{id}`` (asynchronous jobs).

Errors use FlexAI's envelope ``{"error": {"message", "type", "code"}}``: 400 for an unknown
model (``model_not_found``), a model of the wrong category, ``n > 1``, context overflow and
malformed requests; 404 for unknown routes and video jobs (``job_not_found``); 503 for a model
whose ``health_status`` is ``"maintenance"``. Any Authorization header is accepted.

Assumptions where FlexAI publishes nothing: the ``pricing[]`` entries of non-token models
(see ``default_catalog``), the ``/api/status`` details, the completed video job shape
(``data[0].b64_json`` holding a stub MP4 header, plus ``seconds`` and ``progress``), and the
audio payloads (speech is WAV data whatever ``response_format`` says).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import math
import re
import secrets
import struct
import time
import wave
import zlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_RECORDED_REQUESTS = 200
DEFAULT_EMBEDDING_DIMENSIONS = 8
MAX_EMBEDDING_DIMENSIONS = 4096
MAX_IMAGES = 10
IMAGE_SIDE = 8
REPLY_QUOTE_CHARS = 120
SPEECH_SAMPLE_RATE = 8000
SPEECH_SECONDS_PER_CHAR = 0.06
SPEECH_MAX_SECONDS = 10.0
CATALOG_CREATED = 1_735_689_600  # 2025-01-01T00:00:00Z, the "created" of every /v1/models entry

CHAT_CATEGORIES = frozenset({"text", "code", "reasoning", "multimodal", "vision"})
SPEECH_CONTENT_TYPES: MappingProxyType[str, str] = MappingProxyType(
    {
        "mp3": "audio/mpeg",
        "opus": "audio/opus",
        "aac": "audio/aac",
        "flac": "audio/flac",
        "wav": "audio/wav",
        "pcm": "audio/pcm",
    }
)
TRANSCRIPTION_FORMATS = frozenset({"json", "text", "verbose_json", "srt", "vtt"})
# An ISO base media "ftyp" box: enough for `file` to say MP4, not a playable clip.
VIDEO_STUB_BYTES = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"


# --------------------------------------------------------------------------- catalog


def _token_model(
    model_name: str,
    *,
    slug: str,
    display_name: str,
    description: str,
    category: str,
    provider: str,
    context_window: int,
    max_output: int,
    price: tuple[float, float],
    supports: list[str],
    health: str | None = "healthy",
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "slug": slug,
        "model_name": model_name,
        "display_name": display_name,
        "description": description,
        "category": category,
        "context_window": context_window,
        "max_output": max_output,
        "input_per_mtok": price[0],
        "output_per_mtok": price[1],
        "supports": supports,
        "pricing": [],
        "health_status": health,
        "provider": provider,
    }
    if health is None:
        del entry["health_status"]
    return entry


def _unit_model(
    model_name: str,
    *,
    slug: str,
    display_name: str,
    description: str,
    category: str,
    provider: str,
    supports: list[str],
    unit: str,
    price_usd: float,
) -> dict[str, Any]:
    return {
        "slug": slug,
        "model_name": model_name,
        "display_name": display_name,
        "description": description,
        "category": category,
        "context_window": 0,
        "max_output": 0,
        "input_per_mtok": 0.0,
        "output_per_mtok": 0.0,
        "supports": supports,
        "pricing": [{"unit": unit, "price_usd": price_usd}],
        "health_status": "healthy",
        "provider": provider,
    }


def _chat_catalog() -> list[dict[str, Any]]:
    return [
        _token_model(
            "Qwen2.5-32B-Instruct-FP8",
            slug="qwen-qwen2-5-32b-instruct",
            display_name="Qwen 2.5 32B Instruct",
            description="Qwen 2.5 32B — instruction-tuned text model, FP8.",
            category="text",
            provider="Qwen",
            context_window=32768,
            max_output=8192,
            price=(0.80, 0.80),
            supports=["chat", "tool_use", "streaming"],
        ),
        _token_model(
            "Llama-3.1-8B-Instruct",
            slug="meta-llama-llama-3-1-8b-instruct",
            display_name="Llama 3.1 8B Instruct",
            description="Meta Llama 3.1 8B — small, fast instruction-tuned text model.",
            category="text",
            provider="Meta",
            context_window=8192,
            max_output=2048,
            price=(0.10, 0.10),
            supports=["chat", "streaming"],
        ),
        _token_model(
            "DeepSeek-R1-Distill-Qwen-32B",
            slug="deepseek-ai-deepseek-r1-distill-qwen-32b",
            display_name="DeepSeek R1 Distill Qwen 32B",
            description="DeepSeek R1 distilled into Qwen 32B — step-by-step reasoning.",
            category="reasoning",
            provider="DeepSeek",
            context_window=32768,
            max_output=16384,
            price=(0.90, 0.90),
            supports=["chat", "streaming", "reasoning"],
            health="degraded",
        ),
        _token_model(
            "Qwen2.5-VL-7B-Instruct",
            slug="qwen-qwen2-5-vl-7b-instruct",
            display_name="Qwen 2.5 VL 7B Instruct",
            description="Qwen 2.5 VL 7B — text and image input, tool calling.",
            category="multimodal",
            provider="Qwen",
            context_window=32768,
            max_output=8192,
            price=(0.30, 0.30),
            supports=["chat", "vision", "streaming", "tool_use"],
        ),
        _token_model(
            "Llama-3.2-11B-Vision-Instruct",
            slug="meta-llama-llama-3-2-11b-vision-instruct",
            display_name="Llama 3.2 11B Vision Instruct",
            description="Meta Llama 3.2 11B Vision — image understanding, no streaming.",
            category="vision",
            provider="Meta",
            context_window=131072,
            max_output=4096,
            price=(0.35, 0.35),
            supports=["chat", "vision"],
        ),
        _token_model(
            "Qwen2.5-Coder-32B-Instruct",
            slug="qwen-qwen2-5-coder-32b-instruct",
            display_name="Qwen 2.5 Coder 32B Instruct",
            description="Qwen 2.5 Coder 32B — code generation and repair.",
            category="code",
            provider="Qwen",
            context_window=32768,
            max_output=8192,
            price=(0.80, 0.80),
            supports=["chat", "streaming"],
            health="unhealthy",
        ),
        _token_model(
            "Mistral-7B-Instruct-v0.3",
            slug="mistralai-mistral-7b-instruct-v0-3",
            display_name="Mistral 7B Instruct v0.3",
            description="Mistral 7B Instruct v0.3 — compact general-purpose text model.",
            category="text",
            provider="Mistral AI",
            context_window=32768,
            max_output=4096,
            price=(0.15, 0.15),
            supports=["chat", "streaming"],
            health="maintenance",
        ),
        _token_model(
            "Phi-3.5-mini-instruct",
            slug="microsoft-phi-3-5-mini-instruct",
            display_name="Phi 3.5 Mini Instruct",
            description="Microsoft Phi 3.5 mini — 3.8B text model with a long context.",
            category="text",
            provider="Microsoft",
            context_window=131072,
            max_output=4096,
            price=(0.10, 0.10),
            supports=["chat", "streaming"],
            health=None,
        ),
    ]


def _media_catalog() -> list[dict[str, Any]]:
    tts = _unit_model(
        "Kokoro-82M",
        slug="hexgrad-kokoro-82m",
        display_name="Kokoro 82M",
        description="Kokoro 82M — lightweight multi-voice text-to-speech.",
        category="audio",
        provider="hexgrad",
        supports=["tts"],
        unit="character",
        price_usd=0.000015,
    )
    tts["voices"] = ["af_bella", "am_adam", "bf_emma"]
    embedding = _token_model(
        "bge-m3",
        slug="baai-bge-m3",
        display_name="BGE M3",
        description="BAAI BGE M3 — multilingual dense embeddings.",
        category="embedding",
        provider="BAAI",
        context_window=8192,
        max_output=0,
        price=(0.02, 0.0),
        supports=["embeddings"],
    )
    return [
        embedding,
        _unit_model(
            "FLUX.1-schnell",
            slug="black-forest-labs-flux-1-schnell",
            display_name="FLUX.1 [schnell]",
            description="FLUX.1 schnell — fast text-to-image generation.",
            category="image",
            provider="Black Forest Labs",
            supports=["image_generation"],
            unit="image",
            price_usd=0.003,
        ),
        tts,
        _unit_model(
            "whisper-large-v3",
            slug="openai-whisper-large-v3",
            display_name="Whisper Large v3",
            description="Whisper large-v3 — multilingual speech-to-text.",
            category="audio",
            provider="OpenAI",
            supports=["audio_transcription"],
            unit="minute",
            price_usd=0.006,
        ),
        _unit_model(
            "Wan2.1-T2V-1.3B",
            slug="wan-ai-wan2-1-t2v-1-3b",
            display_name="Wan 2.1 T2V 1.3B",
            description="Wan 2.1 text-to-video, 1.3B parameters — short 480p clips.",
            category="video",
            provider="Wan-AI",
            supports=["video_generation"],
            unit="second",
            price_usd=0.05,
        ),
    ]


def default_catalog() -> list[dict[str, Any]]:
    """A fresh copy of the simulated ``GET /api/models`` array, one model per case worth testing.

    Token models (chat and embedding) carry ``input_per_mtok``/``output_per_mtok`` and
    ``pricing: []``. Non-token models carry zero per-token prices and ``pricing`` entries of
    the shape ``{"unit": "image" | "second" | "character" | "minute", "price_usd": float}``
    (per image, per second of video output, per TTS character, per minute of STT audio):
    that shape is our assumption, FlexAI does not document it. ``context_window`` and
    ``max_output`` are 0 for non-token models. The TTS model lists its ``voices``.
    """
    return _chat_catalog() + _media_catalog()


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the demo upstream received it (header names lowercased)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class VideoJob:
    """An asynchronous video generation job."""

    id: str
    model: str
    prompt: str
    seconds: int
    created: int
    started_at: float  # time.monotonic() at submission
    duration: float  # seconds from queued to completed (DemoState.video_seconds at submission)


def _recorded_requests() -> deque[RecordedRequest]:
    return deque(maxlen=MAX_RECORDED_REQUESTS)


@dataclass
class DemoState:
    """Everything the demo upstream serves and counts; tests read and change it at run time."""

    catalog: list[dict[str, Any]] = field(default_factory=default_catalog)
    token_delay: float = 0.02  # seconds between streamed tokens
    video_seconds: float = 3.0  # queued -> processing -> completed
    catalog_fetches: int = 0
    streams_started: int = 0
    streams_completed: int = 0
    streams_cancelled: int = 0  # the client went away before [DONE]
    requests: deque[RecordedRequest] = field(default_factory=_recorded_requests)
    video_jobs: dict[str, VideoJob] = field(default_factory=dict)

    def find_model(self, model_name: str) -> dict[str, Any] | None:
        """The catalog entry whose ``model_name`` is ``model_name``."""
        return next((m for m in self.catalog if m.get("model_name") == model_name), None)


# --------------------------------------------------------------------------- errors and helpers


class UpstreamError(Exception):
    """An error answered in FlexAI's envelope."""

    def __init__(
        self, status: int, message: str, *, code: str | None = None, type_: str = "invalid_request_error"
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type_


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, headers=headers, media_type="application/json")


def _error_response(
    status: int, message: str, type_: str, code: str | None, headers: Mapping[str, str] | None = None
) -> Response:
    return _json({"error": {"message": message, "type": type_, "code": code}}, status, headers)


async def _on_upstream_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, UpstreamError)
    return _error_response(exc.status, exc.message, exc.type, exc.code)


async def _on_http_exception(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = "not_found" if exc.status_code == 404 else None
    return _error_response(exc.status_code, exc.detail, "invalid_request_error", code, exc.headers)


async def _on_crash(_request: Request, exc: Exception) -> Response:
    return _error_response(500, f"simulated upstream failure: {type(exc).__name__}", "server_error", None)


def _bad_request(message: str, code: str | None = None) -> UpstreamError:
    return UpstreamError(400, message, code=code)


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _bad_request(f"request body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(body, dict):
        raise _bad_request("request body must be a JSON object", "invalid_json")
    return body


def _int_field(body: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad_request(f"'{name}' must be an integer between {low} and {high}", "invalid_value")
    return value


def _text_field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise _bad_request(
            f"'{name}' is required and must be a non-empty string", "missing_required_parameter"
        )
    return value


def _estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def _split_tokens(text: str) -> list[str]:
    return re.findall(r"\S+\s*", text) or [text]


def _quote(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= REPLY_QUOTE_CHARS else text[: REPLY_QUOTE_CHARS - 3] + "..."


def _new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def _now() -> int:
    return int(time.time())


# --------------------------------------------------------------------------- model resolution


def _is_chat(model: dict[str, Any]) -> bool:
    return model.get("category") in CHAT_CATEGORIES


def _is_embedding(model: dict[str, Any]) -> bool:
    return model.get("category") == "embedding"


def _is_image(model: dict[str, Any]) -> bool:
    return model.get("category") == "image"


def _is_stt(model: dict[str, Any]) -> bool:
    return model.get("category") == "audio" and "audio_transcription" in model.get("supports", [])


def _is_tts(model: dict[str, Any]) -> bool:
    return model.get("category") == "audio" and not _is_stt(model)


def _is_video(model: dict[str, Any]) -> bool:
    return model.get("category") == "video"


def _resolve_model(
    state: DemoState, name: object, endpoint: str, accepts: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The catalog entry for ``name`` if ``endpoint`` serves it, else the FlexAI error."""
    if not isinstance(name, str) or not name:
        raise _bad_request("'model' is required", "missing_required_parameter")
    model = state.find_model(name)
    if model is None:
        raise _bad_request(f"The model '{name}' does not exist", "model_not_found")
    if not accepts(model):
        raise _bad_request(
            f"The model '{name}' (category {model.get('category')}) is not served by {endpoint}",
            "invalid_model_for_endpoint",
        )
    if model.get("health_status") == "maintenance":
        raise UpstreamError(
            503,
            f"The model '{name}' is under maintenance",
            code="model_unavailable",
            type_="service_unavailable",
        )
    return model


def _supports(model: dict[str, Any], tag: str) -> bool:
    return tag in model.get("supports", [])


def _check_single_choice(body: dict[str, Any]) -> None:
    n = body.get("n", 1)
    if n is None or n == 1:
        return
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        raise _bad_request("multiple choices are not supported", "invalid_value")
    raise _bad_request("'n' must be a positive integer", "invalid_value")


def _check_stream(body: dict[str, Any], model: dict[str, Any]) -> bool:
    stream = body.get("stream") is True
    if stream and not _supports(model, "streaming"):
        raise _bad_request(
            f"The model '{model['model_name']}' does not support streaming", "unsupported_value"
        )
    return stream


def _max_tokens(body: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        if body.get(name) is not None:
            return _int_field(body, name, 1, 1, 10_000_000)
    return None


def _check_context(model: dict[str, Any], prompt_tokens: int, max_tokens: int | None) -> None:
    window = int(model.get("context_window") or 0)
    needed = prompt_tokens + (max_tokens or 0)
    if window and needed > window:
        raise _bad_request(
            f"This model's maximum context length is {window} tokens; the request needs {needed} "
            f"({prompt_tokens} in the prompt, {max_tokens or 0} for the completion)",
            "context_length_exceeded",
        )


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


# --------------------------------------------------------------------------- streaming


def _sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def _sse(state: DemoState, events: list[dict[str, Any]]) -> AsyncIterator[bytes]:
    """Send ``events`` as SSE, ``token_delay`` apart, then ``[DONE]``; count how the stream ended."""
    state.streams_started += 1
    finished = False
    try:
        for index, event in enumerate(events):
            if index and state.token_delay > 0:
                await asyncio.sleep(state.token_delay)
            yield _sse_event(event)
        yield b"data: [DONE]\n\n"
        finished = True
    finally:
        if finished:
            state.streams_completed += 1
        else:
            state.streams_cancelled += 1


def _sse_response(state: DemoState, events: list[dict[str, Any]]) -> StreamingResponse:
    headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
    return StreamingResponse(_sse(state, events), media_type="text/event-stream", headers=headers)


# --------------------------------------------------------------------------- chat completions


@dataclass
class _Reply:
    """What a simulated model answers, token by token."""

    content: list[str]
    reasoning: list[str]
    tool_call: dict[str, Any] | None
    finish_reason: str
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        tool_tokens = _estimate_tokens(orjson.dumps(self.tool_call).decode()) if self.tool_call else 0
        return len(self.content) + len(self.reasoning) + tool_tokens

    def usage(self, *, chat: bool) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        if chat:
            usage["cache_read_input_tokens"] = 0
            usage["cache_creation_input_tokens"] = 0
            if self.reasoning:
                usage["completion_tokens_details"] = {"reasoning_tokens": len(self.reasoning)}
        return usage


def _message_parts(messages: list[Any]) -> tuple[str, str, int]:
    """(all text, the last user text, number of image parts) of a chat ``messages`` list."""
    texts: list[str] = []
    last_user = ""
    images = 0
    for message in messages:
        if not isinstance(message, dict):
            raise _bad_request("each message must be an object", "invalid_value")
        content = message.get("content")
        parts = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
        text = " ".join(
            str(p.get("text", "")) for p in parts if isinstance(p, dict) and p.get("type") == "text"
        )
        images += sum(1 for p in parts if isinstance(p, dict) and p.get("type") == "image_url")
        texts.append(text)
        if message.get("role") == "user":
            last_user = text
    return "\n".join(texts), last_user, images


def _chosen_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    """The tool call to answer with: the named tool_choice, else the first tool, unless "none"."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not isinstance(tools, list) or not tools or choice == "none":
        return None
    name = None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
    if name is None:
        first = tools[0] if isinstance(tools[0], dict) else {}
        name = (first.get("function") or {}).get("name")
    if not isinstance(name, str) or not name:
        raise _bad_request("each tool needs function.name", "invalid_value")
    return {"id": _new_id("call_"), "type": "function", "function": {"name": name, "arguments": "{}"}}


def _truncate(reply: _Reply, max_tokens: int | None) -> _Reply:
    if max_tokens is None or reply.tool_call or len(reply.reasoning) + len(reply.content) <= max_tokens:
        return reply
    reasoning = reply.reasoning[:max_tokens]
    content = reply.content[: max_tokens - len(reasoning)]
    return _Reply(content, reasoning, None, "length", reply.prompt_tokens)


def _chat_reply(model: dict[str, Any], body: dict[str, Any]) -> _Reply:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad_request("'messages' must be a non-empty array", "invalid_value")
    all_text, last_user, images = _message_parts(messages)
    if images and not _supports(model, "vision"):
        raise _bad_request(
            f"The model '{model['model_name']}' does not accept image input", "unsupported_value"
        )
    tool_call = _chosen_tool(body)
    if body.get("tools") and not _supports(model, "tool_use"):
        raise _bad_request(f"The model '{model['model_name']}' does not support tools", "unsupported_value")
    prompt_tokens = _estimate_tokens(all_text) + 85 * images
    max_tokens = _max_tokens(body)
    _check_context(model, prompt_tokens, max_tokens)
    if tool_call:
        return _Reply([], [], tool_call, "tool_calls", prompt_tokens)
    attached = f" ({images} image(s) attached)" if images else ""
    content = _split_tokens(f"This is a simulated reply to: {_quote(last_user)}{attached}")
    reasoning = []
    if _supports(model, "reasoning"):
        reasoning = _split_tokens(f"The user wrote: {_quote(last_user)}. A short, direct answer fits.")
    return _truncate(_Reply(content, reasoning, None, "stop", prompt_tokens), max_tokens)


def _chat_message(reply: _Reply) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": "".join(reply.content) or None}
    if reply.reasoning:
        message["reasoning_content"] = "".join(reply.reasoning)
    if reply.tool_call:
        message["tool_calls"] = [reply.tool_call]
    return message


def _chat_completion(model_name: str, reply: _Reply) -> dict[str, Any]:
    choice = {
        "index": 0,
        "message": _chat_message(reply),
        "finish_reason": reply.finish_reason,
        "logprobs": None,
    }
    return {
        "id": _new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": _now(),
        "model": model_name,
        "system_fingerprint": None,
        "choices": [choice],
        "usage": reply.usage(chat=True),
    }


def _chat_deltas(reply: _Reply) -> list[dict[str, Any]]:
    deltas: list[dict[str, Any]] = [{"reasoning_content": token} for token in reply.reasoning]
    deltas += [{"content": token} for token in reply.content]
    if reply.tool_call:
        call = reply.tool_call
        start = {
            "index": 0,
            "id": call["id"],
            "type": "function",
            "function": {"name": call["function"]["name"], "arguments": ""},
        }
        deltas.append({"tool_calls": [start]})
        deltas.append(
            {"tool_calls": [{"index": 0, "function": {"arguments": call["function"]["arguments"]}}]}
        )
    deltas[0] = {"role": "assistant", **deltas[0]}
    return deltas


def _chat_chunks(model_name: str, reply: _Reply, include_usage: bool) -> list[dict[str, Any]]:
    base = {
        "id": _new_id("chatcmpl-"),
        "object": "chat.completion.chunk",
        "created": _now(),
        "model": model_name,
        "system_fingerprint": None,
    }

    def chunk(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {**base, "choices": [choice]}

    chunks = [chunk(delta, None) for delta in _chat_deltas(reply)]
    chunks.append(chunk({}, reply.finish_reason))
    if include_usage:
        chunks.append({**base, "choices": [], "usage": reply.usage(chat=True)})
    return chunks


async def _chat_completions(state: DemoState, request: Request) -> Response:
    body = await _json_body(request)
    model = _resolve_model(state, body.get("model"), "/v1/chat/completions", _is_chat)
    _check_single_choice(body)
    stream = _check_stream(body, model)
    reply = _chat_reply(model, body)
    if stream:
        return _sse_response(state, _chat_chunks(model["model_name"], reply, _include_usage(body)))
    return _json(_chat_completion(model["model_name"], reply))


# --------------------------------------------------------------------------- legacy completions


def _prompt_text(prompt: object) -> tuple[str, int]:
    """(text to quote, prompt tokens) of a completions ``prompt``; one prompt only."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt, _estimate_tokens(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return f"<{len(prompt)} token ids>", len(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise _bad_request("multiple choices are not supported", "invalid_value")
    raise _bad_request("'prompt' must be a string, a list of strings or a list of token ids", "invalid_value")


def _completion_reply(model: dict[str, Any], body: dict[str, Any]) -> _Reply:
    text, prompt_tokens = _prompt_text(body.get("prompt"))
    max_tokens = _max_tokens(body)
    _check_context(model, prompt_tokens, max_tokens)
    content = _split_tokens(f"This is a simulated completion of: {_quote(text)}")
    return _truncate(_Reply(content, [], None, "stop", prompt_tokens), max_tokens)


def _completion_chunks(model_name: str, reply: _Reply, include_usage: bool) -> list[dict[str, Any]]:
    base = {"id": _new_id("cmpl-"), "object": "text_completion", "created": _now(), "model": model_name}

    def chunk(text: str, finish_reason: str | None) -> dict[str, Any]:
        return {
            **base,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        }

    chunks = [chunk(token, None) for token in reply.content]
    chunks.append(chunk("", reply.finish_reason))
    if include_usage:
        chunks.append({**base, "choices": [], "usage": reply.usage(chat=False)})
    return chunks


async def _completions(state: DemoState, request: Request) -> Response:
    body = await _json_body(request)
    model = _resolve_model(state, body.get("model"), "/v1/completions", _is_chat)
    _check_single_choice(body)
    stream = _check_stream(body, model)
    reply = _completion_reply(model, body)
    if stream:
        return _sse_response(state, _completion_chunks(model["model_name"], reply, _include_usage(body)))
    choice = {
        "index": 0,
        "text": "".join(reply.content),
        "logprobs": None,
        "finish_reason": reply.finish_reason,
    }
    return _json(
        {
            "id": _new_id("cmpl-"),
            "object": "text_completion",
            "created": _now(),
            "model": model["model_name"],
            "choices": [choice],
            "usage": reply.usage(chat=False),
        }
    )


# --------------------------------------------------------------------------- embeddings


def _embedding_inputs(value: object) -> list[tuple[bytes, int]]:
    """(hash key, token count) per input of an embeddings ``input``."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _bad_request("'input' must be a string or a non-empty array", "invalid_value")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        value = [value]
    inputs: list[tuple[bytes, int]] = []
    for item in value:
        if isinstance(item, str) and item:
            inputs.append((item.encode(), _estimate_tokens(item)))
        elif isinstance(item, list) and item and all(isinstance(t, int) for t in item):
            inputs.append((orjson.dumps(item), len(item)))
        else:
            raise _bad_request("each input must be a non-empty string or array of token ids", "invalid_value")
    return inputs


def _vector(key: bytes, dimensions: int) -> list[float]:
    """A deterministic unit vector for ``key``, already rounded to float32."""
    raw = b""
    counter = 0
    while len(raw) < 4 * dimensions:
        raw += hashlib.sha256(key + counter.to_bytes(4, "little")).digest()
        counter += 1
    values = [int.from_bytes(raw[4 * i : 4 * i + 4], "little") / 2**31 - 1.0 for i in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    packed = struct.pack(f"<{dimensions}f", *(v / norm for v in values))
    return list(struct.unpack(f"<{dimensions}f", packed))


def _encode_vector(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


async def _embeddings(state: DemoState, request: Request) -> Response:
    body = await _json_body(request)
    model = _resolve_model(state, body.get("model"), "/v1/embeddings", _is_embedding)
    dims = _int_field(body, "dimensions", DEFAULT_EMBEDDING_DIMENSIONS, 1, MAX_EMBEDDING_DIMENSIONS)
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ("float", "base64"):
        raise _bad_request("'encoding_format' must be 'float' or 'base64'", "invalid_value")
    inputs = _embedding_inputs(body.get("input"))
    for _key, tokens in inputs:
        _check_context(model, tokens, None)
    data = [
        {"object": "embedding", "index": i, "embedding": _encode_vector(_vector(key, dims), encoding_format)}
        for i, (key, _tokens) in enumerate(inputs)
    ]
    tokens = sum(t for _key, t in inputs)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return _json({"object": "list", "data": data, "model": model["model_name"], "usage": usage})


# --------------------------------------------------------------------------- images


def _png(width: int, height: int, rgb: bytes) -> bytes:
    """A valid truecolour PNG filled with one colour."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = (b"\x00" + rgb * width) * height
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(pixels))
        + chunk(b"IEND", b"")
    )


async def _images(state: DemoState, request: Request) -> Response:
    body = await _json_body(request)
    _resolve_model(state, body.get("model"), "/v1/images/generations", _is_image)
    prompt = _text_field(body, "prompt")
    count = _int_field(body, "n", 1, 1, MAX_IMAGES)
    response_format = body.get("response_format") or "b64_json"
    if response_format != "b64_json":
        raise _bad_request(
            "response_format must be 'b64_json': FlexAI returns images as b64_json only", "unsupported_value"
        )
    data = []
    for index in range(count):
        colour = hashlib.sha256(f"{index}:{prompt}".encode()).digest()[:3]
        data.append({"b64_json": base64.b64encode(_png(IMAGE_SIDE, IMAGE_SIDE, colour)).decode()})
    return _json({"created": _now(), "data": data})


# --------------------------------------------------------------------------- speech


def _wav(seconds: float, frequency: float) -> bytes:
    """A 16-bit mono sine WAV of ``seconds`` at SPEECH_SAMPLE_RATE."""
    frames = max(1, int(seconds * SPEECH_SAMPLE_RATE))
    step = 2 * math.pi * frequency / SPEECH_SAMPLE_RATE
    pcm = struct.pack(f"<{frames}h", *(int(8000 * math.sin(step * i)) for i in range(frames)))
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SPEECH_SAMPLE_RATE)
        out.writeframes(pcm)
    return buffer.getvalue()


def _voice_index(model: dict[str, Any], body: dict[str, Any]) -> int:
    voice = _text_field(body, "voice")
    voices = model.get("voices")
    if not isinstance(voices, list) or not voices:
        return 0
    if voice not in voices:
        raise _bad_request(
            f"Voice '{voice}' is not available for {model['model_name']}; choose one of: {', '.join(voices)}",
            "invalid_voice",
        )
    return voices.index(voice)


async def _speech(state: DemoState, request: Request) -> Response:
    """Text to speech. The audio is WAV data whatever ``response_format`` asks for; only the
    Content-Type follows the requested format."""
    body = await _json_body(request)
    model = _resolve_model(state, body.get("model"), "/v1/audio/speech", _is_tts)
    text = _text_field(body, "input")
    voice = _voice_index(model, body)
    response_format = body.get("response_format") or "mp3"
    content_type = SPEECH_CONTENT_TYPES.get(response_format)
    if content_type is None:
        raise _bad_request(
            f"'response_format' must be one of: {', '.join(SPEECH_CONTENT_TYPES)}", "invalid_value"
        )
    seconds = min(SPEECH_MAX_SECONDS, 0.25 + SPEECH_SECONDS_PER_CHAR * len(text))
    return Response(_wav(seconds, 220.0 + 110.0 * voice), media_type=content_type)


# --------------------------------------------------------------------------- transcriptions


def _audio_seconds(data: bytes) -> float:
    """The duration of WAV data, else an estimate for 16 kHz 16-bit mono."""
    try:
        with wave.open(io.BytesIO(data), "rb") as audio:
            return audio.getnframes() / audio.getframerate()
    except (wave.Error, EOFError):
        return len(data) / 32000


def _timestamp(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    return f"{hours:02d}:{minutes:02d}:{rest // 1000:02d}{separator}{rest % 1000:03d}"


def _transcription_response(
    text: str, seconds: float, response_format: str, headers: dict[str, str]
) -> Response:
    usage = {"type": "duration", "seconds": math.ceil(seconds)}
    if response_format == "text":
        return Response(text, media_type="text/plain", headers=headers)
    if response_format in ("srt", "vtt"):
        sep = "," if response_format == "srt" else "."
        cue = f"{_timestamp(0, sep)} --> {_timestamp(seconds, sep)}\n{text}\n"
        body = f"1\n{cue}" if response_format == "srt" else f"WEBVTT\n\n{cue}"
        return Response(body, media_type="text/plain", headers=headers)
    if response_format == "verbose_json":
        segment = {
            "id": 0,
            "seek": 0,
            "start": 0.0,
            "end": seconds,
            "text": text,
            "tokens": [],
            "temperature": 0.0,
            "avg_logprob": -0.1,
            "compression_ratio": 1.0,
            "no_speech_prob": 0.0,
        }
        verbose = {
            "task": "transcribe",
            "language": "english",
            "duration": seconds,
            "text": text,
            "segments": [segment],
            "usage": usage,
        }
        return _json(verbose, headers=headers)
    return _json({"text": text, "usage": usage}, headers=headers)


async def _transcriptions(state: DemoState, request: Request) -> Response:
    """Speech to text. The text names the byte count and sha256 of the uploaded file, and the
    ``x-demo-file-sha256`` header carries the sha256, so tests can check the upload byte for byte."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise _bad_request("expected a multipart/form-data body", "invalid_value")
    async with request.form(max_part_size=1024 * 1024) as form:
        _resolve_model(state, form.get("model"), "/v1/audio/transcriptions", _is_stt)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise _bad_request("'file' is required", "missing_required_parameter")
        data = await upload.read()
        response_format = form.get("response_format") or "json"
    if response_format not in TRANSCRIPTION_FORMATS:
        raise _bad_request(
            f"'response_format' must be one of: {', '.join(sorted(TRANSCRIPTION_FORMATS))}", "invalid_value"
        )
    digest = hashlib.sha256(data).hexdigest()
    text = f"Simulated transcription of {len(data)} bytes (sha256 {digest})."
    headers = {"x-demo-file-sha256": digest}
    return _transcription_response(text, _audio_seconds(data), str(response_format), headers)


# --------------------------------------------------------------------------- videos


def _video_status(job: VideoJob) -> str:
    elapsed = time.monotonic() - job.started_at
    if elapsed >= job.duration:
        return "completed"
    return "queued" if elapsed < job.duration / 3 else "processing"


def _video_object(job: VideoJob) -> dict[str, Any]:
    status = _video_status(job)
    progress = {"queued": 0, "processing": 50, "completed": 100}[status]
    video: dict[str, Any] = {
        "id": job.id,
        "object": "video.generation",
        "status": status,
        "created": job.created,
        "model": job.model,
        "seconds": job.seconds,
        "progress": progress,
    }
    if status == "completed":
        video["completed_at"] = job.created + math.ceil(job.duration)
        video["data"] = [{"b64_json": base64.b64encode(VIDEO_STUB_BYTES).decode()}]
    return video


async def _create_video(state: DemoState, request: Request) -> Response:
    body = await _json_body(request)
    model = _resolve_model(state, body.get("model"), "/v1/videos/generations", _is_video)
    prompt = _text_field(body, "prompt")
    seconds = _int_field(body, "seconds", _int_field(body, "duration", 2, 1, 60), 1, 60)
    job = VideoJob(
        id=_new_id("video_"),
        model=model["model_name"],
        prompt=prompt,
        seconds=seconds,
        created=_now(),
        started_at=time.monotonic(),
        duration=max(0.0, state.video_seconds),
    )
    state.video_jobs[job.id] = job
    return _json(
        {
            "id": job.id,
            "object": "video.generation",
            "status": "queued",
            "created": job.created,
            "model": job.model,
        }
    )


async def _get_video(state: DemoState, request: Request) -> Response:
    job = state.video_jobs.get(request.path_params["job_id"])
    if job is None:
        raise UpstreamError(404, f"No video job '{request.path_params['job_id']}'", code="job_not_found")
    return _json(_video_object(job))


# --------------------------------------------------------------------------- catalog endpoints


def _is_live(model: dict[str, Any]) -> bool:
    return bool(model.get("health_status", "healthy") == "healthy")


def _openai_model(model: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": model["model_name"],
        "object": "model",
        "created": CATALOG_CREATED,
        "owned_by": model.get("provider", "flexai"),
        "category": model.get("category"),
    }


async def _api_models(state: DemoState, _request: Request) -> Response:
    state.catalog_fetches += 1
    return _json(state.catalog)


async def _v1_models(state: DemoState, _request: Request) -> Response:
    return _json({"object": "list", "data": [_openai_model(m) for m in state.catalog if _is_live(m)]})


async def _v1_model(state: DemoState, request: Request) -> Response:
    name = request.path_params["model"]
    model = state.find_model(name)
    if model is None or not _is_live(model):
        raise UpstreamError(
            404, f"The model '{name}' does not exist or is not serving", code="model_not_found"
        )
    return _json(_openai_model(model))


def _status_entry(model: dict[str, Any], checked_at: str) -> dict[str, Any]:
    health = model.get("health_status")
    error = None if health in ("healthy", None) else f"health check reports {health}"
    return {
        "name": model.get("model_name"),
        "status": health or "unknown",
        "last_checked_at": checked_at,
        "error": error,
    }


async def _api_status(state: DemoState, _request: Request) -> Response:
    """Service status derived from the catalog: ``ok`` when every model with a health status is
    healthy, ``down`` when none is, else ``degraded``; a model without one reports ``unknown``."""
    now = datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    reported = [m.get("health_status") for m in state.catalog if m.get("health_status") is not None]
    healthy = sum(1 for h in reported if h == "healthy")
    overall = "ok" if healthy == len(reported) else ("down" if healthy == 0 else "degraded")
    body = {
        "status": overall,
        "components": [
            {"name": "api", "status": "ok"},
            {"name": "catalog", "status": "ok"},
            {"name": "inference", "status": overall},
        ],
        "models": [_status_entry(m, now) for m in state.catalog],
        "incidents": [],
        "generated_at": now,
        "health_data_age_seconds": 0,
    }
    return _json(body, headers={"cache-control": "public, max-age=10, stale-while-revalidate=60"})


# --------------------------------------------------------------------------- app


class _RecordingMiddleware:
    """Reads each HTTP request body in full, records the request in ``DemoState.requests``,
    then replays the body to the app."""

    def __init__(self, app: ASGIApp, state: DemoState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        pending: list[Message] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                pending.append(message)
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        self.state.requests.append(_record(scope, body))
        pending.insert(0, {"type": "http.request", "body": body, "more_body": False})

        async def replay() -> Message:
            return pending.pop(0) if pending else await receive()

        await self.app(scope, replay, send)


def _record(scope: Scope, body: bytes) -> RecordedRequest:
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return RecordedRequest(
        method=scope["method"],
        path=scope["path"],
        query=scope["query_string"].decode("latin-1"),
        headers=headers,
        body=body,
    )


def _bind(
    handler: Callable[[DemoState, Request], Awaitable[Response]], state: DemoState
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return await handler(state, request)

    endpoint.__name__ = handler.__name__.lstrip("_")
    return endpoint


def _routes(state: DemoState) -> list[Route]:
    table: list[tuple[str, str, Callable[[DemoState, Request], Awaitable[Response]]]] = [
        ("GET", "/api/models", _api_models),
        ("GET", "/api/status", _api_status),
        ("GET", "/v1/models", _v1_models),
        ("GET", "/v1/models/{model:path}", _v1_model),
        ("POST", "/v1/chat/completions", _chat_completions),
        ("POST", "/v1/completions", _completions),
        ("POST", "/v1/embeddings", _embeddings),
        ("POST", "/v1/images/generations", _images),
        ("POST", "/v1/audio/speech", _speech),
        ("POST", "/v1/audio/transcriptions", _transcriptions),
        ("POST", "/v1/videos/generations", _create_video),
        ("GET", "/v1/videos/generations/{job_id}", _get_video),
    ]
    return [Route(path, _bind(handler, state), methods=[method]) for method, path, handler in table]


def create_demo_upstream(state: DemoState | None = None) -> Starlette:
    """The simulated FlexAI upstream app, serving (and counting into) ``state``."""
    state = DemoState() if state is None else state
    app = Starlette(
        routes=_routes(state),
        middleware=[Middleware(_RecordingMiddleware, state=state)],
        exception_handlers={
            UpstreamError: _on_upstream_error,
            HTTPException: _on_http_exception,
            Exception: _on_crash,
        },
    )
    app.state.demo = state
    return app
