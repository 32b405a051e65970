"""Catalog entries with numbers the upstream should never send: parsed to None, never an error."""

from __future__ import annotations

import pytest

from gateway.catalog.entries import parse_entry


@pytest.mark.parametrize("value", [10**400, -(10**400), 1e308 * 10, float("nan"), True, "32768", 0, -5, 1.5, [1]])
def test_an_odd_context_window_or_max_output_is_unknown(value: object) -> None:
    entry, problem = parse_entry({"model_name": "m", "category": "text", "context_window": value, "max_output": value})
    assert entry is not None, problem
    assert (entry.context_window, entry.max_output) == (None, None)


def test_a_whole_float_is_a_whole_number() -> None:
    entry, _ = parse_entry({"model_name": "m", "category": "text", "context_window": 32768.0, "max_output": 4096})
    assert entry is not None
    assert (entry.context_window, entry.max_output) == (32768, 4096)
