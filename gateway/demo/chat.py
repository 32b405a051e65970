"""``POST /v1/chat/completions`` and ``POST /v1/completions``, streamed or not; tool calls and
``reasoning_content`` for reasoning models."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gateway.demo.common import (
    bad_request,
    check_context,
    estimate_tokens,
    json_body,
    json_response,
    new_id,
    resolve_model,
    supports,
    unix_time,
)
from gateway.demo.reply import (
    Reply,
    check_single_choice,
    check_stream,
    quote,
    requested_max_tokens,
    split_tokens,
    truncate,
    wants_usage,
)
from gateway.demo.sse import sse_response
from gateway.demo.state import DemoState

CHAT_CATEGORIES = frozenset({"text", "code", "reasoning", "multimodal", "vision"})


def _is_chat(model: dict[str, Any]) -> bool:
    return model.get("category") in CHAT_CATEGORIES


def _message_parts(messages: list[Any]) -> tuple[str, str, int]:
    """(all text, the last user text, number of image parts) of a chat ``messages`` list."""
    texts: list[str] = []
    last_user = ""
    images = 0
    for message in messages:
        if not isinstance(message, dict):
            raise bad_request("each message must be an object", "invalid_value")
        content = message.get("content")
        parts = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
        text = " ".join(str(p.get("text", "")) for p in parts if isinstance(p, dict) and p.get("type") == "text")
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
        raise bad_request("each tool needs function.name", "invalid_value")
    return {"id": new_id("call_"), "type": "function", "function": {"name": name, "arguments": "{}"}}


def _chat_reply(model: dict[str, Any], body: dict[str, Any]) -> Reply:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array", "invalid_value")
    all_text, last_user, images = _message_parts(messages)
    if images and not supports(model, "vision"):
        raise bad_request(f"The model '{model['model_name']}' does not accept image input", "unsupported_value")
    tool_call = _chosen_tool(body)
    if body.get("tools") and not supports(model, "tool_use"):
        raise bad_request(f"The model '{model['model_name']}' does not support tools", "unsupported_value")
    prompt_tokens = estimate_tokens(all_text) + 85 * images
    max_tokens = requested_max_tokens(body)
    check_context(model, prompt_tokens, max_tokens)
    if tool_call:
        return Reply([], [], tool_call, "tool_calls", prompt_tokens)
    attached = f" ({images} image(s) attached)" if images else ""
    content = split_tokens(f"This is a simulated reply to: {quote(last_user)}{attached}")
    reasoning = []
    if supports(model, "reasoning"):
        reasoning = split_tokens(f"The user wrote: {quote(last_user)}. A short, direct answer fits.")
    return truncate(Reply(content, reasoning, None, "stop", prompt_tokens), max_tokens)


def _chat_message(reply: Reply) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": "".join(reply.content) or None}
    if reply.reasoning:
        message["reasoning_content"] = "".join(reply.reasoning)
    if reply.tool_call:
        message["tool_calls"] = [reply.tool_call]
    return message


def _chat_completion(model_name: str, reply: Reply) -> dict[str, Any]:
    choice = {
        "index": 0,
        "message": _chat_message(reply),
        "finish_reason": reply.finish_reason,
        "logprobs": None,
    }
    return {
        "id": new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": unix_time(),
        "model": model_name,
        "system_fingerprint": None,
        "choices": [choice],
        "usage": reply.usage(chat=True),
    }


def _chat_deltas(reply: Reply) -> list[dict[str, Any]]:
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
        deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": call["function"]["arguments"]}}]})
    deltas[0] = {"role": "assistant", **deltas[0]}
    return deltas


def _chat_chunks(model_name: str, reply: Reply, include_usage: bool) -> list[dict[str, Any]]:
    base = {
        "id": new_id("chatcmpl-"),
        "object": "chat.completion.chunk",
        "created": unix_time(),
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


async def chat_completions(state: DemoState, request: Request) -> Response:
    body = await json_body(request)
    model = resolve_model(state, body.get("model"), "/v1/chat/completions", _is_chat)
    check_single_choice(body)
    stream = check_stream(body, model)
    reply = _chat_reply(model, body)
    if stream:
        return sse_response(state, _chat_chunks(model["model_name"], reply, wants_usage(body)))
    return json_response(_chat_completion(model["model_name"], reply))


def _prompt_text(prompt: object) -> tuple[str, int]:
    """(text to quote, prompt tokens) of a completions ``prompt``; one prompt only."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt, estimate_tokens(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return f"<{len(prompt)} token ids>", len(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise bad_request("multiple choices are not supported", "invalid_value")
    raise bad_request("'prompt' must be a string, a list of strings or a list of token ids", "invalid_value")


def _completion_reply(model: dict[str, Any], body: dict[str, Any]) -> Reply:
    text, prompt_tokens = _prompt_text(body.get("prompt"))
    max_tokens = requested_max_tokens(body)
    check_context(model, prompt_tokens, max_tokens)
    content = split_tokens(f"This is a simulated completion of: {quote(text)}")
    return truncate(Reply(content, [], None, "stop", prompt_tokens), max_tokens)


def _completion_chunks(model_name: str, reply: Reply, include_usage: bool) -> list[dict[str, Any]]:
    base = {"id": new_id("cmpl-"), "object": "text_completion", "created": unix_time(), "model": model_name}

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


async def completions(state: DemoState, request: Request) -> Response:
    body = await json_body(request)
    model = resolve_model(state, body.get("model"), "/v1/completions", _is_chat)
    check_single_choice(body)
    stream = check_stream(body, model)
    reply = _completion_reply(model, body)
    if stream:
        return sse_response(state, _completion_chunks(model["model_name"], reply, wants_usage(body)))
    choice = {
        "index": 0,
        "text": "".join(reply.content),
        "logprobs": None,
        "finish_reason": reply.finish_reason,
    }
    return json_response(
        {
            "id": new_id("cmpl-"),
            "object": "text_completion",
            "created": unix_time(),
            "model": model["model_name"],
            "choices": [choice],
            "usage": reply.usage(chat=False),
        }
    )
