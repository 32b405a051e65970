"""Bad requests against the gateway over plain HTTP: each is refused with the right status and the
exact OpenAI error envelope, never reaches the upstream, and leaves the gateway serving.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import orjson
import pytest

from gateway.demo import DemoState
from gateway.server.thread import LocalServer
from tests.helpers.gateway import (
    CHAT_MODEL,
    CHAT_PATH,
    STT_MODEL,
    StartGateway,
    assert_error_envelope,
    assert_gateway_error,
    assert_upstream_untouched,
    forwarded,
    module_server_fixtures,
    normal_chat,
)
from tests.helpers.processes import free_port

MAX_BODY = 1000
TRANSCRIPTIONS = "/v1/audio/transcriptions"
JSON = {"content-type": "application/json", "authorization": "Bearer sk-client"}
BOUNDARY = "bAdInPuTbOuNdArY"

Send = Callable[[httpx.Client], httpx.Response]


# One upstream and one gateway shared by the module (conftest's fixtures overridden).
_servers, demo_state, upstream, gateway = module_server_fixtures({"GATEWAY_LIMITS_MAX_BODY_BYTES": str(MAX_BODY)})


# --------------------------------------------------------------------------- request builders


def post_json(path: str, raw: bytes) -> Send:
    return lambda http: http.post(path, content=raw, headers=JSON)


def multipart(fields: dict[str, str], file: bytes | None, boundary: str = BOUNDARY) -> bytes:
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    if file is not None:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n".encode()
            + file
            + b"\r\n"
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def post_form(raw: bytes, content_type: str = f"multipart/form-data; boundary={BOUNDARY}") -> Send:
    headers = {"content-type": content_type, "authorization": "Bearer sk-client"}
    return lambda http: http.post(TRANSCRIPTIONS, content=raw, headers=headers)


def request(method: str, path: str) -> Send:
    return lambda http: http.request(method, path, headers={"authorization": "Bearer sk-client"})


def oversized_json() -> bytes:
    """A valid chat request, larger than MAX_BODY."""
    body = {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "x" * (5 * MAX_BODY)}],
    }
    return orjson.dumps(body)


def send_oversized_with_length(http: httpx.Client) -> httpx.Response:
    raw = oversized_json()
    req = http.build_request("POST", CHAT_PATH, content=raw, headers=JSON)
    assert req.headers["content-length"] == str(len(raw))
    return http.send(req)


def send_oversized_chunked(http: httpx.Client) -> httpx.Response:
    raw = oversized_json()

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(raw), 400):
            yield raw[start : start + 400]

    req = http.build_request("POST", CHAT_PATH, content=chunks(), headers=JSON)
    assert "content-length" not in req.headers
    assert req.headers["transfer-encoding"] == "chunked"
    return http.send(req)


@dataclass(frozen=True)
class Case:
    send: Send
    status: int
    code: str
    message: str = ""  # a part of the error message
    param: str | None = None
    allow: frozenset[str] | None = None  # the methods a 405 must list in its Allow header


MISSING_MODEL = "the `model` field is missing or null"
ALLOW_GET = frozenset({"GET"})
ALLOW_POST = frozenset({"POST"})
ALLOW_GET_HEAD = frozenset({"GET", "HEAD"})  # Starlette serves HEAD wherever GET is

CASES: dict[str, Case] = {
    # -- the body is not a JSON object
    "empty-body": Case(post_json(CHAT_PATH, b""), 400, "invalid_json", "empty"),
    "whitespace-body": Case(post_json(CHAT_PATH, b"  \n "), 400, "invalid_json", "empty"),
    "truncated-json": Case(post_json(CHAT_PATH, b'{"model": "x",'), 400, "invalid_json", "not valid JSON"),
    "not-json": Case(post_json(CHAT_PATH, b"model=Qwen"), 400, "invalid_json", "not valid JSON"),
    "invalid-utf8": Case(post_json(CHAT_PATH, b'{"model": "\xff\xfe"}'), 400, "invalid_json", "not valid JSON"),
    "json-array": Case(post_json(CHAT_PATH, b'[{"model": "x"}]'), 400, "invalid_json", "not an array"),
    "json-string": Case(post_json(CHAT_PATH, b'"Qwen"'), 400, "invalid_json", "not a string"),
    "json-number": Case(post_json(CHAT_PATH, b"42"), 400, "invalid_json", "not a number"),
    "json-null": Case(post_json(CHAT_PATH, b"null"), 400, "invalid_json", "not null"),
    # -- the model field
    "no-model": Case(post_json(CHAT_PATH, b'{"messages": []}'), 400, "missing_model", MISSING_MODEL, "model"),
    "null-model": Case(post_json(CHAT_PATH, b'{"model": null}'), 400, "missing_model", MISSING_MODEL, "model"),
    "number-model": Case(post_json(CHAT_PATH, b'{"model": 7}'), 400, "invalid_model", "not a number", "model"),
    "bool-model": Case(post_json(CHAT_PATH, b'{"model": true}'), 400, "invalid_model", "not a boolean", "model"),
    "list-model": Case(post_json(CHAT_PATH, b'{"model": ["x"]}'), 400, "invalid_model", "not an array", "model"),
    "empty-model": Case(post_json(CHAT_PATH, b'{"model": ""}'), 400, "invalid_model", "non-empty string", "model"),
    # -- multipart transcription
    "form-without-model": Case(
        post_form(multipart({"language": "en"}, b"RIFF....WAVE")),
        400,
        "missing_model",
        MISSING_MODEL,
        "model",
    ),
    "form-without-boundary": Case(
        post_form(multipart({"model": STT_MODEL}, b"RIFF"), "multipart/form-data"),
        400,
        "invalid_multipart",
        "boundary",
    ),
    "transcription-as-json": Case(
        lambda http: http.post(TRANSCRIPTIONS, json={"model": STT_MODEL, "file": "aGVsbG8="}),
        415,
        "unsupported_media_type",
        "multipart/form-data",
    ),
    # -- method and path
    "get-chat": Case(request("GET", CHAT_PATH), 405, "method_not_allowed", "use POST", None, ALLOW_POST),
    "put-embeddings": Case(request("PUT", "/v1/embeddings"), 405, "method_not_allowed", "use POST", None, ALLOW_POST),
    "delete-models": Case(
        request("DELETE", "/v1/models"), 405, "method_not_allowed", "use GET, HEAD", None, ALLOW_GET_HEAD
    ),
    "post-video-job": Case(
        request("POST", "/v1/videos/generations/video_1"),
        405,
        "method_not_allowed",
        "use GET",
        None,
        ALLOW_GET,
    ),
    "unknown-v1-path": Case(request("POST", "/v1/chat/complete"), 404, "unknown_url", "Unknown endpoint"),
    "unknown-v1-get": Case(request("GET", "/v1/engines"), 404, "unknown_url", "Unknown endpoint"),
    "translations": Case(
        request("POST", "/v1/audio/translations"), 404, "unknown_url", "is not supported by the upstream"
    ),
    "image-edits": Case(request("POST", "/v1/images/edits"), 404, "unknown_url", "is not supported"),
    "files-subpath": Case(request("GET", "/v1/files/file-1/content"), 404, "unknown_url", "is not supported"),
    "non-v1-path": Case(request("GET", "/v2/chat/completions"), 404, "unknown_url", "Unknown endpoint"),
    "root-path": Case(request("GET", "/"), 404, "unknown_url", "Unknown endpoint"),
    "post-healthz": Case(request("POST", "/healthz"), 405, "method_not_allowed", "use", None, ALLOW_GET_HEAD),
    "delete-readyz": Case(request("DELETE", "/readyz"), 405, "method_not_allowed", "use", None, ALLOW_GET_HEAD),
    # -- size
    "too-large-content-length": Case(send_oversized_with_length, 413, "request_too_large", f"{MAX_BODY} bytes"),
    "too-large-chunked": Case(send_oversized_chunked, 413, "request_too_large", f"{MAX_BODY} bytes"),
    # -- query
    "unknown-category": Case(
        request("GET", "/v1/models?category=nonsense"), 400, "invalid_request", "nonsense", "category"
    ),
    "unknown-category-in-list": Case(
        request("GET", "/v1/models?category=text,bogus"), 400, "invalid_request", "bogus", "category"
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input_is_refused_cleanly(http: httpx.Client, demo_state: DemoState, case: Case) -> None:
    response = case.send(http)
    error = assert_gateway_error(response, case.status, case.code, "invalid_request_error")
    assert case.message in error["message"]
    assert error["param"] == case.param
    if case.allow is not None:
        allow = {m.strip() for m in response.headers.get("allow", "").split(",") if m.strip()}
        assert allow == case.allow, dict(response.headers)
    else:
        assert "allow" not in response.headers
    assert response.headers["x-request-id"]
    assert_upstream_untouched(demo_state)
    # The gateway still serves, on the same client.
    normal_chat(http)
    assert forwarded(demo_state) == [f"POST {CHAT_PATH}"]


@pytest.mark.parametrize(
    "path", ["/v1/videos/generations/", "/v1/videos/generations//", "/v1/videos/generations/video_abc/"]
)
def test_video_job_without_an_id_is_refused_locally(http: httpx.Client, demo_state: DemoState, path: str) -> None:
    response = http.get(path, headers={"authorization": "Bearer sk-client"})
    assert response.status_code in (404, 405), response.status_code
    assert_gateway_error(
        response, response.status_code, "unknown_url" if response.status_code == 404 else "method_not_allowed"
    )
    assert_upstream_untouched(demo_state)


def test_body_at_the_limit_is_accepted(http: httpx.Client, demo_state: DemoState) -> None:
    """The limit is the limit: a body of exactly MAX_BODY bytes is forwarded (the 413 is not off by one)."""
    prefix = orjson.dumps({"model": CHAT_MODEL, "messages": [{"role": "user", "content": ""}]})
    pad = MAX_BODY - len(prefix)
    raw = prefix.replace(b'"content":""', b'"content":"' + b"y" * pad + b'"')
    assert len(raw) == MAX_BODY
    response = http.post(CHAT_PATH, content=raw, headers=JSON)
    assert response.status_code == 200, response.text
    assert [r.body for r in demo_state.requests if r.path == CHAT_PATH] == [raw]
    over = http.post(CHAT_PATH, content=raw + b" ", headers=JSON)  # still valid JSON, one byte more
    assert_gateway_error(over, 413, "request_too_large")


def read_http_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """(head, body) of one HTTP/1.1 response with a Content-Length, read within the socket's timeout."""
    data = b""
    for _ in range(1000):
        if b"\r\n\r\n" in data:
            head, _, body = data.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
            assert length is not None, head
            if len(body) >= int(length.group(1)):
                return head, body
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    raise AssertionError(f"incomplete response: {data!r}")


def test_declared_oversized_body_is_refused_before_it_is_uploaded(
    gateway: LocalServer, http: httpx.Client, demo_state: DemoState
) -> None:
    """An honest Content-Length over the limit is answered at once: the client need not upload 5 MB."""
    head = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {gateway.host}:{gateway.port}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer sk-client\r\nContent-Length: {5_000_000}\r\n\r\n"
    ).encode()
    with socket.create_connection((gateway.host, gateway.port), timeout=3) as sock:
        sock.sendall(head + b'{"model": "' + CHAT_MODEL.encode())  # and nothing more
        status_and_headers, body = read_http_response(sock)
    assert status_and_headers.startswith(b"HTTP/1.1 413 "), status_and_headers
    assert_error_envelope(body, code="request_too_large")
    assert_upstream_untouched(demo_state)
    normal_chat(http)


# --------------------------------------------------------------------------- no catalog


def test_no_catalog_ever_loaded(start_gateway: StartGateway) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gateway = start_gateway(upstream_url=dead)
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        response = http.post(CHAT_PATH, content=orjson.dumps({"model": CHAT_MODEL, "messages": []}), headers=JSON)
        error = assert_gateway_error(response, 503, "catalog_unavailable", "server_error")
        assert "catalog" in error["message"]
        assert dead not in response.text  # the upstream's address is not disclosed
        retry_after = response.headers["retry-after"]
        assert retry_after.isdigit()
        assert int(retry_after) >= 1
        assert response.headers["x-request-id"]

        models = http.get("/v1/models")
        assert_gateway_error(models, 503, "catalog_unavailable")
        assert models.headers["retry-after"].isdigit()

        ready = http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["status"] == "not ready"
        assert ready.json()["catalog"]["loaded"] is False

        health = http.get("/healthz")
        assert health.status_code == 200
        assert health.json() == {"status": "ok"}
