"""Asynchronous video jobs: ``POST /v1/videos/generations`` queues one, ``GET
/v1/videos/generations/{id}`` reports it queued, processing, then completed with a stub MP4."""

from __future__ import annotations

import base64
import math
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gateway.demo.common import (
    UpstreamError,
    int_field,
    json_body,
    json_response,
    new_id,
    resolve_model,
    text_field,
    unix_time,
)
from gateway.demo.state import DemoState, VideoJob

# An ISO base media "ftyp" box: enough for `file` to say MP4, not a playable clip.
VIDEO_STUB_BYTES = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"


def _is_video(model: dict[str, Any]) -> bool:
    return model.get("category") == "video"


def _video_status(job: VideoJob) -> str:
    elapsed = time.monotonic() - job.started_at
    if elapsed >= job.duration:
        return "completed"
    return "queued" if elapsed < job.duration / 3 else "processing"


def _video_object(job: VideoJob) -> dict[str, Any]:
    status = _video_status(job)
    progress = {"queued": 0, "processing": 50, "completed": 100}[status]
    video: dict[str, Any] = {
        "id": job.id,
        "object": "video.generation",
        "status": status,
        "created": job.created,
        "model": job.model,
        "seconds": job.seconds,
        "progress": progress,
    }
    if status == "completed":
        video["completed_at"] = job.created + math.ceil(job.duration)
        video["data"] = [{"b64_json": base64.b64encode(VIDEO_STUB_BYTES).decode()}]
    return video


async def create_video(state: DemoState, request: Request) -> Response:
    body = await json_body(request)
    model = resolve_model(state, body.get("model"), "/v1/videos/generations", _is_video)
    prompt = text_field(body, "prompt")
    # OpenAI's video API spells seconds as a string ("4"); a number is accepted too.
    spelled = {k: int(v) if isinstance(v, str) and v.isdigit() and len(v) < 4 else v for k, v in body.items()}
    seconds = int_field(spelled, "seconds", int_field(spelled, "duration", 2, 1, 60), 1, 60)
    job = VideoJob(
        id=new_id("video_"),
        model=model["model_name"],
        prompt=prompt,
        seconds=seconds,
        created=unix_time(),
        started_at=time.monotonic(),
        duration=max(0.0, state.video_seconds),
    )
    state.video_jobs[job.id] = job
    return json_response(
        {
            "id": job.id,
            "object": "video.generation",
            "status": "queued",
            "created": job.created,
            "model": job.model,
        }
    )


async def get_video(state: DemoState, request: Request) -> Response:
    job = state.video_jobs.get(request.path_params["job_id"])
    if job is None:
        raise UpstreamError(404, f"No video job '{request.path_params['job_id']}'", code="job_not_found")
    return json_response(_video_object(job))
