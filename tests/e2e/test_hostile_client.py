"""Hostile clients on raw sockets (issue #13, findings 1 and 2): oversized and endless headers,
slowloris, stalled bodies, request smuggling, absolute URIs, encoded traversal, CRLF injection.

The gateway runs as a real `gateway serve` process, so uvicorn has exactly the options it serves
with (httptools and the connection limits of gateway.server.protocol), in front of the simulated
upstream, with short timeouts so the module takes seconds. After each attack the gateway still
answers /healthz and a normal chat request, and its resident memory (read from /proc) has not
grown. Every socket is closed, every loop is bounded in time and count, and the process is stopped
by its pid. The protocol's accounting, where sockets prove nothing, has unit tests in
tests/server/test_protocol.py.
"""

from __future__ import annotations

import re
import selectors
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest

from gateway.demo import DemoState, create_demo_upstream
from gateway.server.thread import serve_in_thread
from tests.helpers.gateway import (
    CHAT_BODY,
    CHAT_PATH,
    assert_error_envelope,
    forwarded,
    fresh_demo_state,
    normal_chat,
    reset_demo_state,
)
from tests.helpers.processes import GATEWAY, clean_env, free_port, wait_ready

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
KEEPALIVE_TIMEOUT = 1.0
MAX_CONNECTIONS = 200
MAX_KEEPALIVE_REQUESTS = 20
MAX_HEADER_BYTES = 65536  # the defaults, as served
MAX_HEADERS = 100
# How late a timeout may act on a loaded test machine, and how much the gateway's memory may grow.
MARGIN = 1.5
RSS_SLACK_KB = 32 * 1024
START_TIMEOUT = 20.0
MAX_READS = 10_000  # recv() calls per connection, a bound on every read loop

CHAT_JSON = orjson.dumps(CHAT_BODY)
AUTH = b"Authorization: Bearer sk-client\r\n"


# --------------------------------------------------------------------------- the gateway process


@dataclass(frozen=True)
class Served:
    """A `gateway serve` process in front of the simulated upstream."""

    state: DemoState
    port: int
    pid: int
    log: Path
    baseline_rss_kb: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


def rss_kb(pid: int) -> int:
    """The process's resident set size (VmRSS) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.fixture(scope="module")
def _served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    state = fresh_demo_state()
    workdir = tmp_path_factory.mktemp("hostile")
    log = workdir / "gateway.log"
    with serve_in_thread(create_demo_upstream(state)) as upstream:
        port = free_port()
        env = clean_env(
            {
                "GATEWAY_UPSTREAM_URL": upstream.url,
                "GATEWAY_USAGE_PATH": "",
                "GATEWAY_LOG_FORMAT": "json",
                "GATEWAY_LIMITS_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
                "GATEWAY_LIMITS_BODY_TIMEOUT": str(BODY_TIMEOUT),
                "GATEWAY_LIMITS_KEEPALIVE_TIMEOUT": str(KEEPALIVE_TIMEOUT),
                "GATEWAY_LIMITS_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
                "GATEWAY_LIMITS_MAX_KEEPALIVE_REQUESTS": str(MAX_KEEPALIVE_REQUESTS),
            }
        )
        with log.open("wb") as out:
            proc = subprocess.Popen(  # noqa: S603 - our own console script
                [GATEWAY, "serve", "--port", str(port)], cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, proc)
            with httpx.Client(base_url=url, timeout=10) as http:
                for _ in range(5):  # warm up before the memory baseline
                    normal_chat(http)
            yield Served(state, port, proc.pid, log, rss_kb(proc.pid))
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@pytest.fixture
def served(_served: Served) -> Served:
    reset_demo_state(_served.state)
    return _served


def assert_still_serving(served: Served) -> None:
    """/healthz and a normal chat request are answered, memory has not grown, nothing crashed."""
    with httpx.Client(base_url=served.url, timeout=10) as http:
        assert http.get("/healthz").status_code == 200
        normal_chat(http)
    growth = rss_kb(served.pid) - served.baseline_rss_kb
    assert growth < RSS_SLACK_KB, f"the gateway's RSS grew by {growth} KiB"
    assert "Traceback" not in served.log.read_text(errors="replace")


# --------------------------------------------------------------------------- raw HTTP


@dataclass(frozen=True)
class Answer:
    status: int
    head: bytes  # status line and header lines, as sent
    headers: dict[str, str]  # lowercased names
    body: bytes


def connect(served: Served) -> socket.socket:
    return socket.create_connection(served.address, timeout=5)


def read_answer(sock: socket.socket, timeout: float) -> tuple[Answer | None, float]:
    """One response (by its Content-Length) and the seconds it took; None when the connection closed
    (or the time ran out) before a whole response arrived."""
    started = time.monotonic()
    data = bytearray()
    for _ in range(MAX_READS):
        answer = parse_answer(bytes(data))
        if answer is not None:
            return answer, time.monotonic() - started
        remaining = started + timeout - time.monotonic()
        if remaining <= 0:
            break
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    return parse_answer(bytes(data)), time.monotonic() - started


def parse_answer(data: bytes) -> Answer | None:
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    status_line, *lines = head.split(b"\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
    length = int(headers.get("content-length", "0"))
    if len(rest) < length:
        return None
    return Answer(int(status_line.split()[1]), head, headers, rest[:length])


def closed_within(sock: socket.socket, timeout: float) -> bool:
    """The gateway ends the connection (end of stream or reset) within ``timeout``; bytes before that
    are read and dropped."""
    deadline = time.monotonic() + timeout
    for _ in range(MAX_READS):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        sock.settimeout(remaining)
        try:
            if not sock.recv(65536):
                return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
    return False


def refused(served: Served, raw: bytes, status: int, code: str, timeout: float = 5.0) -> Answer:
    """Send ``raw`` on a fresh connection: the answer is ``status`` in the OpenAI envelope with
    ``code``, and the gateway closes the connection after it."""
    with connect(served) as sock:
        sock.sendall(raw)
        answer, _ = read_answer(sock, timeout)
        assert answer is not None, "no answer"
        assert answer.status == status, answer
        assert answer.headers["content-type"] == "application/json"
        assert_error_envelope(answer.body, code=code)
        assert answer.headers.get("connection") == "close"
        assert closed_within(sock, 2.0), "the connection stayed open"
    return answer


def chat_request(*header_lines: bytes, path: bytes = CHAT_PATH.encode(), close: bool = True) -> bytes:
    extra = b"".join(line + b"\r\n" for line in header_lines)
    return (
        b"POST " + path + b" HTTP/1.1\r\nHost: gateway\r\n" + AUTH + b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(len(CHAT_JSON)).encode() + b"\r\n" + (b"Connection: close\r\n" if close else b"")
        + extra + b"\r\n" + CHAT_JSON
    )  # fmt: skip


def get_request(path: bytes, *header_lines: bytes, close: bool = True) -> bytes:
    extra = b"".join(line + b"\r\n" for line in header_lines)
    connection = b"Connection: close\r\n" if close else b""
    return b"GET " + path + b" HTTP/1.1\r\nHost: gateway\r\n" + AUTH + connection + extra + b"\r\n"


# --------------------------------------------------------------------------- finding 1: header size and count


def test_an_oversized_header_block_is_refused_431_and_never_forwarded(served: Served) -> None:
    big = b"X-Big: " + b"a" * (MAX_HEADER_BYTES + 1000)
    refused(served, chat_request(big), 431, "request_header_too_large")
    many_small = [b"X-Pad-%d: %s" % (i, b"b" * 900) for i in range(80)]  # 80 KB in 80 headers
    refused(served, chat_request(*many_small), 431, "request_header_too_large")
    long_url = CHAT_PATH.encode() + b"?q=" + b"c" * (MAX_HEADER_BYTES + 1000)
    refused(served, chat_request(path=long_url), 431, "request_header_too_large")
    assert forwarded(served.state) == []
    assert_still_serving(served)


def test_too_many_headers_are_refused_431_and_never_forwarded(served: Served) -> None:
    lines = [b"X-H-%d: 1" % i for i in range(MAX_HEADERS + 10)]
    refused(served, chat_request(*lines), 431, "too_many_headers")
    assert forwarded(served.state) == []
    assert_still_serving(served)


def test_header_blocks_within_the_bounds_are_served(served: Served) -> None:
    near_size = b"X-Big: " + b"a" * (MAX_HEADER_BYTES - 2000)
    near_count = [b"X-H-%d: 1" % i for i in range(MAX_HEADERS - 10)]
    for raw in (chat_request(near_size), chat_request(*near_count)):
        with connect(served) as sock:
            sock.sendall(raw)
            answer, _ = read_answer(sock, 10)
        assert answer is not None
        assert answer.status == 200, answer
    assert forwarded(served.state) == [f"POST {CHAT_PATH}"] * 2
    assert_still_serving(served)


def test_an_unfinished_huge_header_is_cut_off_and_memory_stays_flat(served: Served) -> None:
    piece = b"a" * (1 << 20)
    sent = 0
    answer: Answer | None = None
    with connect(served) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Endless: ")
        deadline = time.monotonic() + 10
        try:
            # Up to 64 MiB of one header that never ends, until the gateway answers.
            while sent < 64 * len(piece) and time.monotonic() < deadline:
                if readable(sock):
                    break
                sock.sendall(piece)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass  # cut off: what matters is what was answered and what memory it took
        growth = rss_kb(served.pid) - served.baseline_rss_kb  # while the connection is still open
        assert growth < RSS_SLACK_KB, f"{sent >> 20} MiB of one header grew the gateway's RSS by {growth} KiB"
        answer, _ = read_answer(sock, 5)
    assert answer is not None, f"no answer after {sent >> 20} MiB of header"
    assert answer.status == 431
    assert_error_envelope(answer.body, code="request_header_too_large")
    assert sent < 16 * len(piece), f"the gateway read {sent >> 20} MiB of one header"
    assert_still_serving(served)


def readable(sock: socket.socket) -> bool:
    """Whether ``sock`` has something to read (or its end) now, without blocking."""
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        return bool(selector.select(timeout=0))


# --------------------------------------------------------------------------- finding 2: slow clients


def test_slow_headers_are_answered_408_within_the_header_timeout(served: Served) -> None:
    with connect(served) as sock:
        started = time.monotonic()
        sock.sendall(b"POST " + CHAT_PATH.encode() + b" HTTP/1.1\r\n")
        answer: Answer | None = None
        for i in range(40):  # one header line every 0.1 s, never the end of the block
            if readable(sock):
                answer, _ = read_answer(sock, 1)
                break
            try:
                sock.sendall(b"X-Slow-%d: 1\r\n" % i)
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        assert answer is not None, f"no answer after {elapsed:.1f} s of slow headers"
        assert answer.status == 408
        assert_error_envelope(answer.body, code="request_timeout")
        assert HEADER_TIMEOUT * 0.9 <= elapsed <= HEADER_TIMEOUT + MARGIN
        assert closed_within(sock, 2.0)
    assert forwarded(served.state) == []
    assert_still_serving(served)


def test_a_silent_connection_is_closed_after_the_header_timeout(served: Served) -> None:
    with connect(served) as sock:
        started = time.monotonic()
        assert closed_within(sock, HEADER_TIMEOUT + MARGIN)
        assert time.monotonic() - started >= HEADER_TIMEOUT * 0.9
    assert_still_serving(served)


def test_a_stalled_body_is_answered_408_and_the_connection_closed(served: Served) -> None:
    raw = chat_request()
    with connect(served) as sock:
        sock.sendall(raw[: len(raw) - len(CHAT_JSON) + 10])  # the headers and 10 bytes of the body
        started = time.monotonic()
        answer, _ = read_answer(sock, BODY_TIMEOUT + MARGIN)
        assert answer is not None, "a stalled body was waited for"
        assert answer.status == 408
        assert_error_envelope(answer.body, code="request_timeout")
        assert answer.headers.get("connection") == "close"
        assert time.monotonic() - started >= BODY_TIMEOUT * 0.9
        assert closed_within(sock, 2.0)
    assert forwarded(served.state) == []
    assert_still_serving(served)


def test_a_slow_body_that_keeps_moving_is_served(served: Served) -> None:
    raw = chat_request()
    head, body = raw[: len(raw) - len(CHAT_JSON)], CHAT_JSON
    pieces = [body[i : i + len(body) // 4 + 1] for i in range(0, len(body), len(body) // 4 + 1)]
    with connect(served) as sock:
        sock.sendall(head)
        for piece in pieces:  # in all longer than the body timeout, each gap shorter
            time.sleep(BODY_TIMEOUT / 3)
            sock.sendall(piece)
        answer, _ = read_answer(sock, 10)
    assert answer is not None
    assert answer.status == 200, answer
    assert_still_serving(served)


def test_slowloris_connections_are_closed_and_excess_connections_refused(served: Served) -> None:
    count = MAX_CONNECTIONS + 100
    socks: list[socket.socket] = []
    received: dict[socket.socket, bytes] = {}
    finished: dict[socket.socket, float] = {}
    try:
        started = time.monotonic()
        for _ in range(count):
            sock = connect(served)
            socks.append(sock)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n")  # and never the rest
        with selectors.DefaultSelector() as selector:
            for sock in socks:
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ)
                received[sock] = b""
            deadline = started + HEADER_TIMEOUT + MARGIN
            for _ in range(MAX_READS):
                if len(finished) == count or time.monotonic() > deadline:
                    break
                for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
                    ready = key.fileobj
                    assert isinstance(ready, socket.socket)
                    try:
                        chunk = ready.recv(65536)
                    except ConnectionResetError:
                        chunk = b""
                    if chunk:
                        received[ready] += chunk
                    else:
                        finished[ready] = time.monotonic() - started
                        selector.unregister(ready)
    finally:
        for sock in socks:
            sock.close()
    assert len(finished) == count, f"{count - len(finished)} of {count} connections still open"
    statuses = [parse_answer(data) for data in received.values()]
    timed_out = [a for a in statuses if a is not None and a.status == 408]
    turned_away = [a for a in statuses if a is not None and a.status == 503]
    assert len(timed_out) + len(turned_away) == count
    assert len(timed_out) <= MAX_CONNECTIONS
    assert len(turned_away) >= count - MAX_CONNECTIONS
    for answer in turned_away:
        assert_error_envelope(answer.body, code="too_many_connections")
        assert answer.headers["retry-after"] == "1"
    refused_at = [finished[s] for s in socks if received[s].startswith(b"HTTP/1.1 503")]
    assert max(refused_at) < HEADER_TIMEOUT, "connections beyond the cap were not refused at once"
    assert_still_serving(served)


def test_a_kept_alive_connection_closes_after_max_keepalive_requests(served: Served) -> None:
    with connect(served) as sock:
        connection_headers = []
        for _ in range(MAX_KEEPALIVE_REQUESTS):
            sock.sendall(get_request(b"/healthz", close=False))
            answer, _ = read_answer(sock, 5)
            assert answer is not None
            assert answer.status == 200
            connection_headers.append(answer.headers.get("connection"))
        assert connection_headers == [None] * (MAX_KEEPALIVE_REQUESTS - 1) + ["close"]
        assert closed_within(sock, 2.0)
    assert_still_serving(served)


def test_an_idle_kept_alive_connection_closes_even_when_fed_blank_lines(served: Served) -> None:
    with connect(served) as sock:
        sock.sendall(get_request(b"/healthz", close=False))
        answer, _ = read_answer(sock, 5)
        assert answer is not None
        assert answer.status == 200
        started = time.monotonic()
        closed = False
        for _ in range(int((KEEPALIVE_TIMEOUT + MARGIN) / 0.2)):  # CRLF between requests is allowed, not activity
            if readable(sock):
                closed = closed_within(sock, 0.5)
                break
            try:
                sock.sendall(b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.2)
        assert closed, "a kept-alive connection fed blank lines stayed open"
        assert time.monotonic() - started <= KEEPALIVE_TIMEOUT + MARGIN
    assert_still_serving(served)


def test_pipelined_requests_are_not_counted_as_one_header_block(served: Served) -> None:
    count = 15  # 15 requests of 5 KB headers: 75 KB in one write, more than one header block may hold
    pad = b"X-Pad: " + b"p" * 5000
    raw = b"".join(get_request(b"/healthz", pad, close=i == count - 1) for i in range(count))
    assert len(raw) > MAX_HEADER_BYTES
    with connect(served) as sock:
        sock.sendall(raw)
        data = bytearray()
        for _ in range(MAX_READS):
            sock.settimeout(5)
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == count, bytes(data[:300])
    assert b"HTTP/1.1 431" not in data
    assert_still_serving(served)


# --------------------------------------------------------------------------- request smuggling and paths

SMUGGLED = b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\n\r\n"
SMUGGLING = {
    "two different Content-Length": (
        b"Content-Length: " + str(len(CHAT_JSON)).encode() + b"\r\nContent-Length: 5\r\n\r\n" + CHAT_JSON
    ),
    "Content-Length and Transfer-Encoding": (
        b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED
    ),
    "Transfer-Encoding and Content-Length": (
        b"Transfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\n" + SMUGGLED
    ),
    "obs-fold": b"X-Folded: a\r\n b\r\nContent-Length: " + str(len(CHAT_JSON)).encode() + b"\r\n\r\n" + CHAT_JSON,
    "obs-fold of Transfer-Encoding": b"Transfer-Encoding: identity\r\n chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "Transfer-Encoding not ending in chunked": b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "two Transfer-Encoding": b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "space before the colon": b"Content-Length : 4\r\n\r\n" + SMUGGLED,
    "a list in Content-Length": b"Content-Length: 4, 40\r\n\r\n" + SMUGGLED,
}


@pytest.mark.parametrize("tail", SMUGGLING.values(), ids=SMUGGLING.keys())
def test_request_smuggling_shapes_are_400_and_never_forwarded(served: Served, tail: bytes) -> None:
    raw = b"POST " + CHAT_PATH.encode() + b" HTTP/1.1\r\nHost: gateway\r\n" + AUTH + tail
    refused(served, raw, 400, "invalid_http_request")
    assert forwarded(served.state) == []
    assert_still_serving(served)


def test_an_absolute_uri_is_only_ever_sent_to_the_configured_upstream(served: Served) -> None:
    raw = chat_request(path=b"http://evil.example" + CHAT_PATH.encode()).replace(
        b"Host: gateway", b"Host: evil.example"
    )
    with connect(served) as sock:
        sock.sendall(raw)
        answer, _ = read_answer(sock, 10)
    assert answer is not None
    # Served from the configured upstream (or refused): never relayed towards evil.example.
    assert answer.status in (200, 400), answer
    assert forwarded(served.state) in ([f"POST {CHAT_PATH}"], [])
    for request in served.state.requests:
        assert "evil.example" not in request.path
        assert "evil.example" not in request.headers.get("host", "")
    assert_still_serving(served)


VIDEO_JOB = re.compile(r"/v1/videos/generations/[^/]+")
TRAVERSALS = [
    "/v1/models/%2e%2e",
    "/v1/models/%2E%2E/%2e%2e/api/models",
    "/v1/models/..%2f..%2fapi%2fmodels",
    "/v1/videos/generations/%2e%2e",
    "/v1/videos/generations/.%2e",
    "/v1/videos/generations/%2e",
    "/v1/videos/generations/..%2f..%2fapi%2fmodels",
    "/v1/videos/generations/%2e%2e%2f%2e%2e%2fapi%2fmodels",
    "/v1/videos/generations/%2e%2e/%2e%2e/api/models",
    "/v1/videos/generations/job%2f..%2f..%2fmodels",
    "/v1/videos/generations/%252e%252e",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_encoded_traversal_never_reaches_the_upstream_as_another_path(served: Served, path: str) -> None:
    request_id = "traversal-probe"
    with connect(served) as sock:
        sock.sendall(get_request(path.encode(), b"X-Request-ID: " + request_id.encode()))
        answer, _ = read_answer(sock, 10)
    assert answer is not None
    assert answer.status < 500, answer
    sent = [r for r in served.state.requests if r.headers.get("x-request-id") == request_id]
    for request in sent:
        # The only path the gateway routes upstream here is one video job: one segment, not a dot
        # segment, as the upstream reads it (so no normalisation anywhere can make it another path).
        assert path.startswith("/v1/videos/generations/"), f"{path} reached the upstream as {request.path}"
        assert VIDEO_JOB.fullmatch(request.path), f"{path} reached the upstream as {request.path}"
        assert request.path.rsplit("/", 1)[1] not in (".", ".."), f"{path} reached the upstream as {request.path}"
    assert_still_serving(served)


CRLF_IDS = {
    "percent-encoded CRLF": b"X-Request-ID: a%0d%0aSet-Cookie:%20injected=1",
    "raw CR": b"X-Request-ID: a\rSet-Cookie: injected=1",
    "raw LF": b"X-Request-ID: a\nSet-Cookie: injected=1",
    "raw CRLF and a fold": b"X-Request-ID: a\r\n Set-Cookie: injected=1",
    "NUL": b"X-Request-ID: a\x00Set-Cookie: injected=1",
}


@pytest.mark.parametrize("line", CRLF_IDS.values(), ids=CRLF_IDS.keys())
def test_crlf_in_an_echoed_header_is_never_echoed_raw(served: Served, line: bytes) -> None:
    for raw in (get_request(b"/healthz", line), chat_request(line), get_request(b"/v1/models/a%0d%0aSet-Cookie:x")):
        with connect(served) as sock:
            sock.sendall(raw)
            answer, _ = read_answer(sock, 10)
        assert answer is not None
        assert answer.status in (200, 400, 404), answer
        assert b"injected" not in answer.head.lower()
        assert b"set-cookie" not in answer.head.lower()
        for header_line in answer.head.split(b"\r\n"):
            assert not re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", header_line), answer.head
        if "x-request-id" in answer.headers:
            assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", answer.headers["x-request-id"])
    assert_still_serving(served)
