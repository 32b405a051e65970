"""What a request asks for, read from its parsed body: pure functions, no I/O.

How many images or video seconds it asks for (as validation accepts them: pricing and validation
share these readers), and its token bounds, what it certainly needs before any model sees it: a
lower bound of its prompt's tokens (for the context-window check, rate-limit reservations and the
least a request can cost), the number of separate prompts it holds, and the completion tokens it
asks for at most. This is the one reader of
``max_completion_tokens`` / ``max_tokens``: validation, rate limits and pricing all ask here.

The prompt bound: every mainstream tokenizer (tiktoken-style regex pre-tokenization, as in Llama 3,
Qwen 2, DeepSeek and Mistral's tekken; SentencePiece with whitespace splitting, as in Llama 2 and
Mistral v1) emits at least one token per whitespace-separated word, so the number of words in the
prompt's text (plus the exact length of token-id arrays) is a lower bound.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from gateway import endpoints
from gateway.jsonvalues import as_int, as_list

# The fields that cap a completion's tokens, in precedence order: max_completion_tokens (OpenAI's
# newer name) supersedes max_tokens.
COMPLETION_CAP_FIELDS: Final = ("max_completion_tokens", "max_tokens")


def completion_cap(fields: Mapping[str, Any], name: str) -> int | None:
    """``fields[name]`` (one of ``COMPLETION_CAP_FIELDS``) when it is a positive integer, else None
    (absent, null, or of a wrong type or value)."""
    value = fields.get(name)
    # A JSON integer (``type() is int``: never a bool, whose type is bool), asked for on every request.
    return value if type(value) is int and value > 0 else None


def requested_completion_tokens(fields: Mapping[str, Any]) -> int:
    """``max_completion_tokens`` (it supersedes ``max_tokens``), else ``max_tokens``, when a positive
    integer; else 0."""
    for name in COMPLETION_CAP_FIELDS:  # (completion_cap's test, inline: this runs several times a request)
        value = fields.get(name)
        if type(value) is int and value > 0:
            return value
    return 0


def prompt_tokens_lower_bound(path: str, fields: Mapping[str, Any]) -> int:
    """The certain minimum of prompt tokens (for rate-limit reservations), 0 when not a text endpoint."""
    if path == endpoints.CHAT:
        messages = as_list(fields.get("messages"))
        if messages is not None:
            return words_in_messages([m for m in messages if isinstance(m, dict)])
    elif path == endpoints.COMPLETIONS:
        return prompt_tokens(fields.get("prompt")) or 0
    elif path == endpoints.EMBEDDINGS:
        return sum(embedding_input_tokens(fields.get("input")) or ())
    return 0


def prompt_count(path: str, fields: Mapping[str, Any]) -> int:
    """How many separate prompts a text request holds: the items of a completions ``prompt`` list of
    strings or of token-id lists, or of an embeddings ``input`` list; else 1 (a chat is one)."""
    if path == endpoints.COMPLETIONS:
        prompt = as_list(fields.get("prompt"))
        if prompt and prompt_tokens(prompt) is not None and not all(as_int(t) is not None for t in prompt):
            return len(prompt)
    elif path == endpoints.EMBEDDINGS:
        inputs = embedding_input_tokens(fields.get("input"))
        if inputs is not None:
            return len(inputs)
    return 1


def words_in_messages(messages: list[Any]) -> int:
    """The words of the text of chat ``messages`` (objects): a lower bound of their tokens."""
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            total += _words(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += _words(part["text"])
    return total


def chars_in_messages(messages: list[Any]) -> int:
    """The characters of the text of chat ``messages`` (objects), plus one per text: n characters
    hold at most (n + 1) / 2 words, a cheap upper bound of ``words_in_messages``."""
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content) + 1
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += len(part["text"]) + 1
    return total


def prompt_tokens(prompt: Any) -> int | None:
    """A lower bound of a completions ``prompt``'s tokens, or None when the prompt has the wrong shape."""
    if isinstance(prompt, str):
        return _words(prompt)
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return max(_words(p) for p in prompt)  # each string is its own prompt
        if all(as_int(t) is not None for t in prompt):
            return len(prompt)
        if all(isinstance(p, list) and p and all(as_int(t) is not None for t in p) for p in prompt):
            return max(len(p) for p in prompt)
    return None


def embedding_input_tokens(value: Any) -> list[int] | None:
    """A lower bound of tokens per embeddings input, or None when ``input`` has the wrong shape."""
    if isinstance(value, str):
        return [_words(value)] if value else None
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(v, str) and v for v in value):
        return [_words(v) for v in value]
    if all(as_int(t) is not None for t in value):
        return [len(value)]
    if all(isinstance(v, list) and v and all(as_int(t) is not None for t in v) for v in value):
        return [len(v) for v in value]
    return None


def _words(text: str) -> int:
    return len(text.split())


MAX_IMAGES = 10
# Video clip length in whole seconds (``seconds``, else ``duration``): what the upstream accepts.
# Without either field the clip is 2 s (FlexAI's documented example, and the simulated upstream's).
MAX_VIDEO_SECONDS: Final = 60
VIDEO_DEFAULT_SECONDS: Final = 2


def image_count(fields: Mapping[str, Any]) -> int | None:
    """How many images an images request asks for: ``n`` (1 when absent or null), None when invalid."""
    n = fields.get("n")
    if n is None:
        return 1
    count = as_int(n)
    return count if count is not None and 1 <= count <= MAX_IMAGES else None


def video_seconds(fields: Mapping[str, Any]) -> int | None:
    """The clip length a video request asks for: ``seconds``, else ``duration``, else the default
    (2 s); None when the field it gives is invalid (not a whole number of seconds from 1 to 60)."""
    for name in ("seconds", "duration"):
        value = fields.get(name)
        if value is not None:
            return clip_seconds(value)
    return VIDEO_DEFAULT_SECONDS


def clip_seconds(value: object) -> int | None:
    """A video length field as whole seconds within the accepted range, else None."""
    if isinstance(value, str):  # OpenAI's video API spells seconds as a string ("4")
        seconds = int(value) if value.isascii() and value.isdigit() and len(value) <= 3 else None
    else:
        seconds = as_int(value)
    return seconds if seconds is not None and 1 <= seconds <= MAX_VIDEO_SECONDS else None
