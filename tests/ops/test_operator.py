"""Operator surprises (issue #14, item 8): what an operator reads must be true, and reading it must
change nothing.

- a 401 of the key check is counted in the metrics and access-logged like every other request;
- the usage ledger's default path is absolute (the XDG state directory), never the working directory;
- /readyz only reads state: the catalog retries on its own while nothing is loaded;
- the pool gauge is counted by the upstream client itself (no private attribute of aiohttp or httpx).
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.config import load_settings
from gateway.demo import DemoState, default_catalog
from gateway.server.thread import LocalServer, serve_in_thread
from tests.helpers.gateway import CHAT_BODY, CHAT_PATH, StartGateway, key_secret, key_table, keys_config, wait_until

UPSTREAM_DIR = Path(__file__).resolve().parents[2] / "gateway" / "upstream"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str, headers: dict[str, str] | None = None) -> Samples:
    response = httpx.get(url + "/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def series(found: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (sample, labels) in found if sample == name]


# --------------------------------------------------------------------------- 401s are counted and logged


def test_key_refusals_are_counted_and_access_logged(
    start_gateway: StartGateway, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    config = keys_config(tmp_path / "gateway.toml", key_table("alice"))
    gateway = start_gateway({"GATEWAY_UPSTREAM_API_KEY": "sk-org-upstream"}, config=config)
    admin = {"Authorization": f"Bearer {key_secret('admin')}"}
    wrong = "sk-gw-not-a-key-7f3a9c"
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        missing = http.post(CHAT_PATH, json=CHAT_BODY)
        invalid = http.post(CHAT_PATH, json=CHAT_BODY, headers={"Authorization": f"Bearer {wrong}"})
        not_admin = http.get("/admin/usage", headers={"Authorization": f"Bearer {key_secret('alice')}"})
        served = http.post(CHAT_PATH, json=CHAT_BODY, headers={"Authorization": f"Bearer {key_secret('alice')}"})
    assert [missing.status_code, invalid.status_code, not_admin.status_code] == [401, 401, 401]
    assert served.status_code == 200, served.text

    def refused(found: Samples) -> float:
        return value(
            found, "gateway_requests_total", endpoint=CHAT_PATH, model="unknown", status="401", outcome="refused"
        )

    # Counted just after the answer went out: the client can be quicker than that.
    assert wait_until(lambda: refused(scrape(gateway.url, admin)) == 2)
    found = scrape(gateway.url, admin)
    assert value(found, "gateway_refusals_total", endpoint=CHAT_PATH, code="missing_api_key") == 1
    assert value(found, "gateway_refusals_total", endpoint=CHAT_PATH, code="invalid_api_key") == 1
    assert value(found, "gateway_refusals_total", endpoint="other", code="admin_key_required") == 1
    assert (
        value(found, "gateway_requests_total", endpoint="other", model="unknown", status="401", outcome="refused") == 1
    )

    def lines() -> list[dict[str, Any]]:
        return [r.access for r in caplog.records if r.name == "gateway.access" and hasattr(r, "access")]

    assert wait_until(lambda: len([line for line in lines() if line["status"] == 401]) == 3)
    by_code = {line["error_code"]: line for line in lines() if line["status"] == 401}
    assert set(by_code) == {"missing_api_key", "invalid_api_key", "admin_key_required"}
    served_line = next(line for line in lines() if line["status"] == 200)
    for line, response in zip(
        (by_code["missing_api_key"], by_code["invalid_api_key"], by_code["admin_key_required"]),
        (missing, invalid, not_admin),
        strict=True,
    ):
        assert set(line) == set(served_line)  # the same fields as every other request
        assert line["request_id"] == response.headers["x-request-id"]
        assert line["key"] is None
        assert line["outcome"] == "refused"
        assert line["method"] == response.request.method
        assert line["endpoint"] == response.request.url.path
        assert line["latency_ms"] >= 0
    assert served_line["key"] == "alice"
    # Never the presented key, anywhere in what was logged.
    assert wrong not in caplog.text
    assert not any(wrong in repr(line) for line in lines())
    assert not any(key_secret("alice") in repr(line) for line in lines())


# --------------------------------------------------------------------------- the ledger's default path


def test_ledger_default_path_is_absolute_under_the_state_directory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert load_settings(None, {"XDG_STATE_HOME": str(state)}).usage.path == str(state / "flexai-gateway" / "usage.db")
    home = tmp_path / "home"
    expected = str(home / ".local" / "state" / "flexai-gateway" / "usage.db")
    assert load_settings(None, {"HOME": str(home)}).usage.path == expected
    # A relative XDG_STATE_HOME is ignored, as the XDG spec says.
    assert load_settings(None, {"HOME": str(home), "XDG_STATE_HOME": "rel"}).usage.path == expected
    assert load_settings(None, {"HOME": str(home), "GATEWAY_USAGE_PATH": "~/u.db"}).usage.path == str(home / "u.db")
    assert load_settings(None, {"GATEWAY_USAGE_PATH": ""}).usage.path == ""  # off stays off


def test_relative_ledger_path_is_made_absolute_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(None, {"GATEWAY_USAGE_PATH": "data/usage.db"})
    assert settings.usage.path == str(tmp_path / "data" / "usage.db")
    assert Path(settings.usage.path).is_absolute()


def test_gateway_writes_its_default_ledger_under_the_state_directory_not_the_working_directory(
    upstream: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    state = tmp_path / "state"
    env = {"GATEWAY_UPSTREAM_URL": upstream.url, "XDG_STATE_HOME": str(state), "GATEWAY_USAGE_FLUSH_INTERVAL": "0.05"}
    with serve_in_thread(create_app(load_settings(None, env))) as gateway:
        assert httpx.post(gateway.url + CHAT_PATH, json=CHAT_BODY, timeout=10).status_code == 200
    assert (state / "flexai-gateway" / "usage.db").is_file()
    assert list(work.iterdir()) == []


# --------------------------------------------------------------------------- /readyz reads state only


def test_readyz_only_reads_state_while_the_catalog_retries_on_its_own(
    start_gateway: StartGateway, demo_state: DemoState
) -> None:
    demo_state.catalog = {"models": "not a list"}  # type: ignore[assignment]  # every load fails
    gateway = start_gateway({"GATEWAY_CATALOG_REFRESH_BACKOFF_MAX": "0.2"})
    # No probe, no request: the catalog keeps trying by itself, at its backoff.
    assert wait_until(lambda: demo_state.catalog_fetches >= 4, timeout=5), demo_state.catalog_fetches
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        not_ready = http.get("/readyz")
        assert not_ready.status_code == 503
        assert not_ready.json()["catalog"]["loaded"] is False
        # Once the upstream's catalog is good again, it is picked up without anyone asking.
        demo_state.catalog = default_catalog()
        seen = demo_state.catalog_fetches
        assert wait_until(lambda: value(scrape(gateway.url), "gateway_catalog_loaded") == 1, timeout=5)
        assert demo_state.catalog_fetches > seen
        loaded_after = demo_state.catalog_fetches
        for _ in range(20):
            assert http.get("/readyz").status_code == 200
        assert demo_state.catalog_fetches == loaded_after  # probing fetched nothing


# --------------------------------------------------------------------------- the pool gauge


def _private_reads(source: str) -> list[str]:
    """Attributes with a leading underscore read from objects other than ``self`` (ast), and
    ``getattr`` with such a name: what a library does not promise to keep."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                found.append(node.attr)
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"):
            continue
        name = node.args[1].value if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) else None
        if isinstance(name, str) and name.startswith("_"):
            found.append(name)
    return found


@pytest.mark.parametrize("module", ["aiohttp_client.py", "base.py"])
def test_upstream_clients_read_no_private_attributes(module: str) -> None:
    assert _private_reads((UPSTREAM_DIR / module).read_text(encoding="utf-8")) == []


@pytest.fixture(params=["aiohttp", "httpx"])
def pooled_gateway(request: pytest.FixtureRequest, start_gateway: StartGateway) -> LocalServer:
    return start_gateway({"GATEWAY_UPSTREAM_CLIENT": request.param})


def test_pool_gauge_counts_connections_in_use(pooled_gateway: LocalServer, demo_state: DemoState) -> None:
    url = pooled_gateway.url
    assert wait_until(lambda: value(scrape(url), "gateway_catalog_loaded") == 1)
    demo_state.token_delay = 0.05
    body = {**CHAT_BODY, "stream": True, "max_tokens": 60}
    with httpx.Client(base_url=url, timeout=10) as http, http.stream("POST", CHAT_PATH, json=body) as response:
        assert response.status_code == 200
        chunks = response.iter_raw()
        next(chunks)  # the stream is open: its upstream connection is in use
        during = scrape(url)
        assert value(during, "gateway_upstream_connections", state="active") == 1
        # Only what public API can tell: no "idle" series read from a library's internals.
        assert series(during, "gateway_upstream_connections") == [{"state": "active"}]
        for _ in chunks:
            pass
    assert wait_until(lambda: value(scrape(url), "gateway_upstream_connections", state="active") == 0)
