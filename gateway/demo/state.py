"""``DemoState``: everything the demo upstream serves and counts, plus the records it keeps."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from gateway.demo.catalog import default_catalog

MAX_RECORDED_REQUESTS = 200


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the demo upstream received it (header names lowercased)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class VideoJob:
    """An asynchronous video generation job."""

    id: str
    model: str
    prompt: str
    seconds: int
    created: int
    started_at: float  # time.monotonic() at submission
    duration: float  # seconds from queued to completed (DemoState.video_seconds at submission)


def _recorded_requests() -> deque[RecordedRequest]:
    return deque(maxlen=MAX_RECORDED_REQUESTS)


@dataclass
class DemoState:
    """Everything the demo upstream serves and counts; tests read and change it at run time."""

    catalog: list[dict[str, Any]] = field(default_factory=default_catalog)
    token_delay: float = 0.02  # seconds between streamed tokens
    video_seconds: float = 3.0  # queued -> processing -> completed
    catalog_fetches: int = 0
    streams_started: int = 0
    streams_completed: int = 0
    streams_cancelled: int = 0  # the client went away before [DONE]
    requests: deque[RecordedRequest] = field(default_factory=_recorded_requests)
    video_jobs: dict[str, VideoJob] = field(default_factory=dict)
    # Fault switches (gateway.demo.faults): per model, and for GET /api/status.
    faults: dict[str, str] = field(default_factory=dict)  # model -> "500", "503", "429", "midstream"
    delays: dict[str, float] = field(default_factory=dict)  # model -> seconds before answering
    status_health: dict[str, str] = field(default_factory=dict)  # model -> health in /api/status only
    status_fault: str | None = None  # "404", "malformed", "hang"
    status_reads: int = 0
    fault_answers: int = 0  # error answers given by a fault switch (429, 5xx)

    def find_model(self, model_name: str) -> dict[str, Any] | None:
        """The catalog entry whose ``model_name`` is ``model_name``."""
        return next((m for m in self.catalog if m.get("model_name") == model_name), None)
