"""What a response reported it used: ``Usage``, read from a decoded JSON body or usage object.

Token counts from the upstream are checked and clamped (never negative, never past ``MAX_COUNT``);
a non-token quantity the answer reports (seconds of audio or video, images made) is carried as
``units``/``unit`` so that it is billed rather than what the request asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from gateway.catalog.entries import non_negative

# The largest token count believed from an upstream (2**53 - 1: exact as a float, fits SQLite's
# INTEGER and every JSON reader): a larger reported number is clamped to it, never passed on.
MAX_COUNT: Final = (1 << 53) - 1


@dataclass(frozen=True, slots=True)
class Usage:
    """What a response reported it used. Token counts are 0 when absent.

    ``total_tokens`` is the upstream's, or prompt + completion when it sent none. ``cached_tokens``
    comes from ``cache_read_input_tokens`` (FlexAI) or ``prompt_tokens_details.cached_tokens``
    (OpenAI). ``units``/``unit``: a non-token quantity the response reported, today the seconds of
    audio of a transcription (``unit == "second"``): the verbose_json ``duration`` when present,
    else a ``{"type": "duration", "seconds": n}`` usage block.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    units: float | None = None
    unit: str | None = None


def usage_from_response(obj: Any) -> Usage | None:
    """The usage of a decoded JSON response body (a completion, an embedding list, a
    transcription, images, a video job, ...), or None when it reports none."""
    if not isinstance(obj, dict):
        return None
    block = obj.get("usage")
    reported = _reported_units(obj, block)
    if not isinstance(block, dict):
        return None if reported is None else Usage(units=reported[0], unit=reported[1])
    usage = _token_usage(block)
    if reported is None:
        return usage
    return Usage(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens, usage.cached_tokens, *reported)


def _reported_units(obj: Mapping[str, Any], block: Any) -> tuple[float, str] | None:
    """A non-token quantity the answer itself reports, so that it is billed rather than what the
    request asked for: seconds of audio (a transcription's ``duration`` or a duration usage block),
    seconds of video (a video job's ``seconds``), images made (the entries of an images answer)."""
    seconds = non_negative(obj.get("duration"))
    if seconds is None and isinstance(block, dict) and block.get("type") == "duration":
        seconds = non_negative(block.get("seconds"))
    if seconds is None and str(obj.get("object", "")).startswith("video"):
        raw = obj.get("seconds")
        seconds = non_negative(int(raw) if isinstance(raw, str) and raw.isdigit() and len(raw) < 6 else raw)
    if seconds is not None:
        return seconds, "second"
    data = obj.get("data")
    if isinstance(data, list) and data and all(isinstance(d, dict) and ("b64_json" in d or "url" in d) for d in data):
        return float(len(data)), "image"
    return None


def _token_usage(block: Mapping[str, Any]) -> Usage:
    prompt = _count(block, "prompt_tokens", "input_tokens")
    completion = _count(block, "completion_tokens", "output_tokens")
    total = _count(block, "total_tokens") or prompt + completion
    cached = _count(block, "cache_read_input_tokens")
    if not cached:
        for name in ("prompt_tokens_details", "input_tokens_details"):
            details = block.get(name)
            if isinstance(details, dict):
                cached = _count(details, "cached_tokens")
                if cached:
                    break
    return Usage(prompt, completion, total, cached)


def _count(block: Mapping[str, Any], *names: str) -> int:
    """The first of ``names`` holding a non-negative whole number (at most MAX_COUNT), else 0."""
    for name in names:
        raw = block.get(name)
        if type(raw) is int and 0 <= raw <= MAX_COUNT:  # the usual case (a JSON integer), without the checks below
            return raw
        value = non_negative(raw)
        if value is not None and value == int(value):
            return min(int(value), MAX_COUNT)
    return 0
