"""The validation checks that several endpoints share, and the ``Violation`` they report: pure functions.

Each check reads fields of a parsed body (already decoded once by ``body``) against the catalog
entry of the requested model: the shape of chat messages and of the fields every text endpoint
takes, tool calling, image input, streaming, the completion cap and the context window. Which
endpoint runs which check, and in what order, is ``gateway.catalog.validation``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.catalog.bounds import COMPLETION_CAP_FIELDS, completion_cap, requested_completion_tokens
from gateway.catalog.entries import ModelEntry
from gateway.jsonvalues import as_choice, as_int, as_number, as_object, as_text, describe

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


@dataclass(frozen=True, slots=True)
class Violation:
    check: str
    code: str
    message: str
    param: str | None
    # The capability a model would need to accept the request (for suggesting alternatives).
    wants: str | None = None
    wants_at_least: tuple[str, int] | None = None  # ("max_output" | "context_window", n)


def check_messages_shape(messages: Any) -> Violation | None:
    if messages is None:
        return missing("messages", "a non-empty `messages` list")
    if not isinstance(messages, list) or not messages:
        return invalid("messages", "invalid_type", "`messages` must be a non-empty list of message objects.")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return invalid(f"messages[{i}]", "invalid_type", f"messages[{i}] must be an object.")
        role = message.get("role")
        if as_choice(role, CHAT_ROLES) is None:
            return invalid(
                f"messages[{i}].role",
                "invalid_value",
                f"messages[{i}].role must be one of {', '.join(sorted(CHAT_ROLES))}, not {describe(role)}.",
            )
        content = message.get("content")
        if not (content is None or isinstance(content, str | list)):
            return invalid(
                f"messages[{i}].content",
                "invalid_type",
                f"messages[{i}].content must be a string or a list of parts.",
            )
    return None


def check_common_shape(fields: Mapping[str, Any]) -> Iterator[Violation]:
    stream = fields.get("stream")
    if stream is not None and not isinstance(stream, bool):
        yield invalid("stream", "invalid_type", f"`stream` must be true or false, not {describe(stream)}.")
    options = fields.get("stream_options")
    if options is not None and as_object(options) is None:
        yield invalid(
            "stream_options", "invalid_type", f"`stream_options` must be an object or null, not {describe(options)}."
        )
    n = fields.get("n")
    if n is not None:
        count = as_int(n)
        if count is None or count < 1:
            yield invalid("n", "invalid_value", f"`n` must be a positive integer, not {describe(n)}.")
        elif count > 1:
            yield invalid(
                "n",
                "multiple_choices_not_supported",
                "The upstream does not support multiple choices (n > 1).",
            )
    for name, bounds in RANGES.items():
        value = fields.get(name)
        if value is not None and not in_range(value, bounds):
            yield invalid(
                name,
                "invalid_value",
                f"`{name}` must be a number from {bounds[0]:g} to {bounds[1]:g}, not {describe(value)}.",
            )
    for name in reversed(COMPLETION_CAP_FIELDS):  # max_tokens first
        value = fields.get(name)
        if value is not None and completion_cap(fields, name) is None:
            yield invalid(name, "invalid_value", f"`{name}` must be a positive integer, not {describe(value)}.")


def check_tools(fields: Mapping[str, Any], entry: ModelEntry) -> Iterator[Violation]:
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


def check_vision(messages: list[Any], entry: ModelEntry) -> Iterator[Violation]:
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


def check_streaming(fields: Mapping[str, Any], entry: ModelEntry) -> Iterator[Violation]:
    if fields.get("stream") is True and "streaming" not in entry.supports:
        yield Violation(
            "streaming",
            "streaming_not_supported",
            f"Model {entry.model_name!r} does not support streaming (its catalog entry has no `streaming`); "
            "set `stream` to false or choose a model that streams.",
            "stream",
            wants="streaming",
        )


def check_max_output(fields: Mapping[str, Any], entry: ModelEntry, names: tuple[str, ...]) -> Iterator[Violation]:
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


def check_context(
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


def in_range(value: object, bounds: tuple[float, float]) -> bool:
    number = as_number(value)
    return number is not None and bounds[0] <= number <= bounds[1]


def nonempty_str(value: object) -> bool:
    text = as_text(value)
    return text is not None and bool(text.strip())


def missing(param: str, what: str) -> Violation:
    return Violation("shape", "missing_required_parameter", f"This endpoint needs {what}.", param)


def invalid(param: str, code: str, message: str) -> Violation:
    return Violation("shape", code, message, param)
