"""Typed catalog entries parsed from the upstream's GET /api/models array (pure, no I/O).

The upstream publishes no schema beyond an example, so parsing is forgiving: extra fields are kept
in ``raw``, a null or malformed ``supports`` is an empty set, odd numbers become ``None``. An entry
that cannot be routed at all (no string ``model_name``, an unknown ``category``) is skipped and
reported, never fatal. A body that is not a list of entries is an error (the refresh failed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.endpoints import CATEGORIES
from gateway.jsonvalues import as_number


class CatalogFormatError(ValueError):
    """The catalog body is not a list of model entries."""


@dataclass(frozen=True, slots=True)
class ModelEntry:
    model_name: str
    category: str
    supports: frozenset[str]
    health_status: str | None
    context_window: int | None
    max_output: int | None
    input_per_mtok: float | None
    output_per_mtok: float | None
    pricing: tuple[Mapping[str, Any], ...]
    provider: str | None
    slug: str | None
    display_name: str | None
    raw: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ParsedCatalog:
    entries: tuple[ModelEntry, ...]
    skipped: tuple[str, ...]  # one human-readable reason per unusable entry


def parse_catalog(data: Any) -> ParsedCatalog:
    """Parse the decoded JSON of /api/models (a list; ``{"data": [...]}`` is accepted too)."""
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise CatalogFormatError(f"expected a JSON array of models, got {type(data).__name__}")
    entries: list[ModelEntry] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for index, item in enumerate(data):
        entry, problem = parse_entry(item)
        if entry is not None and entry.model_name in seen:
            problem = f"duplicate model_name {entry.model_name!r}"
            entry = None
        if entry is None:
            skipped.append(f"entry {index}: {problem}")
            continue
        seen.add(entry.model_name)
        entries.append(entry)
    return ParsedCatalog(tuple(entries), tuple(skipped))


def parse_entry(item: Any) -> tuple[ModelEntry | None, str]:
    """One entry, or ``(None, reason)`` when it cannot be routed."""
    if not isinstance(item, dict):
        return None, f"not an object ({type(item).__name__})"
    name = item.get("model_name")
    if not isinstance(name, str) or not name.strip():
        return None, "missing or non-string model_name"
    category = item.get("category")
    if not isinstance(category, str) or category.lower() not in CATEGORIES:
        return None, f"model {name!r} has unknown category {category!r}"
    supports_raw = item.get("supports")
    supports = (
        frozenset(tag.lower() for tag in supports_raw if isinstance(tag, str))
        if isinstance(supports_raw, list)
        else frozenset()
    )
    health = item.get("health_status")
    pricing = item.get("pricing")
    return (
        ModelEntry(
            model_name=name,
            category=category.lower(),
            supports=supports,
            health_status=health.lower() if isinstance(health, str) else None,
            context_window=_positive_int(item.get("context_window")),
            max_output=_positive_int(item.get("max_output")),
            input_per_mtok=non_negative(item.get("input_per_mtok")),
            output_per_mtok=non_negative(item.get("output_per_mtok")),
            pricing=tuple(p for p in pricing if isinstance(p, dict)) if isinstance(pricing, list) else (),
            provider=_str(item.get("provider")),
            slug=_str(item.get("slug")),
            display_name=_str(item.get("display_name")),
            raw=item,
        ),
        "",
    )


def _positive_int(value: Any) -> int | None:
    """A whole JSON number > 0 (10 or 10.0) as an int, else None (a huge or odd value included)."""
    number = as_number(value)
    if number is None or number <= 0 or number != int(number):
        return None
    return int(number)


def non_negative(value: Any, *, allow_zero: bool = True) -> float | None:
    """A JSON number that is finite and >= 0 (> 0 without ``allow_zero``) as a float, else None."""
    number = as_number(value)
    if number is None or number < 0 or (number == 0 and not allow_zero):
        return None
    return number


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None
