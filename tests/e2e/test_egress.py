"""The gateway as an organisation's egress proxy (issue #13): what may cross to the upstream, who may
read the metrics, who may poll a video job, and the small promises a team relies on (rate-limit
reset times, refusals in the ledger and the metrics, a dry run's health warning).

Each test drives a real gateway on 127.0.0.1 in front of the simulated upstream, which records
every request it receives.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.demo import DemoState
from gateway.server.thread import LocalServer
from tests.helpers.gateway import (
    CHAT_BODY,
    CHAT_MODEL,
    CHAT_PATH,
    DEGRADED_MODEL,
    EMBEDDING_MODEL,
    VIDEO_MODEL,
    StartGateway,
    assert_gateway_error,
    forwarded,
    key_secret,
    key_table,
    keys_config,
    requests_on,
    wait_until,
)

VIDEOS = "/v1/videos/generations"
ORG_KEY = "sk-org-0123456789abcdefghijklmnop"
SCRAPE_TOKEN = "scrape-token-for-prometheus"

Launch = Callable[..., LocalServer]


def bearer(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key_secret(name)}"}


@pytest.fixture
def launch(start_gateway: StartGateway, tmp_path: Path) -> Launch:
    """A keys-mode gateway whose config has the given [[keys]] tables (and an admin key)."""

    def start(tables: str = key_table("alice"), *, ledger: bool = False, extra: str = "", **env: str) -> LocalServer:
        config = keys_config(
            tmp_path / "gateway.toml", tables, ledger=tmp_path / "usage.db" if ledger else None, extra=extra
        )
        usage = {"GATEWAY_USAGE_PATH": str(tmp_path / "usage.db")} if ledger else {}
        return start_gateway({"GATEWAY_UPSTREAM_API_KEY": ORG_KEY, **usage, **env}, config=config)

    return start


def upstream_headers(state: DemoState, path: str = CHAT_PATH) -> dict[str, str]:
    (request,) = requests_on(state, path)
    return request.headers


# --------------------------------------------------------------------------- what crosses upstream


def test_client_side_headers_and_credentials_never_reach_the_upstream(launch: Launch, demo_state: DemoState) -> None:
    gateway = launch()
    secret = key_secret("alice")
    response = httpx.post(
        gateway.url + CHAT_PATH + "?api_key=" + secret + "&keep=1",
        json=CHAT_BODY,
        headers={
            **bearer("alice"),
            "x-api-key": secret,
            "cookie": "session=abc",
            "forwarded": "for=1.2.3.4",
            "x-forwarded-for": "1.2.3.4",
            "x-forwarded-host": "evil.example",
            "x-real-ip": "1.2.3.4",
            "openai-organization": "org-123",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "x-gateway-fallback": "auto",
            "x-custom": "kept",
        },
        timeout=10,
    )
    assert response.status_code == 200, response.text
    (request,) = requests_on(demo_state, CHAT_PATH)
    for name in ("x-api-key", "cookie", "forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip",
                 "openai-organization", "traceparent", "x-gateway-fallback"):  # fmt: skip
        assert name not in request.headers, name
    assert request.headers["authorization"] == f"Bearer {ORG_KEY}"
    assert request.headers["x-custom"] == "kept"
    assert request.query == "keep=1"
    assert all(secret not in value for value in request.headers.values())


def test_the_gateway_sets_its_own_forwarded_for_when_configured(launch: Launch, demo_state: DemoState) -> None:
    gateway = launch(GATEWAY_UPSTREAM_FORWARD_CLIENT_IP="true")
    response = httpx.post(
        gateway.url + CHAT_PATH, json=CHAT_BODY, headers={**bearer("alice"), "x-forwarded-for": "6.6.6.6"}
    )
    assert response.status_code == 200, response.text
    headers = upstream_headers(demo_state)
    assert headers["x-forwarded-for"] == "127.0.0.1"  # the peer the gateway saw, not the client's claim
    assert headers["x-forwarded-proto"] == "http"


@pytest.mark.parametrize(
    ("asked", "stream", "sent"),
    [
        ("br", False, "identity"),
        ("gzip, br, zstd", False, "gzip"),
        ("*", False, "gzip, deflate"),
        ("gzip;q=0, deflate", False, "deflate"),
        ("gzip, deflate", True, "identity"),  # an event stream is metered as it passes: never compressed
        ("", False, "identity"),
    ],
)
def test_the_upstream_is_asked_only_for_encodings_the_meter_reads(
    gateway: LocalServer, demo_state: DemoState, asked: str, stream: bool, sent: str
) -> None:
    headers = {"authorization": "Bearer sk-client", "accept-encoding": asked or ""}
    body = {**CHAT_BODY, "stream": stream}
    with httpx.Client(timeout=10) as http:
        response = http.post(gateway.url + CHAT_PATH, json=body, headers=headers)
    assert response.status_code == 200, response.text
    assert upstream_headers(demo_state)["accept-encoding"] == sent


# --------------------------------------------------------------------------- /metrics


def test_metrics_need_an_admin_key_or_the_scrape_token_in_keys_mode(launch: Launch) -> None:
    digest = hashlib.sha256(SCRAPE_TOKEN.encode()).hexdigest()
    gateway = launch(extra=f'[metrics]\ntoken_sha256 = "{digest}"\n')
    assert httpx.post(gateway.url + CHAT_PATH, json=CHAT_BODY, headers=bearer("alice")).status_code == 200
    url = gateway.url + "/metrics"
    assert_gateway_error(httpx.get(url), 401, "missing_api_key")
    assert_gateway_error(httpx.get(url, headers=bearer("alice")), 401, "admin_key_required")
    assert_gateway_error(httpx.get(url, headers={"authorization": "Bearer not-the-token"}), 401, "invalid_api_key")
    for headers in (bearer("admin"), {"authorization": f"Bearer {SCRAPE_TOKEN}"}):
        answer = httpx.get(url, headers=headers)
        assert answer.status_code == 200, answer.text
        assert 'key="alice"' in answer.text
    # The scrape token is good for /metrics only.
    assert_gateway_error(
        httpx.post(gateway.url + CHAT_PATH, json=CHAT_BODY, headers={"authorization": f"Bearer {SCRAPE_TOKEN}"}),
        401,
        "invalid_api_key",
    )


def test_metrics_can_be_made_public_and_stay_open_outside_keys_mode(launch: Launch, gateway: LocalServer) -> None:
    assert httpx.get(gateway.url + "/metrics").status_code == 200  # pass-through: no key names in it
    public = launch(GATEWAY_METRICS_PUBLIC="true")
    assert httpx.get(public.url + "/metrics").status_code == 200


# --------------------------------------------------------------------------- video jobs


def test_only_the_key_that_created_a_video_job_may_poll_it(launch: Launch, demo_state: DemoState) -> None:
    gateway = launch(key_table("alice") + key_table("bob"))
    created = httpx.post(gateway.url + VIDEOS, json={"model": VIDEO_MODEL, "prompt": "a cat"}, headers=bearer("alice"))
    assert created.status_code == 200, created.text
    job = created.json()["id"]
    poll = gateway.url + f"{VIDEOS}/{job}"
    assert httpx.get(poll, headers=bearer("alice")).status_code == 200
    assert httpx.get(poll, headers=bearer("admin")).status_code == 200
    before = len(forwarded(demo_state))
    assert_gateway_error(httpx.get(poll, headers=bearer("bob")), 404, "job_not_found")
    assert_gateway_error(httpx.get(gateway.url + f"{VIDEOS}/video-unknown", headers=bearer("alice")), 404,
                         "job_not_found")  # fmt: skip
    assert len(forwarded(demo_state)) == before  # neither reached the upstream


def test_polling_is_held_to_the_key_policy(launch: Launch, demo_state: DemoState) -> None:
    gateway = launch(key_table("alice", "rpm = 2"))
    created = httpx.post(gateway.url + VIDEOS, json={"model": VIDEO_MODEL, "prompt": "a cat"}, headers=bearer("alice"))
    assert created.status_code == 200, created.text
    poll = gateway.url + f"{VIDEOS}/{created.json()['id']}"
    assert httpx.get(poll, headers=bearer("alice")).status_code == 200
    limited = httpx.get(poll, headers=bearer("alice"))
    assert_gateway_error(limited, 429, "rate_limit_exceeded")


@pytest.mark.parametrize("raw", ["%2e%2e", "..", "%2E%2e", "..%2f..%2fapi%2fmodels", "a%00b", "%2e"])
def test_a_job_id_that_is_not_one_never_reaches_the_upstream(
    gateway: LocalServer, demo_state: DemoState, raw: str
) -> None:
    with httpx.Client(timeout=10) as http:
        request = http.build_request("GET", gateway.url + f"{VIDEOS}/x")
        request.url = request.url.copy_with(raw_path=f"{VIDEOS}/{raw}".encode())
        answer = http.send(request)
    assert answer.status_code == 404, answer.text
    assert answer.json()["error"]["code"] in ("job_not_found", "unknown_url")
    assert forwarded(demo_state) == []


def test_the_job_path_sent_upstream_is_the_one_matched(gateway: LocalServer, demo_state: DemoState) -> None:
    """A job id spelled with escapes the gateway decodes goes upstream in its plain form."""
    with httpx.Client(timeout=10) as http:
        request = http.build_request("GET", gateway.url + f"{VIDEOS}/x", headers={"authorization": "Bearer sk-x"})
        request.url = request.url.copy_with(raw_path=f"{VIDEOS}/video%2Dabc".encode())
        http.send(request)
    assert forwarded(demo_state) == [f"GET {VIDEOS}/video-abc"]


# --------------------------------------------------------------------------- team promises


def test_the_answer_that_uses_up_the_limit_says_when_it_resets(launch: Launch) -> None:
    gateway = launch(key_table("alice", "rpm = 2"))
    first = httpx.post(gateway.url + CHAT_PATH, json=CHAT_BODY, headers=bearer("alice"))
    last = httpx.post(gateway.url + CHAT_PATH, json=CHAT_BODY, headers=bearer("alice"))
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-reset-requests"] == "0s"  # room for another one now
    assert last.headers["x-ratelimit-remaining-requests"] == "0"
    reset = float(last.headers["x-ratelimit-reset-requests"].removesuffix("s"))
    assert 50 < reset <= 60  # the first request leaves the 60 s window then
    refused = httpx.post(gateway.url + CHAT_PATH, json=CHAT_BODY, headers=bearer("alice"))
    assert refused.status_code == 429
    assert refused.headers["x-ratelimit-reset-requests"] != "0s"


def test_every_refusal_of_a_catalog_model_is_in_the_ledger_and_labelled_in_metrics(launch: Launch) -> None:
    gateway = launch(key_table("alice", 'models = ["Qwen*"]'), ledger=True)
    auth = bearer("alice")
    ok = httpx.post(gateway.url + CHAT_PATH, json=CHAT_BODY, headers=auth)
    assert ok.status_code == 200
    forbidden = httpx.post(gateway.url + "/v1/embeddings", json={"model": EMBEDDING_MODEL, "input": "x"}, headers=auth)
    assert_gateway_error(forbidden, 403, "model_not_allowed")
    wrong = httpx.post(gateway.url + CHAT_PATH, json={**CHAT_BODY, "n": "two"}, headers=auth)
    assert wrong.status_code == 400
    admin = bearer("admin")

    def rows() -> list[dict[str, Any]]:
        answer = httpx.get(gateway.url + "/admin/usage", params={"by": "model"}, headers=admin)
        assert answer.status_code == 200, answer.text
        data: list[dict[str, Any]] = answer.json()["data"]
        return data

    assert wait_until(lambda: sum(r["requests"] + r["refused"] for r in rows()) == 3)
    by_model = {r["model"]: (r["requests"], r["refused"]) for r in rows()}
    assert by_model == {CHAT_MODEL: (1, 1), EMBEDDING_MODEL: (0, 1)}
    metrics = httpx.get(gateway.url + "/metrics", headers=admin).text
    refusals = {
        (s.labels["model"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.name == "gateway_requests_total" and s.labels["outcome"] == "refused"
    }
    assert refusals == {(EMBEDDING_MODEL, "403"): 1.0, (CHAT_MODEL, "400"): 1.0}


def test_a_dry_run_for_a_degraded_model_warns(gateway: LocalServer, demo_state: DemoState) -> None:
    answer = httpx.post(
        gateway.url + "/v1/validate/chat/completions",
        json={"model": DEGRADED_MODEL, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert answer.status_code == 200, answer.text
    report = answer.json()
    assert report["admitted"] is True
    assert [w["code"] for w in report["warnings"]] == ["model_not_healthy"]
    assert "degraded" in report["warnings"][0]["message"]
    assert answer.headers["x-gateway-model-health"] == "degraded"
    assert forwarded(demo_state) == []
