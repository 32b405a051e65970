"""Which /v1 paths exist, what body each takes, and which model categories each admits.

The rules are data (``ENDPOINTS``, the category -> endpoint table of FlexAI's model-discovery
page); the decisions are pure functions without I/O: ``match`` (path and method -> Endpoint) and
``admit`` (catalog entry + endpoint -> ok, or the error to answer).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from gateway.entries import ModelEntry
from gateway.errors import JobNotFound, MethodNotAllowed, ModelEndpointMismatch, ModelUnavailable, UnknownPath

BodyKind = Literal["json", "multipart", "none"]

CHAT_CATEGORIES = frozenset({"text", "code", "reasoning", "multimodal", "vision"})
STT_TAG = "audio_transcription"

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
IMAGES = "/v1/images/generations"
SPEECH = "/v1/audio/speech"
TRANSCRIPTIONS = "/v1/audio/transcriptions"
VIDEOS = "/v1/videos/generations"
VIDEO_JOB_PREFIX = VIDEOS + "/"
MODELS = "/v1/models"


@dataclass(frozen=True, slots=True)
class Endpoint:
    path: str
    methods: frozenset[str]
    body: BodyKind
    # True when the request names a model that must be admitted before forwarding.
    needs_model: bool = True
    # Served by the gateway itself (never forwarded).
    local: bool = False


ENDPOINTS: Mapping[str, Endpoint] = MappingProxyType(
    {
        e.path: e
        for e in (
            Endpoint(CHAT, frozenset({"POST"}), "json"),
            Endpoint(COMPLETIONS, frozenset({"POST"}), "json"),
            Endpoint(EMBEDDINGS, frozenset({"POST"}), "json"),
            Endpoint(IMAGES, frozenset({"POST"}), "json"),
            Endpoint(SPEECH, frozenset({"POST"}), "json"),
            Endpoint(TRANSCRIPTIONS, frozenset({"POST"}), "multipart"),
            Endpoint(VIDEOS, frozenset({"POST"}), "json"),
            Endpoint(MODELS, frozenset({"GET"}), "none", needs_model=False, local=True),
        )
    }
)
# GET /v1/videos/generations/{id}: polling a job is relayed as it is (no model in the request).
VIDEO_JOB = Endpoint(VIDEO_JOB_PREFIX + "{id}", frozenset({"GET"}), "none", needs_model=False)
# What a job id may look like: one path segment of token characters, never "." or "..".
_JOB_ID = re.compile(r"(?!\.{1,2}\Z)[A-Za-z0-9._:\-]{1,256}")
MODEL_RETRIEVE = Endpoint(MODELS + "/{model}", frozenset({"GET"}), "none", needs_model=False, local=True)

# OpenAI paths that FlexAI does not serve: answered 404 locally with a message that says so.
UNSUPPORTED_UPSTREAM = (
    "/v1/audio/translations",
    "/v1/images/edits",
    "/v1/images/variations",
    "/v1/files",
    "/v1/uploads",
    "/v1/batches",
    "/v1/fine_tuning",
    "/v1/assistants",
    "/v1/threads",
    "/v1/vector_stores",
    "/v1/responses",
    "/v1/moderations",
    "/v1/realtime",
)


def match(method: str, path: str) -> Endpoint:
    """The endpoint for a /v1 request, or UnknownPath (404) / MethodNotAllowed (405)."""
    endpoint = ENDPOINTS.get(path)
    if endpoint is None:
        endpoint = _match_prefixed(path)
    if endpoint.methods and method not in endpoint.methods:
        allowed = ", ".join(sorted(endpoint.methods))
        raise MethodNotAllowed(
            f"{method} is not allowed on {path}; use {allowed}.",
            headers=[(b"allow", allowed.encode())],
        )
    return endpoint


def job_id(path: str) -> str:
    """The job id of a ``GET /v1/videos/generations/{id}`` path, or JobNotFound (404) for one that
    cannot be a job id (so that nothing but a plain id is ever put in the path sent upstream)."""
    candidate = path.removeprefix(VIDEO_JOB_PREFIX)
    if not _JOB_ID.fullmatch(candidate):
        raise JobNotFound(f"No video job with id {candidate[:64]!r}.", param="id")
    return candidate


def upstream_path(endpoint: Endpoint, path: str) -> str:
    """The path to send upstream, built from what was matched (never the client's raw path)."""
    return VIDEO_JOB_PREFIX + job_id(path) if endpoint is VIDEO_JOB else endpoint.path


def _match_prefixed(path: str) -> Endpoint:
    job = path.removeprefix(VIDEO_JOB_PREFIX) if path.startswith(VIDEO_JOB_PREFIX) else ""
    if job and "/" not in job:
        job_id(path)  # refuses what cannot be a job id ("..", odd characters)
        return VIDEO_JOB
    if path.startswith(MODELS + "/") and len(path) > len(MODELS) + 1:
        return MODEL_RETRIEVE
    for unsupported in UNSUPPORTED_UPSTREAM:
        if path == unsupported or path.startswith(unsupported + "/"):
            raise UnknownPath(
                f"{unsupported} is not supported by the upstream (FlexAI). Supported endpoints: "
                f"{', '.join(p for p, e in ENDPOINTS.items() if not e.local)}."
            )
    raise UnknownPath(f"Unknown endpoint {path}. Supported endpoints: {', '.join(ENDPOINTS)}.")


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
