"""The TTL-cached catalog: single flight, stale-if-error, early refresh, bounded fetches."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest

from gateway.catalog.cache import Catalog, suggest
from gateway.config import CatalogSettings
from gateway.demo import DemoState, default_catalog
from gateway.errors import CatalogUnavailable, ModelNotFound
from tests.helpers.clocks import FakeClock
from tests.helpers.gateway import CHAT_MODEL, StartGateway


@dataclass
class FakeUpstream:
    """A catalog source whose answers the test scripts: bytes, an exception, or a hang."""

    models: list[dict[str, object]] = field(default_factory=default_catalog)
    fail: Exception | None = None
    hang: bool = False
    calls: int = 0
    gate: asyncio.Event | None = None

    async def fetch(self) -> bytes:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.hang:
            await asyncio.sleep(3600)
        if self.fail is not None:
            raise self.fail
        return orjson.dumps(self.models)


def make_catalog(upstream: FakeUpstream, clock: FakeClock, **overrides: float) -> Catalog:
    values: dict[str, Any] = {
        "ttl": 60.0,
        "fetch_timeout": 0.2,
        "max_staleness": 600.0,
        "unknown_model_refresh_interval": 5.0,
    }
    settings = dataclasses.replace(CatalogSettings(), **(values | overrides))
    return Catalog(upstream.fetch, settings, clock=clock)


async def test_first_load_and_lookup() -> None:
    upstream, clock = FakeUpstream(), FakeClock()
    catalog = make_catalog(upstream, clock)
    entry = await catalog.lookup(CHAT_MODEL)
    assert entry.category == "text"
    assert "tool_use" in entry.supports
    assert upstream.calls == 1
    await catalog.lookup(CHAT_MODEL)
    assert upstream.calls == 1  # served from the cache while fresh


async def test_one_fetch_for_100_concurrent_lookups_at_expiry() -> None:
    upstream, clock = FakeUpstream(), FakeClock()
    catalog = make_catalog(upstream, clock)
    await catalog.current()
    clock.now += 61  # expired
    upstream.gate = asyncio.Event()  # hold the refresh so all 100 arrive while it is in flight
    results = await asyncio.gather(*(catalog.lookup(CHAT_MODEL) for _ in range(100)))
    assert all(r.model_name == CHAT_MODEL for r in results)  # answered from the stale copy at once
    upstream.gate.set()
    await _settle()
    assert upstream.calls == 2  # the first load plus exactly one refresh
    assert catalog.age() == 0


async def test_one_fetch_for_100_concurrent_first_loads() -> None:
    gate = asyncio.Event()
    upstream, clock = FakeUpstream(gate=gate), FakeClock()
    catalog = make_catalog(upstream, clock)
    waiting = [asyncio.ensure_future(catalog.lookup(CHAT_MODEL)) for _ in range(100)]
    await asyncio.sleep(0)
    gate.set()
    assert len(await asyncio.gather(*waiting)) == 100
    assert upstream.calls == 1


async def test_stale_if_error_then_backoff_then_recovery(caplog: pytest.LogCaptureFixture) -> None:
    upstream, clock = FakeUpstream(), FakeClock()
    catalog = make_catalog(upstream, clock)
    await catalog.current()
    clock.now += 61
    upstream.fail = RuntimeError("HTTP 500")
    with caplog.at_level(logging.WARNING, logger="gateway.catalog.cache"):
        assert (await catalog.lookup(CHAT_MODEL)).model_name == CHAT_MODEL  # stale copy keeps serving
        await _settle()
    assert upstream.calls == 2
    assert catalog.refresh_failures == 1
    assert "refresh failed (HTTP 500)" in caplog.text
    # Backoff: no new attempt for a while, however many requests arrive.
    for _ in range(20):
        await catalog.lookup(CHAT_MODEL)
    await _settle()
    assert upstream.calls == 2
    clock.now += 1.5  # past the first backoff step (1 s)
    upstream.fail = None
    await catalog.lookup(CHAT_MODEL)
    await _settle()
    assert upstream.calls == 3
    assert catalog.refresh_failures == 1
    assert catalog.age() == 0


async def test_stale_copy_is_dropped_past_max_staleness() -> None:
    upstream, clock = FakeUpstream(), FakeClock()
    catalog = make_catalog(upstream, clock, max_staleness=100.0)
    await catalog.current()
    upstream.fail = RuntimeError("down")
    clock.now += 60 + 101
    with pytest.raises(CatalogUnavailable) as caught:
        await catalog.lookup(CHAT_MODEL)
    assert caught.value.status == 503
    assert caught.value.retry_after is not None
    assert "down" in caught.value.message


@pytest.mark.parametrize(
    "failure",
    [RuntimeError("connection refused"), None],
    ids=["error", "malformed-json"],
)
async def test_no_catalog_ever_loaded_is_a_503(failure: Exception | None) -> None:
    upstream, clock = FakeUpstream(fail=failure), FakeClock()
    if failure is None:
        upstream.models = "not json"  # type: ignore[assignment]
        upstream.fetch = _returning(b"{not json")  # type: ignore[method-assign]
    catalog = make_catalog(upstream, clock)
    with pytest.raises(CatalogUnavailable):
        await catalog.lookup(CHAT_MODEL)
    assert not catalog.loaded


async def test_hanging_fetch_is_bounded_by_fetch_timeout() -> None:
    upstream, clock = FakeUpstream(), FakeClock()
    catalog = make_catalog(upstream, clock, fetch_timeout=0.05)
    await catalog.current()
    clock.now += 61
    upstream.hang = True
    # A stale copy exists: the request is answered at once, the hanging refresh times out on its own.
    assert (await asyncio.wait_for(catalog.lookup(CHAT_MODEL), 1.0)).model_name == CHAT_MODEL
    await asyncio.sleep(0.2)
    assert catalog.last_error == "timed out"
    # With no copy at all, the caller waits at most fetch_timeout.
    empty = make_catalog(FakeUpstream(hang=True), FakeClock(), fetch_timeout=0.05)
    with pytest.raises(CatalogUnavailable):
        await asyncio.wait_for(empty.lookup(CHAT_MODEL), 1.0)


async def test_unknown_model_triggers_one_early_refresh_per_interval() -> None:
    upstream, clock = FakeUpstream(), FakeClock()
    catalog = make_catalog(upstream, clock)
    await catalog.current()
    clock.now += 10
    upstream.models = [*default_catalog(), {**default_catalog()[0], "model_name": "Brand-New-Model"}]
    assert (await catalog.lookup("Brand-New-Model")).model_name == "Brand-New-Model"
    assert upstream.calls == 2  # found after one early refresh, long before the TTL
    for name in ("nope-1", "nope-2", "nope-3"):  # a flood of unknown names
        with pytest.raises(ModelNotFound):
            await catalog.lookup(name)
    assert upstream.calls == 2  # within the interval: no more fetches
    clock.now += 5
    with pytest.raises(ModelNotFound):
        await catalog.lookup("nope-4")
    assert upstream.calls == 3


async def test_malformed_entries_are_skipped_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    good = default_catalog()[0]
    models: list[object] = [
        good,
        {**good, "model_name": "null-supports", "supports": None},
        {**good, "model_name": "extra-fields", "brand_new_field": {"x": 1}},
        {**good, "model_name": "no-health", "health_status": None},
        {"category": "text"},  # no model_name
        {**good, "model_name": "odd-category", "category": "hologram"},
        {**good, "model_name": 42},
        "not an object",
        {**good},  # duplicate name
    ]
    upstream = FakeUpstream(models=models)  # type: ignore[arg-type]
    catalog = make_catalog(upstream, FakeClock())
    with caplog.at_level(logging.WARNING, logger="gateway.catalog.cache"):
        snapshot = await catalog.current()
    assert sorted(snapshot.entries) == sorted([good["model_name"], "null-supports", "extra-fields", "no-health"])
    assert snapshot.entries["null-supports"].supports == frozenset()
    assert snapshot.entries["no-health"].health_status is None
    assert len(snapshot.skipped) == 5
    assert "skipped 5 unusable entries" in caplog.text


def test_suggestions_prefer_case_and_slug_matches() -> None:
    snapshot = asyncio.run(make_catalog(FakeUpstream(), FakeClock()).current())
    assert suggest(CHAT_MODEL.lower(), snapshot) == [CHAT_MODEL]
    slug = next(e.slug for e in snapshot.entries.values() if e.model_name == CHAT_MODEL)
    assert slug is not None
    assert suggest(slug, snapshot) == [CHAT_MODEL]
    assert CHAT_MODEL in suggest("Qwen2.5-32B-Instruct", snapshot)
    assert suggest("zzzzzzzz", snapshot) == []


def test_end_to_end_100_concurrent_requests_at_expiry_make_one_upstream_fetch(
    start_gateway: StartGateway, demo_state: DemoState
) -> None:
    # The TTL must outlast the burst below, or a second expiry would rightly cause a second fetch.
    gateway = start_gateway({"GATEWAY_CATALOG_TTL": "1.5"})
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        before = demo_state.catalog_fetches
        assert before >= 1
        time.sleep(1.6)  # let the TTL lapse

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
            answers = await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(100)))
        return [a.status_code for a in answers]

    statuses = asyncio.run(burst())
    assert statuses == [200] * 100
    assert demo_state.catalog_fetches == before + 1


async def _settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def _returning(body: bytes):  # type: ignore[no-untyped-def]
    async def fetch() -> bytes:
        return body

    return fetch
