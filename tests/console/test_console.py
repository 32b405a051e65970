"""The console over HTTP (httpx) against a keys-mode gateway with traffic sent through it: who may
open it, that its pages show what the ledger, the catalog and the counters hold, that the CSV is
what the page shows, that refusals show no body or key, and that no console request goes upstream."""

from __future__ import annotations

import csv
import io
import re
import sqlite3
from collections.abc import Iterator
from contextlib import closing

import httpx
import pytest

from gateway.console.formats import usd
from gateway.demo import DemoState, default_catalog
from gateway.usage.reports import summarize
from tests.console.conftest import ORG_KEY, SECRET_PROMPT, Site
from tests.helpers.gateway import StartGateway, assert_error_envelope, forwarded, key_secret, wait_until


@pytest.fixture
def http(console_site: Site) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=console_site.gateway.url, timeout=10) as client:
        yield client


@pytest.fixture
def admin(console_site: Site, http: httpx.Client) -> httpx.Client:
    http.headers.update(console_site.admin)
    return http


def cell(html: str, row: str, field: str) -> str:
    """The text of the ``data-field`` cell of the table row ``data-name=row``."""
    match = re.search(rf'<tr data-name="{re.escape(row)}">(.*?)</tr>', html, re.S)
    assert match, f"no row {row!r}"
    found = re.search(rf'data-field="{field}">([^<]*)<', match.group(1))
    assert found, f"no {field} in row {row!r}"
    return found.group(1)


# --------------------------------------------------------------------------- access


def test_a_browser_without_a_session_is_sent_to_sign_in(http: httpx.Client) -> None:
    for path in ("/console", "/console/usage?by=model", "/console/catalog", "/console/live", "/console/refusals"):
        answer = http.get(path)
        assert answer.status_code == 303, path
        assert answer.headers["location"].startswith("/console/login?next=%2Fconsole"), path
    assert http.get("/console/live/panel").status_code == 401  # fragments and downloads: no redirect
    assert http.get("/console/usage.csv").status_code == 401
    form = http.get("/console/login")
    assert form.status_code == 200
    assert 'type="password"' in form.text


def test_only_an_admin_key_opens_the_console(http: httpx.Client) -> None:
    alice = http.get("/console/usage", headers={"Authorization": f"Bearer {key_secret('alice')}"})
    assert alice.status_code == 401
    assert_error_envelope(alice.content, code="admin_key_required")
    wrong = http.get("/console/usage", headers={"Authorization": "Bearer sk-gw-wrong"})
    assert wrong.status_code == 401
    ok = http.get("/console/usage", headers={"Authorization": f"Bearer {key_secret('admin')}"})
    assert ok.status_code == 200
    assert "Usage and cost" in ok.text
    assert "default-src 'none'" in ok.headers["content-security-policy"]
    assert ok.headers["cache-control"] == "no-store"


def test_signing_in_sets_a_signed_cookie_that_never_holds_the_key(http: httpx.Client) -> None:
    refused = http.post("/console/login", data={"key": key_secret("alice"), "next": "/console/live"})
    assert refused.status_code == 401
    assert "admin key" in refused.text
    assert "gw_console" not in refused.headers.get("set-cookie", "")
    signed = http.post("/console/login", data={"key": key_secret("admin"), "next": "https://evil.example/x"})
    assert signed.status_code == 303
    assert signed.headers["location"] == "/console/usage"  # never another site
    cookie = signed.headers["set-cookie"]
    assert "httponly" in cookie.lower()
    assert "samesite=strict" in cookie.lower()
    assert "Path=/console" in cookie
    assert key_secret("admin") not in cookie
    assert ORG_KEY not in cookie
    page = http.get("/console/usage")
    assert page.status_code == 200
    assert "Signed in as <strong>admin</strong>" in page.text
    # A forged or altered cookie is a browser without a session.
    value = http.cookies["gw_console"]
    http.cookies.set("gw_console", value[:-1] + ("0" if value[-1] != "0" else "1"), path="/console")
    assert http.get("/console/usage").status_code == 303
    http.cookies.set("gw_console", value, path="/console")
    assert http.get("/console/usage").status_code == 200
    out = http.post("/console/logout")
    assert out.status_code == 303
    assert 'gw_console=""' in out.headers["set-cookie"]


# --------------------------------------------------------------------------- usage


def test_the_usage_page_shows_what_the_ledger_holds(console_site: Site, admin: httpx.Client) -> None:
    page = admin.get("/console/usage", params={"start": console_site.day, "end": console_site.day, "by": "key"})
    assert page.status_code == 200, page.text
    by_key = {r["key"]: r for r in summarize(console_site.ledger, by="key")}
    assert by_key["alice"]["requests"] == 3
    assert by_key["bob"]["requests"] == 3
    for name in ("alice", "bob"):
        assert cell(page.text, name, "cost_usd") == usd(by_key[name]["cost_usd"])
    total = sum(r["cost_usd"] or 0 for r in by_key.values())
    assert re.search(r'data-field="cost_usd">([^<]*)<', page.text).group(1) == usd(total)  # type: ignore[union-attr]
    # The hourly cost chart: its bars add up to the ledger's total, each with a readable title.
    values = [
        float(v)
        for v in re.findall(
            r'<rect class="bar"[^>]*data-value="([^"]+)"', page.text.split('id="chart-cost"')[1].split("</svg>")[0]
        )
    ]
    assert len(values) == 24
    assert sum(values) == pytest.approx(total)
    assert 'role="img"' in page.text
    assert "<title" in page.text
    # Budgets: alice's daily budget and what she used of it.
    spent = by_key["alice"]["cost_usd"]
    row = rf'<tr data-budget="alice"><th scope="row">alice</th><td>team-a</td>\s*<td>{re.escape(usd(spent))} of \$5.00'
    assert re.search(row, page.text)
    assert SECRET_PROMPT not in page.text


def test_filters_and_grouping(console_site: Site, admin: httpx.Client) -> None:
    only_bob = admin.get(
        "/console/usage", params={"start": console_site.day, "end": console_site.day, "by": "model", "key": "bob"}
    )
    by_model = {r["model"]: r for r in summarize(console_site.ledger, by="model", key="bob")}
    assert set(by_model) >= {"Qwen2.5-32B-Instruct-FP8", "bge-m3"}
    for model, row in by_model.items():
        assert cell(only_bob.text, model, "cost_usd") == usd(row["cost_usd"])
    assert '<tr data-name="alice">' not in only_bob.text
    by_team = admin.get("/console/usage", params={"by": "team", "period": "day"})
    assert '<tr data-name="team-a">' in by_team.text
    assert '<tr data-name="team-b">' in by_team.text
    bad = admin.get("/console/usage", params={"start": "yesterday"})
    assert bad.status_code == 400
    assert "YYYY-MM-DD" in bad.text
    too_wide = admin.get("/console/usage", params={"start": "2024-01-01", "end": "2024-03-01", "period": "hour"})
    assert too_wide.status_code == 400
    assert "31 days" in too_wide.text


def test_the_csv_download_is_what_the_page_shows(console_site: Site, admin: httpx.Client) -> None:
    answer = admin.get(
        "/console/usage.csv",
        params={"start": console_site.day, "end": console_site.day, "by": "key", "table": "breakdown"},
    )
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/csv")
    assert f"usage-breakdown-key-{console_site.day}-{console_site.day}.csv" in answer.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(answer.text)))
    ledger = {r["key"]: r for r in summarize(console_site.ledger, by="key")}
    assert {r["key"] for r in rows} == {k or "" for k in ledger}
    for row in rows:
        want = ledger[row["key"]]
        assert int(row["requests"]) == want["requests"]
        assert int(row["refused"]) == want["refused"]
        assert float(row["cost_usd"] or 0) == pytest.approx(want["cost_usd"] or 0)
    series = admin.get(
        "/console/usage.csv", params={"start": console_site.day, "end": console_site.day, "table": "series"}
    )
    assert sum(float(r["cost_usd"] or 0) for r in csv.DictReader(io.StringIO(series.text))) == pytest.approx(
        sum(float(r["cost_usd"] or 0) for r in rows)
    )
    assert admin.get("/console/usage.csv", params={"table": "nope"}).status_code == 400


# --------------------------------------------------------------------------- catalog, live, refusals


def test_the_catalog_page_lists_and_filters_the_models(admin: httpx.Client) -> None:
    catalog = default_catalog()
    page = admin.get("/console/catalog")
    assert page.status_code == 200
    assert set(re.findall(r'<tr data-model="([^"]+)">', page.text)) == {m["model_name"] for m in catalog}
    assert "Last refreshed" in page.text
    assert "The last refresh succeeded." in page.text
    embeddings = admin.get("/console/catalog", params={"category": "embedding"})
    assert set(re.findall(r'<tr data-model="([^"]+)">', embeddings.text)) == {
        m["model_name"] for m in catalog if m.get("category") == "embedding"
    }
    tools = admin.get("/console/catalog", params={"supports": "tool_use"})
    shown = set(re.findall(r'<tr data-model="([^"]+)">', tools.text))
    assert shown
    assert shown == {m["model_name"] for m in catalog if "tool_use" in (m.get("supports") or [])}
    assert admin.get("/console/catalog", params={"category": "nonsense"}).status_code == 400


def test_the_live_panel_counts_the_traffic(admin: httpx.Client) -> None:
    admin.get("/console/live.json")  # a sample to measure from
    alice = {"Authorization": f"Bearer {key_secret('alice')}"}
    refused = admin.post("/v1/chat/completions", json={"model": "nope-model", "messages": []}, headers=alice)
    assert refused.status_code == 404
    live = admin.get("/console/live.json").json()
    assert live["requests_total"] >= 9
    assert dict(live["refusals_by_code"])["model_not_found"] >= 1
    assert live["refusal_rate"] > 0
    assert live["in_flight"] == 0
    assert live["open_streams"] == 0
    assert live["open_circuits"] == []
    assert live["overhead_ms"]["p50"] is not None
    assert live["overhead_ms"]["p50"] > 0
    panel = admin.get("/console/live/panel")
    assert panel.status_code == 200
    assert 'id="live-tiles"' in panel.text
    assert "<html" not in panel.text
    page = admin.get("/console/live")
    assert 'data-src="/console/live/panel"' in page.text
    assert 'data-interval="1.0"' in page.text


def test_refusals_show_code_model_key_and_message_never_a_body_or_key(admin: httpx.Client) -> None:
    page = admin.get("/console/refusals")
    assert page.status_code == 200
    rows = re.findall(r"<tr><td>[^<]*</td><td>(\d+)</td><td><code>([^<]*)</code></td><td>([^<]*)</td><td>([^<]*)</td>"
                      r"<td>([^<]*)</td><td>([^<]*)</td>", page.text)  # fmt: skip
    unknown = [r for r in rows if r[1] == "model_not_found"]
    assert {r[3] for r in unknown} == {"alice", "bob"}
    assert all(r[4] == "/v1/chat/completions" for r in unknown)
    assert sum("no-such-model-xyz" in r[5] for r in unknown) == 2  # the message names the model asked for
    assert SECRET_PROMPT not in page.text
    for name in ("alice", "bob", "admin"):
        assert key_secret(name) not in page.text


def test_no_console_request_reaches_the_upstream(console_site: Site, admin: httpx.Client) -> None:
    before = (list(forwarded(console_site.state)), console_site.state.catalog_fetches)
    pages = ("usage", "usage.csv", "catalog", "live", "live/panel", "live.json", "refusals")
    for path in [f"/console/{p}" for p in pages] + ["/console/static/console.css", "/console/static/console.js"]:
        assert admin.get(path).status_code == 200, path
    assert (forwarded(console_site.state), console_site.state.catalog_fetches) == before


def test_a_sign_in_form_is_small(http: httpx.Client) -> None:
    huge = http.post("/console/login", content=b"key=" + b"x" * 100_000,
                     headers={"content-type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert huge.status_code == 400
    assert_error_envelope(huge.content, code="request_too_large")
    many = http.post("/console/login", content="&".join(f"f{i}=1" for i in range(50)).encode(),
                     headers={"content-type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert many.status_code == 400
    empty = http.post("/console/login", data={"key": "  "})
    assert empty.status_code == 400
    assert "Enter an admin key." in empty.text


def test_the_gateway_keeps_the_roll_ups_up_to_date(console_site: Site) -> None:
    """The keeper runs in the gateway: every written row is rolled up within seconds."""

    def caught_up() -> bool:
        with closing(sqlite3.connect(console_site.ledger)) as conn:
            last = conn.execute("SELECT last_id FROM usage_rollup_state").fetchone()[0]
            newest = conn.execute("SELECT MAX(id) FROM usage").fetchone()[0]
        return bool(newest) and last == newest

    assert wait_until(caught_up, timeout=10)
    with closing(sqlite3.connect(console_site.ledger)) as conn:
        rolled = conn.execute("SELECT SUM(records) FROM usage_daily_total").fetchone()[0]
        raw = conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0]
    assert rolled == raw


def test_the_catalog_page_keeps_the_last_refresh_failure_after_recovery(
    start_gateway: StartGateway, demo_state: DemoState
) -> None:
    """Pass-through mode (the console answers loopback): a refresh fails, the next one succeeds; the
    page says the catalog is fine now and what the last failure was."""
    gateway = start_gateway({"GATEWAY_CATALOG_TTL": "0.2", "GATEWAY_CATALOG_REFRESH_BACKOFF_MAX": "0.2"})
    with httpx.Client(base_url=gateway.url, timeout=10) as client:

        def status() -> str:
            client.get("/v1/models")  # a request that needs the catalog refreshes it when it expired
            page = client.get("/console/catalog")
            assert page.status_code == 200, page.text
            found = re.search(r'<p id="catalog-status">(.*?)</p>', page.text, re.S)
            assert found is not None
            return found.group(1)

        assert "The last refresh succeeded." in status()
        assert "last failure" not in status()
        good = demo_state.catalog
        demo_state.catalog = {"not": "a list"}  # type: ignore[assignment]  # a refresh now fails
        assert wait_until(lambda: "Last refresh failed" in status())
        demo_state.catalog = good
        assert wait_until(lambda: "The last refresh succeeded." in status())
        recovered = status()
    assert "The last failure," in recovered
    failure = re.search(r'<span id="last-failure">(.+?)</span>', recovered)
    assert failure is not None
    assert failure.group(1).strip()


def test_a_refusal_of_an_unknown_model_names_the_model_asked_for(start_gateway: StartGateway) -> None:
    gateway = start_gateway()
    body = {"model": "no-such-model-xyz", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        refused = client.post("/v1/chat/completions", json=body, headers={"authorization": "Bearer sk-client"})
        assert refused.status_code == 404
        page = client.get("/console/refusals")
    assert page.status_code == 200
    row = next(line for line in page.text.split("<tr") if "model_not_found" in line)
    cells = re.findall(r"<td>(.*?)</td>", row)
    assert cells[3] == "no-such-model-xyz"  # the Model column, not only the message
