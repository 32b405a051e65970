"""The endpoint table and the pure admission decision."""

from __future__ import annotations

import dataclasses

import pytest

from gateway import routing
from gateway.entries import ModelEntry, parse_entry
from gateway.errors import MethodNotAllowed, ModelEndpointMismatch, ModelUnavailable, UnknownPath

ROUTABLE = ("healthy", "degraded")


def entry(category: str, supports: tuple[str, ...] = (), health: str | None = "healthy") -> ModelEntry:
    parsed, problem = parse_entry(
        {
            "model_name": f"m-{category}",
            "category": category,
            "supports": list(supports),
            "health_status": health,
        }
    )
    assert parsed is not None, problem
    return parsed


# The model-discovery page's table, as (category, supports) -> endpoint.
TABLE = [
    ("text", (), routing.CHAT),
    ("code", (), routing.CHAT),
    ("reasoning", (), routing.CHAT),
    ("multimodal", ("vision",), routing.CHAT),
    ("vision", ("vision",), routing.CHAT),
    ("embedding", ("embeddings",), routing.EMBEDDINGS),
    ("image", (), routing.IMAGES),
    ("audio", ("tts",), routing.SPEECH),
    ("audio", (), routing.SPEECH),
    ("audio", ("audio_transcription",), routing.TRANSCRIPTIONS),
    ("video", (), routing.VIDEOS),
]


@pytest.mark.parametrize(("category", "supports", "path"), TABLE)
def test_category_to_endpoint_table(category: str, supports: tuple[str, ...], path: str) -> None:
    model = entry(category, supports)
    assert routing.endpoint_for(model) == path
    for other in (routing.CHAT, routing.EMBEDDINGS, routing.IMAGES, routing.SPEECH, routing.TRANSCRIPTIONS):
        assert routing.fits(model, other) == (other == path)
    # Legacy completions admit exactly the chat categories.
    assert routing.fits(model, routing.COMPLETIONS) == (path == routing.CHAT)


def test_admit_accepts_a_fitting_healthy_model() -> None:
    routing.admit(entry("text"), routing.match("POST", routing.CHAT), ROUTABLE, 5)


def test_mismatch_names_the_right_path() -> None:
    with pytest.raises(ModelEndpointMismatch) as caught:
        routing.admit(entry("embedding"), routing.match("POST", routing.CHAT), ROUTABLE, 5)
    assert "/v1/embeddings" in caught.value.message
    assert (caught.value.status, caught.value.param) == (400, "model")


def test_wrong_endpoint_wins_over_bad_health() -> None:
    with pytest.raises(ModelEndpointMismatch):
        routing.admit(entry("image", health="down"), routing.match("POST", routing.CHAT), ROUTABLE, 5)


@pytest.mark.parametrize("health", ["unhealthy", "down", "maintenance", "never-seen-before"])
def test_unroutable_health_is_503_with_retry_after(health: str) -> None:
    with pytest.raises(ModelUnavailable) as caught:
        routing.admit(entry("text", health=health), routing.match("POST", routing.CHAT), ROUTABLE, 7.2)
    assert caught.value.status == 503
    assert health in caught.value.message
    assert (b"retry-after", b"8") in caught.value.headers()


def test_missing_health_is_routable_and_the_routable_set_is_configurable() -> None:
    chat = routing.match("POST", routing.CHAT)
    routing.admit(entry("text", health=None), chat, ROUTABLE, 1)
    routing.admit(entry("text", health="degraded"), chat, ROUTABLE, 1)
    with pytest.raises(ModelUnavailable):
        routing.admit(entry("text", health="degraded"), chat, ("healthy",), 1)


def test_match_methods_and_paths() -> None:
    assert routing.match("GET", "/v1/videos/generations/video_123") is routing.VIDEO_JOB
    with pytest.raises(MethodNotAllowed) as caught:
        routing.match("GET", routing.CHAT)
    assert (b"allow", b"POST") in caught.value.headers()
    with pytest.raises(MethodNotAllowed):
        routing.match("POST", "/v1/models")
    with pytest.raises(UnknownPath, match="not supported by the upstream"):
        routing.match("POST", "/v1/audio/translations")
    with pytest.raises(UnknownPath, match="Unknown endpoint"):
        routing.match("POST", "/v1/chat/completion")
    with pytest.raises(UnknownPath):
        routing.match("GET", "/v1/videos/generations/a/b")


def test_endpoints_are_immutable_data() -> None:
    with pytest.raises(TypeError):
        routing.ENDPOINTS["/v1/x"] = routing.VIDEO_JOB  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        routing.VIDEO_JOB.path = "/x"  # type: ignore[misc]
