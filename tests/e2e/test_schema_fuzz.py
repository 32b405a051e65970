"""Schema-driven fuzzing: OpenAI's published OpenAPI spec, cut to FlexAI's endpoints, drives
schemathesis against a real gateway in front of the simulated upstream.

The spec is ``shared/openai-openapi-flexai.yaml`` beside the repository (CI lays a copy of
``shared/`` there too); without it these tests fail, they do not skip.

Every operation of the spec gets the cases of schemathesis' two generation phases: coverage
(deterministic: every property with a value of each wrong type, out of its range or enum, left out,
and the operation's path with every method it does not define) and fuzzing (Hypothesis-driven,
cases that conform to the schema and cases that violate it). The ``model`` of a generated request
(in the body, a multipart field or the path) is mostly replaced by a model of the simulated
catalog, most often one the endpoint serves, so that requests get past ``model_not_found`` into
admission, validation and the upstream. Properties, for every answer:

- never a 500, and no other 5xx but ``model_unavailable`` (the catalog has unhealthy models);
- a status and a Content-Type the spec documents for the operation;
- an error the gateway answers itself: the exact OpenAI envelope (four keys, no stack trace),
  with nothing sent upstream;
- a method the spec does not define for the path: 405 with ``Allow`` naming the ones it does (a
  path FlexAI does not serve: 404 ``unknown_url``, whatever the method);
- an admitted request: the upstream received it once, on the same path, with the client's bytes
  (or those plus ``stream_options.include_usage``), and a 2xx answer is the upstream's, with the
  Content-Type the upstream gives that endpoint; a dry run answers its report without forwarding.

Why real servers, not schemathesis' ASGI transport: the gateway must run its lifespan (catalog
load, upstream client), and schemathesis keeps an ASGI app's lifespan in a process-wide registry
that outlives the test module; a uvicorn server per module (``gateway.server.thread``) starts and
stops it like production does, and the requests go through uvicorn's HTTP parser too.

Deterministic and bounded: the coverage phase has no randomness (about 4,600 cases), the fuzzing
phase runs derandomized (fixed seeds) with the per-operation example counts of ``EXAMPLES`` (about
1,700 cases); the module takes about 35 s on two cores. The coverage phase is what finds a chat
``role`` given as an object (issue #13), which random fuzzing rarely produces.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.core.result import Ok
from schemathesis.core.transport import Response
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance
from schemathesis.specs.openapi.schemas import OpenApiSchema

from gateway import endpoints
from gateway.catalog import admission
from gateway.catalog.entries import ModelEntry, parse_entry
from gateway.demo import DemoState, default_catalog
from gateway.server.thread import LocalServer
from tests.helpers.gateway import CATALOG_PATH, error_object, shared_servers

SPEC = Path(__file__).parents[3] / "shared" / "openai-openapi-flexai.yaml"

AnyCase = Case[Any]

# Every operation of the spec, and how many cases each gets. A test below checks this list against
# the spec, so an operation added there is not silently left out here.
SERVED = ("/chat/completions", "/completions", "/embeddings", "/images/generations", "/audio/speech",
          "/audio/transcriptions", "/videos/generations")  # fmt: skip
UNSERVED = ("POST /audio/translations", "POST /images/edits", "POST /moderations", "GET /files", "GET /batches",
            "GET /fine_tuning/jobs", "GET /assistants", "GET /vector_stores")  # fmt: skip
EXAMPLES: Mapping[str, int] = MappingProxyType(
    {
        **{f"POST {path}": 150 for path in SERVED},
        **{f"POST /validate{path}": 60 for path in SERVED},
        "GET /videos/generations/{video_id}": 50,
        "GET /models": 50,
        "GET /models/{model}": 50,
        **dict.fromkeys(UNSERVED, 10),
    }
)
# Operations the gateway relays to the upstream (the others it answers itself).
FORWARDED = frozenset({*(f"POST {path}" for path in SERVED), "GET /videos/generations/{video_id}"})
# What the simulated upstream answers a served request with.
UPSTREAM_CONTENT_TYPES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        endpoints.CHAT: ("application/json", "text/event-stream"),
        endpoints.COMPLETIONS: ("application/json", "text/event-stream"),
        endpoints.EMBEDDINGS: ("application/json",),
        endpoints.IMAGES: ("application/json",),
        endpoints.SPEECH: ("audio/",),
        endpoints.TRANSCRIPTIONS: ("application/json", "text/plain"),
        endpoints.VIDEOS: ("application/json",),
    }
)
# The only 5xx a healthy gateway in front of a healthy upstream answers: the catalog's unhealthy models.
ALLOWED_5XX_CODES = frozenset({"model_unavailable"})
ERROR_TYPES_4XX = frozenset(
    {"invalid_request_error", "authentication_error", "permission_error", "rate_limit_error", "insufficient_quota"}
)


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,  # the same cases in every run; run with other seeds by hand
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )


@pytest.fixture(scope="module")
def schema() -> OpenApiSchema:
    assert SPEC.is_file(), f"the OpenAPI spec is missing: {SPEC} (shared/ must sit beside the repository)"
    return schemathesis.openapi.from_path(str(SPEC))


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[DemoState, LocalServer]]:
    with shared_servers() as (state, _upstream, gateway):
        state.token_delay = 0.0  # streams as fast as they can go
        yield state, gateway


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as http:  # one keep-alive connection for every case
        yield http


def catalog() -> list[ModelEntry]:
    entries = []
    for raw in default_catalog():
        entry, problem = parse_entry(raw)
        assert entry is not None, problem
        entries.append(entry)
    return entries


def model_choices(label: str) -> list[str | None]:
    """Model names to put in a request: each catalog model the endpoint serves twice, every other
    catalog model once, and None (the generated value stays)."""
    entries = catalog()
    path = "/v1" + label.split(" ", 1)[1].removeprefix("/validate")
    fitting = [e.model_name for e in entries if admission.fits(e, path)]
    return [*fitting, *fitting, *(e.model_name for e in entries), None]


def with_model(case: AnyCase, model: str | None) -> AnyCase:
    """The case with ``model`` in place of the generated one (the strategy override)."""
    if model is None:
        return case
    if "model" in (case.path_parameters or {}):
        case.path_parameters = {**(case.path_parameters or {}), "model": model}
    elif isinstance(case.body, dict):
        case.body = {**case.body, "model": model}
    return case


def cases_for(schema: OpenApiSchema, label: str) -> st.SearchStrategy[AnyCase]:
    method, path = label.split(" ", 1)
    operation = schema[path][method]
    generated = st.one_of(
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )
    return st.builds(with_model, generated, st.sampled_from(model_choices(label)))


def coverage_cases(schema: OpenApiSchema, label: str) -> Iterator[AnyCase]:
    """The coverage phase's cases, each with the next model of ``model_choices`` (round robin)."""
    method, path = label.split(" ", 1)
    operation = schema[path][method]
    models = model_choices(label)
    cases = schema.iter_coverage_cases(
        operation,
        generation_modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
        generation_config=schema.config.generation_for(operation=operation),
    )
    for index, case in enumerate(cases):
        yield with_model(case, models[index % len(models)])


def upstream_requests(state: DemoState) -> list[Any]:
    return [r for r in state.requests if r.path != CATALOG_PATH]


def sent_body(response: Response) -> bytes:
    body = response.request.body
    if body is None:
        return b""
    if isinstance(body, str):
        return body.encode()
    assert isinstance(body, bytes), type(body)
    return body


def media_type(response: Response) -> str:
    values = response.headers.get("content-type") or [""]
    return values[0].split(";")[0].strip().lower()


def header(response: Response, name: str) -> str | None:
    values = response.headers.get(name)
    return values[0] if values else None


def assert_gateway_envelope(response: Response, request_text: str) -> dict[str, Any]:
    """The exact OpenAI error envelope, as JSON, without stack-trace text (unless the client sent
    that text and the message quotes it)."""
    assert media_type(response) == "application/json", response.headers
    error = error_object(response.content, echoed=request_text)
    text = response.content.decode("utf-8")
    assert isinstance(error["code"], str), text
    assert error["code"], text
    expected_types = ERROR_TYPES_4XX if response.status_code < 500 else {"server_error"}
    assert error["type"] in expected_types, text
    return error


def assert_forwarded_as_sent(label: str, response: Response, forwarded: list[Any]) -> None:
    """The upstream received the request once, on its path, with the client's bytes (a stream may
    carry ``stream_options.include_usage`` added by the gateway)."""
    assert label in FORWARDED, f"{label} reached the upstream: {forwarded}"
    assert len(forwarded) == 1, forwarded
    received = forwarded[0]
    request = response.request
    assert received.method == request.method
    assert received.path == unquote(urlsplit(request.url).path)
    sent = sent_body(response)
    if received.body != sent:
        got, asked = orjson.loads(received.body), orjson.loads(sent)
        assert got.pop("stream_options")["include_usage"] is True
        asked.pop("stream_options", None)
        assert got == asked


def check_answer(label: str, case: AnyCase, response: Response, state: DemoState) -> None:
    status = response.status_code
    forwarded = upstream_requests(state)
    request_text = f"{response.request.url} {sent_body(response).decode('utf-8', 'replace')}"
    assert header(response, "x-request-id"), response.headers
    method = label.split(" ", 1)[0]
    if case.method.upper() != method:  # a method the spec does not define for this path
        assert forwarded == [], forwarded
        error = assert_gateway_envelope(response, request_text)
        if label in UNSERVED:
            assert (status, error["code"]) == (404, "unknown_url"), error
        else:
            assert (status, error["code"]) == (405, "method_not_allowed"), error
            allowed = {m.strip() for m in (header(response, "allow") or "").split(",")}
            assert method in allowed, response.headers
        return
    case.validate_response(response, checks=[status_code_conformance, content_type_conformance])
    if forwarded:
        assert_forwarded_as_sent(label, response, forwarded)
        path = forwarded[0].path
        if 200 <= status < 300 and path in UPSTREAM_CONTENT_TYPES:
            assert media_type(response).startswith(UPSTREAM_CONTENT_TYPES[path]), response.headers
        assert status < 500, response.content[:500]  # the simulated upstream does not fail
        return
    if status >= 400:
        error = assert_gateway_envelope(response, request_text)
        assert status != 500, error
        assert status < 500 or error["code"] in ALLOWED_5XX_CODES, error
        if status == 405:
            assert header(response, "allow"), response.headers
        return
    assert label not in FORWARDED, f"a {status} for {label} that the upstream never saw"
    assert 200 <= status < 300, status
    data = orjson.loads(response.content)
    if label.startswith("POST /validate/"):
        assert data["object"] == "validation"
        assert data["admitted"] is True
        assert data["endpoint"] == "/v1" + label.split(" ", 1)[1].removeprefix("/validate")
        assert isinstance(case.body, dict)
        assert data["model"] == case.body["model"]
    elif label == "GET /models":
        assert data["object"] == "list"
    else:
        assert data["id"] == (case.path_parameters or {})["model"]


def test_every_operation_of_the_spec_is_fuzzed(schema: OpenApiSchema) -> None:
    labels = set()
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        labels.add(result.ok().label)
    assert labels == set(EXAMPLES)


def call_and_check(label: str, case: AnyCase, stack: tuple[DemoState, LocalServer], session: requests.Session) -> None:
    state, gateway = stack
    state.requests.clear()
    response = case.call(base_url=gateway.url + "/v1", session=session, timeout=10)
    check_answer(label, case, response, state)


@pytest.mark.parametrize("label", sorted(EXAMPLES))
def test_coverage_phase(
    schema: OpenApiSchema, stack: tuple[DemoState, LocalServer], session: requests.Session, label: str
) -> None:
    for case in coverage_cases(schema, label):
        call_and_check(label, case, stack, session)


@pytest.mark.parametrize("label", sorted(EXAMPLES))
def test_fuzzing_phase(
    schema: OpenApiSchema, stack: tuple[DemoState, LocalServer], session: requests.Session, label: str
) -> None:
    @fuzz_settings(EXAMPLES[label])
    @given(case=cases_for(schema, label))
    def fuzz(case: AnyCase) -> None:
        call_and_check(label, case, stack, session)

    fuzz()
