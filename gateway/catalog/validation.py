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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from gateway import endpoints
from gateway.catalog import admission
from gateway.catalog.bounds import (
    COMPLETION_CAP_FIELDS,
    MAX_IMAGES,
    MAX_VIDEO_SECONDS,
    chars_in_messages,
    clip_seconds,
    completion_cap,
    embedding_input_tokens,
    image_count,
    prompt_tokens,
    requested_completion_tokens,
    words_in_messages,
)
from gateway.catalog.entries import ModelEntry
from gateway.jsonvalues import as_choice, as_int, as_list, as_number, as_object, as_text, describe

CHECKS = ("shape", "tools", "vision", "streaming", "max_output", "context_window")

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "image"})
VISION_CATEGORIES = frozenset({"vision", "multimodal"})
# What the OpenAI API defines, where it defines it: field -> (low, high).
RANGES: Mapping[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}
SPEECH_SPEED = (0.25, 4.0)


@dataclass(frozen=True, slots=True)
class Violation:
    check: str
    code: str
    message: str
    param: str | None
    # The capability a model would need to accept the request (for suggesting alternatives).
    wants: str | None = None
    wants_at_least: tuple[str, int] | None = None  # ("max_output" | "context_window", n)


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
        yield _missing("file", "an audio `file` part")


# --- per endpoint ------------------------------------------------------------------------------


def _chat(fields: Mapping[str, Any], entry: ModelEntry) -> Iterator[Violation]:
    messages = fields.get("messages")
    shape = _messages_shape(messages)
    if shape is not None:
        yield shape
        return
    assert isinstance(messages, list)
    yield from _common_shape(fields)
    yield from _tools(fields, entry)
    yield from _vision(messages, entry)
    yield from _streaming(fields, entry)
    yield from _max_output(fields, entry, COMPLETION_CAP_FIELDS)
    yield from _context(entry, lambda: words_in_messages(messages), fields, "messages", chars_in_messages(messages))


def _completions(fields: Mapping[str, Any], entry: ModelEntry) -> Iterator[Violation]:
    prompt = fields.get("prompt")
    tokens = prompt_tokens(prompt)
    if tokens is None:
        yield _invalid(
            "prompt",
            "missing_required_parameter" if prompt is None else "invalid_type",
            "`prompt` must be a string, a list of strings, or token ids (a list of integers or of lists).",
        )
        return
    yield from _common_shape(fields)
    yield from _streaming(fields, entry)
    yield from _max_output(fields, entry, ("max_tokens",))
    yield from _context(entry, lambda: tokens, fields, "prompt", None)


def _embeddings(fields: Mapping[str, Any], entry: ModelEntry) -> Iterator[Violation]:
    inputs = embedding_input_tokens(fields.get("input"))
    if inputs is None:
        yield _invalid(
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
    if not _nonempty_str(fields.get("prompt")):
        yield _missing("prompt", "a non-empty string `prompt`")
        return
    if path == endpoints.IMAGES:
        n = fields.get("n")
        if n is not None and image_count(fields) is None:
            yield _invalid("n", "invalid_value", f"`n` must be an integer from 1 to {MAX_IMAGES}, not {describe(n)}.")
        if fields.get("response_format") == "url":
            yield _invalid(
                "response_format",
                "invalid_value",
                'The upstream returns images as `b64_json` only; omit `response_format` or set it to "b64_json".',
            )
        return
    for name in ("seconds", "duration"):
        value = fields.get(name)
        if value is not None and clip_seconds(value) is None:
            yield _invalid(
                name,
                "invalid_value",
                f"`{name}` must be a whole number of seconds from 1 to {MAX_VIDEO_SECONDS} (a number, or a string "
                f'such as "4"), not {describe(value)}.',
            )


def _speech(fields: Mapping[str, Any], entry: ModelEntry) -> Iterator[Violation]:
    if not _nonempty_str(fields.get("input")):
        yield _missing("input", "a non-empty string `input` (the text to speak)")
        return
    voice = fields.get("voice")
    if not _nonempty_str(voice):
        yield _missing("voice", "a string `voice`")
        return
    voices = as_list(entry.raw.get("voices"))
    if voices and voice not in voices:  # a list test by equality: any catalog value is safe
        names = ", ".join(describe(v) if not isinstance(v, str) else v for v in voices[:20])
        yield _invalid(
            "voice", "invalid_value", f"Voice {describe(voice)} is not one of {entry.model_name!r}'s voices: {names}."
        )
    speed = fields.get("speed")
    if speed is not None and not _in_range(speed, SPEECH_SPEED):
        yield _invalid("speed", "invalid_value", f"`speed` must be a number from 0.25 to 4.0, not {describe(speed)}.")


# --- shared checks ----------------------------------------------------------------------------


def _messages_shape(messages: Any) -> Violation | None:
    if messages is None:
        return _missing("messages", "a non-empty `messages` list")
    if not isinstance(messages, list) or not messages:
        return _invalid("messages", "invalid_type", "`messages` must be a non-empty list of message objects.")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return _invalid(f"messages[{i}]", "invalid_type", f"messages[{i}] must be an object.")
        role = message.get("role")
        if as_choice(role, CHAT_ROLES) is None:
            return _invalid(
                f"messages[{i}].role",
                "invalid_value",
                f"messages[{i}].role must be one of {', '.join(sorted(CHAT_ROLES))}, not {describe(role)}.",
            )
        content = message.get("content")
        if not (content is None or isinstance(content, str | list)):
            return _invalid(
                f"messages[{i}].content",
                "invalid_type",
                f"messages[{i}].content must be a string or a list of parts.",
            )
    return None


def _common_shape(fields: Mapping[str, Any]) -> Iterator[Violation]:
    stream = fields.get("stream")
    if stream is not None and not isinstance(stream, bool):
        yield _invalid("stream", "invalid_type", f"`stream` must be true or false, not {describe(stream)}.")
    options = fields.get("stream_options")
    if options is not None and as_object(options) is None:
        yield _invalid(
            "stream_options", "invalid_type", f"`stream_options` must be an object or null, not {describe(options)}."
        )
    n = fields.get("n")
    if n is not None:
        count = as_int(n)
        if count is None or count < 1:
            yield _invalid("n", "invalid_value", f"`n` must be a positive integer, not {describe(n)}.")
        elif count > 1:
            yield _invalid(
                "n",
                "multiple_choices_not_supported",
                "The upstream does not support multiple choices (n > 1).",
            )
    for name, bounds in RANGES.items():
        value = fields.get(name)
        if value is not None and not _in_range(value, bounds):
            yield _invalid(
                name,
                "invalid_value",
                f"`{name}` must be a number from {bounds[0]:g} to {bounds[1]:g}, not {describe(value)}.",
            )
    for name in reversed(COMPLETION_CAP_FIELDS):  # max_tokens first
        value = fields.get(name)
        if value is not None and completion_cap(fields, name) is None:
            yield _invalid(name, "invalid_value", f"`{name}` must be a positive integer, not {describe(value)}.")


def _tools(fields: Mapping[str, Any], entry: ModelEntry) -> Iterator[Violation]:
    if "tool_use" in entry.supports:
        return
    tool_choice = fields.get("tool_choice")
    if fields.get("tools"):
        param = "tools"
    elif fields.get("functions"):
        param = "functions"
    elif tool_choice is not None and tool_choice != "none":
        param = "tool_choice"
    else:
        return
    yield Violation(
        "tools",
        "tools_not_supported",
        f"Model {entry.model_name!r} does not support tool calling (its catalog entry has no `tool_use`); "
        f"remove `{param}` or choose a model that supports tools.",
        param,
        wants="tool_use",
    )


def _vision(messages: list[Any], entry: ModelEntry) -> Iterator[Violation]:
    if "vision" in entry.supports or entry.category in VISION_CATEGORIES:
        return
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if isinstance(part, dict) and as_choice(part.get("type"), IMAGE_PART_TYPES) is not None:
                yield Violation(
                    "vision",
                    "vision_not_supported",
                    f"messages[{i}].content[{j}] is an image, but model {entry.model_name!r} does not accept image "
                    "input (its catalog entry has no `vision`).",
                    f"messages[{i}].content[{j}]",
                    wants="vision",
                )
                return


def _streaming(fields: Mapping[str, Any], entry: ModelEntry) -> Iterator[Violation]:
    if fields.get("stream") is True and "streaming" not in entry.supports:
        yield Violation(
            "streaming",
            "streaming_not_supported",
            f"Model {entry.model_name!r} does not support streaming (its catalog entry has no `streaming`); "
            "set `stream` to false or choose a model that streams.",
            "stream",
            wants="streaming",
        )


def _max_output(fields: Mapping[str, Any], entry: ModelEntry, names: tuple[str, ...]) -> Iterator[Violation]:
    limit = entry.max_output
    if limit is None:
        return
    for name in names:
        value = completion_cap(fields, name)
        if value is not None and value > limit:
            yield Violation(
                "max_output",
                "max_tokens_exceeded",
                f"`{name}` is {value}, but model {entry.model_name!r} generates at most {limit} tokens; "
                f"ask for {limit} or fewer.",
                name,
                wants_at_least=("max_output", value),
            )
            return


def _context(
    entry: ModelEntry, count: Callable[[], int], fields: Mapping[str, Any], param: str, chars: int | None
) -> Iterator[Violation]:
    window = entry.context_window
    if window is None:
        return
    requested = requested_completion_tokens(fields)
    if chars is not None and (chars + 1) // 2 + requested <= window:
        return  # n characters hold at most (n + 1) / 2 words: no need to count them
    prompt_tokens = count()
    if prompt_tokens + requested > window:
        detail = f" plus {requested} requested for the completion" if requested else ""
        yield Violation(
            "context_window",
            "context_length_exceeded",
            f"The prompt has at least {prompt_tokens} tokens{detail}, more than the {window}-token context window "
            f"of {entry.model_name!r}. Shorten the prompt or choose a model with a larger context window.",
            param,
            wants_at_least=("context_window", prompt_tokens + requested),
        )


# --- small helpers ----------------------------------------------------------------------------


def _in_range(value: object, bounds: tuple[float, float]) -> bool:
    number = as_number(value)
    return number is not None and bounds[0] <= number <= bounds[1]


def _nonempty_str(value: object) -> bool:
    text = as_text(value)
    return text is not None and bool(text.strip())


def _missing(param: str, what: str) -> Violation:
    return Violation("shape", "missing_required_parameter", f"This endpoint needs {what}.", param)


def _invalid(param: str, code: str, message: str) -> Violation:
    return Violation("shape", code, message, param)


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
