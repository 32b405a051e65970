"""The cost in USD of one request, from its model's catalog entry (pure, no I/O).

Token endpoints (chat, completions, embeddings) are billed per million input and output tokens
(``input_per_mtok``, ``output_per_mtok``). The others are billed per unit, from the entry's
``pricing`` list (``{"unit": ..., "price_usd": ...}``); which unit each endpoint is billed in, and
how many units a request used, is the table ``UNIT_RULES``. Whatever is unknown (no price, no
usage, a malformed field) gives None, never an exception.

How many units a request used comes from the upstream's answer when it reports them (units the
caller measured in the response, or a ``Usage`` whose ``unit`` the endpoint is billed in), else
from the request's fields as validation accepts them (``gateway.catalog.validation``: images ``n`` 1-10,
video ``seconds`` 1-60, a string speech ``input``): a client-chosen value the upstream would
refuse (``"seconds": 1e-9``, ``"NaN"``, ``"n": 10**6``) prices nothing, it is an unknown (None).

Cached input tokens are billed at the input price: the catalog carries no cache price.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from gateway.catalog.bounds import (
    MAX_IMAGES,
    MAX_VIDEO_SECONDS,
    image_count,
    prompt_count,
    requested_completion_tokens,
    video_seconds,
)
from gateway.catalog.entries import ModelEntry, non_negative
from gateway.endpoints import CHAT, COMPLETIONS, EMBEDDINGS, IMAGES, SPEECH, TRANSCRIPTIONS, VIDEOS
from gateway.jsonvalues import as_int, as_text
from gateway.usage.model import Usage

TOKEN_ENDPOINTS: Final = frozenset({CHAT, COMPLETIONS, EMBEDDINGS})

# Spellings of the catalog's ``pricing[].unit`` accepted for the canonical names used below.
UNIT_ALIASES: Mapping[str, str] = MappingProxyType(
    {"images": "image", "characters": "character", "chars": "character", "seconds": "second", "minutes": "minute"}
)

# How many billing units a request asks for, from its fields as validation accepts them (None: invalid).
Quantity = Callable[[Mapping[str, Any]], float | None]


def _images(request: Mapping[str, Any]) -> float | None:
    count = image_count(request)  # ``n``, 1 when absent
    return None if count is None else float(count)


def _characters(request: Mapping[str, Any]) -> float | None:
    text = as_text(request.get("input"))
    return None if text is None else float(len(text))  # Unicode code points


def _video_seconds(request: Mapping[str, Any]) -> float | None:
    seconds = video_seconds(request)  # ``seconds``, else ``duration``, else the 2 s default
    return None if seconds is None else float(seconds)


@dataclass(frozen=True, slots=True)
class UnitRule:
    unit: str  # the catalog's ``pricing[].unit`` the endpoint is billed in
    # Units an answer may report (``Usage.unit``) -> how many billing units one of them is.
    reported: Mapping[str, float]
    # How many units the request asks for; None: only the answer tells (the audio's length).
    requested: Quantity | None
    # The most units one request can use when its own field is invalid (None: no bound known).
    most: float | None = None

    @property
    def known_upfront(self) -> bool:
        """The quantity is known from the request alone (before forwarding)."""
        return self.requested is not None


UNIT_RULES: Mapping[str, UnitRule] = MappingProxyType(
    {
        IMAGES: UnitRule("image", MappingProxyType({"image": 1.0}), _images, most=MAX_IMAGES),
        SPEECH: UnitRule("character", MappingProxyType({"character": 1.0}), _characters),
        TRANSCRIPTIONS: UnitRule("minute", MappingProxyType({"second": 1 / 60, "minute": 1.0}), None),
        VIDEOS: UnitRule("second", MappingProxyType({"second": 1.0}), _video_seconds, most=MAX_VIDEO_SECONDS),
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

    ``path`` is the endpoint (``gateway.endpoints`` constants), ``request`` the parsed request fields
    (multipart text fields for transcriptions), ``usage`` what the response reported.
    The quantity of a per-unit endpoint, first found wins: ``response_units`` (the quantity in the
    endpoint's billing unit that the caller measured from the response, e.g. the number of images
    returned), the units ``usage`` reports when its ``unit`` is one the endpoint is billed by
    (``UnitRule.reported``: seconds of audio for a transcription), the request's validated fields.
    A per-unit endpoint whose entry has no price for its unit falls back to token prices when the
    response reported tokens.
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
    quantity = _quantity(rule, request, usage, response_units)
    return None if quantity is None else _finite(quantity * price)


def _quantity(
    rule: UnitRule, request: Mapping[str, Any], usage: Usage | None, response_units: float | None
) -> float | None:
    """The billing units used: from the answer when it tells them, else from the validated request."""
    if response_units is not None:
        return non_negative(response_units)
    factor = None if usage is None or usage.unit is None else rule.reported.get(usage.unit)
    if usage is not None and usage.units is not None and factor is not None:
        reported = non_negative(usage.units)
        return None if reported is None else reported * factor
    return None if rule.requested is None else rule.requested(request)


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


def max_cost_usd(entry: ModelEntry, path: str, fields: Mapping[str, Any]) -> float | None:
    """The most this request can cost if it is served: what to charge when the answer's usage
    cannot be read (an encoding the gateway cannot decode, a body cut short), rather than nothing.

    Token endpoints: each prompt at the entry's whole ``context_window`` at the input price, plus
    each completion at its cap at the output price. The cap is ``max_completion_tokens`` /
    ``max_tokens`` when given, else the entry's ``max_output``, else the context window, and never
    more than the ``max_output`` or the window the entry states (the model cannot go past them).
    A request holds several prompts when a completions ``prompt`` or an embeddings ``input`` is a
    list of them, and ``n`` completions per prompt; embeddings complete nothing. None when the
    entry has no context window (nothing bounds the prompt) or lacks a price it would need.

    Per-unit endpoints: the request's units (images ``n``, video seconds, speech characters) at
    the unit price; when the field is invalid, the most the upstream accepts (10 images, 60 s).
    None for transcriptions (the audio's length is in the answer only), for an invalid speech
    ``input``, and when the entry has no price for the unit.
    """
    if path in TOKEN_ENDPOINTS:
        window = entry.context_window
        if window is None:
            return None
        prompts = prompt_count(path, fields)
        completions = 0
        if path != EMBEDDINGS:
            limits = [limit for limit in (entry.max_output, window) if limit is not None]
            cap = min([requested_completion_tokens(fields) or entry.max_output or window, *limits])
            choices = as_int(fields.get("n"))
            completions = prompts * (choices if choices is not None and choices > 1 else 1) * cap
        return _token_cost(entry, Usage(prompt_tokens=prompts * window, completion_tokens=completions))
    rule = UNIT_RULES.get(path)
    if rule is None or rule.requested is None:
        return None
    price = unit_price(entry, rule.unit)
    if price is None:
        return None
    quantity = rule.requested(fields)
    if quantity is None:
        quantity = rule.most
    return None if quantity is None else _finite(quantity * price)


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


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
