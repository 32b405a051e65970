"""The endpoint table and the pure admission decision."""

from __future__ import annotations

import dataclasses

import pytest

from gateway import endpoints
from gateway.catalog import admission
from gateway.catalog.entries import ModelEntry, parse_entry
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
    ("text", (), endpoints.CHAT),
    ("code", (), endpoints.CHAT),
    ("reasoning", (), endpoints.CHAT),
    ("multimodal", ("vision",), endpoints.CHAT),
    ("vision", ("vision",), endpoints.CHAT),
    ("embedding", ("embeddings",), endpoints.EMBEDDINGS),
    ("image", (), endpoints.IMAGES),
    ("audio", ("tts",), endpoints.SPEECH),
    ("audio", (), endpoints.SPEECH),
    ("audio", ("audio_transcription",), endpoints.TRANSCRIPTIONS),
    ("video", (), endpoints.VIDEOS),
]


@pytest.mark.parametrize(("category", "supports", "path"), TABLE)
def test_category_to_endpoint_table(category: str, supports: tuple[str, ...], path: str) -> None:
    model = entry(category, supports)
    assert admission.endpoint_for(model) == path
    for other in (endpoints.CHAT, endpoints.EMBEDDINGS, endpoints.IMAGES, endpoints.SPEECH, endpoints.TRANSCRIPTIONS):
        assert admission.fits(model, other) == (other == path)
    # Legacy completions admit exactly the chat categories.
    assert admission.fits(model, endpoints.COMPLETIONS) == (path == endpoints.CHAT)


def test_admit_accepts_a_fitting_healthy_model() -> None:
    admission.admit(entry("text"), endpoints.match("POST", endpoints.CHAT), ROUTABLE, 5)


def test_mismatch_names_the_right_path() -> None:
    with pytest.raises(ModelEndpointMismatch) as caught:
        admission.admit(entry("embedding"), endpoints.match("POST", endpoints.CHAT), ROUTABLE, 5)
    assert "/v1/embeddings" in caught.value.message
    assert (caught.value.status, caught.value.param) == (400, "model")


def test_wrong_endpoint_wins_over_bad_health() -> None:
    with pytest.raises(ModelEndpointMismatch):
        admission.admit(entry("image", health="down"), endpoints.match("POST", endpoints.CHAT), ROUTABLE, 5)


@pytest.mark.parametrize("health", ["unhealthy", "down", "maintenance", "never-seen-before"])
def test_unroutable_health_is_503_with_retry_after(health: str) -> None:
    with pytest.raises(ModelUnavailable) as caught:
        admission.admit(entry("text", health=health), endpoints.match("POST", endpoints.CHAT), ROUTABLE, 7.2)
    assert caught.value.status == 503
    assert health in caught.value.message
    assert (b"retry-after", b"8") in caught.value.headers()


def test_missing_health_is_routable_and_the_routable_set_is_configurable() -> None:
    chat = endpoints.match("POST", endpoints.CHAT)
    admission.admit(entry("text", health=None), chat, ROUTABLE, 1)
    admission.admit(entry("text", health="degraded"), chat, ROUTABLE, 1)
    with pytest.raises(ModelUnavailable):
        admission.admit(entry("text", health="degraded"), chat, ("healthy",), 1)


def test_match_methods_and_paths() -> None:
    assert endpoints.match("GET", "/v1/videos/generations/video_123") is endpoints.VIDEO_JOB
    with pytest.raises(MethodNotAllowed) as caught:
        endpoints.match("GET", endpoints.CHAT)
    assert (b"allow", b"POST") in caught.value.headers()
    with pytest.raises(MethodNotAllowed):
        endpoints.match("POST", "/v1/models")
    with pytest.raises(UnknownPath, match="not supported by the upstream"):
        endpoints.match("POST", "/v1/audio/translations")
    with pytest.raises(UnknownPath, match="Unknown endpoint"):
        endpoints.match("POST", "/v1/chat/completion")
    with pytest.raises(UnknownPath):
        endpoints.match("GET", "/v1/videos/generations/a/b")


def test_endpoints_are_immutable_data() -> None:
    with pytest.raises(TypeError):
        endpoints.ENDPOINTS["/v1/x"] = endpoints.VIDEO_JOB  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        endpoints.VIDEO_JOB.path = "/x"  # type: ignore[misc]
