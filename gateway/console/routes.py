"""The console's routes under /console: server-rendered pages (Jinja2), their CSV, the live panel.

Every page reads state the gateway already holds (the catalog's last snapshot, counters, the
ledger's roll-ups): no console request goes upstream. Who may see them: ``gateway.console.access``.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import parse_qs, quote

import jinja2
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from gateway.catalog.admission import endpoint_for, is_routable
from gateway.config import Settings
from gateway.console import charts
from gateway.console.access import COOKIE, ConsoleAccess, SignInNeeded
from gateway.console.formats import ago, num, pct, usd, utc
from gateway.console.live import LiveStats
from gateway.console.usage_view import UsageQuery, UsageView, usage_view
from gateway.endpoints import CATEGORIES
from gateway.errors import GatewayError, InvalidRequest
from gateway.services import Services

PREFIX: Final = "/console"
# No script or style from anywhere else; no framing; nothing cached or leaked in a Referer.
SECURITY_HEADERS: Final = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
    "x-frame-options": "DENY",
}
FORM_LIMIT: Final = 8192
Handler = Callable[[Request, str | None], Awaitable[Response]]


def console_routes(settings: Settings, services: Services) -> list[BaseRoute]:
    """The routes to add to the gateway's own app ([console] enabled)."""
    console = Console(settings, services)
    guard = console.guarded
    return [
        Route(PREFIX, guard(console.home), methods=["GET"]),
        Route(f"{PREFIX}/login", console.login_form, methods=["GET"]),
        Route(f"{PREFIX}/login", console.login, methods=["POST"]),
        Route(f"{PREFIX}/logout", console.logout, methods=["POST"]),
        Route(f"{PREFIX}/usage", guard(console.usage), methods=["GET"]),
        Route(f"{PREFIX}/usage.csv", guard(console.usage_csv, page=False), methods=["GET"]),
        Route(f"{PREFIX}/catalog", guard(console.catalog), methods=["GET"]),
        Route(f"{PREFIX}/live", guard(console.live), methods=["GET"]),
        Route(f"{PREFIX}/live/panel", guard(console.live_panel, page=False), methods=["GET"]),
        Route(f"{PREFIX}/live.json", guard(console.live_json, page=False), methods=["GET"]),
        Route(f"{PREFIX}/refusals", guard(console.refusals), methods=["GET"]),
        Mount(f"{PREFIX}/static", app=StaticFiles(packages=[("gateway.console", "static")]), name="console-static"),
    ]


class Console:
    def __init__(self, settings: Settings, services: Services) -> None:
        self._settings = settings
        self._services = services
        self._access = ConsoleAccess(lambda: services.keys, settings.upstream.api_key, settings.console.session_hours)
        self._live = LiveStats(services)
        env = jinja2.Environment(
            loader=jinja2.PackageLoader("gateway.console", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        env.filters.update(usd=usd, num=num, pct=pct, ago=ago, utc=utc)
        self._templates = Jinja2Templates(env=env)

    def guarded(self, handler: Handler, *, page: bool = True) -> Callable[[Request], Awaitable[Response]]:
        """``handler`` for viewers the access rules let in; a browser without a session is sent to sign in."""

        async def endpoint(request: Request) -> Response:
            try:
                viewer = self._access.viewer(request)
            except SignInNeeded:
                if not page:
                    return _secured(Response("Sign in again: /console/login", status_code=401))
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return _secured(RedirectResponse(f"{PREFIX}/login?next={_quote(target)}", status_code=303))
            return _secured(await handler(request, viewer))

        return endpoint

    def _page(self, request: Request, name: str, viewer: str | None, code: int = 200, **context: Any) -> Response:
        base = {"viewer": viewer, "keys_mode": self._access.keys_mode, "prefix": PREFIX, "section": name.split(".")[0]}
        return self._templates.TemplateResponse(request, name, {**base, **context}, status_code=code)

    async def home(self, request: Request, viewer: str | None) -> Response:
        return RedirectResponse(f"{PREFIX}/usage", status_code=303)

    async def login_form(self, request: Request) -> Response:
        return self._login_page(request, _safe_next(request.query_params.get("next")))

    def _login_page(self, request: Request, target: str, error: str | None = None, status: int = 200) -> Response:
        if not self._access.keys_mode:
            return _secured(RedirectResponse(f"{PREFIX}/usage", status_code=303))
        response = self._page(request, "login.html", None, status, error=error, next=target)
        return _secured(response)

    async def login(self, request: Request) -> Response:
        body = b""
        async for chunk in request.stream():  # a sign-in form is small: read at most FORM_LIMIT bytes
            body += chunk
            if len(body) > FORM_LIMIT:
                raise InvalidRequest("The sign-in form is too large.", code="request_too_large")
        try:
            form = parse_qs(body.decode("utf-8", "replace"), max_num_fields=10)
        except ValueError:  # more fields than a sign-in form has
            raise InvalidRequest("The sign-in form takes a key.", code=None) from None
        key = (form.get("key") or [""])[0]
        target = _safe_next((form.get("next") or [""])[0])
        if not key.strip():
            return self._login_page(request, target, "Enter an admin key.", 400)
        try:
            _name, cookie = self._access.sign_in(key)
        except GatewayError as error:
            return self._login_page(request, target, error.message, error.status)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(COOKIE, cookie, max_age=self._access.max_age, path=PREFIX, httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")  # fmt: skip
        return _secured(response)

    async def logout(self, request: Request) -> Response:
        response = RedirectResponse(f"{PREFIX}/login", status_code=303)
        response.delete_cookie(COOKIE, path=PREFIX)
        return _secured(response)

    async def usage(self, request: Request, viewer: str | None) -> Response:
        try:
            view = await self._usage_view(request)
        except GatewayError as error:  # a bad query (400), the ledger not answering (503)
            return self._page(request, "usage.html", viewer, error.status, error=error.message, view=None,
                              charts=None)  # fmt: skip
        if view is None:
            return self._page(request, "usage.html", viewer, error=None, view=None, charts=None)
        money = [(row["label"], float(row["cost_usd"] or 0.0)) for row in view.series]
        tokens = [(row["label"], float(row["total_tokens"])) for row in view.series]
        drawn = {
            "cost": charts.bar_chart("chart-cost", "Cost per " + view.query.period + " (USD)", money, usd),
            "tokens": charts.bar_chart("chart-tokens", "Tokens per " + view.query.period, tokens, num),
            "top": charts.line_chart(f"chart-top-{view.query.by}", f"Cost of the top {view.query.by}s (USD)",
                                     [row["label"] for row in view.series], view.top_series, usd)
            if view.top_series else None,
        }  # fmt: skip
        return self._page(request, "usage.html", viewer, error=None, view=view, charts=drawn)

    async def usage_csv(self, request: Request, viewer: str | None) -> Response:
        view = await self._usage_view(request)
        if view is None:
            raise InvalidRequest("No usage ledger is configured ([usage] path or database_url).", code=None)
        table = request.query_params.get("table", "breakdown")
        rows, columns = _csv_table(view, table)
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in columns])
        q = view.query
        name = f"usage-{table}-{q.by if table == 'breakdown' else q.period}-{q.start}-{q.end}.csv"
        return Response(out.getvalue(), media_type="text/csv; charset=utf-8",
                        headers={"content-disposition": f'attachment; filename="{name}"'})  # fmt: skip

    async def _usage_view(self, request: Request) -> UsageView | None:
        today = datetime.now(UTC).date()
        query = UsageQuery.parse(request.query_params, today)
        ledger = self._services.usage_reports  # the SQLite file or PostgreSQL: the same report layer
        if ledger is None:
            return None
        ring = self._services.keys
        callers = ring.callers() if ring is not None else []
        return await usage_view(ledger, query, callers, time.time())

    async def catalog(self, request: Request, viewer: str | None) -> Response:
        catalog = self._services.catalog
        snapshot = catalog.snapshot  # never fetched here: the page shows what the gateway holds
        category = request.query_params.get("category", "")
        wanted = {t for t in request.query_params.getlist("supports") if t}
        if category and category not in CATEGORIES:
            raise InvalidRequest(f"Unknown category {category!r}.", param="category")
        entries = sorted(snapshot.entries.values(), key=lambda e: e.model_name) if snapshot else []
        tags = sorted({t for e in entries for t in e.supports})
        routable = self._settings.catalog.routable_health
        models = [
            {"entry": e, "endpoint": endpoint_for(e), "routable": is_routable(e, routable)}
            for e in entries
            if (not category or e.category == category) and wanted <= e.supports
        ]
        state = {"age": catalog.age(), "refreshes": catalog.refreshes, "failures": catalog.refresh_failures,
                  "last_error": catalog.last_error, "skipped": snapshot.skipped if snapshot else (),
                  "last_failure": catalog.last_failure, "last_failure_age": catalog.last_failure_age()}  # fmt: skip
        return self._page(request, "catalog.html", viewer, models=models, total=len(entries), status=state,
                          categories=sorted(CATEGORIES), tags=tags, category=category, wanted=wanted)  # fmt: skip

    async def live(self, request: Request, viewer: str | None) -> Response:
        return self._page(request, "live.html", viewer, live=self._live.read(),
                          interval=self._settings.console.live_interval)  # fmt: skip

    async def live_panel(self, request: Request, viewer: str | None) -> Response:
        return self._page(request, "live_panel.html", viewer, live=self._live.read())

    async def live_json(self, request: Request, viewer: str | None) -> Response:
        return JSONResponse(self._live.read())

    async def refusals(self, request: Request, viewer: str | None) -> Response:
        ring = self._services.refusals
        latest = ring.latest() if ring is not None else []
        return self._page(request, "refusals.html", viewer, refusals=latest, total=ring.total if ring else 0)


def _csv_table(view: UsageView, table: str) -> tuple[list[dict[str, Any]], list[str]]:
    amounts = ["requests", "refused", "cached", "errors", "prompt_tokens", "completion_tokens", "total_tokens",
               "cost_usd", "saved_usd", "unpriced_requests"]  # fmt: skip
    if table == "breakdown":
        return [{view.query.by: r["name"], **r} for r in view.breakdown], [view.query.by, *amounts]
    if table == "series":
        return view.series, ["label", *amounts]
    if table == "budgets":
        return view.budgets, ["key", "team", "daily_usd", "spent_today_usd", "monthly_usd", "spent_month_usd"]
    raise InvalidRequest("`table` must be breakdown, series or budgets.", param="table")


def _cell(value: Any) -> Any:
    """A CSV cell; text that a spreadsheet would run as a formula is quoted with a leading '."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return "" if value is None else value


def _secured(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


def _safe_next(target: str | None) -> str:
    """Where to go after signing in: a console path only (never another site)."""
    if target and target.startswith(PREFIX + "/") and not target.startswith("//") and "\\" not in target:
        return target
    return f"{PREFIX}/usage"


def _quote(value: str) -> str:
    return quote(value, safe="")
