"""Whether a catalog model may serve a request on an endpoint: the category -> endpoint table of
FlexAI's model-discovery page, and health (pure functions, no I/O).

``admit`` (catalog entry + endpoint -> ok, or the error to answer). When a model is both on the
wrong endpoint and unhealthy, the wrong endpoint is reported: the caller's mistake is permanent,
the health is not.
"""

from __future__ import annotations

from collections.abc import Collection

from gateway.catalog.entries import ModelEntry
from gateway.endpoints import (
    CHAT,
    CHAT_CATEGORIES,
    COMPLETIONS,
    EMBEDDINGS,
    IMAGES,
    SPEECH,
    STT_TAG,
    TRANSCRIPTIONS,
    VIDEOS,
    Endpoint,
)
from gateway.errors import ModelEndpointMismatch, ModelUnavailable


def endpoint_for(entry: ModelEntry) -> str:
    """The path a model is called through (the model-discovery page's table)."""
    category = entry.category
    if category in CHAT_CATEGORIES:
        return CHAT
    if category == "embedding":
        return EMBEDDINGS
    if category == "image":
        return IMAGES
    if category == "audio":
        return TRANSCRIPTIONS if STT_TAG in entry.supports else SPEECH
    return VIDEOS


def fits(entry: ModelEntry, path: str) -> bool:
    """Whether the model's category is called through this endpoint."""
    home = endpoint_for(entry)
    return home == path or (path == COMPLETIONS and home == CHAT)


def is_routable(entry: ModelEntry, routable_health: Collection[str]) -> bool:
    # No health_status at all: the upstream gives no health for it, so do not block it.
    return entry.health_status is None or entry.health_status in routable_health


def admit(entry: ModelEntry, endpoint: Endpoint, routable_health: Collection[str], retry_after: float) -> None:
    """Raise the error to answer when this model cannot serve this endpoint now.

    The wrong endpoint wins over bad health: the caller's mistake is permanent, the health is not.
    """
    if not fits(entry, endpoint.path):
        home = endpoint_for(entry)
        raise ModelEndpointMismatch(
            f"Model {entry.model_name!r} ({_describe(entry)}) is called through POST {home}, not {endpoint.path}.",
            param="model",
        )
    if not is_routable(entry, routable_health):
        raise ModelUnavailable(
            f"Model {entry.model_name!r} is not available right now: its health status is "
            f"{entry.health_status!r}. Retry later or choose another model (GET /v1/models lists the "
            "available ones).",
            param="model",
            retry_after=retry_after,
        )


def _describe(entry: ModelEntry) -> str:
    if entry.category == "audio":
        return "category audio, speech-to-text" if STT_TAG in entry.supports else "category audio, text-to-speech"
    return f"category {entry.category}"
