"""A hostile (or broken) upstream: out-of-range usage numbers, encodings the meter cannot read,
cookies and spoofed gateway headers, error bodies that echo the organisation's key.

The upstream here is a small ASGI app on 127.0.0.1 that answers what each test scripts; the gateway
in front of it is real, in keys or open mode, with its SQLite ledger where the test reads usage.
"""

from __future__ import annotations

import gzip
import json
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from gateway.catalog.entries import parse_catalog
from gateway.demo import default_catalog
from gateway.headers import header_safe
from gateway.server.thread import LocalServer, serve_in_thread
from gateway.usage.model import MAX_COUNT
from gateway.usage.pricing import max_cost_usd
from tests.helpers.gateway import (
    CHAT_MODEL,
    CHAT_PATH,
    IMAGE_MODEL,
    StartGateway,
    chat_body,
    key_secret,
    key_table,
    keys_config,
    wait_until,
)

ORG_KEY = "sk-org-0123456789abcdefghijklmnopqrstuv"
IMAGES = "/v1/images/generations"
PRICE_PER_TOKEN = 0.80 / 1e6  # the demo catalog's price for CHAT_MODEL, in and out
Header = tuple[bytes, bytes]


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    headers: list[Header] = field(default_factory=lambda: [(b"content-type", b"application/json")])


@dataclass
class Script:
    """What the upstream answers (``answer(request headers)``) and what it received."""

    answer: Callable[[dict[str, str]], Answer] = lambda _headers: Answer(body=completion({}))
    received: list[dict[str, str]] = field(default_factory=list)


def completion(usage: Any) -> bytes:
    """A chat completion with this ``usage`` (the standard library's JSON: integers of any size)."""
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": CHAT_MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": usage,
        }
    ).encode()


def tokens(prompt: Any, completion_tokens: Any = 1) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens}


@pytest.fixture
def script() -> Script:
    return Script()


@pytest.fixture
def hostile(script: Script) -> Iterator[LocalServer]:
    catalog = orjson.dumps(default_catalog())

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body", False):
            pass
        if scope["path"] == "/api/models":
            answer = Answer(body=catalog)
        else:
            headers = {k.decode().lower(): v.decode("latin-1") for k, v in scope["headers"]}
            script.received.append(headers)
            answer = script.answer(headers)
        await send({"type": "http.response.start", "status": answer.status, "headers": answer.headers})
        await send({"type": "http.response.body", "body": answer.body})

    with serve_in_thread(app) as server:
        yield server


@pytest.fixture
def keys_gateway(start_gateway: StartGateway, hostile: LocalServer, tmp_path: Path) -> Callable[[str], LocalServer]:
    def start(alice: str = "") -> LocalServer:
        ledger = tmp_path / "usage.db"
        config = keys_config(tmp_path / "gateway.toml", key_table("alice", alice), ledger=ledger)
        env = {"GATEWAY_UPSTREAM_API_KEY": ORG_KEY, "GATEWAY_USAGE_PATH": str(ledger)}
        return start_gateway(env, upstream_url=hostile.url, config=config)

    return start


def alice() -> dict[str, str]:
    return {"authorization": f"Bearer {key_secret('alice')}"}


def ledger_rows(path: Path, expected: int) -> list[sqlite3.Row]:
    """The ledger's rows once ``expected`` of them have been written (bounded wait)."""

    def read() -> list[sqlite3.Row]:
        if not path.is_file():
            return []
        conn = sqlite3.connect(path)
        conn.row_factory = sqlite3.Row
        try:
            return list(conn.execute("SELECT * FROM usage ORDER BY id"))
        except sqlite3.OperationalError:
            return []
        finally:
            conn.close()

    assert wait_until(lambda: len(read()) >= expected, timeout=10), read()
    return read()


CHAT_BODY = chat_body("hi")


# --------------------------------------------------------------------------- usage numbers


@pytest.mark.parametrize(
    "usage",
    [
        tokens(1e308),
        tokens(10**30, 10**30),
        tokens(-5, -1),
        tokens("12", "3"),
        tokens(True, False),
        tokens(1.5, 2.5),
        tokens({"n": 1}, [1]),
        tokens(None, None),
        {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 1e300},
        "not an object",
        None,
    ],
)
def test_out_of_range_or_mistyped_usage_never_stops_the_ledger(
    keys_gateway: Callable[[str], LocalServer], script: Script, tmp_path: Path, usage: Any
) -> None:
    """The answer is relayed as it came, numbers are clamped or ignored at the boundary, and the
    ledger keeps recording: the hostile answer's row and the normal one after it."""
    gateway = keys_gateway("")
    script.answer = lambda _h: Answer(body=completion(usage))
    hostile = httpx.post(gateway.url + CHAT_PATH, json=CHAT_BODY, headers=alice(), timeout=10)
    assert hostile.status_code == 200
    assert hostile.content == completion(usage)  # relayed untouched
    cost = hostile.headers.get("x-gateway-cost-usd")
    assert cost is None or 0 <= float(cost) < float("inf")
    script.answer = lambda _h: Answer(body=completion(tokens(7, 3)))
    assert httpx.post(gateway.url + CHAT_PATH, json=CHAT_BODY, headers=alice(), timeout=10).status_code == 200
    first, second = ledger_rows(tmp_path / "usage.db", 2)
    assert 0 <= first["prompt_tokens"] <= MAX_COUNT
    assert 0 <= first["total_tokens"] <= 2 * MAX_COUNT
    assert (second["prompt_tokens"], second["completion_tokens"]) == (7, 3)


def test_a_huge_count_is_clamped_not_dropped(keys_gateway: Callable[[str], LocalServer], script: Script,
                                            tmp_path: Path) -> None:  # fmt: skip
    gateway = keys_gateway("")
    script.answer = lambda _h: Answer(body=completion(tokens(1e308)))
    assert httpx.post(gateway.url + CHAT_PATH, json=CHAT_BODY, headers=alice(), timeout=10).status_code == 200
    (row,) = ledger_rows(tmp_path / "usage.db", 1)
    assert row["prompt_tokens"] == MAX_COUNT
    assert row["cost_usd"] == pytest.approx((MAX_COUNT + 1) * PRICE_PER_TOKEN)


# --------------------------------------------------------------------------- encodings


def honours_accept_encoding(usage: dict[str, Any]) -> Callable[[dict[str, str]], Answer]:
    """An upstream that compresses the way the request asked: br (bytes no meter reads), gzip or none."""

    def answer(headers: dict[str, str]) -> Answer:
        asked = headers.get("accept-encoding", "")
        body = completion(usage)
        if "br" in asked:
            return Answer(body=b"\x1b\x00brotli-bytes", headers=[(b"content-type", b"application/json"),
                                                                   (b"content-encoding", b"br")])  # fmt: skip
        if "gzip" in asked:
            return Answer(body=gzip.compress(body, mtime=0), headers=[(b"content-type", b"application/json"),
                                                                       (b"content-encoding", b"gzip")])  # fmt: skip
        return Answer(body=body)

    return answer


def test_a_client_cannot_slip_past_its_budget_by_asking_for_brotli(
    keys_gateway: Callable[[str], LocalServer], script: Script
) -> None:
    """The review's case: $0.80 requests against a $2 budget, the client asking for br. The
    upstream is never asked for br, so every answer is metered and the budget holds."""
    gateway = keys_gateway("budget_usd_daily = 2.0")
    script.answer = honours_accept_encoding(tokens(1_000_000, 0))
    statuses = []
    for _ in range(8):
        answer = httpx.post(
            gateway.url + CHAT_PATH, json=CHAT_BODY, headers={**alice(), "accept-encoding": "br"}, timeout=10
        )
        statuses.append(answer.status_code)
    assert statuses == [200, 200, 200, 402, 402, 402, 402, 402]
    assert all("br" not in received["accept-encoding"] for received in script.received)


def test_gzip_asked_by_the_client_is_metered_and_relayed_compressed(
    keys_gateway: Callable[[str], LocalServer], script: Script
) -> None:
    gateway = keys_gateway("")
    script.answer = honours_accept_encoding(tokens(100, 50))
    with httpx.Client(timeout=10) as http:
        answer = http.post(gateway.url + CHAT_PATH, json=CHAT_BODY, headers={**alice(), "accept-encoding": "gzip, br"})
    assert answer.status_code == 200
    assert answer.headers["content-encoding"] == "gzip"
    assert answer.json()["usage"]["prompt_tokens"] == 100  # httpx decoded it
    assert float(answer.headers["x-gateway-cost-usd"]) == pytest.approx(150 * PRICE_PER_TOKEN)


# --------------------------------------------------------------------------- headers from upstream


def test_upstream_cookies_and_gateway_headers_never_reach_the_client(
    keys_gateway: Callable[[str], LocalServer], script: Script
) -> None:
    gateway = keys_gateway("")
    spoofed = [
        (b"content-type", b"application/json"),
        (b"set-cookie", b"session=upstream; Path=/"),
        (b"x-gateway-cost-usd", b"0.00000000"),
        (b"x-gateway-model-health", b"spoofed"),
        (b"x-upstream-own", b"kept"),
    ]
    script.answer = lambda _h: Answer(body=completion(tokens(10, 10)), headers=spoofed)
    answer = httpx.post(gateway.url + CHAT_PATH, json=CHAT_BODY, headers=alice(), timeout=10)
    assert answer.status_code == 200
    assert "set-cookie" not in answer.headers
    assert answer.headers.get_list("x-gateway-cost-usd") == [f"{20 * PRICE_PER_TOKEN:.8f}"]
    assert "x-gateway-model-health" not in answer.headers
    assert answer.headers["x-upstream-own"] == "kept"


def test_text_from_the_catalog_is_made_safe_for_a_header() -> None:
    assert header_safe("degraded\r\nx-evil: 1") == b"degraded??x-evil: 1"
    assert header_safe("é") == b"??"
    assert len(header_safe("x" * 1000)) == 256


@pytest.mark.parametrize(
    "echo",
    [
        ORG_KEY.encode(),
        b"Incorrect API key provided: " + ORG_KEY[:20].encode() + b"****",  # the prefix OpenAI shows
        b"key ending in " + ORG_KEY[-20:].encode(),
    ],
)
@pytest.mark.parametrize("compressed", [False, True])
def test_an_upstream_error_echoing_the_organisation_key_is_redacted(
    start_gateway: StartGateway, hostile: LocalServer, script: Script, echo: bytes, compressed: bool
) -> None:
    body = b'{"error": {"message": "' + echo + b'", "type": "authentication_error", "code": "invalid_api_key"}}'
    headers = [(b"content-type", b"application/json")]
    if compressed:
        body = gzip.compress(body, mtime=0)
        headers.append((b"content-encoding", b"gzip"))
    script.answer = lambda _h: Answer(status=401, body=body, headers=headers)
    gateway = start_gateway(
        {"GATEWAY_UPSTREAM_API_KEY": ORG_KEY, "GATEWAY_AUTH_MODE": "open"}, upstream_url=hostile.url
    )
    with (
        openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-anything", max_retries=0) as sdk,
        pytest.raises(openai.AuthenticationError) as raised,
    ):
        sdk.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}])
    text = raised.value.response.text
    assert "[redacted]" in text
    for fragment in (ORG_KEY, ORG_KEY[:19], ORG_KEY[-19:]):
        assert fragment not in text
    assert raised.value.code == "invalid_api_key"  # still the upstream's error, parsed by the SDK


def test_a_failed_image_request_is_not_charged(
    keys_gateway: Callable[[str], LocalServer], script: Script, tmp_path: Path
) -> None:
    """The per-image price applies to images made: an upstream 500 costs nothing."""
    gateway = keys_gateway("")
    script.answer = lambda _h: Answer(status=500, body=b'{"error": {"message": "boom", "type": "server_error"}}')
    body = {"model": IMAGE_MODEL, "prompt": "a cat", "n": 2}
    assert httpx.post(gateway.url + IMAGES, json=body, headers=alice(), timeout=10).status_code == 500
    made = {"created": 1, "data": [{"b64_json": "aGk="}, {"b64_json": "aGk="}]}
    script.answer = lambda _h: Answer(body=orjson.dumps(made))
    assert httpx.post(gateway.url + IMAGES, json=body, headers=alice(), timeout=10).status_code == 200
    # The answer's count wins over the request's: two asked, one made, one billed.
    script.answer = lambda _h: Answer(body=orjson.dumps({"created": 1, "data": [{"b64_json": "aGk="}]}))
    assert httpx.post(gateway.url + IMAGES, json=body, headers=alice(), timeout=10).status_code == 200
    failed, served, fewer = ledger_rows(tmp_path / "usage.db", 3)
    (price,) = [p["price_usd"] for m in default_catalog() if m["model_name"] == IMAGE_MODEL for p in m["pricing"]]
    assert (failed["status"], failed["cost_usd"]) == (500, 0.0)
    assert (served["status"], served["cost_usd"]) == (200, pytest.approx(2 * price))
    assert (fewer["status"], fewer["cost_usd"]) == (200, pytest.approx(price))


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_the_meter_cannot_read_is_charged_the_ceiling(
    keys_gateway: Callable[[str], LocalServer], script: Script, tmp_path: Path, stream: bool
) -> None:
    """An upstream that compresses what it was not asked to (br, or a gzip event stream) is charged
    the request's ceiling, never nothing, and the budget sees it."""
    gateway = keys_gateway("budget_usd_daily = 0.02")
    content_type = b"text/event-stream" if stream else b"application/json"
    coding = b"gzip" if stream else b"br"
    script.answer = lambda _h: Answer(
        body=b"\x1f\x8b-not-readable", headers=[(b"content-type", content_type), (b"content-encoding", coding)]
    )
    body = {**CHAT_BODY, "max_tokens": 100, "stream": stream}
    with (
        httpx.Client(timeout=10) as http,
        http.stream(
            "POST", gateway.url + CHAT_PATH, json=body, headers={**alice(), "accept-encoding": "identity"}
        ) as first,
    ):
        assert first.status_code == 200
        assert b"".join(first.iter_raw()) == b"\x1f\x8b-not-readable"  # relayed as it came
    assert script.received[0]["accept-encoding"] == "identity"
    (row,) = ledger_rows(tmp_path / "usage.db", 1)
    entry = next(e for e in parse_catalog(default_catalog()).entries if e.model_name == CHAT_MODEL)
    ceiling = max_cost_usd(entry, CHAT_PATH, body)
    assert ceiling is not None
    assert ceiling > 0.02  # the model's context window at its input price is more than the budget
    assert row["cost_usd"] == pytest.approx(ceiling)
    second = httpx.post(gateway.url + CHAT_PATH, json=body, headers=alice(), timeout=10)
    assert second.status_code == 402
