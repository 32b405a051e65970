"""Which /v1 paths exist, what body each takes, and the one classification of a path.

The rules are data (``ENDPOINTS``, and the model categories of FlexAI's model-discovery page); the
decisions are pure functions without I/O: ``match`` (path and method -> Endpoint), ``route`` (the
route template a path belongs to, for metrics labels and span names: never an id), ``front``
(which part of the app serves a path), ``upstream_path`` (the path sent upstream). Which category
is called through which endpoint, and whether a model is admitted, is ``gateway.catalog.admission``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from gateway.errors import JobNotFound, MethodNotAllowed, UnknownPath

BodyKind = Literal["json", "multipart", "none"]

CATEGORIES = frozenset({"text", "code", "reasoning", "multimodal", "vision", "embedding", "image", "audio", "video"})
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
# POST /v1/validate/{endpoint}: the dry run of /v1/{endpoint} (never forwarded).
DRY_RUN_PREFIX = "/v1/validate"

Front = Literal["proxy", "dry_run", "local"]


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


def front(path: str) -> Front:
    """Which part of the app serves a path: the proxy (forwarded /v1 paths), the dry run, or the
    gateway's own routes (the model list, health, metrics, admin, and every unknown path)."""
    if not path.startswith("/v1/"):
        return "local"
    if path.startswith(DRY_RUN_PREFIX + "/"):
        return "dry_run"
    if path == MODELS or path.startswith(MODELS + "/"):
        return "local"
    return "proxy"


def dry_run_target(path: str) -> str:
    """The /v1 path a dry-run path stands for (``/v1/validate/chat/completions`` -> ``/v1/chat/completions``)."""
    return "/v1" + path.removeprefix(DRY_RUN_PREFIX)


def route(path: str) -> str | None:
    """The route template of a /v1 path (its dry run's too), for metrics labels and span names,
    which must never carry ids; None for a path that is no route."""
    if path in ENDPOINTS:
        return path
    if path.startswith(DRY_RUN_PREFIX + "/"):
        target = route(dry_run_target(path))
        return None if target is None else DRY_RUN_PREFIX + target.removeprefix("/v1")
    job = path.removeprefix(VIDEO_JOB_PREFIX)
    if job != path and job and "/" not in job:
        return VIDEO_JOB.path
    return None
