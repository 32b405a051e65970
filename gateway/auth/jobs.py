"""Which gateway key created which video job, so that polling a job is held to that key's policy.

``POST /v1/videos/generations`` answers with a job id that the client then polls at
``GET /v1/videos/generations/{id}``. Every job is created with the organisation's one upstream key,
so the upstream cannot tell callers apart: in keys mode the gateway remembers who created each job
and lets only that key (or an admin key) poll it, under the key's policy (model allowlist, rate
limit, budget). The map is in memory, bounded in entries and time (FlexAI keeps jobs 24 h after
completion): a job created before a restart, or on another replica, is unknown here and answered
404 ``job_not_found`` like a job that does not exist.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from cachetools import TTLCache

# Jobs remembered at once, and for how long (a day of generation plus FlexAI's 24 h of retention).
MAX_JOBS: Final = 100_000
JOB_TTL: Final = 48 * 3600.0


@dataclass(frozen=True, slots=True)
class JobOwner:
    key_name: str
    model: str


class JobOwners:
    def __init__(
        self, max_jobs: int = MAX_JOBS, ttl: float = JOB_TTL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._owners: TTLCache[str, JobOwner] = TTLCache(max_jobs, ttl, timer=clock)

    def record(self, job_id: str, key_name: str, model: str) -> None:
        self._owners[job_id] = JobOwner(key_name, model)

    def owner(self, job_id: str) -> JobOwner | None:
        return self._owners.get(job_id)

    def __len__(self) -> int:
        return len(self._owners)


def created_job_id(document: Any) -> str | None:
    """The job id of a video generation answer (``{"id": ..., "status": "queued", ...}``)."""
    if isinstance(document, dict):
        job_id = document.get("id")
        if isinstance(job_id, str) and job_id:
            return job_id
    return None
