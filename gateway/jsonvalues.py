"""Typed reads of parsed JSON: a request body's fields, and their members at any depth, may hold
any JSON value, so whatever reads one goes through these readers. Each answers the value when it
has the expected type, else None, and none raises, whatever it is given: a field of an unexpected
type becomes a refusal or an unknown quantity, never a TypeError (``{"role": {}} in a set``), an
OverflowError (a huge integer compared as a float) or a RecursionError (``repr`` of a deep value).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

# Integers with more bits than this are described, not printed (str() of a huge int raises).
_MAX_SHOWN_INT_BITS = 128


def as_int(value: object) -> int | None:
    """A JSON integer (a boolean is not one)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def as_number(value: object) -> float | None:
    """A finite JSON number (integer or not; a boolean is not one) as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range
        return None
    return number if math.isfinite(number) else None


def as_text(value: object) -> str | None:
    """A JSON string."""
    return value if isinstance(value, str) else None


def as_list(value: object) -> list[Any] | None:
    """A JSON array."""
    return value if isinstance(value, list) else None


def as_object(value: object) -> dict[str, Any] | None:
    """A JSON object."""
    return value if isinstance(value, dict) else None


def as_choice(value: object, choices: Collection[str]) -> str | None:
    """``value`` when it is one of the strings ``choices`` (never hashes a value of another type)."""
    return value if isinstance(value, str) and value in choices else None


def describe(value: object, limit: int = 40) -> str:
    """A short text naming a JSON value in an error message: a scalar as its repr (cut to about
    ``limit`` characters), an array or object by its kind. Bounded whatever the value's size or depth."""
    if isinstance(value, str):
        text = repr(value[: limit + 1])
        return text if len(text) <= limit else text[: limit - 3] + "..."
    if value is None or isinstance(value, bool | float):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= _MAX_SHOWN_INT_BITS else "a very large integer"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a value of type {type(value).__name__}"
