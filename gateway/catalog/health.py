"""A model's effective health: the fresher of the catalog's ``health_status`` and /api/status.

The catalog snapshot was fetched at one time, the status reading's health data measured at
another; whichever is more recent decides (a model the status does not list keeps the catalog's
health). ``LiveHealth.effective`` returns the entry itself when the catalog decides (no copy on
the request path) and a copy carrying the status's health otherwise, so every rule that reads
``health_status`` (admission, the health header, /v1/models) sees the effective one. The gateway's
own circuit breakers are the third source; they live above the catalog and are added by the
callers that show health (``gateway.routing.health``).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from gateway.catalog.cache import Catalog
from gateway.catalog.entries import ModelEntry
from gateway.catalog.status import StatusFeed

HealthSource = Literal["catalog", "status"]


class LiveHealth:
    def __init__(self, catalog: Catalog, feed: StatusFeed) -> None:
        self._catalog = catalog
        self._feed = feed
        # model name -> (the catalog entry, the health the status gave it, the copy with that health)
        self._copies: dict[str, tuple[ModelEntry, str, ModelEntry]] = {}

    @property
    def feed(self) -> StatusFeed:
        return self._feed

    def effective(self, entry: ModelEntry) -> ModelEntry:
        """``entry`` with its effective health (the entry itself when the catalog decides)."""
        if self._feed.reading is None:  # no usable status reading: the catalog decides (the common case)
            return entry
        return self.explain(entry)[0]

    def explain(self, entry: ModelEntry) -> tuple[ModelEntry, HealthSource]:
        """``entry`` with its effective health, and which source decided it."""
        reading = self._feed.reading
        if reading is None:
            return entry, "catalog"
        status = reading.models.get(entry.model_name)
        snapshot = self._catalog.snapshot
        if status is None or (snapshot is not None and snapshot.fetched_at > reading.measured_at):
            return entry, "catalog"
        if status == entry.health_status:
            return entry, "status"
        copy = self._copies.get(entry.model_name)
        if copy is None or copy[0] is not entry or copy[1] != status:
            copy = (entry, status, dataclasses.replace(entry, health_status=status))
            self._copies[entry.model_name] = copy  # one per catalog model: bounded by the catalog
        return copy[2], "status"
