"""Endpoints the gateway answers itself: the model list, the raw catalog, health and readiness;
and the record of the 401s the key check answers (``key_refusal_recorder``)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from typing import Any, cast

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.auth.middleware import KeyRefusal, scope_caller
from gateway.catalog.admission import endpoint_for, is_routable
from gateway.catalog.cache import Snapshot
from gateway.catalog.entries import ModelEntry
from gateway.config import AliasSettings, Settings
from gateway.endpoints import CATEGORIES
from gateway.errors import InvalidRequest, ModelNotFound, PermissionDenied, UnknownPath
from gateway.exchange import Exchange
from gateway.ops.request_id import scope_request_id
from gateway.routing.health import CIRCUIT_OPEN, shown_health
from gateway.services import Services
from gateway.usage.reports import SUMMARY_GROUPS, SummaryBy


def model_object(entry: ModelEntry, health_source: str = "catalog") -> dict[str, Any]:
    """OpenAI's Model shape, plus the catalog's facts as extra fields (SDKs ignore them); the
    health is the effective one, ``health_source`` where it came from."""
    created = entry.raw.get("created")
    return {
        "id": entry.model_name,
        "object": "model",
        "created": created if isinstance(created, int) and not isinstance(created, bool) else 0,
        "owned_by": entry.provider or "flexai",
        "category": entry.category,
        "endpoint": endpoint_for(entry),
        "supports": sorted(entry.supports),
        "context_window": entry.context_window,
        "max_output": entry.max_output,
        "pricing": {
            "input_per_mtok": entry.input_per_mtok,
            "output_per_mtok": entry.output_per_mtok,
            "units": list(entry.pricing),
        },
        "health_status": entry.health_status,
        "health_source": health_source,
    }


def alias_object(alias: AliasSettings, serving: list[str]) -> dict[str, Any]:
    """An ``[[aliases]]`` name in OpenAI's Model shape, marked as an alias, with its models (those
    of the catalog that could serve now, in the alias's order)."""
    return {
        "id": alias.name,
        "object": "model",
        "created": 0,
        "owned_by": "gateway",
        "alias": True,
        "models": serving,
        "strategy": alias.strategy,
    }


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _from_loopback(request: Request) -> bool:
    client = request.client
    return client is not None and client.host in ("127.0.0.1", "::1", "localhost")


def _filter_values(request: Request, name: str) -> set[str]:
    return {v.strip().lower() for raw in request.query_params.getlist(name) for v in raw.split(",") if v.strip()}


class LocalRoutes:
    def __init__(self, settings: Settings, runtime: Services) -> None:
        self._runtime = runtime
        self._routable = frozenset(settings.catalog.routable_health)

    async def list_models(self, request: Request) -> Response:
        snapshot = await self._runtime.catalog.current()
        categories = _filter_values(request, "category")
        unknown = categories - CATEGORIES
        if unknown:
            raise InvalidRequest(
                f"Unknown category {', '.join(sorted(unknown))}; known: {', '.join(sorted(CATEGORIES))}.",
                param="category",
            )
        tags = _filter_values(request, "supports")
        caller = scope_caller(request.scope)
        data: list[dict[str, Any]] = []
        available: dict[str, ModelEntry] = {}
        for e in snapshot.entries.values():
            entry, health, source = shown_health(e, self._runtime.health, self._runtime.breakers)
            if health == CIRCUIT_OPEN or not is_routable(entry, self._routable):
                continue
            if caller is not None and not caller.may_use(entry):
                continue
            available[entry.model_name] = entry
            if (not categories or entry.category in categories) and tags <= entry.supports:
                data.append(model_object(entry, source))
        for alias in self._runtime.router.aliases.values():
            if caller is not None and not caller.may_use_name(alias.name):
                continue
            serving = [available[m] for m in alias.models if m in available]
            if serving and any((not categories or e.category in categories) and tags <= e.supports for e in serving):
                data.append(alias_object(alias, [e.model_name for e in serving]))
        return _json({"object": "list", "data": data})

    async def retrieve_model(self, request: Request) -> Response:
        snapshot = await self._runtime.catalog.current()
        name = request.path_params["model"]
        caller = scope_caller(request.scope)
        alias = self._runtime.router.alias(name)
        if alias is not None:  # an alias named like a catalog model hides it, as in requests
            if caller is not None and not caller.may_use_name(name):
                raise ModelNotFound(f"The model {name!r} does not exist.", param="model")
            return _json(alias_object(alias, [m for m in alias.models if m in snapshot.entries]))
        entry = snapshot.entries.get(name)
        if entry is None:
            entry = await self._runtime.catalog.lookup(name)  # refreshes early once, or raises 404
        if caller is not None and not caller.may_use(entry):
            raise ModelNotFound(f"The model {name!r} does not exist.", param="model")  # hidden from this key
        entry, _health, source = shown_health(entry, self._runtime.health, self._runtime.breakers)
        return _json(model_object(entry, source))

    async def api_models(self, request: Request) -> Response:
        snapshot = await self._runtime.catalog.current()
        return Response(snapshot.raw, media_type="application/json")

    async def admin_usage(self, request: Request) -> Response:
        """GET /admin/usage?by=key|team|model|day&key=K&since=YYYY-MM-DD (keys mode, admin key)."""
        summary = self._runtime.usage_summary
        if self._runtime.keys is None or summary is None:
            raise UnknownPath(
                '/admin/usage needs keys mode ([auth] mode = "keys") and a usage ledger ([usage] path or database_url).'
            )
        params = request.query_params
        by = params.get("by", "key")
        if by not in SUMMARY_GROUPS:
            raise InvalidRequest(f"`by` must be one of {', '.join(SUMMARY_GROUPS)}, not {by!r}.", param="by")
        since = None
        if "since" in params:
            try:
                since = date.fromisoformat(params["since"])
            except ValueError:
                raise InvalidRequest("`since` must be a date, YYYY-MM-DD.", param="since") from None
        rows = await summary(cast(SummaryBy, by), params.get("key"), since)
        return _json({"object": "list", "by": by, "data": rows})

    async def admin_cache_purge(self, request: Request) -> Response:
        """POST /admin/cache/purge {"model": M, "namespace": N} (both optional; neither: everything).
        Keys mode: an admin key; the other modes: from the gateway's own host (loopback) only."""
        cache = self._runtime.cache
        if cache is None:
            raise UnknownPath("/admin/cache/purge needs the response cache ([cache] enabled = true).")
        if self._runtime.keys is None and not _from_loopback(request):
            raise PermissionDenied("Without gateway keys, /admin/cache/purge answers the gateway's own host only.")
        raw = await request.body()
        try:
            fields = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError:
            raise InvalidRequest("The body must be a JSON object.", code="invalid_json") from None
        if not isinstance(fields, dict) or set(fields) - {"model", "namespace"}:
            raise InvalidRequest('The body takes "model" and "namespace" (strings), both optional.')
        model, namespace = fields.get("model"), fields.get("namespace")
        for name, value in (("model", model), ("namespace", namespace)):
            if value is not None and not isinstance(value, str):
                raise InvalidRequest(f"`{name}` must be a string.", param=name)
        purged = cache.purge(model=model, namespace=namespace)
        answer = {"object": "cache.purge", "purged": purged, "model": model, "namespace": namespace}
        shared = await cache.purge_remote(model=model, namespace=namespace)
        if shared is not None:
            answer["purged_shared"] = shared  # from the Redis tier
        return _json(answer)

    async def healthz(self, request: Request) -> Response:
        return _json({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        # Reads state only: while no catalog is loaded, the catalog's own task keeps retrying.
        catalog = self._runtime.catalog
        snapshot = catalog.snapshot
        draining = self._runtime.drain.draining
        ready = snapshot is not None and self._runtime.serving and not draining
        age = catalog.age()
        body = {
            "status": "draining" if draining else "ready" if ready else "not ready",
            "catalog": {
                "loaded": snapshot is not None,
                "age_seconds": None if age is None else round(age, 1),
                "models": 0 if snapshot is None else len(snapshot.entries),
                "routable": 0 if snapshot is None else self._count_routable(snapshot),
                "skipped_entries": [] if snapshot is None else list(snapshot.skipped),
                "refreshes": catalog.refreshes,
                "refresh_failures": catalog.refresh_failures,
                "last_error": catalog.last_error,
            },
            "live_health": self._live_health(snapshot),
            "upstream_client": "open" if self._runtime.serving else "closed",
            "open_circuits": self._runtime.breakers.open_circuits(),
            "in_flight": self._runtime.in_flight,
        }
        return _json(body, 200 if ready else 503)

    def _live_health(self, snapshot: Snapshot | None) -> dict[str, Any]:
        """The /api/status reader, and every model whose effective health is not "healthy"."""
        feed = self._runtime.health.feed
        age = feed.age()
        models = {}
        for e in snapshot.entries.values() if snapshot is not None else ():
            _entry, health, source = shown_health(e, self._runtime.health, self._runtime.breakers)
            if health != "healthy":
                models[e.model_name] = {"health": health, "source": source}
        return {
            "status_feed": feed.state,
            "status_age_seconds": None if age is None else round(age, 1),
            "reads": feed.reads,
            "read_failures": feed.read_failures,
            "last_error": feed.last_error,
            "not_healthy": models,
        }

    def _count_routable(self, snapshot: Snapshot) -> int:
        health = self._runtime.health
        return sum(1 for e in snapshot.entries.values() if is_routable(health.effective(e), self._routable))


def key_refusal_recorder(services: Services) -> Callable[[KeyRefusal], None]:
    """``KeyAuthMiddleware``'s ``on_refused``: a 401 of the key check becomes a finished request, so it
    is counted (``gateway_requests_total``, ``gateway_refusals_total``) and access-logged like every
    other refusal. No key name (the key was not accepted), never the presented key."""

    def record(refusal: KeyRefusal) -> None:
        scope = refusal.scope
        exchange = Exchange(
            scope_request_id(scope).decode(),
            scope["method"],
            scope["path"],
            started=refusal.started,
            arrived=refusal.arrived,
        )
        exchange.refuse(refusal.error)
        services.accounting.finish(exchange)

    return record
