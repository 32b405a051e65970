"""The simulated text reply shared by chat and legacy completions, and the request checks
both endpoints apply (``n``, ``stream``, ``max_tokens``, ``stream_options``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.demo.common import bad_request, estimate_tokens, int_field, supports

REPLY_QUOTE_CHARS = 120


@dataclass
class Reply:
    """What a simulated model answers, token by token."""

    content: list[str]
    reasoning: list[str]
    tool_call: dict[str, Any] | None
    finish_reason: str
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        tool_tokens = estimate_tokens(orjson.dumps(self.tool_call).decode()) if self.tool_call else 0
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


def split_tokens(text: str) -> list[str]:
    return re.findall(r"\S+\s*", text) or [text]


def quote(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= REPLY_QUOTE_CHARS else text[: REPLY_QUOTE_CHARS - 3] + "..."


def truncate(reply: Reply, max_tokens: int | None) -> Reply:
    if max_tokens is None or reply.tool_call or len(reply.reasoning) + len(reply.content) <= max_tokens:
        return reply
    reasoning = reply.reasoning[:max_tokens]
    content = reply.content[: max_tokens - len(reasoning)]
    return Reply(content, reasoning, None, "length", reply.prompt_tokens)


def check_single_choice(body: dict[str, Any]) -> None:
    n = body.get("n", 1)
    if n is None or n == 1:
        return
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        raise bad_request("multiple choices are not supported", "invalid_value")
    raise bad_request("'n' must be a positive integer", "invalid_value")


def check_stream(body: dict[str, Any], model: dict[str, Any]) -> bool:
    stream = body.get("stream") is True
    if stream and not supports(model, "streaming"):
        raise bad_request(f"The model '{model['model_name']}' does not support streaming", "unsupported_value")
    return stream


def requested_max_tokens(body: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        if body.get(name) is not None:
            return int_field(body, name, 1, 1, 10_000_000)
    return None


def wants_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True
