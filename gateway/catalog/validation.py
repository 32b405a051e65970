"""Request validation against the model's catalog entry: pure functions, no I/O.

Each check looks at the parsed body (already decoded once by ``body``) and the catalog entry of
the requested model, and reports a ``Violation`` when the request certainly cannot work:

| check          | refuses                                                                     |
|----------------|-----------------------------------------------------------------------------|
| shape          | a body that does not have the endpoint's required fields, types and ranges  |
| tools          | tools / tool_choice / functions on a model without the ``tool_use`` tag       |
| vision         | image parts in chat messages on a model that cannot see                     |
| streaming      | ``stream: true`` on a model without the ``streaming`` tag                     |
| max_output     | max_tokens / max_completion_tokens above the model's ``max_output``          |
| context_window | a prompt whose token count is certainly above the model's ``context_window`` |

The context-window check adds the requested completion tokens to a lower bound of the prompt's
tokens (``gateway.catalog.bounds``: at least one token per word). Only a request whose lower bound
already exceeds the window is refused: one that might fit is always forwarded.

This module's job: which checks each endpoint runs, in what order, and the endpoint-specific ones
(completions' prompt, embeddings' inputs, image and video prompts, speech); the checks several
endpoints share, and ``Violation``, are ``gateway.catalog.checks``'s. ``alternatives`` names models
that would accept a refused request.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from gateway import endpoints
from gateway.catalog import admission
from gateway.catalog.bounds import (
    COMPLETION_CAP_FIELDS,
    MAX_IMAGES,
    MAX_VIDEO_SECONDS,
    chars_in_messages,
    clip_seconds,
    embedding_input_tokens,
    image_count,
    prompt_tokens,
    words_in_messages,
)
from gateway.catalog.checks import (
    VISION_CATEGORIES,
    Violation,
    check_common_shape,
    check_context,
    check_max_output,
    check_messages_shape,
    check_streaming,
    check_tools,
    check_vision,
    in_range,
    invalid,
    missing,
    nonempty_str,
)
from gateway.catalog.entries import ModelEntry
from gateway.jsonvalues import as_list, describe

__all__ = ["CHECKS", "alternatives", "validate"]

CHECKS = ("shape", "tools", "vision", "streaming", "max_output", "context_window")

SPEECH_SPEED = (0.25, 4.0)


def validate(path: str, fields: Mapping[str, Any], files: Iterable[str], entry: ModelEntry) -> Iterator[Violation]:
    """Every violation of this request, in check order (shape first)."""
    if path == endpoints.CHAT:
        yield from _chat(fields, entry)
    elif path == endpoints.COMPLETIONS:
        yield from _completions(fields, entry)
    elif path == endpoints.EMBEDDINGS:
        yield from _embeddings(fields, entry)
    elif path in (endpoints.IMAGES, endpoints.VIDEOS):
        yield from _prompted(path, fields)
    elif path == endpoints.SPEECH:
        yield from _speech(fields, entry)
    elif path == endpoints.TRANSCRIPTIONS and "file" not in set(files):
        yield missing("file", "an audio `file` part")


# --- per endpoint ------------------------------------------------------------------------------


def _chat(fields: Mapping[str, Any], entry: ModelEntry) -> Iterator[Violation]:
    messages = fields.get("messages")
    shape = check_messages_shape(messages)
    if shape is not None:
        yield shape
        return
    assert isinstance(messages, list)
    yield from check_common_shape(fields)
    yield from check_tools(fields, entry)
    yield from check_vision(messages, entry)
    yield from check_streaming(fields, entry)
    yield from check_max_output(fields, entry, COMPLETION_CAP_FIELDS)
    yield from check_context(
        entry, lambda: words_in_messages(messages), fields, "messages", chars_in_messages(messages)
    )


def _completions(fields: Mapping[str, Any], entry: ModelEntry) -> Iterator[Violation]:
    prompt = fields.get("prompt")
    tokens = prompt_tokens(prompt)
    if tokens is None:
        yield invalid(
            "prompt",
            "missing_required_parameter" if prompt is None else "invalid_type",
            "`prompt` must be a string, a list of strings, or token ids (a list of integers or of lists).",
        )
        return
    yield from check_common_shape(fields)
    yield from check_streaming(fields, entry)
    yield from check_max_output(fields, entry, ("max_tokens",))
    yield from check_context(entry, lambda: tokens, fields, "prompt", None)


def _embeddings(fields: Mapping[str, Any], entry: ModelEntry) -> Iterator[Violation]:
    inputs = embedding_input_tokens(fields.get("input"))
    if inputs is None:
        yield invalid(
            "input",
            "missing_required_parameter" if fields.get("input") is None else "invalid_type",
            "`input` must be a non-empty string, a list of strings, or token ids (a list of integers or of lists).",
        )
        return
    window = entry.context_window
    for index, count in enumerate(inputs):
        if window is not None and count > window:
            yield Violation(
                "context_window",
                "context_length_exceeded",
                f"input[{index}] has at least {count} tokens, more than the model's context window of {window} "
                f"tokens for {entry.model_name!r}.",
                f"input[{index}]",
                wants_at_least=("context_window", count),
            )
            return


def _prompted(path: str, fields: Mapping[str, Any]) -> Iterator[Violation]:
    if not nonempty_str(fields.get("prompt")):
        yield missing("prompt", "a non-empty string `prompt`")
        return
    if path == endpoints.IMAGES:
        n = fields.get("n")
        if n is not None and image_count(fields) is None:
            yield invalid("n", "invalid_value", f"`n` must be an integer from 1 to {MAX_IMAGES}, not {describe(n)}.")
        if fields.get("response_format") == "url":
            yield invalid(
                "response_format",
                "invalid_value",
                'The upstream returns images as `b64_json` only; omit `response_format` or set it to "b64_json".',
            )
        return
    for name in ("seconds", "duration"):
        value = fields.get(name)
        if value is not None and clip_seconds(value) is None:
            yield invalid(
                name,
                "invalid_value",
                f"`{name}` must be a whole number of seconds from 1 to {MAX_VIDEO_SECONDS} (a number, or a string "
                f'such as "4"), not {describe(value)}.',
            )


def _speech(fields: Mapping[str, Any], entry: ModelEntry) -> Iterator[Violation]:
    if not nonempty_str(fields.get("input")):
        yield missing("input", "a non-empty string `input` (the text to speak)")
        return
    voice = fields.get("voice")
    if not nonempty_str(voice):
        yield missing("voice", "a string `voice`")
        return
    voices = as_list(entry.raw.get("voices"))
    if voices and voice not in voices:  # a list test by equality: any catalog value is safe
        names = ", ".join(describe(v) if not isinstance(v, str) else v for v in voices[:20])
        yield invalid(
            "voice", "invalid_value", f"Voice {describe(voice)} is not one of {entry.model_name!r}'s voices: {names}."
        )
    speed = fields.get("speed")
    if speed is not None and not in_range(speed, SPEECH_SPEED):
        yield invalid("speed", "invalid_value", f"`speed` must be a number from 0.25 to 4.0, not {describe(speed)}.")


def alternatives(violation: Violation, path: str, candidates: Iterable[ModelEntry], limit: int = 3) -> list[str]:
    """Up to ``limit`` model names (from routable candidates) that would not have this violation."""
    found: list[str] = []
    for entry in candidates:
        if not admission.fits(entry, path):
            continue
        if violation.wants is not None and not (
            violation.wants in entry.supports or (violation.wants == "vision" and entry.category in VISION_CATEGORIES)
        ):
            continue
        if violation.wants_at_least is not None:
            field_name, needed = violation.wants_at_least
            have = entry.max_output if field_name == "max_output" else entry.context_window
            if have is None or have < needed:
                continue
        if violation.wants is None and violation.wants_at_least is None:
            return []
        found.append(entry.model_name)
        if len(found) == limit:
            break
    return found
