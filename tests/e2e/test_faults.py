"""Fault injection: the gateway in front of an upstream that fails in every way FaultyUpstream can.

For each fault the client gets the documented outcome within the configured time, the metrics count
it, and afterwards the gateway holds no request, stream, upstream connection or event-loop task it
did not hold before (``leftovers``), and serves a normal request (``assert_recovered``).

Faults at the connection, timeout and body level run once per upstream client (``[upstream]
client``: aiohttp, the default, and httpx), since that is where the two differ; the gateway's own
logic above them (retry rules, passing answers through, the breaker, the catalog, the in-flight cap)
runs with the default client. Tests with the base settings share one gateway and stand-in per client
(``rig``, reset and checked for leftovers between tests; counters are read as increases); tests with
settings of their own start their own (``start``).

Timeouts are small (first byte 0.5 s, idle 0.4 s, retries with a Retry-After up to 1 s), so every
fault resolves in well under a second or two.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from email.utils import formatdate
from json import JSONDecodeError
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionChunk
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.app import create_app
from gateway.config import load_settings
from gateway.demo import default_catalog
from gateway.proxy.relay import MAX_LATE_HEADERS_BODY
from gateway.server.thread import serve_in_thread
from tests.helpers.gateway import CHAT_BODY, CHAT_MODEL, CHAT_PATH, NO_HEALTH_MODEL, assert_gateway_error, wait_until
from tests.helpers.upstreams import (
    CATALOG_JSON,
    INVALID_SSE,
    OK_CHAT,
    PARTIAL_EVENTS,
    STREAM_EVENTS,
    TRUNCATED_SSE,
    UPSTREAM_ERROR_BODY,
    FaultMode,
    FaultyUpstream,
    StatusAnswer,
    huge_body,
)

AUTH = {"authorization": "Bearer sk-client"}
STREAM_BODY: dict[str, Any] = {**CHAT_BODY, "stream": True}

FIRST_BYTE_TIMEOUT = 0.5
IDLE_TIMEOUT = 0.4
RETRIES = 2
RETRY_MAX_WAIT = 1.0
BASE_ENV = {
    "GATEWAY_UPSTREAM_CONNECT_TIMEOUT": "1",
    "GATEWAY_UPSTREAM_FIRST_BYTE_TIMEOUT": str(FIRST_BYTE_TIMEOUT),
    "GATEWAY_UPSTREAM_IDLE_TIMEOUT": str(IDLE_TIMEOUT),
    "GATEWAY_UPSTREAM_RETRIES": str(RETRIES),
    "GATEWAY_UPSTREAM_RETRY_MAX_WAIT": str(RETRY_MAX_WAIT),
    "GATEWAY_UPSTREAM_MAX_KEEPALIVE_CONNECTIONS": "1",
    # Off unless a test is about it: a few faults in a row must not open a circuit by surprise.
    "GATEWAY_UPSTREAM_BREAKER_FAILURES": "0",
    "GATEWAY_CATALOG_REFRESH_BACKOFF_MAX": "0.2",
    "GATEWAY_ACCESS_LOG": "false",
}
SETTLE_SECONDS = 5.0  # the most a fault may take to be cleaned up after the client has its answer


# --------------------------------------------------------------------------- the gateway under test


class LoopProbe:
    """Wraps the gateway app to learn its event loop, so a test can count the loop's tasks."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()  # the lifespan call comes first
        await self.app(scope, receive, send)


async def _tasks_now() -> list[str]:
    """The loop's tasks but this one and catalog refreshes (which come and go on their own)."""
    me = asyncio.current_task()
    return sorted(
        getattr(task.get_coro(), "__qualname__", repr(task.get_coro()))
        for task in asyncio.all_tasks()
        if task is not me and task.get_name() != "catalog-refresh"
    )


class Metrics:
    """One scrape of GET /metrics. A name the gateway does not export fails the test (no silent 0)."""

    def __init__(self, text: str, base: Metrics | None = None) -> None:
        self.base = base  # counters (``*_total``) are read as increases since this scrape
        self.names: set[str] = set()
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for family in text_string_to_metric_families(text):
            self.names.add(family.name)
            if family.type == "counter":
                self.names.add(family.name + "_total")
            for sample in family.samples:
                self.names.add(sample.name)
                self.samples.append((sample.name, dict(sample.labels), sample.value))

    def __call__(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels``."""
        assert name in self.names, f"the gateway exports no metric {name!r}"
        value = sum(
            value
            for sample, sample_labels, value in self.samples
            if sample == name and all(sample_labels.get(k) == v for k, v in labels.items())
        )
        if self.base is not None and name.endswith("_total"):
            value -= self.base(name, **labels)
        return value


@dataclass
class Gateway:
    url: str
    http: httpx.Client
    probe: LoopProbe
    baseline_tasks: list[str] = field(default_factory=list)
    base: Metrics | None = None  # counters read relative to this (a gateway shared between tests)

    def mark(self) -> None:
        """Count from now on: what earlier tests did on a shared gateway no longer shows."""
        self.base = None
        self.base = self.metrics()

    def tasks(self) -> list[str]:
        loop = self.probe.loop
        assert loop is not None
        return asyncio.run_coroutine_threadsafe(_tasks_now(), loop).result(5)

    def metrics(self) -> Metrics:
        response = self.http.get("/metrics")
        assert response.status_code == 200, response.text
        return Metrics(response.text, self.base)

    def metrics_after(self, requests: int) -> Metrics:
        """A scrape taken once ``requests`` chat requests have been counted (bounded wait): a request
        is counted just after its last byte went out, so the client can be quicker than that."""

        def counted() -> float:
            return self.metrics()("gateway_requests_total", endpoint=CHAT_PATH)

        wait_until(lambda: counted() >= requests, timeout=SETTLE_SECONDS, interval=0.02)
        metrics = self.metrics()
        assert metrics("gateway_requests_total", endpoint=CHAT_PATH) == requests
        return metrics

    def readyz(self) -> dict[str, Any]:
        body: dict[str, Any] = self.http.get("/readyz").json()
        return body

    def chat(self, body: dict[str, Any] | None = None) -> httpx.Response:
        return self.http.post(CHAT_PATH, json=CHAT_BODY if body is None else body, headers=AUTH)

    def stream(self, body: dict[str, Any] | None = None) -> tuple[httpx.Response, bytes]:
        """A streamed chat call read to its end: the response and every byte of its body."""
        with self.http.stream("POST", CHAT_PATH, json=STREAM_BODY if body is None else body, headers=AUTH) as response:
            raw = b"".join(response.iter_raw())
        return response, raw

    def sdk(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)


StartGateway = Callable[..., Gateway]
CLIENTS = ("aiohttp", "httpx")
DEFAULT_CLIENT = "aiohttp"


def start_gateway(
    stack: ExitStack, faulty: FaultyUpstream, client: str, env: dict[str, str] | None = None, *, ready: bool = True
) -> Gateway:
    """A gateway in front of ``faulty`` (BASE_ENV plus ``env``), stopped with ``stack``; by default
    once it is ready."""
    full_env = {
        **BASE_ENV,
        "GATEWAY_UPSTREAM_URL": faulty.url,
        "GATEWAY_UPSTREAM_CLIENT": client,
        "GATEWAY_USAGE_PATH": "",
        **(env or {}),
    }
    probe = LoopProbe(create_app(load_settings(None, full_env)))
    server = stack.enter_context(serve_in_thread(probe))
    http = stack.enter_context(httpx.Client(base_url=server.url, timeout=10))
    gateway = Gateway(server.url, http, probe)
    if ready:
        assert wait_until(lambda: http.get("/readyz").status_code == 200), "the catalog never loaded"
    gateway.baseline_tasks = gateway.tasks()
    return gateway


@dataclass
class Rig:
    """A gateway and the stand-in behind it."""

    gateway: Gateway
    faulty: FaultyUpstream


class SharedRigs:
    """One rig per upstream client with the base settings, shared by the module's tests (starting
    and stopping a gateway costs more than most of these tests)."""

    def __init__(self, stack: ExitStack) -> None:
        self._stack = stack
        self._rigs: dict[str, Rig] = {}

    def get(self, client: str) -> Rig:
        rig = self._rigs.get(client)
        if rig is None:
            faulty = self._stack.enter_context(FaultyUpstream("ok"))
            rig = self._rigs[client] = Rig(start_gateway(self._stack, faulty, client), faulty)
        # Fresh for the next test: the previous one must have left nothing behind (it checked).
        rig.faulty.reset()
        assert_settled(rig.gateway, rig.faulty)
        rig.gateway.mark()
        return rig


@pytest.fixture(scope="module")
def shared_rigs() -> Iterator[SharedRigs]:
    with ExitStack() as stack:
        yield SharedRigs(stack)


@pytest.fixture(params=CLIENTS)
def upstream_client(request: pytest.FixtureRequest) -> str:
    client: str = request.param
    return client


@pytest.fixture
def rig(shared_rigs: SharedRigs, upstream_client: str) -> Rig:
    """For faults where the upstream client matters (connections, timeouts, bodies): once per client."""
    return shared_rigs.get(upstream_client)


@pytest.fixture
def default_rig(shared_rigs: SharedRigs) -> Rig:
    """For the gateway's own logic above the client (retry rules, passing answers through): the
    default client only."""
    return shared_rigs.get(DEFAULT_CLIENT)


@pytest.fixture
def faulty() -> Iterator[FaultyUpstream]:
    """A stand-in of the test's own, for a gateway with settings of its own (``start``)."""
    with FaultyUpstream("ok") as upstream:
        yield upstream


@pytest.fixture
def start(faulty: FaultyUpstream, upstream_client: str) -> Iterator[StartGateway]:
    """Start a gateway of the test's own in front of ``faulty``: ``start(env, ready=True)``; once per client."""
    with ExitStack() as stack:
        yield lambda env=None, ready=True: start_gateway(stack, faulty, upstream_client, env, ready=ready)


@pytest.fixture
def start_default(faulty: FaultyUpstream) -> Iterator[StartGateway]:
    """As ``start``, with the default client only."""
    with ExitStack() as stack:
        yield lambda env=None, ready=True: start_gateway(stack, faulty, DEFAULT_CLIENT, env, ready=ready)


# --------------------------------------------------------------------------- after every fault


def leftovers(gateway: Gateway, faulty: FaultyUpstream) -> dict[str, Any]:
    """What is still held after a fault; empty when nothing leaked.

    Requests and streams: /readyz and the gauges say 0. Upstream connections: no exchange in
    progress in the gateway's clients, none of the stand-in's connections in the middle of an answer
    (the ones it still has open are the gateway's kept-alive ones). Tasks: none the loop did not have
    when the gateway had just started."""
    metrics = gateway.metrics()
    found = {
        "in_flight (readyz)": gateway.readyz()["in_flight"],
        "gateway_in_flight_requests": metrics("gateway_in_flight_requests"),
        "gateway_open_streams": metrics("gateway_open_streams"),
        "pool active": metrics("gateway_upstream_connections", state="active"),
        "stand-in connections mid-answer": faulty.answering,
        "new tasks": sorted(
            (collections.Counter(gateway.tasks()) - collections.Counter(gateway.baseline_tasks)).elements()
        ),
    }
    return {name: value for name, value in found.items() if value}


def assert_settled(gateway: Gateway, faulty: FaultyUpstream) -> None:
    wait_until(lambda: not leftovers(gateway, faulty), timeout=SETTLE_SECONDS, interval=0.05)
    assert leftovers(gateway, faulty) == {}


def assert_recovered(gateway: Gateway, faulty: FaultyUpstream, model: str = CHAT_MODEL) -> None:
    """Nothing leaked, the process is alive, and with a healthy upstream a normal request is served."""
    assert_settled(gateway, faulty)
    assert gateway.http.get("/healthz").status_code == 200
    faulty.mode = "ok"
    response = gateway.chat({**CHAT_BODY, "model": model})
    assert response.status_code == 200, response.text
    assert response.content == OK_CHAT
    assert_settled(gateway, faulty)


def collect(stream: Iterable[ChatCompletionChunk], into: list[str | None]) -> None:
    """Append each chunk's content to ``into`` as it arrives (what was got stays when it raises)."""
    for chunk in stream:
        into.append(chunk.choices[0].delta.content if chunk.choices else None)


def timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def error_event(raw: bytes, before: bytes) -> dict[str, Any]:
    """``raw`` is ``before``, then the gateway's stream error event, then nothing. Returns its error."""
    assert raw.startswith(before), raw
    rest = raw[len(before) :]
    assert rest.startswith(b"\n\ndata: "), rest
    assert rest.endswith(b"\n\n"), rest
    payload = orjson.loads(rest[len(b"\n\ndata: ") : -2])
    assert set(payload) == {"error"}, payload
    error: dict[str, Any] = payload["error"]
    assert error["code"] == "upstream_stream_error"
    assert error["type"] == "server_error"
    assert "127.0.0.1" not in error["message"]
    return error


# --------------------------------------------------------------------------- no connection


def test_refused_connections_are_retried_then_502(rig: Rig) -> None:
    gateway, faulty = rig.gateway, rig.faulty
    faulty.mode = "refuse"  # the upstream went away after the catalog loaded
    response, elapsed = timed(gateway.chat)
    error = assert_gateway_error(response, 502, "upstream_unavailable", "server_error")
    assert "127.0.0.1" not in error["message"]
    # 1 + RETRIES attempts, jittered backoff of at least 0.05 s then 0.1 s between them.
    assert 0.15 <= elapsed < 2.0, elapsed
    assert faulty.faulted == []
    metrics = gateway.metrics_after(1)
    assert metrics("gateway_upstream_retries_total", endpoint=CHAT_PATH) == RETRIES
    assert metrics("gateway_upstream_errors_total", endpoint=CHAT_PATH, kind="unavailable") == 1
    assert metrics("gateway_requests_total", endpoint=CHAT_PATH, model=CHAT_MODEL, status="502", outcome="refused") == 1
    assert metrics("gateway_refusals_total", endpoint=CHAT_PATH, code="upstream_unavailable") == 1
    assert_recovered(gateway, faulty)


def test_upstream_back_during_the_retries_is_served(start: StartGateway, faulty: FaultyUpstream) -> None:
    """A refused connection is retried: an upstream that comes back within the backoff answers."""
    gateway = start({"GATEWAY_UPSTREAM_RETRIES": "6"})  # at least 1.55 s of backoff in all
    faulty.mode = "refuse"
    back = threading.Timer(0.2, lambda: setattr(faulty, "mode", "ok"))
    back.start()
    try:
        response, elapsed = timed(gateway.chat)
    finally:
        back.join(5)
    assert response.status_code == 200, response.text
    assert response.content == OK_CHAT
    assert 0.2 <= elapsed < 2.0, elapsed
    assert faulty.faulted == [f"POST {CHAT_PATH}"]
    retries = gateway.metrics_after(1)("gateway_upstream_retries_total", endpoint=CHAT_PATH)
    assert 1 <= retries <= 6
    assert_recovered(gateway, faulty)


def test_connection_closed_after_the_request_was_read_is_502_without_retry(rig: Rig) -> None:
    """The upstream reads the whole request, then closes the connection without a byte of answer.
    The client library sees a disconnect after sending (httpx RemoteProtocolError, aiohttp
    ServerDisconnectedError), not a connect error: the request was delivered and may be running, so
    it is not retried (a POST is not idempotent). (A connection closed before the request could be
    written is retried: tests/upstream/test_reused_connection.py.)"""
    gateway, faulty = rig.gateway, rig.faulty
    faulty.mode = "close"
    response = gateway.chat()
    assert_gateway_error(response, 502, "upstream_unavailable", "server_error")
    assert faulty.faulted == [f"POST {CHAT_PATH}"]  # sent once
    metrics = gateway.metrics_after(1)
    assert metrics("gateway_upstream_retries_total", endpoint=CHAT_PATH) == 0
    assert metrics("gateway_upstream_errors_total", endpoint=CHAT_PATH, kind="unavailable") == 1
    assert_recovered(gateway, faulty)


# --------------------------------------------------------------------------- no answer, slow answer


def test_upstream_that_never_answers_is_504_within_the_first_byte_timeout(rig: Rig) -> None:
    gateway, faulty = rig.gateway, rig.faulty
    faulty.mode = "hang"
    response, elapsed = timed(gateway.chat)
    error = assert_gateway_error(response, 504, "upstream_timeout", "server_error")
    assert f"{FIRST_BYTE_TIMEOUT:g}s" in error["message"]
    assert FIRST_BYTE_TIMEOUT * 0.9 <= elapsed < FIRST_BYTE_TIMEOUT + 2.5, elapsed
    assert faulty.faulted == [f"POST {CHAT_PATH}"]  # sent once: a request that may be running is not retried
    metrics = gateway.metrics_after(1)
    assert metrics("gateway_upstream_errors_total", endpoint=CHAT_PATH, kind="timeout") == 1
    assert metrics("gateway_upstream_retries_total", endpoint=CHAT_PATH) == 0
    assert metrics("gateway_requests_total", endpoint=CHAT_PATH, status="504", outcome="refused") == 1
    assert_recovered(gateway, faulty)  # the hanging connections were closed, not left to the stand-in


def test_slow_event_stream_arrives_whole_and_as_it_comes(rig: Rig) -> None:
    """Headers after 0.2 s, then five events 0.2 s apart: 1 s in all, longer than the first-byte
    and the idle timeout, yet every wait is shorter than its timeout. No total timeout cuts it."""
    gateway, faulty = rig.gateway, rig.faulty
    faulty.mode, faulty.body_kind, faulty.head_delay, faulty.chunk_gap = "slow", "sse", 0.2, 0.2
    started = time.monotonic()
    arrivals: list[float] = []
    contents: list[str | None] = []
    with gateway.sdk() as sdk:
        stream = sdk.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "Hello"}], stream=True
        )
        for chunk in stream:
            arrivals.append(time.monotonic() - started)
            contents.append(chunk.choices[0].delta.content if chunk.choices else None)
    assert contents == ["one ", "two ", "three", None]
    total = time.monotonic() - started  # [DONE] came last, 0.2 s after the final chunk
    assert total >= 0.9, total  # the upstream's pace ...
    assert arrivals[0] < total - 0.5, (arrivals, total)  # ... relayed as it came, not gathered first
    metrics = gateway.metrics_after(1)
    # Its outcome (completed, or client_disconnected when the SDK's hang-up after [DONE] beats the
    # upstream's end of body): see test_stream_read_through_done_counts_as_completed.
    assert metrics("gateway_requests_total", endpoint=CHAT_PATH, status="200") == 1
    assert metrics("gateway_upstream_errors_total") == 0
    assert_recovered(gateway, faulty)


def test_slow_json_body_arrives_whole(rig: Rig) -> None:
    gateway, faulty = rig.gateway, rig.faulty
    faulty.mode, faulty.body_kind, faulty.head_delay, faulty.chunk_gap = "slow", "json", 0.2, 0.2
    response, elapsed = timed(gateway.chat)
    assert response.status_code == 200, response.text
    assert response.content == OK_CHAT
    assert elapsed >= 0.9, elapsed  # five pieces 0.2 s apart after 0.2 s: longer than any timeout
    assert gateway.metrics_after(1)("gateway_upstream_errors_total") == 0
    assert_recovered(gateway, faulty)


# --------------------------------------------------------------------------- broken mid-body


def test_stream_read_through_done_counts_as_completed(default_rig: Rig) -> None:
    """The openai SDK stops reading at ``data: [DONE]`` and closes the response at once. Here the
    upstream ends its body 0.3 s after [DONE] (its last chunk in a later packet)."""
    gateway, faulty = default_rig.gateway, default_rig.faulty
    faulty.mode, faulty.end_delay = "sse", 0.3
    contents: list[str | None] = []
    with gateway.sdk() as sdk:
        collect(
            sdk.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "Hello"}], stream=True),
            contents,
        )
    assert contents == ["one ", "two ", "three", None]  # all of it, [DONE] included
    metrics = gateway.metrics_after(1)
    assert metrics("gateway_requests_total", endpoint=CHAT_PATH, status="200", outcome="completed") == 1
    assert_recovered(gateway, faulty)


@pytest.mark.parametrize("fault", ["stall", "reset", "cut"])
def test_event_stream_broken_mid_way_ends_with_an_error_event(rig: Rig, fault: FaultMode) -> None:
    """Two events, then silence beyond the idle timeout ("stall"), a TCP reset or a plain close: the
    client gets the two events, then OpenAI's stream error event, then a cleanly ended stream."""
    gateway, faulty = rig.gateway, rig.faulty
    faulty.mode, faulty.body_kind = fault, "sse"
    started = time.monotonic()
    response, raw = gateway.stream()
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    error_event(raw, b"".join(STREAM_EVENTS[:PARTIAL_EVENTS]))
    if fault == "stall":
        assert IDLE_TIMEOUT * 0.9 <= elapsed < IDLE_TIMEOUT + 2.5, elapsed
    else:
        assert elapsed < 2.0, elapsed
    metrics = gateway.metrics_after(1)
    assert metrics("gateway_upstream_errors_total", endpoint=CHAT_PATH, kind="stream_broken") == 1
    assert metrics("gateway_requests_total", endpoint=CHAT_PATH, status="200", outcome="upstream_broken") == 1
    assert_recovered(gateway, faulty)


@pytest.mark.parametrize("fault", ["stall", "reset"])
def test_sdk_stream_raises_api_error_after_the_chunks_it_got(rig: Rig, fault: FaultMode) -> None:
    gateway, faulty = rig.gateway, rig.faulty
    faulty.mode, faulty.body_kind = fault, "sse"
    contents: list[str | None] = []
    with gateway.sdk() as sdk:
        stream = sdk.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "Hello"}], stream=True
        )
        with pytest.raises(openai.APIError) as raised:
            collect(stream, contents)
    assert contents == ["one ", "two "]
    assert not isinstance(raised.value, openai.APIStatusError)  # the status was 200: an in-stream error
    assert raised.value.code == "upstream_stream_error"
    assert "The upstream stream broke" in raised.value.message
    assert_recovered(gateway, faulty)


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [("stall", 504, "upstream_timeout"), ("reset", 502, "upstream_unavailable"), ("cut", 502, "upstream_unavailable")],
)
def test_json_body_broken_before_its_end_is_an_upstream_error(
    rig: Rig, fault: FaultMode, status: int, code: str
) -> None:
    """Half a JSON body, then silence, a reset or a close. Nothing has reached the client yet (a
    body up to 1 MiB is read whole for the cost header before the status goes out), so it gets a
    proper error, not the upstream's 200 with half a body (regression: it used to get uvicorn's
    plain-text 500)."""
    gateway, faulty = rig.gateway, rig.faulty
    faulty.mode, faulty.body_kind = fault, "json"
    response, elapsed = timed(gateway.chat)
    error = assert_gateway_error(response, status, code, "server_error")
    assert "127.0.0.1" not in error["message"]
    if fault == "stall":
        assert IDLE_TIMEOUT * 0.9 <= elapsed < IDLE_TIMEOUT + 2.5, elapsed
    else:
        assert elapsed < 2.0, elapsed
    assert faulty.faulted == [f"POST {CHAT_PATH}"]  # the upstream answered: not retried
    metrics = gateway.metrics_after(1)
    assert metrics("gateway_requests_total", endpoint=CHAT_PATH, status=str(status), outcome="upstream_broken") == 1
    assert metrics("gateway_upstream_errors_total", endpoint=CHAT_PATH, kind="stream_broken") == 1
    assert_recovered(gateway, faulty)


# --------------------------------------------------------------------------- malformed streams


def test_truncated_event_stream_is_relayed_as_sent_and_ends(rig: Rig) -> None:
    """A whole event, then half of one, then a proper end of the HTTP body: the client gets exactly
    those bytes and the stream ends (no hang). The SDK yields the whole event and drops the half one
    without an error."""
    gateway, faulty = rig.gateway, rig.faulty
    faulty.mode = "truncated_sse"
    response, raw = gateway.stream()
    assert response.status_code == 200
    assert raw == b"".join(TRUNCATED_SSE)
    with gateway.sdk() as sdk:
        stream = sdk.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "Hello"}], stream=True
        )
        assert [chunk.choices[0].delta.content for chunk in stream] == ["one "]
    metrics = gateway.metrics_after(2)
    assert metrics("gateway_requests_total", endpoint=CHAT_PATH, status="200", outcome="completed") == 2
    assert_recovered(gateway, faulty)


def test_invalid_event_stream_is_relayed_as_sent_and_ends(rig: Rig) -> None:
    """Lines that are not server-sent events reach the client as they are and the stream ends. The
    SDK ignores a line without a field name but raises json.JSONDecodeError (not an openai error)
    on data that is not JSON."""
    gateway, faulty = rig.gateway, rig.faulty
    faulty.mode = "invalid_sse"
    response, raw = gateway.stream()
    assert response.status_code == 200
    assert raw == b"".join(INVALID_SSE)
    contents: list[str | None] = []
    with gateway.sdk() as sdk:
        stream = sdk.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "Hello"}], stream=True
        )
        with pytest.raises(JSONDecodeError):
            collect(stream, contents)
    assert contents == []
    metrics = gateway.metrics_after(2)
    assert metrics("gateway_requests_total", endpoint=CHAT_PATH, status="200") == 2
    # The SDK hangs up when it raises: its request may be counted as cut short instead of completed.
    assert metrics("gateway_requests_total", endpoint=CHAT_PATH, status="200", outcome="completed") >= 1
    assert metrics("gateway_upstream_errors_total") == 0
    assert_recovered(gateway, faulty)


# --------------------------------------------------------------------------- a huge body

HUGE_SIZE = 32 << 20


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_huge_body_is_relayed_whole_and_intact(rig: Rig, chunked: bool) -> None:
    gateway, faulty = rig.gateway, rig.faulty
    faulty.mode, faulty.huge_size, faulty.huge_chunked = "huge", HUGE_SIZE, chunked
    expected = hashlib.sha256()
    for piece in huge_body(HUGE_SIZE):
        expected.update(piece)
    received = hashlib.sha256()
    size = 0
    started = time.monotonic()
    with gateway.http.stream("POST", CHAT_PATH, json=CHAT_BODY, headers=AUTH) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            received.update(chunk)
            size += len(chunk)
    elapsed = time.monotonic() - started
    assert size == HUGE_SIZE
    assert received.hexdigest() == expected.hexdigest()
    if not chunked:
        assert response.headers["content-length"] == str(HUGE_SIZE)
    assert "x-gateway-cost-usd" not in response.headers  # beyond 1 MiB the body is streamed, not read whole
    assert elapsed < 20, elapsed
    assert (
        gateway.metrics_after(1)("gateway_requests_total", endpoint=CHAT_PATH, status="200", outcome="completed") == 1
    )
    assert_recovered(gateway, faulty)


HUGE_BROKEN_SIZE = 8 << 20
HUGE_BROKEN_AT = 3 << 20


def read_into(response: httpx.Response, sizes: list[int]) -> None:
    for chunk in response.iter_raw():
        sizes.append(len(chunk))


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_huge_body_broken_after_its_headers_is_visibly_incomplete(rig: Rig, chunked: bool) -> None:
    """Beyond 1 MiB the status goes out before the body is read whole, so a reset 3 MiB into an
    8 MiB body can only end the body. The client must be able to tell it is incomplete: the
    connection closes short of the Content-Length, or without the last chunk (regression: a
    chunked body used to get a clean last chunk, a truncated body passing for a whole one)."""
    gateway, faulty = rig.gateway, rig.faulty
    faulty.mode, faulty.huge_size, faulty.huge_chunked = "huge", HUGE_BROKEN_SIZE, chunked
    faulty.huge_reset_after = HUGE_BROKEN_AT
    sizes: list[int] = []
    with gateway.http.stream("POST", CHAT_PATH, json=CHAT_BODY, headers=AUTH) as response:
        assert response.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            read_into(response, sizes)
    assert MAX_LATE_HEADERS_BODY < sum(sizes) <= HUGE_BROKEN_AT
    metrics = gateway.metrics_after(1)
    assert metrics("gateway_requests_total", endpoint=CHAT_PATH, status="200", outcome="upstream_broken") == 1
    assert metrics("gateway_upstream_errors_total", endpoint=CHAT_PATH, kind="stream_broken") == 1
    assert_recovered(gateway, faulty)


# --------------------------------------------------------------------------- error statuses

PAST_DATE = formatdate(0, usegmt=True)  # an HTTP date already passed: wait 0


@pytest.mark.parametrize(("status", "retry_after"), [(429, "0"), (503, "0"), (503, PAST_DATE)])
def test_short_retry_after_is_retried_until_the_attempts_run_out(
    default_rig: Rig, status: int, retry_after: str
) -> None:
    gateway, faulty = default_rig.gateway, default_rig.faulty
    faulty.mode, faulty.status_answer = "status", StatusAnswer(status, retry_after)
    response, elapsed = timed(gateway.chat)
    # The last answer goes to the client as the upstream sent it.
    assert response.status_code == status
    assert response.content == UPSTREAM_ERROR_BODY
    assert response.headers["retry-after"] == retry_after
    assert faulty.faulted == [f"POST {CHAT_PATH}"] * (1 + RETRIES)
    assert elapsed < 2.0, elapsed
    metrics = gateway.metrics_after(1)
    assert metrics("gateway_upstream_retries_total", endpoint=CHAT_PATH) == RETRIES
    assert metrics("gateway_upstream_errors_total", endpoint=CHAT_PATH, kind="status_5xx") == (status >= 500)
    assert metrics("gateway_requests_total", endpoint=CHAT_PATH, status=str(status), outcome="completed") == 1
    assert_recovered(gateway, faulty)


@pytest.mark.parametrize("status", [429, 503])
def test_one_short_retry_after_then_success_is_200(default_rig: Rig, status: int) -> None:
    gateway, faulty = default_rig.gateway, default_rig.faulty
    faulty.status_answer = StatusAnswer(status, "0")
    faulty.queue("status")  # the first attempt; then mode "ok"
    response = gateway.chat()
    assert response.status_code == 200, response.text
    assert response.content == OK_CHAT
    assert faulty.faulted == [f"POST {CHAT_PATH}"] * 2
    metrics = gateway.metrics_after(1)
    assert metrics("gateway_upstream_retries_total", endpoint=CHAT_PATH) == 1
    assert metrics("gateway_upstream_errors_total") == 0
    assert_recovered(gateway, faulty)


@pytest.mark.parametrize(
    ("status", "retry_after"),
    [
        (500, None),
        (503, None),
        (429, None),
        (503, "5"),  # longer than retry_max_wait (1 s)
        (429, "7"),
        # Only 429 and 503 are retried, whatever their Retry-After: another 5xx may mean the request ran.
        (502, "0"),
        (500, "0"),
    ],
)
def test_other_error_answers_pass_through_at_once(default_rig: Rig, status: int, retry_after: str | None) -> None:
    gateway, faulty = default_rig.gateway, default_rig.faulty
    faulty.mode, faulty.status_answer = "status", StatusAnswer(status, retry_after)
    response, elapsed = timed(gateway.chat)
    assert response.status_code == status
    assert response.content == UPSTREAM_ERROR_BODY
    assert response.headers.get("retry-after") == retry_after
    assert faulty.faulted == [f"POST {CHAT_PATH}"]
    assert elapsed < 0.5, elapsed
    metrics = gateway.metrics_after(1)
    assert metrics("gateway_upstream_retries_total", endpoint=CHAT_PATH) == 0
    assert metrics("gateway_upstream_errors_total", endpoint=CHAT_PATH, kind="status_5xx") == (status >= 500)
    assert_recovered(gateway, faulty)


# --------------------------------------------------------------------------- circuit breaker

BREAKER_FAILURES = 3


def fail_once(gateway: Gateway, faulty: FaultyUpstream, failure: str) -> None:
    """One request that the upstream fails in the way ``failure`` names, and what the client gets."""
    if failure == "status_502":
        faulty.mode, faulty.status_answer = "status", StatusAnswer(502)
        response = gateway.chat()
        assert response.status_code == 502
        assert response.content == UPSTREAM_ERROR_BODY
    elif failure == "connection_dropped":
        faulty.mode = "close"
        assert_gateway_error(gateway.chat(), 502, "upstream_unavailable")
    else:  # "stream_reset"
        faulty.mode, faulty.body_kind = "reset", "sse"
        response, raw = gateway.stream()
        assert response.status_code == 200
        error_event(raw, b"".join(STREAM_EVENTS[:PARTIAL_EVENTS]))


@pytest.mark.parametrize("failure", ["status_502", "connection_dropped", "stream_reset"])
def test_circuit_opens_after_consecutive_failures_for_that_model_only(
    start_default: StartGateway, faulty: FaultyUpstream, failure: str
) -> None:
    gateway = start_default(
        {"GATEWAY_UPSTREAM_BREAKER_FAILURES": str(BREAKER_FAILURES), "GATEWAY_UPSTREAM_BREAKER_COOLDOWN": "30"}
    )
    # Not consecutive: a success in between starts the count again.
    for _ in range(BREAKER_FAILURES - 1):
        fail_once(gateway, faulty, failure)
    faulty.mode = "ok"
    assert gateway.chat().status_code == 200
    for _ in range(BREAKER_FAILURES - 1):
        fail_once(gateway, faulty, failure)
    assert gateway.readyz()["open_circuits"] == {}
    fail_once(gateway, faulty, failure)  # the third in a row
    reached = len(faulty.faulted)
    faulty.mode = "ok"
    response, elapsed = timed(gateway.chat)
    error = assert_gateway_error(response, 503, "circuit_open", "server_error")
    assert error["param"] == "model"
    assert 1 <= int(response.headers["retry-after"]) <= 30
    assert elapsed < 0.5, elapsed
    assert len(faulty.faulted) == reached  # answered locally
    assert list(gateway.readyz()["open_circuits"]) == [CHAT_MODEL]
    metrics = gateway.metrics_after(7)
    assert metrics("gateway_circuit_open", model=CHAT_MODEL) == 1
    assert metrics("gateway_refusals_total", endpoint=CHAT_PATH, code="circuit_open") == 1
    # Another model goes through the same upstream as before.
    other = gateway.chat({**CHAT_BODY, "model": NO_HEALTH_MODEL})
    assert other.status_code == 200, other.text
    assert len(faulty.faulted) == reached + 1
    assert_gateway_error(gateway.chat(), 503, "circuit_open")
    assert_recovered(gateway, faulty, model=NO_HEALTH_MODEL)


def test_after_the_cooldown_one_probe_goes_through(start_default: StartGateway, faulty: FaultyUpstream) -> None:
    cooldown = 0.5
    gateway = start_default(
        {"GATEWAY_UPSTREAM_BREAKER_FAILURES": "2", "GATEWAY_UPSTREAM_BREAKER_COOLDOWN": str(cooldown)}
    )
    for _ in range(2):
        fail_once(gateway, faulty, "status_502")
    opened = time.monotonic()
    assert_gateway_error(gateway.chat(), 503, "circuit_open")
    # A failed probe opens the circuit again at once.
    time.sleep(max(0.0, cooldown + 0.05 - (time.monotonic() - opened)))
    reached = len(faulty.faulted)
    assert gateway.chat().status_code == 502  # the probe, failing upstream
    assert len(faulty.faulted) == reached + 1
    reopened = time.monotonic()
    assert_gateway_error(gateway.chat(), 503, "circuit_open")
    assert len(faulty.faulted) == reached + 1
    # After the next cooldown: one slow, successful probe; meanwhile everyone else still gets 503.
    time.sleep(max(0.0, cooldown + 0.05 - (time.monotonic() - reopened)))
    faulty.mode, faulty.body_kind, faulty.head_delay, faulty.chunk_gap = "slow", "json", 0.3, 0.0
    probe: list[httpx.Response] = []

    def send_probe() -> None:
        with httpx.Client(base_url=gateway.url, timeout=10) as http:
            probe.append(http.post(CHAT_PATH, json=CHAT_BODY, headers=AUTH))

    thread = threading.Thread(target=send_probe)
    thread.start()
    try:
        assert wait_until(lambda: faulty.answering == 1, timeout=3), "the probe never reached the upstream"
        assert_gateway_error(gateway.chat(), 503, "circuit_open")
    finally:
        thread.join(10)
    assert probe[0].status_code == 200, probe[0].text
    assert probe[0].content == OK_CHAT
    assert gateway.readyz()["open_circuits"] == {}
    assert gateway.metrics()("gateway_circuit_open", model=CHAT_MODEL) == 0
    assert_recovered(gateway, faulty)


# --------------------------------------------------------------------------- the catalog

BAD_CATALOGS: dict[str, tuple[bytes, int]] = {
    "not-json": (b"<html><body>502 Bad Gateway</body></html>", 200),
    "truncated-json": (CATALOG_JSON[:100], 200),
    "object-not-list": (b'{"models": []}', 200),
    "http-500": (UPSTREAM_ERROR_BODY, 500),
}


@pytest.mark.parametrize("bad", [*BAD_CATALOGS, "unreachable"])
def test_no_usable_catalog_at_start_is_not_ready_then_recovers(
    start: StartGateway, faulty: FaultyUpstream, bad: str
) -> None:
    if bad == "unreachable":
        faulty.mode = "refuse"
    else:
        faulty.catalog, faulty.catalog_status = BAD_CATALOGS[bad]
    gateway = start(ready=False)
    assert wait_until(lambda: gateway.readyz()["catalog"]["refresh_failures"] >= 1)
    ready = gateway.http.get("/readyz")
    assert ready.status_code == 503
    catalog = ready.json()["catalog"]
    assert catalog["loaded"] is False
    assert catalog["last_error"]
    response, elapsed = timed(gateway.chat)
    assert_gateway_error(response, 503, "catalog_unavailable", "server_error")
    assert int(response.headers["retry-after"]) >= 1
    assert elapsed < 2.0, elapsed
    assert faulty.faulted == []
    metrics = gateway.metrics_after(1)
    assert metrics("gateway_catalog_refresh_failures_total") >= 1
    assert metrics("gateway_catalog_loaded") == 0
    assert metrics("gateway_refusals_total", endpoint=CHAT_PATH, code="catalog_unavailable") == 1
    # A good catalog is picked up without a restart (the catalog retries on its own, within the backoff).
    faulty.mode, faulty.catalog, faulty.catalog_status = "ok", CATALOG_JSON, 200
    assert wait_until(lambda: gateway.http.get("/readyz").status_code == 200)
    assert_recovered(gateway, faulty)


def test_catalog_with_bad_entries_serves_the_good_ones(start_default: StartGateway, faulty: FaultyUpstream) -> None:
    bad_entries = [
        {"category": "text", "health_status": "healthy"},  # no model_name
        {"model_name": "Odd-Category-Model", "category": "hologram"},
        "not an object",
    ]
    faulty.catalog = orjson.dumps([*default_catalog(), *bad_entries])
    gateway = start_default()
    catalog = gateway.readyz()["catalog"]
    assert catalog["models"] == len(default_catalog())
    skipped = catalog["skipped_entries"]
    assert len(skipped) == 3
    assert "model_name" in skipped[0]
    assert "hologram" in skipped[1]
    assert "not an object" in skipped[2]
    unusable = gateway.chat({**CHAT_BODY, "model": "Odd-Category-Model"})
    assert_gateway_error(unusable, 404, "model_not_found")
    assert faulty.faulted == []
    assert_recovered(gateway, faulty)


def test_stale_catalog_keeps_serving_while_refreshes_get_garbage(
    start_default: StartGateway, faulty: FaultyUpstream
) -> None:
    ttl = 0.3
    gateway = start_default({"GATEWAY_CATALOG_TTL": str(ttl)})
    faulty.catalog = b"this is not a catalog"

    def served_while_failing() -> bool:
        # Each request past the TTL answers from the stale copy and starts a background refresh.
        assert gateway.chat().status_code == 200
        return bool(gateway.readyz()["catalog"]["refresh_failures"] >= 2)

    assert wait_until(served_while_failing, timeout=5, interval=0.1)
    ready = gateway.http.get("/readyz")
    assert ready.status_code == 200
    catalog = ready.json()["catalog"]
    assert catalog["loaded"] is True
    assert catalog["age_seconds"] > ttl
    assert catalog["last_error"]
    metrics = gateway.metrics()
    assert metrics("gateway_catalog_refresh_failures_total") >= 2
    assert metrics("gateway_catalog_loaded") == 1
    # A good answer again: the next refresh succeeds and the catalog is fresh.
    faulty.catalog = CATALOG_JSON

    def fresh_again() -> bool:
        gateway.chat()
        catalog = gateway.readyz()["catalog"]
        return catalog["last_error"] is None and catalog["age_seconds"] <= ttl

    assert wait_until(fresh_again, timeout=5, interval=0.1)
    assert_recovered(gateway, faulty)


# --------------------------------------------------------------------------- overload


def test_over_the_in_flight_cap_is_503_overloaded_at_once(start_default: StartGateway, faulty: FaultyUpstream) -> None:
    gateway = start_default({"GATEWAY_LIMITS_MAX_IN_FLIGHT": "1", "GATEWAY_UPSTREAM_FIRST_BYTE_TIMEOUT": "1"})
    faulty.mode = "hang"
    first: list[httpx.Response] = []

    def send_first() -> None:
        with httpx.Client(base_url=gateway.url, timeout=10) as http:
            first.append(http.post(CHAT_PATH, json=CHAT_BODY, headers=AUTH))

    thread = threading.Thread(target=send_first)
    thread.start()
    try:
        assert wait_until(lambda: faulty.answering == 1 and gateway.readyz()["in_flight"] == 1, timeout=3)
        second, elapsed = timed(gateway.chat)
        assert_gateway_error(second, 503, "overloaded", "server_error")
        assert second.headers["retry-after"] == "1"
        assert elapsed < 0.5, elapsed
        assert faulty.faulted == [f"POST {CHAT_PATH}"]  # the second never went upstream
    finally:
        thread.join(10)
    assert_gateway_error(first[0], 504, "upstream_timeout")
    metrics = gateway.metrics_after(2)
    assert metrics("gateway_refusals_total", endpoint=CHAT_PATH, code="overloaded") == 1
    assert metrics("gateway_upstream_errors_total", endpoint=CHAT_PATH, kind="timeout") == 1
    assert_recovered(gateway, faulty)
