"""The cost in USD of one request, from its model's catalog entry (pure, no I/O).

Token endpoints (chat, completions, embeddings) are billed per million input and output tokens
(``input_per_mtok``, ``output_per_mtok``). The others are billed per unit, from the entry's
``pricing`` list (``{"unit": ..., "price_usd": ...}``); which unit each endpoint is billed in, and
how many units a request used, is the table ``UNIT_RULES``. Whatever is unknown (no price, no
usage, a malformed field) gives None, never an exception.

Cached input tokens are billed at the input price: the catalog carries no cache price.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from gateway.entries import ModelEntry, non_negative
from gateway.routing import CHAT, COMPLETIONS, EMBEDDINGS, IMAGES, SPEECH, TRANSCRIPTIONS, VIDEOS
from gateway.usage import Usage

TOKEN_ENDPOINTS: Final = frozenset({CHAT, COMPLETIONS, EMBEDDINGS})

# A video request naming neither ``seconds`` nor ``duration`` is a 2 s clip (FlexAI's documented
# example, and what the simulated upstream generates).
VIDEO_DEFAULT_SECONDS: Final = 2.0

# Spellings of the catalog's ``pricing[].unit`` accepted for the canonical names used below.
UNIT_ALIASES: Mapping[str, str] = MappingProxyType(
    {"images": "image", "characters": "character", "chars": "character", "seconds": "second", "minutes": "minute"}
)

# How many billing units a request used: from the request fields and the response's usage.
Quantity = Callable[[Mapping[str, Any], Usage | None], float | None]


def _images(request: Mapping[str, Any], usage: Usage | None) -> float | None:
    n = request.get("n")
    if n is None:
        return 1.0
    return float(n) if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 1_000_000 else None


def _characters(request: Mapping[str, Any], usage: Usage | None) -> float | None:
    text = request.get("input")
    return float(len(text)) if isinstance(text, str) else None  # Unicode code points


def _audio_minutes(request: Mapping[str, Any], usage: Usage | None) -> float | None:
    if usage is None or usage.units is None or usage.unit != "second":
        return None
    return usage.units / 60.0


def _video_seconds(request: Mapping[str, Any], usage: Usage | None) -> float | None:
    value = request.get("seconds")
    if value is None:
        value = request.get("duration")
    if value is None:
        return VIDEO_DEFAULT_SECONDS
    if isinstance(value, str):  # OpenAI's video API spells seconds as a string ("4")
        try:
            value = float(value)
        except ValueError:
            return None
    return non_negative(value, allow_zero=False)


@dataclass(frozen=True, slots=True)
class UnitRule:
    unit: str  # the catalog's ``pricing[].unit`` the endpoint is billed in
    quantity: Quantity  # how many of that unit a request used; None when unknown
    known_upfront: bool  # the quantity is known from the request alone (before forwarding)


UNIT_RULES: Mapping[str, UnitRule] = MappingProxyType(
    {
        IMAGES: UnitRule("image", _images, known_upfront=True),  # request ``n`` (default 1)
        SPEECH: UnitRule("character", _characters, known_upfront=True),  # characters of ``input``
        TRANSCRIPTIONS: UnitRule("minute", _audio_minutes, known_upfront=False),  # response duration
        VIDEOS: UnitRule("second", _video_seconds, known_upfront=True),  # ``seconds`` or ``duration``
    }
)


def cost_usd(
    entry: ModelEntry,
    path: str,
    usage: Usage | None,
    request: Mapping[str, Any],
    response_units: float | None = None,
) -> float | None:
    """The cost of a served request, or None when it cannot be known.

    ``path`` is the endpoint (``gateway.routing`` constants), ``request`` the parsed request fields
    (multipart text fields for transcriptions), ``usage`` what the response reported.
    ``response_units``, when given, is the quantity in the endpoint's billing unit that the caller
    measured from the response (e.g. the number of images returned); it replaces the one derived
    from ``request`` and ``usage``. A per-unit endpoint whose entry has no price for its unit falls
    back to token prices when the response reported tokens.
    """
    if path in TOKEN_ENDPOINTS:
        return _token_cost(entry, usage)
    rule = UNIT_RULES.get(path)
    if rule is None:
        return None
    price = unit_price(entry, rule.unit)
    if price is None:
        has_tokens = usage is not None and (usage.prompt_tokens or usage.completion_tokens)
        return _token_cost(entry, usage) if has_tokens else None
    quantity = non_negative(response_units) if response_units is not None else rule.quantity(request, usage)
    return None if quantity is None else _finite(quantity * price)


def min_cost_usd(
    entry: ModelEntry, path: str, request: Mapping[str, Any], prompt_tokens_lower_bound: int
) -> float | None:
    """A cost the request certainly reaches if it is served: a true lower bound.

    Token endpoints: ``prompt_tokens_lower_bound`` x input price (the output may be 0 tokens).
    Per-unit endpoints whose quantity the request fixes (images, speech, video): their exact cost.
    Otherwise (transcriptions: the audio length is known only from the response) None.
    Refusing when this exceeds a remaining budget refuses only requests that would certainly
    exceed it.
    """
    if path in TOKEN_ENDPOINTS:
        return _token_cost(entry, Usage(prompt_tokens=max(0, prompt_tokens_lower_bound)))
    return _upfront_cost(entry, path, request)


def max_cost_usd(
    entry: ModelEntry, path: str, request: Mapping[str, Any], prompt_tokens_lower_bound: int
) -> float | None:
    """The cost if the model generates all the output the request allows.

    Token endpoints: ``prompt_tokens_lower_bound`` x input price + (``max_completion_tokens``, else
    ``max_tokens``, else 0) x output price. This is NOT a lower bound of the cost: a model that
    stops before its ``max_tokens`` costs less. Refusing when it exceeds a remaining budget refuses
    requests that *could* exceed it if they ran to their limit (what OpenRouter does), not only
    those that certainly would; use ``min_cost_usd`` for the latter. Without a max_tokens it equals
    ``min_cost_usd``; it is not an upper bound either (the prompt count is a lower bound).
    Per-unit endpoints: as ``min_cost_usd``.
    """
    if path in TOKEN_ENDPOINTS:
        completion = _max_output(request)
        if completion is None:
            return None
        usage = Usage(prompt_tokens=max(0, prompt_tokens_lower_bound), completion_tokens=completion)
        return _token_cost(entry, usage)
    return _upfront_cost(entry, path, request)


def unit_price(entry: ModelEntry, unit: str) -> float | None:
    """The entry's ``price_usd`` for one ``unit`` (canonical name, see ``UNIT_ALIASES``)."""
    for item in entry.pricing:
        name = item.get("unit")
        if not isinstance(name, str):
            continue
        name = name.strip().lower()
        if UNIT_ALIASES.get(name, name) == unit:
            price = non_negative(item.get("price_usd"))
            if price is not None:
                return price
    return None


def _upfront_cost(entry: ModelEntry, path: str, request: Mapping[str, Any]) -> float | None:
    rule = UNIT_RULES.get(path)
    if rule is None or not rule.known_upfront:
        return None
    return cost_usd(entry, path, None, request)


def _token_cost(entry: ModelEntry, usage: Usage | None) -> float | None:
    """Tokens x prices per million; None without usage or when a price needed is unknown."""
    if usage is None:
        return None
    input_price, output_price = entry.input_per_mtok, entry.output_per_mtok
    if input_price is None and output_price is None:
        return None
    if (usage.prompt_tokens and input_price is None) or (usage.completion_tokens and output_price is None):
        return None
    try:
        cost = usage.prompt_tokens * (input_price or 0.0) + usage.completion_tokens * (output_price or 0.0)
    except OverflowError:  # a token count beyond float range
        return None
    return _finite(cost / 1e6)


def _max_output(request: Mapping[str, Any]) -> int | None:
    """``max_completion_tokens`` (it supersedes ``max_tokens``), else ``max_tokens``, else 0."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = request.get(name)
        if value is None:
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        return None
    return 0


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
