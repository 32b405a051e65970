"""Everything the request path needs, built complete in one async context manager.

``open_services(settings)`` opens the upstream client, starts the catalog's background refresh,
opens the usage ledger, builds the limits, budgets and accounting, starts tracing and, in keys
mode with a config file, the key reloader; it yields one ``Services`` whose every attribute is set,
and closes all of it, in reverse order, on the way out (the ledger writes what is still queued,
tracing exports what it holds, the access log's buffered lines are written last). Nothing is
bound later: a part that needs a service is built with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from gateway.accounting import Accounting
from gateway.auth.jobs import JobOwners
from gateway.auth.keys import KeyRing
from gateway.auth.reload import KeyReloader
from gateway.cache.redis_tier import RedisTier
from gateway.cache.responses import ResponseCache
from gateway.catalog.admission import is_routable
from gateway.catalog.cache import Catalog
from gateway.catalog.health import LiveHealth
from gateway.catalog.status import STATUS_PATH, StatusFeed
from gateway.config import POSTGRES_INSTALL, Settings, SettingsError, UpstreamSettings
from gateway.exchange import Exchange
from gateway.ops.drain import Drain
from gateway.ops.json_log import flush as flush_logs
from gateway.ops.metrics import Metrics
from gateway.ops.metrics import Snapshot as MetricsSnapshot
from gateway.ops.refusals import RecentRefusals
from gateway.routing.health import CIRCUIT_OPEN, shown_health
from gateway.routing.latency import Latencies
from gateway.routing.route import Router
from gateway.state.budgets import Budgets
from gateway.state.limits import RateLimiter
from gateway.state.redis_client import redis_client
from gateway.state.shaping import UpstreamShaper
from gateway.state.shared import open_shared_store
from gateway.state.store import LocalStore, StateStore
from gateway.upstream.aiohttp_client import AiohttpUpstream
from gateway.upstream.base import HttpxUpstream, Upstream
from gateway.upstream.breaker import Breakers
from gateway.upstream.builtin_client import BuiltinUpstream
from gateway.usage.ledger import Ledger
from gateway.usage.report_source import SqliteReports, UsageReports
from gateway.usage.rollups import RollupKeeper

if TYPE_CHECKING:
    from gateway.ops.spans import Tracing
    from gateway.usage.postgres.ledger import PostgresLedger

# Totals by key, team, model or day (``gateway.usage.reports.summarize``'s rows) for GET /admin/usage.
UsageSummary = Callable[[Any, str | None, date | None], Awaitable[list[dict[str, Any]]]]

CATALOG_PATH = "/api/models"


@dataclass(slots=True, eq=False)
class Services:
    """The gateway's running parts, all set (see ``open_services``)."""

    settings: Settings
    upstream: Upstream
    catalog: Catalog
    accounting: Accounting
    metrics: Metrics
    breakers: Breakers
    store: StateStore  # limits, budgets, upstream shaping, the ledger
    drain: Drain
    jobs: JobOwners  # who created which video job (keys mode)
    tracing: Tracing | None  # None: tracing is off
    keys: KeyRing | None  # keys mode's key ring, swapped whole on a reload; None in the other modes
    health: LiveHealth  # each model's effective health (the catalog's and /api/status's)
    router: Router  # aliases and the candidates of a request (docs/routing.md)
    latencies: Latencies  # each model's measured time to first byte (the "fastest" strategy)
    usage_summary: UsageSummary | None = None  # reads the ledger (None: no ledger)
    usage_reports: UsageReports | None = None  # the report layer on the ledger in use (the console's)
    cache: ResponseCache | None = None  # the response cache ([cache] enabled)
    refusals: RecentRefusals | None = None  # the latest refusals (the console reads them)
    open_streams: int = 0  # event streams being relayed now
    serving: bool = True  # False once shutdown has begun closing the services

    def reload_routing(self, new: Settings) -> None:
        """A config reload's ``[[aliases]]`` and ``[routing]``: a new router in one assignment (a
        request in flight keeps the route it was given); the measured latencies are kept."""
        self.latencies.resize(new.routing.fastest_window)
        self.router = Router(new.routing, new.aliases, self.latencies)

    @property
    def in_flight(self) -> int:
        """Proxied requests being handled now (the drain tracks them)."""
        return self.drain.in_flight


@contextlib.asynccontextmanager
async def open_services(
    settings: Settings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    tracing: Tracing | None = None,
    config_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    store: StateStore | None = None,
) -> AsyncIterator[Services]:
    """Open every service, yield them, close them all (see the module docstring).

    ``transport`` replaces the network under the upstream client (and selects the httpx client);
    ``tracing`` is the app's (built, not started); ``config_path`` with its ``env`` is the file
    whose keys are reloaded in keys mode; ``store`` replaces the in-process state store (its
    ledger is then the store's business).
    """
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(flush_logs)  # last: the access log's buffered lines (gateway.ops.json_log)
        upstream = _upstream_client(settings.upstream, transport)
        stack.push_async_callback(upstream.aclose)
        catalog = Catalog(lambda: upstream.get_bytes(CATALOG_PATH), settings.catalog)
        catalog.start()
        stack.push_async_callback(catalog.aclose)
        feed = StatusFeed(lambda: upstream.get_bytes(STATUS_PATH), settings.catalog)
        feed.start()
        stack.push_async_callback(feed.aclose)
        latencies = Latencies(settings.routing.fastest_window)
        usage = settings.usage
        if usage.database_url:  # the ledger of record is on PostgreSQL: no SQLite file
            usage = dataclasses.replace(usage, path="")
        ledger = Ledger(Path(usage.path), flush_interval=usage.flush_interval) if usage.path else None
        if ledger is not None:
            await ledger.start()  # creates or migrates the database
            keeper = RollupKeeper(
                Path(usage.path), interval=usage.rollup_interval, retention_days=usage.raw_retention_days
            )
            try:
                await keeper.start()
            except BaseException:
                await ledger.aclose()
                raise
            stack.push_async_callback(keeper.aclose)  # after the ledger's last write: rolls it up
            stack.push_async_callback(ledger.aclose)  # writes what is still queued
        records = await _postgres_ledger(settings, stack) if usage.database_url else ledger  # the one in use
        reports = _usage_reports(records, settings)
        services: Services | None = None

        def metrics_state() -> MetricsSnapshot | None:  # read at scrape time, once the services exist
            return _metrics_snapshot(services) if services is not None and services.serving else None

        metrics = Metrics(metrics_state)
        refusals = RecentRefusals()
        up = settings.upstream
        if store is None:
            store = LocalStore(
                RateLimiter(),
                Budgets(records.spend_usd if records else None),
                UpstreamShaper(up.concurrency, up.rpm, up.queue_timeout),
                records,
            )
            if settings.shared.redis_url:
                shaping = (up.concurrency, up.rpm, up.queue_timeout)
                spend = records.spend_usd if records else None
                recent = records.recent_requests if records else None
                shared = open_shared_store(settings.shared, store, spend, recent_since=recent, shaping=shaping)
                await shared.start()
                stack.push_async_callback(shared.aclose)  # settlements in flight get their timeout
                store = shared
        accounting = Accounting(
            store,
            include_usage=usage.include_usage,
            stream_cost=usage.stream_cost,
            access_log=settings.access_log,
            bill_hits=settings.cache.bill_hits == "full",
            # Each request's outcome goes to the metrics, and with tracing on onto its span too.
            on_finish=_both(metrics.observe, refusals.observe)
            if tracing is None
            else _both(_both(metrics.observe, refusals.observe), tracing.finished),
        )
        if tracing is not None:
            tracing.start()
            stack.push_async_callback(tracing.aclose)  # exports the spans still queued
        services = Services(
            settings=settings,
            upstream=upstream,
            catalog=catalog,
            accounting=accounting,
            metrics=metrics,
            breakers=Breakers(up.breaker_failures, up.breaker_cooldown),
            store=store,
            drain=Drain(settings.server.shutdown_grace),
            jobs=JobOwners(),
            tracing=tracing,
            keys=KeyRing(settings.keys) if settings.auth_mode == "keys" else None,
            health=LiveHealth(catalog, feed),
            router=Router(settings.routing, settings.aliases, latencies),
            latencies=latencies,
            usage_summary=reports.summarize if reports is not None else None,
            usage_reports=reports,
            cache=await _response_cache(settings, stack) if settings.cache.enabled else None,
            refusals=refusals,
        )
        if services.keys is not None and config_path is not None:
            reloader = KeyReloader(config_path, env if env is not None else {}, settings, services,
                                   apply=services.reload_routing, applied=("routing", "aliases"))  # fmt: skip
            watcher = asyncio.create_task(reloader.watch(settings.auth.reload_interval))
            stack.push_async_callback(_stop, watcher)
        try:
            yield services
        finally:
            services.serving = False  # readiness and metrics stop reading what is being closed


def _upstream_client(settings: UpstreamSettings, transport: httpx.AsyncBaseTransport | None) -> Upstream:
    """The client behind the upstream seam, as ``[upstream] client`` says (a test's ``transport``: httpx)."""
    if transport is not None or settings.client == "httpx":
        return HttpxUpstream(settings, transport)
    if settings.client == "aiohttp":
        return AiohttpUpstream(settings)
    return BuiltinUpstream(settings)


async def _postgres_ledger(settings: Settings, stack: contextlib.AsyncExitStack) -> PostgresLedger:
    """The ledger of record on PostgreSQL, started (its queue is a Redis Stream when ``[shared]
    redis_url`` is set); closed with the services, writing what it still holds."""
    ledger = _new_postgres_ledger(settings)
    await ledger.start()
    stack.push_async_callback(ledger.aclose)
    return ledger


def _new_postgres_ledger(settings: Settings) -> PostgresLedger:
    try:
        from gateway.usage.postgres.ledger import PostgresLedger
        from gateway.usage.postgres.stream import RecordStream, consumer_name
    except ImportError as exc:
        raise SettingsError(f"[usage] database_url: psycopg is not installed ({exc}): {POSTGRES_INSTALL}") from exc
    usage, shared = settings.usage, settings.shared
    if not shared.redis_url:
        return PostgresLedger(usage.database_url, flush_interval=usage.flush_interval, claim_after=usage.claim_after,
                              retention_days=usage.raw_retention_days)  # fmt: skip
    # Off the request path, so a second's room per call (a consumer waits on the stream for half of it).
    client, errors = redis_client(dataclasses.replace(shared, timeout=max(shared.timeout, 1.0)))
    stream = RecordStream(client, f"{shared.key_prefix}:ledger", consumer_name(), claim_after=usage.claim_after,
                          batch=8)  # fmt: skip
    return PostgresLedger(usage.database_url, stream=stream, stream_errors=errors, flush_interval=usage.flush_interval,
                          claim_after=usage.claim_after, retention_days=usage.raw_retention_days)  # fmt: skip


def _usage_reports(ledger: Ledger | PostgresLedger | None, settings: Settings) -> UsageReports | None:
    """The report layer on the ledger in use (the console's, and GET /admin/usage's)."""
    if ledger is None:
        return None
    if not isinstance(ledger, Ledger):
        return ledger  # the PostgreSQL ledger reads its own roll-ups
    return SqliteReports(Path(settings.usage.path))


async def _response_cache(settings: Settings, stack: contextlib.AsyncExitStack) -> ResponseCache:
    """The response cache, with its Redis tier when ``[shared] redis_url`` is set."""
    remote = None
    if settings.shared.redis_url:
        client, errors = redis_client(settings.shared)
        remote = RedisTier(client, errors, settings.shared, settings.cache, idle_timeout=settings.upstream.idle_timeout)
        stack.push_async_callback(remote.aclose)
    return ResponseCache(settings.cache, remote=remote)


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _both(first: Callable[[Exchange], None], then: Callable[[Exchange], None]) -> Callable[[Exchange], None]:
    def both(exchange: Exchange) -> None:
        first(exchange)
        then(exchange)

    return both


def _metrics_snapshot(services: Services) -> MetricsSnapshot:
    """What the metrics read at scrape time."""
    catalog, snapshot = services.catalog, services.catalog.snapshot
    routable = services.settings.catalog.routable_health
    entries = snapshot.entries.values() if snapshot else ()
    shown = [shown_health(e, services.health, services.breakers) for e in entries]
    feed = services.health.feed
    return MetricsSnapshot(
        catalog_loaded=snapshot is not None,
        catalog_age=catalog.age(),
        catalog_models=len(entries),
        catalog_routable=sum(1 for e, health, _ in shown if health != CIRCUIT_OPEN and is_routable(e, routable)),
        model_health=tuple((e.model_name, health or "unknown", source) for e, health, source in shown),
        status_feed=feed.state,
        status_reads=feed.reads,
        status_read_failures=feed.read_failures,
        catalog_refreshes=catalog.refreshes,
        catalog_refresh_failures=catalog.refresh_failures,
        in_flight=services.in_flight,
        open_streams=services.open_streams,
        upstream_connections=services.upstream.connections(),
        open_circuits=services.breakers.open_circuits(),
        tasks=len(asyncio.all_tasks()),
        ledger_dropped=services.accounting.ledger_dropped,
        shared_store=services.store.shared_state(),
        cache=None if services.cache is None else services.cache.stats(),
    )
