"""Cost in USD from catalog entries: per token and per unit, None whenever something is unknown."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.catalog.entries import ModelEntry, parse_entry
from gateway.endpoints import CHAT, COMPLETIONS, EMBEDDINGS, IMAGES, SPEECH, TRANSCRIPTIONS, VIDEO_JOB, VIDEOS
from gateway.usage.model import Usage
from gateway.usage.pricing import UNIT_RULES, cost_usd, max_cost_usd, min_cost_usd, unit_price


def entry(**fields: Any) -> ModelEntry:
    parsed, problem = parse_entry({"model_name": "m", "category": "text", **fields})
    assert parsed is not None, problem
    return parsed


def unit_entry(category: str, unit: str, price: Any) -> ModelEntry:
    return entry(category=category, input_per_mtok=0, output_per_mtok=0, pricing=[{"unit": unit, "price_usd": price}])


TEXT = entry(input_per_mtok=0.5, output_per_mtok=2.0)


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_token_cost(path: str) -> None:
    usage = Usage(prompt_tokens=1_000_000, completion_tokens=500_000, total_tokens=1_500_000)
    assert cost_usd(TEXT, path, usage, {}) == pytest.approx(0.5 + 1.0)
    assert cost_usd(TEXT, path, Usage(prompt_tokens=1000, completion_tokens=10), {}) == pytest.approx(
        (1000 * 0.5 + 10 * 2.0) / 1e6
    )


def test_embedding_cost_needs_no_output_price() -> None:
    embedding = entry(category="embedding", input_per_mtok=0.02)
    assert cost_usd(embedding, EMBEDDINGS, Usage(prompt_tokens=500, total_tokens=500), {}) == pytest.approx(1e-5)


@pytest.mark.parametrize(
    ("model", "usage"),
    [
        (entry(), Usage(prompt_tokens=10, completion_tokens=10)),  # no prices at all
        (entry(input_per_mtok=1.0), Usage(prompt_tokens=10, completion_tokens=10)),  # output price unknown
        (entry(output_per_mtok=1.0), Usage(prompt_tokens=10, completion_tokens=10)),  # input price unknown
        (entry(input_per_mtok="1", output_per_mtok=-1), Usage(prompt_tokens=10)),  # malformed prices
        (TEXT, None),  # no usage reported
    ],
)
def test_unknown_token_cost_is_none(model: ModelEntry, usage: Usage | None) -> None:
    assert cost_usd(model, CHAT, usage, {}) is None


@pytest.mark.parametrize(
    ("request_fields", "expected"),
    [({}, 0.04), ({"n": 3}, 0.12), ({"n": None}, 0.04), ({"n": 0}, None), ({"n": "2"}, None), ({"n": True}, None)],
)
def test_image_cost_per_image(request_fields: dict[str, Any], expected: float | None) -> None:
    model = unit_entry("image", "image", 0.04)
    assert cost_usd(model, IMAGES, None, request_fields) == pytest.approx(expected)


def test_response_units_replace_the_request_estimate() -> None:
    model = unit_entry("image", "image", 0.04)
    assert cost_usd(model, IMAGES, None, {"n": 3}, response_units=2) == pytest.approx(0.08)
    assert cost_usd(model, IMAGES, None, {"n": 3}, response_units=-1) is None


@pytest.mark.parametrize(
    ("request_fields", "expected"),
    [({"input": "héllo 👋"}, 7 * 15e-6), ({"input": ""}, 0.0), ({}, None), ({"input": ["a"]}, None)],
)
def test_speech_cost_per_character(request_fields: dict[str, Any], expected: float | None) -> None:
    model = unit_entry("audio", "character", 15e-6)
    assert cost_usd(model, SPEECH, None, {"voice": "a", **request_fields}) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (Usage(units=90.0, unit="second"), 0.006 * 1.5),  # verbose_json duration / usage seconds
        (Usage(units=0.0, unit="second"), 0.0),
        (Usage(units=90.0, unit="token"), None),
        (Usage(prompt_tokens=10), None),  # no duration reported (text/srt/vtt formats)
        (None, None),
    ],
)
def test_transcription_cost_per_minute_of_audio(usage: Usage | None, expected: float | None) -> None:
    model = unit_entry("audio", "minute", 0.006)
    assert cost_usd(model, TRANSCRIPTIONS, usage, {"model": "m"}) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("request_fields", "expected"),
    [
        ({}, 0.2),  # the documented 2 s default
        ({"seconds": 5}, 0.5),
        ({"seconds": "8"}, 0.8),  # OpenAI's video API sends a string
        ({"duration": 4}, 0.4),
        ({"seconds": 3, "duration": 9}, 0.3),
        ({"seconds": "long"}, None),
        ({"seconds": -2}, None),
        ({"seconds": 10**400}, None),
    ],
)
def test_video_cost_per_second(request_fields: dict[str, Any], expected: float | None) -> None:
    model = unit_entry("video", "second", 0.1)
    assert cost_usd(model, VIDEOS, None, {"prompt": "p", **request_fields}) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("pricing", "expected"),
    [
        ([{"unit": "Images", "price_usd": 0.04}], 0.04),  # spelling variants of the unit
        ([{"unit": "second", "price_usd": 1}, {"unit": "image", "price_usd": 0.03}], 0.03),
        ([{"unit": "image", "price_usd": "0.04"}, {"unit": "image", "price_usd": 0.05}], 0.05),
        ([{"unit": "image"}], None),
        ([{"unit": "video", "price_usd": 1}], None),
        ([], None),
    ],
)
def test_unit_price(pricing: list[dict[str, Any]], expected: float | None) -> None:
    assert unit_price(entry(category="image", pricing=pricing), "image") == expected


def test_unknown_unit_price_is_none_or_token_fallback() -> None:
    no_price = entry(category="image", input_per_mtok=1.0, output_per_mtok=4.0)
    assert cost_usd(no_price, IMAGES, None, {"n": 1}) is None
    # an image model billed by tokens reports them: priced from the token prices
    assert cost_usd(no_price, IMAGES, Usage(prompt_tokens=100, completion_tokens=1000), {}) == pytest.approx(0.0041)


def test_paths_without_a_price() -> None:
    assert cost_usd(TEXT, VIDEO_JOB.path, Usage(prompt_tokens=1), {}) is None
    assert cost_usd(TEXT, "/v1/unknown", Usage(prompt_tokens=1), {}) is None
    assert set(UNIT_RULES) == {IMAGES, SPEECH, TRANSCRIPTIONS, VIDEOS}


def test_min_and_max_cost_for_token_models() -> None:
    request = {"messages": [], "max_tokens": 1000}
    assert min_cost_usd(TEXT, CHAT, request, 2000) == pytest.approx(2000 * 0.5 / 1e6)
    # max_cost_usd is the most a request can cost (tests/test_type_confusion.py): no window, no bound
    assert max_cost_usd(TEXT, CHAT, request) is None
    assert min_cost_usd(entry(output_per_mtok=1.0), CHAT, request, 10) is None


def test_a_served_request_costs_at_least_min_cost() -> None:
    """The property budget refusal relies on: any completion length costs >= min_cost_usd."""
    lower_bound = 50
    floor = min_cost_usd(TEXT, CHAT, {"max_tokens": 100}, lower_bound)
    assert floor is not None
    for prompt in range(lower_bound, lower_bound + 20):
        for completion in range(101):
            cost = cost_usd(TEXT, CHAT, Usage(prompt_tokens=prompt, completion_tokens=completion), {})
            assert cost is not None
            assert cost >= floor


def test_min_and_max_cost_for_unit_models() -> None:
    images = unit_entry("image", "image", 0.04)
    assert min_cost_usd(images, IMAGES, {"n": 2}, 0) == pytest.approx(0.08)
    assert max_cost_usd(images, IMAGES, {"n": 2}) == pytest.approx(0.08)
    stt = unit_entry("audio", "minute", 0.006)
    assert min_cost_usd(stt, TRANSCRIPTIONS, {}, 0) is None  # the audio length is known afterwards only
    assert max_cost_usd(stt, TRANSCRIPTIONS, {}) is None
