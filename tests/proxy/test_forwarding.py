"""What the gateway sends upstream and what it gives back: bytes, credentials, headers, request ids,
compression, and the answers to upstream faults (the upstream's view is DemoState.requests).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from gateway.demo import DemoState, create_demo_upstream, default_catalog
from gateway.headers import content_encoding, is_event_stream
from gateway.server.thread import LocalServer, serve_in_thread
from tests.helpers.gateway import (
    CHAT_BODY,
    CHAT_MODEL,
    CHAT_PATH,
    EMBEDDING_MODEL,
    STT_MODEL,
    TTS_MODEL,
    TTS_VOICE,
    StartGateway,
    assert_gateway_error,
    forwarded,
    fresh_demo_state,
    is_ready,
    module_server_fixtures,
    normal_chat,
    requests_on,
    wait_until,
)
from tests.helpers.upstreams import (
    EMBEDDING_PAYLOAD,
    RATE_LIMIT_HEADERS,
    RATE_LIMITED_BODY,
    SSE_EVENTS,
    FaultMode,
    FaultyUpstream,
    InlineUpstreamState,
    create_inline_upstream,
)

SPEECH = "/v1/audio/speech"
AUTH = {"authorization": "Bearer sk-client"}
VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


# One upstream and one gateway shared by the module (conftest's fixtures overridden).
_servers, demo_state, upstream, gateway = module_server_fixtures()


def only_request(state: DemoState, path: str = CHAT_PATH) -> dict[str, str]:
    """The headers of the one request the upstream received on ``path``."""
    (received,) = requests_on(state, path)
    return received.headers


# --------------------------------------------------------------------------- bodies


def test_json_body_arrives_byte_for_byte(http: httpx.Client, demo_state: DemoState) -> None:
    raw = (
        b'{ "messages" :[ {"content":"caf\\u00e9 \\ud83d\\ude00 \xc3\xa9t\xc3\xa9","role" : "user"}],\n'
        b'\t"model":"Qwen2.5-32B-Instruct-FP8" ,"temperature":1.50e0, "unknown_field":{"b":1,"a":[ ]} }  \n'
    )
    response = http.post(CHAT_PATH, content=raw, headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == 200, response.text
    (received,) = requests_on(demo_state, CHAT_PATH)
    assert received.body == raw
    assert received.headers["content-length"] == str(len(raw))
    assert received.headers["content-type"] == "application/json"


def test_multipart_body_arrives_byte_for_byte(http: httpx.Client, demo_state: DemoState) -> None:
    audio = os.urandom(20_000)
    request = http.build_request(
        "POST",
        "/v1/audio/transcriptions",
        data={"model": STT_MODEL, "response_format": "text"},
        files={"file": ("clip.wav", audio, "audio/wav")},
        headers=AUTH,
    )
    raw = request.read()
    response = http.send(request)
    assert response.status_code == 200, response.text
    (received,) = requests_on(demo_state, "/v1/audio/transcriptions")
    assert received.body == raw
    assert received.headers["content-type"] == request.headers["content-type"]


def test_chunked_upload_is_forwarded_with_a_length(http: httpx.Client, demo_state: DemoState) -> None:
    raw = orjson.dumps({**CHAT_BODY, "metadata": {"pad": "z" * 5000}})

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(raw), 700):
            yield raw[start : start + 700]

    request = http.build_request(
        "POST", CHAT_PATH, content=chunks(), headers={**AUTH, "content-type": "application/json"}
    )
    assert request.headers["transfer-encoding"] == "chunked"
    response = http.send(request)
    assert response.status_code == 200, response.text
    (received,) = requests_on(demo_state, CHAT_PATH)
    assert received.body == raw
    assert received.headers["content-length"] == str(len(raw))
    assert "transfer-encoding" not in received.headers


def test_path_and_query_forwarded_as_sent(http: httpx.Client, demo_state: DemoState) -> None:
    response = http.post(CHAT_PATH + "?api-version=2024-01-01&tag=a%20b&tag=c", json=CHAT_BODY, headers=AUTH)
    assert response.status_code == 200, response.text
    (received,) = requests_on(demo_state, CHAT_PATH)
    assert received.query == "api-version=2024-01-01&tag=a%20b&tag=c"


# --------------------------------------------------------------------------- credentials


def test_passthrough_forwards_the_client_authorization(client: openai.OpenAI, demo_state: DemoState) -> None:
    client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}])
    assert only_request(demo_state)["authorization"] == "Bearer sk-client"


def test_passthrough_without_authorization_sends_none(http: httpx.Client, demo_state: DemoState) -> None:
    assert http.post(CHAT_PATH, json=CHAT_BODY).status_code == 200
    assert "authorization" not in only_request(demo_state)


def test_open_mode_sends_the_gateway_key_never_the_client_key(
    start_gateway: StartGateway, demo_state: DemoState
) -> None:
    gateway = start_gateway(env={"GATEWAY_UPSTREAM_API_KEY": "sk-org", "GATEWAY_AUTH_MODE": "open"})
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-client-secret", max_retries=0, timeout=10) as sdk:
        sdk.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}])
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        assert http.post(CHAT_PATH, json=CHAT_BODY).status_code == 200  # no client credential at all
        assert http.post(CHAT_PATH, json=CHAT_BODY, headers={"authorization": "Basic c2stY2xpZW50"}).status_code == 200
    received = requests_on(demo_state, CHAT_PATH)
    assert len(received) == 3
    for request in received:
        assert request.headers["authorization"] == "Bearer sk-org"
        for value in request.headers.values():
            assert "sk-client" not in value
            assert "c2stY2xpZW50" not in value


# --------------------------------------------------------------------------- headers


def test_hop_by_hop_headers_are_not_forwarded(http: httpx.Client, demo_state: DemoState, upstream: LocalServer) -> None:
    headers = {
        **AUTH,
        "Connection": "keep-alive, X-Custom",
        "X-Custom": "connection-scoped",
        "Keep-Alive": "timeout=5, max=100",
        "TE": "trailers",
        "Upgrade": "h2c",
        "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
        "Proxy-Connection": "keep-alive",
        "OpenAI-Organization": "org-123",
        "OpenAI-Project": "proj-456",
        "X-Stainless-Lang": "python",
        "X-Stainless-Retry-Count": "0",
        "X-Ordinary": "kept",
    }
    response = http.post(CHAT_PATH, json=CHAT_BODY, headers=headers)
    assert response.status_code == 200, response.text
    received = only_request(demo_state)
    for name in ("x-custom", "keep-alive", "te", "upgrade", "proxy-authorization", "proxy-connection"):
        assert name not in received, (name, received)
    assert "x-custom" not in received.get("connection", "").lower()
    for value in received.values():
        assert "cHJveHk6c2VjcmV0" not in value
        assert "connection-scoped" not in value
    assert "openai-organization" not in received  # OpenAI account routing: the client's side only
    assert "openai-project" not in received
    assert received["x-stainless-lang"] == "python"
    assert received["x-stainless-retry-count"] == "0"
    assert received["x-ordinary"] == "kept"
    assert received["authorization"] == "Bearer sk-client"
    assert received["host"] == f"{upstream.host}:{upstream.port}"


def test_sdk_headers_reach_the_upstream(gateway: LocalServer, demo_state: DemoState) -> None:
    with openai.OpenAI(
        base_url=gateway.url + "/v1", api_key="sk-client", organization="org-abc", max_retries=0, timeout=10
    ) as sdk:
        sdk.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}])
    received = only_request(demo_state)
    assert "openai-organization" not in received
    assert received["x-stainless-lang"] == "python"
    assert received["user-agent"].startswith("OpenAI/Python")
    assert received["content-type"] == "application/json"


# --------------------------------------------------------------------------- request ids


def test_client_request_id_is_forwarded_and_returned(http: httpx.Client, demo_state: DemoState) -> None:
    rid = "req-2024.05:ABC_def-123"
    response = http.post(CHAT_PATH, json=CHAT_BODY, headers={**AUTH, "x-request-id": rid})
    assert response.status_code == 200
    assert response.headers.get_list("x-request-id") == [rid]
    assert only_request(demo_state)["x-request-id"] == rid


def test_generated_request_id_is_forwarded_and_returned(http: httpx.Client, demo_state: DemoState) -> None:
    first = http.post(CHAT_PATH, json=CHAT_BODY, headers=AUTH)
    second = http.post(CHAT_PATH, json=CHAT_BODY, headers=AUTH)
    sent = [r.headers["x-request-id"] for r in requests_on(demo_state, CHAT_PATH)]
    returned = [first.headers["x-request-id"], second.headers["x-request-id"]]
    assert sent == returned
    assert sent[0] != sent[1]
    for rid in sent:
        assert VALID_REQUEST_ID.fullmatch(rid), rid


@pytest.mark.parametrize("bad_id", ["a" * 300, "has spaces in it", 'quote"and<angle>', "", "semi;colon", "x" * 129])
def test_invalid_request_id_is_replaced(http: httpx.Client, demo_state: DemoState, bad_id: str) -> None:
    response = http.post(CHAT_PATH, json=CHAT_BODY, headers={**AUTH, "x-request-id": bad_id})
    assert response.status_code == 200
    sent = only_request(demo_state)["x-request-id"]
    assert sent != bad_id
    assert VALID_REQUEST_ID.fullmatch(sent), sent
    assert response.headers.get_list("x-request-id") == [sent]


def test_request_id_at_the_length_limit_is_kept(http: httpx.Client, demo_state: DemoState) -> None:
    rid = "r" * 128
    response = http.post(CHAT_PATH, json=CHAT_BODY, headers={**AUTH, "x-request-id": rid})
    assert response.headers["x-request-id"] == rid
    assert only_request(demo_state)["x-request-id"] == rid


GATEWAY_ERRORS = {
    "unknown-model": (CHAT_PATH, {"model": "nope", "messages": []}, 404, "model_not_found"),
    "mismatch": ("/v1/embeddings", {"model": CHAT_MODEL, "input": "x"}, 400, "model_endpoint_mismatch"),
    "no-model": (CHAT_PATH, {"messages": []}, 400, "missing_model"),
    "unknown-path": ("/v1/nothing/here", {"model": CHAT_MODEL}, 404, "unknown_url"),
    "unsupported": ("/v1/audio/translations", {"model": STT_MODEL}, 404, "unknown_url"),
}


@pytest.mark.parametrize("case", GATEWAY_ERRORS.values(), ids=GATEWAY_ERRORS.keys())
def test_gateway_errors_carry_the_request_id(
    http: httpx.Client, demo_state: DemoState, case: tuple[str, dict[str, object], int, str]
) -> None:
    path, body, status, code = case
    sent_id = http.post(path, json=body, headers={**AUTH, "x-request-id": "client-id-1"})
    assert_gateway_error(sent_id, status, code)
    assert sent_id.headers.get_list("x-request-id") == ["client-id-1"]
    generated = http.post(path, json=body, headers=AUTH)
    assert_gateway_error(generated, status, code)
    assert VALID_REQUEST_ID.fullmatch(generated.headers["x-request-id"])
    assert forwarded(demo_state) == []


def test_a_header_sent_twice_counts_by_its_first_value(http: httpx.Client, demo_state: DemoState) -> None:
    # The request id as an example of every header the gateway reads (looked up once per request).
    headers = [("authorization", "Bearer sk-client"), ("X-Request-ID", "first-id"), ("x-request-id", "second-id")]
    response = http.post(CHAT_PATH, json=CHAT_BODY, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers.get_list("x-request-id") == ["first-id"]
    assert only_request(demo_state)["x-request-id"] == "first-id"  # one value: the client's two are replaced


# An upstream refusal the gateway does not pre-check: a speech format the upstream does not produce.
BAD_SPEECH = {"model": TTS_MODEL, "voice": TTS_VOICE, "input": "hello", "response_format": "ogg"}


def test_upstream_errors_carry_the_request_id(http: httpx.Client, demo_state: DemoState) -> None:
    response = http.post(SPEECH, json=BAD_SPEECH, headers={**AUTH, "x-request-id": "client-id-2"})
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("'response_format' must be one of")
    assert response.headers.get_list("x-request-id") == ["client-id-2"]
    assert only_request(demo_state, SPEECH)["x-request-id"] == "client-id-2"


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v1/models/no-such-model", 404, "model_not_found"),
        ("/v1/models?category=bogus", 400, "invalid_request"),
        ("/not-an-endpoint", 404, "unknown_url"),
    ],
)
def test_local_route_errors_carry_the_request_id(http: httpx.Client, path: str, status: int, code: str) -> None:
    response = http.get(path, headers={**AUTH, "x-request-id": "client-id-3"})
    assert_gateway_error(response, status, code)
    assert response.headers.get("x-request-id") == "client-id-3"


# --------------------------------------------------------------------------- SSE


def test_sse_response_has_one_x_accel_buffering(http: httpx.Client) -> None:
    with http.stream("POST", CHAT_PATH, json={**CHAT_BODY, "stream": True}, headers=AUTH) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers.get_list("x-accel-buffering") == ["no"]


def test_sse_x_accel_buffering_is_the_gateways(start_gateway: StartGateway) -> None:
    """The inline upstream asks its proxy to buffer (X-Accel-Buffering: yes): the gateway, which must not
    buffer, answers its own "no" instead, once."""
    state = InlineUpstreamState()
    with serve_in_thread(create_inline_upstream(state)) as inline:
        gateway = start_gateway(upstream_url=inline.url)
        with (
            httpx.Client(base_url=gateway.url, timeout=10) as http,
            http.stream("POST", CHAT_PATH, json={**CHAT_BODY, "stream": True}, headers=AUTH) as response,
        ):
            assert response.status_code == 200
            assert response.headers.get_list("x-accel-buffering") == ["no"]
            assert "x-accel-limit-rate" not in response.headers
            assert response.read() == b"".join(SSE_EVENTS)


def test_non_streaming_response_has_no_x_accel_buffering(http: httpx.Client) -> None:
    response = normal_chat(http)
    assert "x-accel-buffering" not in response.headers


# --------------------------------------------------------------------------- compression


@pytest.fixture
def encoding_upstream(start_gateway: StartGateway) -> Iterator[tuple[InlineUpstreamState, LocalServer]]:
    """(state, gateway) for a gateway in front of the gzip-capable inline upstream."""
    state = InlineUpstreamState()
    with serve_in_thread(create_inline_upstream(state)) as inline:
        yield state, start_gateway(upstream_url=inline.url)


EMBED = {"model": EMBEDDING_MODEL, "input": "hello"}


def test_compressed_response_stays_compressed(
    encoding_upstream: tuple[InlineUpstreamState, LocalServer],
) -> None:
    state, gateway = encoding_upstream
    with (
        httpx.Client(base_url=gateway.url, timeout=10) as http,
        http.stream("POST", "/v1/embeddings", json=EMBED, headers={**AUTH, "accept-encoding": "gzip"}) as response,
    ):
        raw = b"".join(response.iter_raw())
        headers = response.headers
    assert response.status_code == 200
    assert state.accept_encodings == ["gzip"]
    assert headers["content-encoding"] == "gzip"
    assert raw == state.sent[0]
    assert raw.startswith(b"\x1f\x8b")
    assert gzip.decompress(raw) == EMBEDDING_PAYLOAD
    if "content-length" in headers:
        assert headers["content-length"] == str(len(raw))
    # Metered from a decompressed copy: 2 prompt tokens at bge-m3's $0.02 per million.
    assert headers["x-gateway-cost-usd"] == f"{2 * 0.02 / 1e6:.8f}"


def test_without_accept_encoding_upstream_is_asked_for_identity(
    encoding_upstream: tuple[InlineUpstreamState, LocalServer],
) -> None:
    state, gateway = encoding_upstream
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        request = http.build_request("POST", "/v1/embeddings", json=EMBED, headers=AUTH)
        del request.headers["accept-encoding"]
        response = http.send(request, stream=True)
        try:
            raw = b"".join(response.iter_raw())
        finally:
            response.close()
        assert response.status_code == 200
        assert "content-encoding" not in response.headers
        assert raw == EMBEDDING_PAYLOAD
        # A client that names its encodings gets them passed on as they are.
        explicit = http.post("/v1/embeddings", json=EMBED, headers={**AUTH, "accept-encoding": "identity"})
        assert explicit.content == EMBEDDING_PAYLOAD
    assert state.accept_encodings == ["identity", "identity"]


def test_upstream_request_id_and_connection_headers_are_not_relayed(
    encoding_upstream: tuple[InlineUpstreamState, LocalServer],
) -> None:
    _state, gateway = encoding_upstream
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        response = http.post(
            "/v1/embeddings", json=EMBED, headers={**AUTH, "accept-encoding": "identity", "x-request-id": "mine-1"}
        )
    assert response.status_code == 200
    assert response.headers.get_list("x-request-id") == ["mine-1"]
    assert "x-upstream-hop" not in response.headers
    assert "x-upstream-hop" not in response.headers.get("connection", "")
    assert response.headers["x-upstream-info"] == "kept"


def test_upstream_redirect_does_not_send_the_client_to_the_upstream(start_gateway: StartGateway) -> None:
    """An upstream redirect to its own origin is rewritten to a relative one (as nginx's
    proxy_redirect default does): the client stays on the gateway and never sees the upstream's address."""
    catalog = orjson.dumps(default_catalog())

    async def redirecting(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        host = dict(scope["headers"])[b"host"].decode()
        if scope["path"] == "/api/models":
            status, headers, body = 200, [(b"content-type", b"application/json")], catalog
        else:
            target = f"http://{host}/v1/videos/generations/moved?x=1".encode()
            status, headers, body = 307, [(b"location", target)], b""
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    with serve_in_thread(redirecting) as inline:
        gateway = start_gateway(upstream_url=inline.url)
        response = httpx.get(gateway.url + "/v1/videos/generations/video_abc", timeout=10)
    assert response.status_code == 307
    assert response.headers["location"] == "/v1/videos/generations/moved?x=1"


def test_upstream_rate_limit_reaches_the_sdk_unchanged(start_gateway: StartGateway) -> None:
    """FlexAI's 429 with Retry-After and x-ratelimit-* headers: the SDK raises RateLimitError and sees
    the upstream's body and headers as they were sent."""
    with serve_in_thread(create_inline_upstream(InlineUpstreamState())) as inline:
        gateway = start_gateway(upstream_url=inline.url)
        with (
            openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-client", max_retries=0, timeout=10) as sdk,
            pytest.raises(openai.RateLimitError) as caught,
        ):
            sdk.completions.create(model=CHAT_MODEL, prompt="hello")
    assert caught.value.status_code == 429
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.response.content == RATE_LIMITED_BODY
    for name, value in RATE_LIMIT_HEADERS.items():
        assert caught.value.response.headers[name] == value
    assert caught.value.response.headers["x-request-id"]


# --------------------------------------------------------------------------- upstream faults


def assert_still_serving(http: httpx.Client) -> None:
    health = http.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    models = http.get("/v1/models", headers=AUTH)
    assert models.status_code == 200
    assert CHAT_MODEL in {m["id"] for m in models.json()["data"]}


def test_upstream_gone_after_catalog_load_is_502(start_gateway: StartGateway) -> None:
    with contextlib.ExitStack() as stack:
        doomed = stack.enter_context(serve_in_thread(create_demo_upstream(fresh_demo_state())))
        gateway = start_gateway(upstream_url=doomed.url)
        http = stack.enter_context(httpx.Client(base_url=gateway.url, timeout=10))
        assert wait_until(lambda: is_ready(http))
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        response = http.post(CHAT_PATH, json=CHAT_BODY, headers={**AUTH, "x-request-id": "gone-1"})
        error = assert_gateway_error(response, 502, "upstream_unavailable", "server_error")
        assert "could not be reached" in error["message"]
        assert "127.0.0.1" not in error["message"]  # the upstream's address is not disclosed
        assert response.headers["x-request-id"] == "gone-1"
        assert_still_serving(http)


@pytest.mark.parametrize("fault", ["close", "garbage"])
def test_connection_dropped_or_garbage_is_502(start_gateway: StartGateway, fault: FaultMode) -> None:
    with FaultyUpstream(fault) as faulty:
        gateway = start_gateway(upstream_url=faulty.url)
        with httpx.Client(base_url=gateway.url, timeout=10) as http:
            response = http.post(CHAT_PATH, json=CHAT_BODY, headers=AUTH)
            assert_gateway_error(response, 502, "upstream_unavailable", "server_error")
            assert response.headers["x-request-id"]
            assert faulty.faulted == [f"POST {CHAT_PATH}"]
            assert_still_serving(http)
            faulty.mode = "ok"
            normal_chat(http)
            assert faulty.faulted == [f"POST {CHAT_PATH}", f"POST {CHAT_PATH}"]


def test_upstream_that_never_answers_is_504(start_gateway: StartGateway) -> None:
    with FaultyUpstream("hang") as faulty:
        gateway = start_gateway(upstream_url=faulty.url, env={"GATEWAY_UPSTREAM_FIRST_BYTE_TIMEOUT": "0.5"})
        with httpx.Client(base_url=gateway.url, timeout=5) as http:
            assert wait_until(lambda: is_ready(http))
            started = time.monotonic()
            response = http.post(CHAT_PATH, json=CHAT_BODY, headers=AUTH)
            elapsed = time.monotonic() - started
            error = assert_gateway_error(response, 504, "upstream_timeout", "server_error")
            assert "0.5s" in error["message"]
            assert 0.45 <= elapsed < 3.0, elapsed
            assert faulty.faulted == [f"POST {CHAT_PATH}"]
            assert_still_serving(http)
            faulty.mode = "ok"
            normal_chat(http)


def test_upstream_error_is_relayed_as_it_is(http: httpx.Client, demo_state: DemoState, upstream: LocalServer) -> None:
    """The other direction: the upstream's status, content type and body bytes, unchanged."""
    response = http.post(SPEECH, json=BAD_SPEECH, headers=AUTH)
    expected = httpx.post(upstream.url + SPEECH, json=BAD_SPEECH, headers=AUTH, timeout=10)
    assert expected.status_code == 400
    assert response.status_code == 400
    assert response.headers["content-type"] == expected.headers["content-type"]
    assert response.content == expected.content
    assert orjson.loads(response.content)["error"]["code"] == "invalid_value"
    assert forwarded(demo_state) == [f"POST {SPEECH}", f"POST {SPEECH}"]


def test_cookies_from_one_answer_never_reach_the_upstream_on_another_request(start_gateway: StartGateway) -> None:
    """One upstream client serves every caller: a Set-Cookie meant for client A must not be sent
    upstream with client B's request."""
    catalog = orjson.dumps(default_catalog())
    cookies_seen: list[bytes | None] = []

    async def cookie_setting(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = dict(scope["headers"])
        if scope["path"] == "/api/models":
            body, extra = catalog, []
        else:
            cookies_seen.append(headers.get(b"cookie"))
            body, extra = b'{"data": []}', [(b"set-cookie", b"session=client-a-secret; Path=/")]
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json"), *extra]}
        )
        await send({"type": "http.response.body", "body": body})

    with serve_in_thread(cookie_setting) as inline:
        gateway = start_gateway(upstream_url=inline.url)
        first = httpx.get(gateway.url + "/v1/videos/generations/job-a", timeout=10)
        second = httpx.get(gateway.url + "/v1/videos/generations/job-b", timeout=10)
    assert "set-cookie" not in first.headers  # an API's cookies are never relayed to clients either
    assert second.status_code == 200
    assert cookies_seen == [None, None]


def test_response_header_rules_ignore_the_case_of_names() -> None:
    """Upstream headers arrive in their original case (aiohttp's raw headers)."""
    assert is_event_stream([(b"Content-Type", b"Text/Event-Stream; charset=utf-8")])
    assert not is_event_stream([(b"content-type", b"application/json")])
    assert not is_event_stream([])
    assert content_encoding([(b"Content-Encoding", b" GZIP ")]) == b"gzip"
    assert content_encoding([(b"content-encoding", b"identity")]) is None
    assert content_encoding([(b"Content-Length", b"12")]) is None
