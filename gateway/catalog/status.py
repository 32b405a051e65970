"""Live health: the upstream's public ``GET /api/status``, read on its own short interval.

The catalog's ``health_status`` changes only when the catalog is reloaded (``[catalog] ttl``);
``/api/status`` says the same per model, measured more often (it is served with ``max-age=10``).
``StatusFeed`` reads it in one background task, so there is never more than one read in flight and
no request ever waits for one; a read that fails (connection, 5xx, timeout) is retried later,
backing off from ``status_interval`` up to ``refresh_backoff_max``. A reading is used while its
health data is younger than ``status_max_age`` (its age is ``health_data_age_seconds`` at the time
of the read plus the time since); older, it is ignored and the catalog's health stands alone.

An endpoint that is missing (404) or answers something that is not a status document turns the
feed off for the process, with one log line: the gateway then works from the catalog alone.

The document (FlexAI's notes): ``{"status", "components", "models": [{"name", "status",
"last_checked_at", "error"}], "incidents", "generated_at", "health_data_age_seconds"}``. A model's
``status`` is lowercased; ``ok``, ``up`` and ``operational`` mean ``healthy``; ``unknown`` (or no
status) says nothing and is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from gateway.config import CatalogSettings
from gateway.errors import UpstreamError
from gateway.jsonvalues import as_number

logger = logging.getLogger("gateway.catalog.status")

Fetch = Callable[[], Awaitable[bytes]]
FeedState = Literal["off", "waiting", "live", "failing", "disabled"]
STATUS_PATH = "/api/status"

_HEALTHY_WORDS = frozenset({"ok", "up", "operational", "healthy"})
_NO_INFORMATION = frozenset({"", "unknown"})


class StatusFormatError(ValueError):
    """The body is not a status document."""


@dataclass(frozen=True, slots=True)
class StatusReading:
    """One read of /api/status: each model's health, and when it was measured."""

    models: Mapping[str, str]  # model name -> health status (lowercased, "healthy" for ok/up)
    measured_at: float  # on the feed's clock: the read's time minus health_data_age_seconds
    overall: str | None


def parse_status(data: Any, now: float) -> StatusReading:
    """The reading of a decoded /api/status body read at ``now``; StatusFormatError when it is none."""
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise StatusFormatError("expected a JSON object with a `models` array")
    models: dict[str, str] = {}
    for item in data["models"]:
        if not isinstance(item, dict):
            continue
        name, status = item.get("name"), item.get("status")
        if not isinstance(name, str) or not name or not isinstance(status, str):
            continue
        word = status.strip().lower()
        if word in _NO_INFORMATION:
            continue
        models[name] = "healthy" if word in _HEALTHY_WORDS else word
    age = as_number(data.get("health_data_age_seconds"))
    overall = data.get("status")
    return StatusReading(
        models=models,
        measured_at=now - (age if age is not None and age >= 0 else 0.0),
        overall=overall.lower() if isinstance(overall, str) else None,
    )


class StatusFeed:
    def __init__(self, fetch: Fetch, settings: CatalogSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch
        self._settings = settings
        self._clock = clock
        self._reading: StatusReading | None = None
        self._task: asyncio.Task[None] | None = None
        self.state: FeedState = "off" if settings.status_interval == 0 else "waiting"
        self.reads = 0
        self.read_failures = 0
        self.last_error: str | None = None

    @property
    def reading(self) -> StatusReading | None:
        """The last reading while its health data is young enough to use (never waits)."""
        reading = self._reading
        if reading is None or self._clock() - reading.measured_at > self._settings.status_max_age:
            return None
        return reading

    def age(self) -> float | None:
        """Seconds since the last reading's health data was measured."""
        return None if self._reading is None else self._clock() - self._reading.measured_at

    def start(self) -> None:
        if self.state != "off" and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="status-feed")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        interval = self._settings.status_interval
        failures = 0
        while True:
            try:
                async with asyncio.timeout(self._settings.fetch_timeout):
                    body = await self._fetch()
                self._reading = parse_status(orjson.loads(body), self._clock())
            except UpstreamError as exc:
                if exc.upstream_status == 404:
                    self._disable("the upstream has no GET /api/status (HTTP 404)")
                    return
                failures += 1
                self._failed(exc.message, failures)
            except (orjson.JSONDecodeError, StatusFormatError) as exc:
                self._disable(f"GET /api/status answered something that is not a status document ({exc})")
                return
            except Exception as exc:  # a timeout, or anything else: try again later
                failures += 1
                self._failed("timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__,
                             failures)  # fmt: skip
            else:
                if failures:
                    logger.info("status: GET /api/status answers again")
                failures = 0
                self.reads += 1
                self.state = "live"
                self.last_error = None
            backoff = max(interval, self._settings.refresh_backoff_max)
            await asyncio.sleep(min(backoff, interval * 2.0**failures))

    def _failed(self, reason: str, failures: int) -> None:
        self.read_failures += 1
        self.last_error = reason[:200]
        self.state = "failing"
        if failures == 1:  # one line when it starts failing, one when it recovers: no flood
            logger.warning("status: reading GET /api/status failed (%s); live health uses the catalog's meanwhile",
                           self.last_error)  # fmt: skip

    def _disable(self, reason: str) -> None:
        self.state = "disabled"
        self.last_error = reason[:200]
        self._reading = None
        logger.warning("status: live health is off: %s; model health comes from the catalog only", reason)
