"""OpenTelemetry tracing ([tracing]): off by default and absent; on, a span per proxied request with
its admission and upstream children, and the trace context carried to the upstream.

The gateways run for real on 127.0.0.1; their spans go to an InMemorySpanExporter handed to
``create_app`` (exported as each span ends), the upstream's view is DemoState.requests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.app import create_app
from gateway.config import TRACING_INSTALL, SettingsError, load_settings
from gateway.demo import DemoState
from gateway.server.thread import LocalServer, serve_in_thread
from tests.helpers.gateway import (
    CHAT_BODY,
    CHAT_MODEL,
    CHAT_PATH,
    assert_gateway_error,
    is_ready,
    requests_on,
    wait_until,
)
from tests.helpers.upstreams import FaultyUpstream

ROOT = Path(__file__).resolve().parents[2]
CLIENT_KEY = "sk-client-secret-for-tracing"
# A client's own trace context (the W3C spec's example ids).
CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
ON = {"GATEWAY_TRACING_ENABLED": "true"}


@dataclass(frozen=True, slots=True)
class RequestSpans:
    server: ReadableSpan
    admission: ReadableSpan | None
    upstream: list[ReadableSpan]  # CLIENT spans, one per attempt, in order


@dataclass(frozen=True, slots=True)
class Traced:
    """A gateway on 127.0.0.1 and what its tracer exported."""

    server: LocalServer
    http: httpx.Client
    exporter: InMemorySpanExporter
    upstream_url: str

    def chat(self, body: Mapping[str, Any] = CHAT_BODY, **headers: str) -> httpx.Response:
        return self.http.post(CHAT_PATH, json=dict(body), headers={"authorization": f"Bearer {CLIENT_KEY}", **headers})

    def spans_of(self, response: httpx.Response) -> RequestSpans:
        """The spans of the request that got ``response`` (waits, bounded, for its server span to end)."""
        rid = response.headers["x-request-id"]

        def server_span() -> ReadableSpan | None:
            return next(
                (
                    s
                    for s in self.exporter.get_finished_spans()
                    if s.kind is SpanKind.SERVER and attrs(s).get("gateway.request_id") == rid
                ),
                None,
            )

        assert wait_until(lambda: server_span() is not None), f"no server span for request {rid}"
        server = server_span()
        assert server is not None
        children = [s for s in self.exporter.get_finished_spans() if parent_id(s) == span_id(server)]
        admission = [s for s in children if s.kind is SpanKind.INTERNAL]
        assert len(admission) <= 1, children
        upstream = sorted((s for s in children if s.kind is SpanKind.CLIENT), key=lambda s: s.start_time or 0)
        assert len(admission) + len(upstream) == len(children), children
        return RequestSpans(server, admission[0] if admission else None, upstream)


StartTraced = Callable[..., Traced]


@pytest.fixture
def start_traced(upstream: LocalServer) -> Iterator[StartTraced]:
    """Start a gateway (tracing on unless ``enabled=False``) whose spans go to an in-memory exporter."""
    with ExitStack() as stack:

        def start(env: dict[str, str] | None = None, upstream_url: str | None = None, enabled: bool = True) -> Traced:
            exporter = InMemorySpanExporter()
            upstream_url = upstream_url or upstream.url
            full_env = {
                "GATEWAY_UPSTREAM_URL": upstream_url,
                "GATEWAY_USAGE_PATH": "",
                **(ON if enabled else {}),
                **(env or {}),
            }
            app = create_app(load_settings(None, full_env), span_exporter=exporter)
            server = stack.enter_context(serve_in_thread(app))
            http = stack.enter_context(httpx.Client(base_url=server.url, timeout=15))
            assert wait_until(lambda: is_ready(http)), "the gateway never loaded the catalog"
            return Traced(server, http, exporter, upstream_url)

        yield start


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def context_of(span: ReadableSpan) -> SpanContext:
    context = span.get_span_context()
    assert context is not None
    return context


def span_id(span: ReadableSpan) -> str:
    return f"{context_of(span).span_id:016x}"


def trace_id(span: ReadableSpan) -> str:
    return f"{context_of(span).trace_id:032x}"


def parent_id(span: ReadableSpan) -> str | None:
    return None if span.parent is None else f"{span.parent.span_id:016x}"


def traceparent(trace: str, span: str, flags: str = "01") -> str:
    return f"00-{trace}-{span}-{flags}"


def sent_upstream(value: str) -> tuple[str, str, bool]:
    """A traceparent the upstream received: (trace id, parent span id, sampled)."""
    version, trace, span, flags = value.split("-")
    assert version == "00", value
    return trace, span, bool(int(flags, 16) & 1)


def upstream_chat_headers(state: DemoState) -> list[dict[str, str]]:
    return [r.headers for r in requests_on(state, CHAT_PATH)]


def assert_no_secret(spans: RequestSpans) -> None:
    """No attribute of any span carries the client's key or the request body."""
    for span in [spans.server, *([spans.admission] if spans.admission else []), *spans.upstream]:
        text = orjson.dumps(attrs(span)).decode()
        assert CLIENT_KEY not in text, text
        assert "Hello" not in text, text  # CHAT_BODY's message


# --------------------------------------------------------------------------- off (the default)


def test_off_by_default_no_span_and_the_client_trace_headers_stay_on_its_side(
    start_traced: StartTraced, demo_state: DemoState
) -> None:
    gateway = start_traced(enabled=False)
    assert gateway.chat().status_code == 200
    client_parent = traceparent(CLIENT_TRACE_ID, CLIENT_SPAN_ID)
    assert gateway.chat(traceparent=client_parent, tracestate="vendor=abc").status_code == 200
    first, second = upstream_chat_headers(demo_state)
    assert "traceparent" not in first
    assert "tracestate" not in first
    # Off, the gateway is no part of the trace: a client's trace context does not reach the upstream.
    assert "traceparent" not in second
    assert "tracestate" not in second
    assert gateway.exporter.get_finished_spans() == ()


def test_a_default_gateway_never_imports_opentelemetry(upstream: LocalServer) -> None:
    """Off costs nothing: a gateway with default settings serves a request without importing it."""
    code = textwrap.dedent(
        f"""
        import sys
        import httpx
        from gateway.app import create_app
        from gateway.server.thread import serve_in_thread
        from gateway.config import load_settings

        settings = load_settings(None, {{"GATEWAY_UPSTREAM_URL": {upstream.url!r}, "GATEWAY_USAGE_PATH": ""}})
        assert not settings.tracing.enabled
        with serve_in_thread(create_app(settings)) as gateway:
            body = {{"model": {CHAT_MODEL!r}, "messages": [{{"role": "user", "content": "Hi"}}]}}
            response = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=15)
            assert response.status_code == 200, response.text
        loaded = sorted(name for name in sys.modules if name.split(".")[0] == "opentelemetry")
        assert not loaded, loaded
        print("clean")
        """
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"


# --------------------------------------------------------------------------- on


def test_a_request_gets_a_server_span_with_admission_and_upstream_children(
    start_traced: StartTraced, demo_state: DemoState
) -> None:
    gateway = start_traced()
    response = gateway.chat()
    assert response.status_code == 200, response.text
    spans = gateway.spans_of(response)
    server, admission = spans.server, spans.admission
    assert admission is not None
    (call,) = spans.upstream

    assert server.name == "POST /v1/chat/completions"
    assert server.parent is None  # the client sent no trace context: a new trace
    assert server.resource.attributes["service.name"] == "flexai-gateway"
    assert server.status.status_code is StatusCode.UNSET
    found = attrs(server)
    assert found["http.request.method"] == "POST"
    assert found["url.path"] == CHAT_PATH
    assert found["http.route"] == CHAT_PATH
    assert found["http.response.status_code"] == 200
    assert found["gateway.request_id"] == response.headers["x-request-id"]
    assert found["gateway.outcome"] == "completed"
    assert found["gen_ai.request.model"] == CHAT_MODEL
    assert found["gen_ai.operation.name"] == "chat"
    usage = response.json()["usage"]
    assert found["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert found["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert found["gateway.cost_usd"] == pytest.approx(float(response.headers["x-gateway-cost-usd"]))
    assert "error.type" not in found

    # Children of the server span, in one trace, one after the other.
    assert {trace_id(admission), trace_id(call)} == {trace_id(server)}
    assert parent_id(admission) == parent_id(call) == span_id(server)
    assert admission.name == "admission"
    assert call.name == "POST /v1/chat/completions"
    assert (admission.end_time or 0) <= (call.start_time or 0)
    assert (call.end_time or 0) <= (server.end_time or 0)
    assert attrs(call)["http.response.status_code"] == 200
    assert attrs(call)["url.full"] == gateway.upstream_url + CHAT_PATH
    assert "http.request.resend_count" not in attrs(call)

    # The upstream received the upstream span's context, and only that.
    (headers,) = upstream_chat_headers(demo_state)
    assert sent_upstream(headers["traceparent"]) == (trace_id(server), span_id(call), True)
    assert "tracestate" not in headers
    assert_no_secret(spans)


def test_the_clients_trace_is_continued_upstream(start_traced: StartTraced, demo_state: DemoState) -> None:
    gateway = start_traced()
    response = gateway.chat(traceparent=traceparent(CLIENT_TRACE_ID, CLIENT_SPAN_ID), tracestate="vendor=abc")
    assert response.status_code == 200, response.text
    spans = gateway.spans_of(response)
    (call,) = spans.upstream
    assert trace_id(spans.server) == CLIENT_TRACE_ID
    assert spans.server.parent is not None
    assert spans.server.parent.is_remote
    assert parent_id(spans.server) == CLIENT_SPAN_ID
    assert trace_id(call) == CLIENT_TRACE_ID
    # Upstream, the gateway's own upstream span is the parent (not the client's span), with the
    # client's tracestate carried along.
    (headers,) = upstream_chat_headers(demo_state)
    assert sent_upstream(headers["traceparent"]) == (CLIENT_TRACE_ID, span_id(call), True)
    assert headers["tracestate"] == "vendor=abc"


def test_an_unsampled_client_trace_records_nothing_but_still_propagates(
    start_traced: StartTraced, demo_state: DemoState
) -> None:
    gateway = start_traced()
    response = gateway.chat(traceparent=traceparent(CLIENT_TRACE_ID, CLIENT_SPAN_ID, flags="00"))
    assert response.status_code == 200, response.text
    (headers,) = upstream_chat_headers(demo_state)
    trace, span, sampled = sent_upstream(headers["traceparent"])
    assert (trace, sampled) == (CLIENT_TRACE_ID, False)
    assert span != CLIENT_SPAN_ID
    # Nothing was recorded for it: once a sampled request's spans are in, they are all there is.
    recorded = gateway.chat()
    new_trace = trace_id(gateway.spans_of(recorded).server)
    assert {trace_id(s) for s in gateway.exporter.get_finished_spans()} == {new_trace}


def test_sample_ratio_zero_records_no_new_trace_but_follows_a_sampled_client(start_traced: StartTraced) -> None:
    gateway = start_traced({"GATEWAY_TRACING_SAMPLE_RATIO": "0"})
    assert gateway.chat().status_code == 200
    sampled = gateway.chat(traceparent=traceparent(CLIENT_TRACE_ID, CLIENT_SPAN_ID, flags="01"))
    assert sampled.status_code == 200
    spans = gateway.spans_of(sampled)  # the parent-based sampler follows the client's decision
    assert trace_id(spans.server) == CLIENT_TRACE_ID
    assert {trace_id(s) for s in gateway.exporter.get_finished_spans()} == {CLIENT_TRACE_ID}


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({**CHAT_BODY, "model": "no-such-model"}, 404, "model_not_found"),
        ({**CHAT_BODY, "n": 2}, 400, "multiple_choices_not_supported"),
        ({"messages": CHAT_BODY["messages"]}, 400, "missing_model"),
    ],
)
def test_a_refused_request_has_its_error_code_and_no_upstream_span(
    start_traced: StartTraced, demo_state: DemoState, body: dict[str, Any], status: int, code: str
) -> None:
    gateway = start_traced()
    response = gateway.chat(body)
    assert_gateway_error(response, status, code)
    spans = gateway.spans_of(response)
    assert spans.upstream == []
    assert upstream_chat_headers(demo_state) == []
    found = attrs(spans.server)
    assert found["http.response.status_code"] == status
    assert found["error.type"] == code
    assert found["gateway.outcome"] == "refused"
    assert spans.server.status.status_code is StatusCode.UNSET  # the client's error, not the gateway's
    assert spans.admission is not None
    assert attrs(spans.admission)["error.type"] == code
    assert (spans.admission.end_time or 0) <= (spans.server.end_time or 0)
    assert_no_secret(spans)


def test_an_unreachable_upstream_is_an_error_with_one_span_per_attempt(start_traced: StartTraced) -> None:
    with FaultyUpstream() as faulty:
        gateway = start_traced({"GATEWAY_UPSTREAM_RETRIES": "1"}, upstream_url=faulty.url)
        faulty.mode = "refuse"  # the upstream goes away after the catalog loaded
        response = gateway.chat()
        assert_gateway_error(response, 502, "upstream_unavailable")
        spans = gateway.spans_of(response)
    assert spans.server.status.status_code is StatusCode.ERROR
    assert attrs(spans.server)["error.type"] == "upstream_unavailable"
    assert attrs(spans.server)["gateway.upstream.retries"] == 1
    first, retry = spans.upstream
    for call in (first, retry):
        assert call.status.status_code is StatusCode.ERROR
        assert attrs(call)["error.type"] == "upstream_unavailable"
    assert "http.request.resend_count" not in attrs(first)
    assert attrs(retry)["http.request.resend_count"] == 1
    assert spans.admission is not None
    assert (spans.admission.end_time or 0) <= (first.start_time or 0)


def test_a_streamed_requests_span_ends_after_the_last_byte(start_traced: StartTraced, demo_state: DemoState) -> None:
    demo_state.token_delay = 0.02
    gateway = start_traced()
    body = {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}}
    with gateway.http.stream(
        "POST", CHAT_PATH, json=body, headers={"authorization": f"Bearer {CLIENT_KEY}"}
    ) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    usage = orjson.loads(events[-2].removeprefix("data: "))["usage"]
    spans = gateway.spans_of(response)
    (call,) = spans.upstream
    # The upstream span ends with the response headers; the server span only after the whole
    # stream, which took (events - 1) token delays (the [DONE] follows the last event at once).
    streamed_ns = (len(events) - 2) * demo_state.token_delay * 1e9
    assert (spans.server.end_time or 0) - (call.end_time or 0) >= 0.9 * streamed_ns
    found = attrs(spans.server)
    assert found["gateway.outcome"] == "completed"
    assert found["gen_ai.usage.output_tokens"] == usage["completion_tokens"]  # read from the stream's end
    assert found["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert spans.server.status.status_code is StatusCode.UNSET


def test_a_dry_run_is_traced_as_admission_only(start_traced: StartTraced, demo_state: DemoState) -> None:
    gateway = start_traced()
    response = gateway.http.post("/v1/validate/chat/completions", json=CHAT_BODY)
    assert response.status_code == 200, response.text
    spans = gateway.spans_of(response)
    assert spans.server.name == "POST /v1/validate/chat/completions"
    assert attrs(spans.server)["gateway.outcome"] == "dry_run"
    assert spans.admission is not None
    assert spans.upstream == []
    assert upstream_chat_headers(demo_state) == []


def test_spans_reach_an_otlp_collector_flushed_when_the_gateway_stops(upstream: LocalServer) -> None:
    """The configured exporter, for real: OTLP over HTTP/protobuf to [tracing] endpoint, batched,
    and what is still queued is sent when the gateway stops."""
    posts: list[tuple[str, bytes]] = []

    async def traces(request: Request) -> Response:
        posts.append((request.headers.get("content-type", ""), await request.body()))
        return Response(b"", media_type="application/x-protobuf")

    with serve_in_thread(Starlette(routes=[Route("/v1/traces", traces, methods=["POST"])])) as collector:
        env = {
            "GATEWAY_UPSTREAM_URL": upstream.url,
            "GATEWAY_USAGE_PATH": "",
            **ON,
            "GATEWAY_TRACING_ENDPOINT": collector.url + "/v1/traces",
            "GATEWAY_TRACING_SERVICE_NAME": "gateway-under-test",
        }
        with (
            serve_in_thread(create_app(load_settings(None, env))) as gateway,
            httpx.Client(base_url=gateway.url, timeout=15) as http,
        ):
            assert wait_until(lambda: is_ready(http))
            response = http.post(CHAT_PATH, json=CHAT_BODY)
            assert response.status_code == 200, response.text
        # The gateway has stopped: its lifespan flushed the batch (sent every 5 s otherwise).
        assert posts, "no spans reached the collector"
    names: list[tuple[str, int]] = []
    services: set[str] = set()
    for content_type, body in posts:
        assert content_type == "application/x-protobuf"
        for resource_spans in ExportTraceServiceRequest.FromString(body).resource_spans:
            services.update(a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name")
            names.extend((span.name, span.kind) for scope in resource_spans.scope_spans for span in scope.spans)
    assert services == {"gateway-under-test"}
    # OTLP's kinds: 1 internal, 2 server, 3 client.
    assert sorted(names) == sorted(
        [("POST /v1/chat/completions", 2), ("admission", 1), ("POST /v1/chat/completions", 3)]
    )


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GATEWAY_TRACING_ENABLED": "maybe"}, "GATEWAY_TRACING_ENABLED: must be true or false"),
        ({"GATEWAY_TRACING_EXPORTER": "jaeger"}, "GATEWAY_TRACING_EXPORTER: must be one of 'otlp', 'console'"),
        ({"GATEWAY_TRACING_SAMPLE_RATIO": "1.5"}, "GATEWAY_TRACING_SAMPLE_RATIO: must be at most 1"),
        ({"GATEWAY_TRACING_SAMPLE_RATIO": "-0.1"}, "GATEWAY_TRACING_SAMPLE_RATIO: must be at least 0"),
        ({"GATEWAY_TRACING_SAMPLE_RATIO": "half"}, "GATEWAY_TRACING_SAMPLE_RATIO: must be a number"),
        ({"GATEWAY_TRACING_ENDPOINT": "collector:4318"}, "[tracing] endpoint: must be an http(s) URL"),
        ({"GATEWAY_TRACING_SERVICE_NAME": " "}, "[tracing] service_name: must not be empty"),
    ],
)
def test_bad_tracing_settings_name_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(None, env)
    assert message in str(caught.value)


def test_tracing_settings_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text(
        '[tracing]\nenabled = true\nexporter = "console"\nendpoint = "http://127.0.0.1:4318/v1/traces"\n'
        'service_name = "gw-eu"\nsample_ratio = 0.25\n'
    )
    tracing = load_settings(path, {}).tracing
    assert (tracing.enabled, tracing.exporter, tracing.endpoint) == (True, "console", "http://127.0.0.1:4318/v1/traces")
    assert (tracing.service_name, tracing.sample_ratio) == ("gw-eu", 0.25)
    defaults = load_settings(None, {}).tracing
    assert (defaults.enabled, defaults.exporter, defaults.endpoint) == (False, "otlp", "")
    assert (defaults.service_name, defaults.sample_ratio) == ("flexai-gateway", 1.0)


BLOCK_OPENTELEMETRY = "import sys\nsys.modules['opentelemetry'] = None  # as if the extra were not installed\n"


def test_tracing_on_without_opentelemetry_refuses_to_start_and_says_what_to_install() -> None:
    code = BLOCK_OPENTELEMETRY + textwrap.dedent(
        """
        from gateway.cli import main
        sys.exit(main(["check-config"]))
        """
    )
    result = run_python(code, {"GATEWAY_TRACING_ENABLED": "true"})
    assert result.returncode == 2, result.stderr
    assert "[tracing] enabled" in result.stderr
    assert TRACING_INSTALL in result.stderr
    assert TRACING_INSTALL == "pip install 'flexai-gateway[tracing]'"
    # Off, the same missing packages are no problem.
    off = run_python(code, {"GATEWAY_TRACING_ENABLED": "false"})
    assert off.returncode == 0, off.stderr


def test_create_app_refuses_too_when_opentelemetry_is_missing() -> None:
    """Settings built without load_settings's checks still cannot start a gateway that cannot trace."""
    code = BLOCK_OPENTELEMETRY + textwrap.dedent(
        """
        from gateway.app import create_app
        from gateway.config import Settings, SettingsError, TracingSettings

        try:
            create_app(Settings(tracing=TracingSettings(enabled=True)))
        except SettingsError as exc:
            print(exc)
        """
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("[tracing] enabled: OpenTelemetry is not installed")
    assert TRACING_INSTALL in result.stdout


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter of this environment (no GATEWAY_* from outside), bounded."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OTEL_"))}
    return subprocess.run(  # noqa: S603 - our own interpreter and code
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_an_answer_from_the_cache_is_traced_without_an_upstream_call(
    start_traced: StartTraced, demo_state: DemoState
) -> None:
    gateway = start_traced({"GATEWAY_CACHE_ENABLED": "true"})
    body = {**CHAT_BODY, "temperature": 0}
    first, hit = gateway.chat(body), gateway.chat(body)
    assert hit.headers["cache-status"].startswith("flexai-gateway; hit")
    missed, served = gateway.spans_of(first), gateway.spans_of(hit)
    assert attrs(missed.server)["gateway.cache"] == "miss"
    assert len(missed.upstream) == 1
    found = attrs(served.server)
    assert (found["gateway.cache"], found["gateway.outcome"]) == ("hit", "cache_hit")
    assert found["gateway.cache.saved_usd"] > 0
    assert served.upstream == []  # nothing went upstream
    assert served.admission is not None
    assert "error.type" not in attrs(served.admission)
    assert len(requests_on(demo_state, CHAT_PATH)) == 1
    assert_no_secret(served)
