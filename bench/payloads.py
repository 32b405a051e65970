"""Canned upstream payloads shared by the nginx stand-in and the paced SSE stand-in (stdlib only).

Everything here is shaped like FlexAI's / OpenAI's real answers, so that every proxy in the
benchmark (the gateway, LiteLLM) parses them as it would parse the real thing.
"""

from __future__ import annotations

import json
import random

CHAT_MODEL = "bench-chat"
EMBED_MODEL = "bench-embed"
# Sent by every client as ``Authorization: Bearer``. The gateway passes it through to the stand-in
# (which ignores it); LiteLLM, which refuses to start without a master key, is given it as its key.
API_KEY = "sk-bench-5f0c1e9a7b3d4c2e8a6f1b0d9c7e5a3f2b4d6e8f0a1c3e5b"
CREATED = 1_700_000_000
EMBED_DIMS = 1024
SSE_CANNED_EVENTS = 20  # content chunks in the canned (unpaced) SSE body served by nginx
SSE_LONG_EVENTS = 100  # content chunks in the long canned SSE body (the response-cache stream rows)

_WORDS = [
    "The",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "while",
    "the",
    "gateway",
    "relays",
    "every",
    "token",
]


def _entry(name: str, category: str, supports: list[str], health: str = "healthy") -> dict[str, object]:
    return {
        "slug": name.lower(),
        "model_name": name,
        "display_name": name,
        "description": f"{name}: benchmark stand-in entry.",
        "category": category,
        "context_window": 32768 if category != "embedding" else 8192,
        "max_output": 4096 if category != "embedding" else 0,
        "input_per_mtok": 0.5,
        "output_per_mtok": 1.5,
        "supports": supports,
        "pricing": [],
        "health_status": health,
        "provider": "bench",
    }


def catalog() -> list[dict[str, object]]:
    """A catalog of realistic size (about 30 entries) that includes the two models used."""
    entries = [
        _entry(CHAT_MODEL, "text", ["streaming", "tool_use", "json_mode"]),
        _entry(EMBED_MODEL, "embedding", []),
    ]
    categories = ["text", "code", "reasoning", "multimodal", "vision", "embedding", "image", "audio"]
    for i in range(28):
        category = categories[i % len(categories)]
        health = "degraded" if i % 9 == 4 else "healthy"
        entries.append(_entry(f"filler-{category}-{i:02d}", category, ["streaming"], health))
    return entries


def catalog_bytes() -> bytes:
    return json.dumps(catalog(), separators=(",", ":")).encode()


def chat_request(stream: bool, deterministic: bool = False) -> bytes:
    """The chat request every scenario sends; ``deterministic`` adds ``"temperature": 0``, which makes
    it cacheable by the gateway's response cache (docs/cache.md: chat is cached when deterministic)."""
    body: dict[str, object] = {
        "model": CHAT_MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say hello in one short sentence."},
        ],
        "max_tokens": 64,
    }
    if deterministic:
        body["temperature"] = 0
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def embeddings_request() -> bytes:
    body = {"model": EMBED_MODEL, "input": "The quick brown fox jumps over the lazy dog."}
    return json.dumps(body, separators=(",", ":")).encode()


def chat_response() -> bytes:
    body = {
        "id": "chatcmpl-bench0001",
        "object": "chat.completion",
        "created": CREATED,
        "model": CHAT_MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 24, "completion_tokens": 9, "total_tokens": 33},
        "system_fingerprint": "fp_bench",
    }
    return json.dumps(body, separators=(",", ":")).encode()


def embeddings_response() -> bytes:
    rng = random.Random(42)
    vector = [round(rng.uniform(-0.1, 0.1), 6) for _ in range(EMBED_DIMS)]
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": vector}],
        "model": EMBED_MODEL,
        "usage": {"prompt_tokens": 11, "total_tokens": 11},
    }
    return json.dumps(body, separators=(",", ":")).encode()


def sse_event(index: int, total: int) -> bytes:
    """Content event ``index`` (0-based) of ``total``: the first carries the role, the last stops."""
    delta: dict[str, object] = {"content": " " + _WORDS[index % len(_WORDS)]}
    if index == 0:
        delta = {"role": "assistant", "content": ""}
    chunk: dict[str, object] = {
        "id": "chatcmpl-bench0001",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": CHAT_MODEL,
        "system_fingerprint": "fp_bench",
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": "stop" if index == total - 1 else None,
            }
        ],
    }
    if index == total - 1:
        chunk["usage"] = {"prompt_tokens": 24, "completion_tokens": total, "total_tokens": 24 + total}
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def sse_body(events: int = SSE_CANNED_EVENTS) -> bytes:
    """A complete SSE body: ``events`` chunks then ``[DONE]``."""
    return b"".join(sse_event(i, events) for i in range(events)) + SSE_DONE
