"""The catalog and status endpoints: ``GET /api/models``, ``GET /api/status``, ``GET /v1/models``
(live models only) and ``GET /v1/models/{model}``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gateway.demo.common import UpstreamError, json_response
from gateway.demo.faults import status_fault
from gateway.demo.state import DemoState

CATALOG_CREATED = 1_735_689_600  # 2025-01-01T00:00:00Z, the "created" of every /v1/models entry


def _is_live(model: dict[str, Any]) -> bool:
    return bool(model.get("health_status", "healthy") == "healthy")


def _openai_model(model: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": model["model_name"],
        "object": "model",
        "created": CATALOG_CREATED,
        "owned_by": model.get("provider", "flexai"),
        "category": model.get("category"),
    }


async def api_models(state: DemoState, _request: Request) -> Response:
    state.catalog_fetches += 1
    return json_response(state.catalog)


async def v1_models(state: DemoState, _request: Request) -> Response:
    return json_response({"object": "list", "data": [_openai_model(m) for m in state.catalog if _is_live(m)]})


async def v1_model(state: DemoState, request: Request) -> Response:
    name = request.path_params["model"]
    model = state.find_model(name)
    if model is None or not _is_live(model):
        raise UpstreamError(404, f"The model '{name}' does not exist or is not serving", code="model_not_found")
    return json_response(_openai_model(model))


def _status_entry(model: dict[str, Any], checked_at: str, overrides: dict[str, str]) -> dict[str, Any]:
    health = overrides.get(str(model.get("model_name")), model.get("health_status"))
    error = None if health in ("healthy", None) else f"health check reports {health}"
    return {
        "name": model.get("model_name"),
        "status": health or "unknown",
        "last_checked_at": checked_at,
        "error": error,
    }


async def api_status(state: DemoState, _request: Request) -> Response:
    """Service status derived from the catalog (and ``status_health``, which changes it here only):
    ``ok`` when every model with a health status is healthy, ``down`` when none is, else
    ``degraded``; a model without one reports ``unknown``. ``status_fault`` replaces the answer."""
    state.status_reads += 1
    faulty = await status_fault(state)
    if faulty is not None:
        return faulty
    now = datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    reported = [
        state.status_health.get(str(m.get("model_name")), m.get("health_status"))
        for m in state.catalog
        if m.get("health_status") is not None or m.get("model_name") in state.status_health
    ]
    healthy = sum(1 for h in reported if h == "healthy")
    overall = "ok" if healthy == len(reported) else ("down" if healthy == 0 else "degraded")
    body = {
        "status": overall,
        "components": [
            {"name": "api", "status": "ok"},
            {"name": "catalog", "status": "ok"},
            {"name": "inference", "status": overall},
        ],
        "models": [_status_entry(m, now, state.status_health) for m in state.catalog],
        "incidents": [],
        "generated_at": now,
        "health_data_age_seconds": 0,
    }
    return json_response(body, headers={"cache-control": "public, max-age=10, stale-while-revalidate=60"})
