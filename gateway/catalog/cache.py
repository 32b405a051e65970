"""The TTL-cached copy of the upstream's model catalog.

- A snapshot is fresh for ``ttl`` seconds after it was fetched. (Told by its ``fetched_at``: a
  cachetools TTLCache of one item cost ~11 Python calls on every request.) When it expires, the
  stale snapshot keeps answering while exactly one refresh runs in the background; callers never
  wait for a refresh unless there is no usable snapshot at all.
- Stale-if-error: a failed refresh (connection error, non-2xx, malformed JSON, timeout) keeps the last
  good snapshot serving for up to ``max_staleness`` past its TTL and retries with exponential backoff.
- Until a first snapshot is loaded, the catalog retries on its own at that backoff (no request need
  come to start a refresh), so readiness probes only read its state.
- A model missing from the snapshot triggers at most one early refresh per
  ``unknown_model_refresh_interval`` seconds, so new models appear without waiting a TTL and a flood
  of unknown names does not hammer the upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import orjson

from gateway.catalog.entries import ModelEntry, parse_catalog
from gateway.config import CatalogSettings
from gateway.errors import CatalogUnavailable, ModelNotFound

logger = logging.getLogger("gateway.catalog.cache")

Fetch = Callable[[], Awaitable[bytes]]


@dataclass(frozen=True, slots=True)
class Snapshot:
    entries: Mapping[str, ModelEntry]
    raw: bytes  # the body exactly as the upstream sent it (served again on GET /api/models)
    skipped: tuple[str, ...]
    fetched_at: float  # on the catalog's clock
    lowercase: Mapping[str, str] = field(default_factory=dict)  # lowercased name or slug -> model_name


class Catalog:
    def __init__(self, fetch: Fetch, settings: CatalogSettings, clock: Callable[[], float] = time.monotonic):
        self._fetch = fetch
        self._settings = settings
        self._clock = clock
        self._last: Snapshot | None = None
        self._refresh_task: asyncio.Task[Snapshot] | None = None
        self._failures = 0
        self._retry_at = 0.0  # no refresh attempt before this (backoff after failures)
        self._last_attempt = float("-inf")
        self._retry_timer: asyncio.TimerHandle | None = None  # the next attempt while nothing is loaded
        self._closed = False
        self.refreshes = 0
        self.refresh_failures = 0
        self.last_error: str | None = None  # why the latest refresh failed; None once one succeeds
        self.last_failure: str | None = None  # why the latest failed refresh failed, kept after recovery
        self._last_failure_at: float | None = None  # when, on the catalog's clock

    # --- state -------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._last is not None

    @property
    def snapshot(self) -> Snapshot | None:
        """The last good snapshot, fresh or not (never waits)."""
        return self._last

    def last_failure_age(self) -> float | None:
        """Seconds since the latest failed refresh (None: none failed yet)."""
        return None if self._last_failure_at is None else self._clock() - self._last_failure_at

    def age(self) -> float | None:
        return None if self._last is None else self._clock() - self._last.fetched_at

    def seconds_until_refresh(self) -> float:
        """When the catalog (and so a model's health) may next change, for Retry-After."""
        age = self.age()
        until_expiry = self._settings.ttl - age if age is not None else 0.0
        return max(1.0, until_expiry, self._retry_at - self._clock())

    # --- reads -------------------------------------------------------------------------------

    async def current(self) -> Snapshot:
        """A usable snapshot: fresh, or stale within bounds while a refresh runs in the background."""
        last = self._last
        if last is not None:
            now = self._clock()
            if now <= last.fetched_at + self._settings.ttl:  # fresh
                return last
            if now - last.fetched_at <= self._settings.ttl + self._settings.max_staleness:
                self._start_refresh()
                return last
        return await self._refresh_and_wait()

    async def lookup(self, name: str) -> ModelEntry:
        """The entry for ``name``, refreshing early once if it is unknown; else ModelNotFound."""
        snapshot = await self.current()
        entry = snapshot.entries.get(name)
        if entry is None and self._early_refresh_allowed():
            with contextlib.suppress(CatalogUnavailable):  # keep answering from the snapshot we have
                snapshot = await self._refresh_and_wait()
            entry = snapshot.entries.get(name)
        if entry is None:
            raise ModelNotFound(_not_found_message(name, snapshot), param="model")
        return entry

    # --- refresh -----------------------------------------------------------------------------

    def start(self) -> None:
        """Begin loading in the background (called at start-up)."""
        self._start_refresh()

    async def aclose(self) -> None:
        self._closed = True
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        task = self._refresh_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _early_refresh_allowed(self) -> bool:
        return self._clock() - self._last_attempt >= self._settings.unknown_model_refresh_interval

    def _start_refresh(self) -> asyncio.Task[Snapshot] | None:
        """The refresh in flight, or a new one; None while backing off after failures."""
        if self._refresh_task is not None:
            return self._refresh_task
        if self._clock() < self._retry_at:
            return None
        self._last_attempt = self._clock()
        task = asyncio.get_running_loop().create_task(self._refresh(), name="catalog-refresh")
        task.add_done_callback(_consume_exception)
        self._refresh_task = task
        return task

    def _retry_later(self, delay: float) -> None:
        """Nothing is loaded, so no request may come to start a refresh: try again in ``delay`` seconds."""
        if self._closed:
            return
        if self._retry_timer is not None:
            self._retry_timer.cancel()
        self._retry_timer = asyncio.get_running_loop().call_later(delay, self._retry)

    def _retry(self) -> None:
        self._retry_timer = None
        if self._last is not None or self._closed:
            return
        if self._start_refresh() is None:  # still backing off by the catalog's own clock
            self._retry_later(max(0.1, self._retry_at - self._clock()))

    async def _refresh_and_wait(self) -> Snapshot:
        task = self._start_refresh()
        if task is not None:
            try:
                # shield: a caller that goes away must not cancel the refresh others wait for.
                return await asyncio.shield(task)
            except Exception:  # noqa: S110 - the refresh logged it; fall back below
                pass
        if self._last is not None and self._clock() - self._last.fetched_at <= (
            self._settings.ttl + self._settings.max_staleness
        ):
            return self._last
        raise CatalogUnavailable(
            "The model catalog is not available yet (the upstream's /api/models could not be loaded"
            + (f": {self.last_error}" if self.last_error else "")
            + "). Retry shortly.",
            retry_after=max(1.0, self._retry_at - self._clock()),
        )

    async def _refresh(self) -> Snapshot:
        try:
            async with asyncio.timeout(self._settings.fetch_timeout):
                body = await self._fetch()
            parsed = parse_catalog(orjson.loads(body))
        except Exception as exc:
            self._record_failure(exc)
            raise
        finally:
            self._refresh_task = None
        lowercase: dict[str, str] = {}
        for entry in parsed.entries:
            if entry.slug:
                lowercase.setdefault(entry.slug.lower(), entry.model_name)
            lowercase[entry.model_name.lower()] = entry.model_name
        snapshot = Snapshot(
            entries={e.model_name: e for e in parsed.entries},
            raw=body,
            skipped=parsed.skipped,
            fetched_at=self._clock(),
            lowercase=lowercase,
        )
        if parsed.skipped:
            logger.warning(
                "catalog: skipped %d unusable entries: %s",
                len(parsed.skipped),
                "; ".join(parsed.skipped[:10]),
            )
        self._last = snapshot
        self._failures = 0
        self._retry_at = 0.0
        self.last_error = None
        self.refreshes += 1
        logger.info("catalog: loaded %d models", len(snapshot.entries))
        return snapshot

    def _record_failure(self, exc: BaseException) -> None:
        self._failures += 1
        self.refresh_failures += 1
        delay = min(self._settings.refresh_backoff_max, 2.0 ** (self._failures - 1))
        self._retry_at = self._clock() + delay
        reason = "timed out" if isinstance(exc, TimeoutError) else (str(exc) or type(exc).__name__)
        self.last_error = self.last_failure = reason[:200]
        self._last_failure_at = self._clock()
        age = self.age()
        logger.warning(
            "catalog: refresh failed (%s); next attempt in %.0fs; %s",
            self.last_error,
            delay,
            f"serving the catalog loaded {age:.0f}s ago" if age is not None else "no catalog loaded yet",
        )
        if self._last is None:
            self._retry_later(delay)


def _consume_exception(task: asyncio.Task[Snapshot]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: the failure was logged by _record_failure


def _not_found_message(name: str, snapshot: Snapshot) -> str:
    message = f"The model {name!r} does not exist in the upstream's catalog."
    suggestions = suggest(name, snapshot)
    if suggestions:
        message += " Did you mean " + " or ".join(repr(s) for s in suggestions) + "?"
    return message


def suggest(name: str, snapshot: Snapshot, limit: int = 3) -> list[str]:
    """Close model names: a case-insensitive or slug match first, then similar spellings."""
    key = name.lower()
    exact = snapshot.lowercase.get(key)
    if exact is not None:
        return [exact]  # the same name in another case, or the model's slug
    found: list[str] = []
    for close in difflib.get_close_matches(key, list(snapshot.lowercase), n=limit + 1, cutoff=0.6):
        candidate = snapshot.lowercase[close]
        if candidate not in found:
            found.append(candidate)
    return found[:limit]
