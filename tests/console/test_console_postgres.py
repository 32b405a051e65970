"""The console on a gateway whose ledger is PostgreSQL (``[usage] database_url``, a real server):
the usage page, its CSV and the budgets panel show what the ledger's rows hold, read through the
same report layer as on SQLite (PostgreSQL's roll-ups)."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import psycopg
import pytest

from gateway.app import create_app
from gateway.config import load_settings
from gateway.console.formats import usd
from gateway.demo import create_demo_upstream
from gateway.server.thread import LocalServer, serve_in_thread
from gateway.usage.postgres.reports import summarize_blocking
from tests.console.conftest import ORG_KEY, SECRET_PROMPT, send_traffic
from tests.console.test_console import cell
from tests.helpers.gateway import (
    fresh_demo_state,
    gateway_env,
    is_ready,
    key_secret,
    key_table,
    keys_config,
    wait_until,
)
from tests.helpers.postgres import PostgresServer


@dataclass(frozen=True)
class PgSite:
    gateway: LocalServer
    url: str  # the ledger's database
    day: str  # the UTC day the traffic landed on (ISO)


@pytest.fixture(scope="module")
def pg_site(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgSite]:
    tmp = tmp_path_factory.mktemp("console-pg")
    url = postgres.database()
    tables = key_table("alice", "budget_usd_daily = 5.0\nbudget_usd_monthly = 100.0") + key_table("bob")
    config = keys_config(tmp / "gateway.toml", tables, extra="[console]\nlive_interval = 1\n")
    with serve_in_thread(create_demo_upstream(fresh_demo_state())) as upstream:
        env = {**gateway_env(upstream.url), "GATEWAY_UPSTREAM_API_KEY": ORG_KEY,
               "GATEWAY_USAGE_DATABASE_URL": url, "GATEWAY_USAGE_FLUSH_INTERVAL": "0.05"}  # fmt: skip
        with serve_in_thread(create_app(load_settings(config, env), config_path=config, env=env)) as gateway:
            with httpx.Client(base_url=gateway.url, timeout=10) as http:
                assert wait_until(lambda: is_ready(http))
            day = send_traffic(gateway.url, lambda: summarize_blocking(url, by="key"))
            yield PgSite(gateway, url, day)


@pytest.fixture
def admin(pg_site: PgSite) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {key_secret('admin')}"}
    with httpx.Client(base_url=pg_site.gateway.url, timeout=10, headers=headers) as client:
        yield client


def requests_cell(html: str, row: str) -> str:
    """The breakdown row's first number: its requests sent upstream."""
    match = re.search(rf'<tr data-name="{re.escape(row)}">.*?</th>\s*<td>([^<]*)</td>', html, re.S)
    assert match, f"no row {row!r}"
    return match.group(1)


def rows_of(url: str, sql: str, *params: object) -> dict[str | None, tuple[int, float]]:
    """Requests and cost per group, counted from the ledger's rows themselves (not its roll-ups)."""
    with psycopg.connect(url) as conn:
        return {name: (int(n), float(cost)) for name, n, cost in conn.execute(sql, params)}


def test_the_usage_page_shows_the_postgresql_ledgers_numbers(pg_site: PgSite, admin: httpx.Client) -> None:
    ledger = rows_of(pg_site.url, "SELECT key_name, count(*), coalesce(sum(cost_usd), 0) FROM usage GROUP BY 1")
    assert ledger["alice"][0] == 3
    assert ledger["bob"][0] == 3
    assert ledger["alice"][1] > 0
    page = admin.get("/console/usage", params={"start": pg_site.day, "end": pg_site.day, "by": "key"})
    assert page.status_code == 200, page.text
    for name in ("alice", "bob"):
        assert requests_cell(page.text, name) == str(ledger[name][0])
        assert cell(page.text, name, "cost_usd") == usd(ledger[name][1])
    total = sum(cost for _, cost in ledger.values())
    assert re.search(r'data-field="cost_usd">([^<]*)<', page.text).group(1) == usd(total)  # type: ignore[union-attr]
    # The hourly chart (from usage_hourly and this hour's rows) adds up to the ledger's total.
    chart = page.text.split('id="chart-cost"')[1].split("</svg>")[0]
    values = [float(v) for v in re.findall(r'<rect class="bar"[^>]*data-value="([^"]+)"', chart)]
    assert len(values) == 24
    assert sum(values) == pytest.approx(total)
    # The budgets panel: what alice spent today, of her $5.00.
    spent = usd(ledger["alice"][1])
    assert re.search(rf'<tr data-budget="alice"><th scope="row">alice</th><td>team-a</td>\s*<td>{re.escape(spent)} '
                     r"of \$5.00", page.text)  # fmt: skip
    # A filter and another grouping: bob's models.
    bobs = rows_of(pg_site.url, "SELECT model, count(*), coalesce(sum(cost_usd), 0) FROM usage "
                   "WHERE key_name = %s GROUP BY 1", "bob")  # fmt: skip
    only_bob = admin.get(
        "/console/usage", params={"start": pg_site.day, "end": pg_site.day, "by": "model", "key": "bob"}
    )
    assert len(bobs) == 2
    for model, (count, cost) in bobs.items():
        assert model is not None
        assert requests_cell(only_bob.text, model) == str(count)
        assert cell(only_bob.text, model, "cost_usd") == usd(cost)
    assert SECRET_PROMPT not in page.text + only_bob.text


def test_the_csv_holds_the_postgresql_ledgers_numbers(pg_site: PgSite, admin: httpx.Client) -> None:
    ledger = rows_of(pg_site.url, "SELECT key_name, count(*), coalesce(sum(cost_usd), 0) FROM usage GROUP BY 1")
    params = {"start": pg_site.day, "end": pg_site.day, "by": "key"}
    answer = admin.get("/console/usage.csv", params={**params, "table": "breakdown"})
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/csv")
    rows = {r["key"]: r for r in csv.DictReader(io.StringIO(answer.text))}
    assert set(rows) == {name or "" for name in ledger}
    for name, (count, cost) in ledger.items():
        assert int(rows[name or ""]["requests"]) == count
        assert float(rows[name or ""]["cost_usd"] or 0) == pytest.approx(cost)
    series = admin.get("/console/usage.csv", params={**params, "table": "series", "period": "day"})
    [today] = list(csv.DictReader(io.StringIO(series.text)))
    assert today["label"] == pg_site.day
    assert int(today["requests"]) == sum(count for count, _ in ledger.values())
    budgets = {r["key"]: r for r in csv.DictReader(io.StringIO(admin.get(
        "/console/usage.csv", params={**params, "table": "budgets"}).text))}  # fmt: skip
    assert set(budgets) == {"alice"}
    assert float(budgets["alice"]["spent_today_usd"]) == pytest.approx(ledger["alice"][1])
    assert float(budgets["alice"]["spent_month_usd"]) == pytest.approx(ledger["alice"][1])
