"""Type confusion (issue #13, findings 5 and 8): any JSON value in any field never crashes a reader.

Every function that reads a parsed request body (validation for every endpoint, the token bounds,
pricing, the ``include_usage`` rewrite, ``model_of``) gets bodies whose fields, at any depth, hold
arbitrary JSON values. Each must return its documented result or raise its documented refusal
(``InvalidRequest`` for ``model_of`` and ``parse_json_object``), never TypeError, KeyError,
AttributeError, ValueError, OverflowError or RecursionError. Then the specific findings: a chat
``role`` that is an object answered 500, and client-chosen cost fields (``"seconds": 1e-9``) made
a request free. Last, ``max_cost_usd``: the most a request can cost.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import endpoints
from gateway.catalog.bounds import (
    MAX_IMAGES,
    MAX_VIDEO_SECONDS,
    image_count,
    prompt_count,
    prompt_tokens_lower_bound,
    requested_completion_tokens,
    video_seconds,
)
from gateway.catalog.checks import Violation
from gateway.catalog.entries import ModelEntry, parse_entry
from gateway.catalog.validation import CHECKS, validate
from gateway.demo import DemoState, default_catalog
from gateway.errors import InvalidRequest
from gateway.jsonvalues import as_choice, as_int, as_number, describe
from gateway.proxy.body import model_of, parse_json_object
from gateway.server.thread import LocalServer
from gateway.usage.model import Usage
from gateway.usage.pricing import cost_usd, max_cost_usd, min_cost_usd
from gateway.usage.rewrite import client_wants_usage, with_include_usage
from tests.helpers.gateway import (
    CHAT_MODEL,
    IMAGE_MODEL,
    TTS_MODEL,
    VIDEO_MODEL,
    assert_gateway_error,
    module_server_fixtures,
    requests_on,
)

_servers, demo_state, upstream, gateway = module_server_fixtures()

T = TypeVar("T")

FUZZ = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,  # the same examples in every run; run with other seeds by hand
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

VIOLATION_CODES = frozenset(
    {
        "missing_required_parameter",
        "invalid_type",
        "invalid_value",
        "multiple_choices_not_supported",
        "tools_not_supported",
        "vision_not_supported",
        "streaming_not_supported",
        "max_tokens_exceeded",
        "context_length_exceeded",
    }
)
# The top-level fields any reader looks at, on any endpoint.
FIELD_NAMES = (
    "model", "messages", "prompt", "input", "voice", "n", "stream", "stream_options", "tools", "tool_choice",
    "functions", "temperature", "top_p", "presence_penalty", "frequency_penalty", "max_tokens",
    "max_completion_tokens", "response_format", "speed", "seconds", "duration", "size",
)  # fmt: skip

PATHS = (
    endpoints.CHAT,
    endpoints.COMPLETIONS,
    endpoints.EMBEDDINGS,
    endpoints.IMAGES,
    endpoints.SPEECH,
    endpoints.TRANSCRIPTIONS,
    endpoints.VIDEOS,
)


def template(path: str) -> dict[str, Any]:
    """A valid request for ``path`` (a fresh copy): its every member, at any depth, is a place to
    put a wrong value."""
    return copy.deepcopy(dict(_TEMPLATES[path]))


_TEMPLATES: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        endpoints.CHAT: {
            "model": CHAT_MODEL,
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "look at"}, {"type": "image_url", "image_url": {"url": "x"}}],
                },
            ],
            "stream": True,
            "stream_options": {"include_usage": False},
            "max_tokens": 16,
            "n": 1,
            "temperature": 0.5,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "tool_choice": "auto",
        },
        endpoints.COMPLETIONS: {"model": CHAT_MODEL, "prompt": ["one two", "three"], "max_tokens": 8, "stream": True},
        endpoints.EMBEDDINGS: {"model": "bge-m3", "input": ["a b", "c"]},
        endpoints.IMAGES: {"model": IMAGE_MODEL, "prompt": "a cat", "n": 2, "response_format": "b64_json"},
        endpoints.SPEECH: {"model": TTS_MODEL, "input": "hello there", "voice": "af_bella", "speed": 1.5},
        endpoints.TRANSCRIPTIONS: {"model": "whisper-large-v3", "response_format": "json"},
        endpoints.VIDEOS: {"model": VIDEO_MODEL, "prompt": "waves", "seconds": "4", "duration": 4},
    }
)


def catalog_entries() -> list[ModelEntry]:
    """The demo catalog's entries, plus entries with odd or missing fields (as an upstream may send)."""
    raws: list[Any] = [
        *default_catalog(),
        {"model_name": "bare", "category": "text"},
        {"model_name": "odd", "category": "audio", "voices": [{"id": 1}, None, 3, "x"], "pricing": [{"unit": 5}]},
        {"model_name": "huge", "category": "text", "context_window": 2**62, "max_output": 2**62,
         "input_per_mtok": 1e308, "output_per_mtok": 1e308},
        {"model_name": "units", "category": "video", "pricing": [{"unit": "seconds", "price_usd": 1e300}]},
    ]  # fmt: skip
    entries = []
    for raw in raws:
        entry, problem = parse_entry(raw)
        assert entry is not None, problem
        entries.append(entry)
    return entries


def entry_named(name: str) -> ModelEntry:
    return next(e for e in catalog_entries() if e.model_name == name)


any_entry = st.deferred(lambda: st.sampled_from(catalog_entries()))

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63, max_value=2**1100)  # beyond 64 bits, beyond float range
    | st.floats()  # NaN and infinities too: a direct caller may pass them
    | st.text(max_size=20)
    | st.sampled_from(["user", "image_url", "4", "1e-9", "NaN", "-1", "٤", "", " "])
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = [value]
    return value


def locations(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a JSON value (its members at any depth), the value itself first."""
    yield prefix
    if isinstance(value, dict):
        for key, member in value.items():
            yield from locations(member, (*prefix, key))
    elif isinstance(value, list):
        for index, member in enumerate(value):
            yield from locations(member, (*prefix, index))


def put(value: Any, where: tuple[Any, ...], new: Any) -> None:
    """Replace the member at ``where``; nothing when a replaced parent no longer holds it."""
    *parents, last = where
    for step in parents:
        if not holds(value, step):
            return
        value = value[step]
    if holds(value, last) or isinstance(value, dict):
        value[last] = new


def holds(container: Any, step: Any) -> bool:
    if isinstance(container, dict):
        return isinstance(step, str) and step in container
    return isinstance(container, list) and isinstance(step, int) and step < len(container)


@st.composite
def confused_requests(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """An endpoint and its valid request with up to three members (at any depth) replaced by
    arbitrary JSON values, and up to three known fields set to arbitrary values."""
    path = draw(st.sampled_from(PATHS))
    fields = template(path)
    places = list(locations(fields))[1:]
    for where in draw(st.lists(st.sampled_from(places), max_size=3, unique=True)):
        put(fields, where, draw(json_values))
    fields.update(draw(st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=3)))
    return path, fields


def attempt(call: Callable[[], T]) -> T | InvalidRequest:
    """What ``call`` returns, or the refusal it raises (any other exception propagates)."""
    try:
        return call()
    except InvalidRequest as refusal:
        return refusal


def assert_cost(value: object) -> None:
    assert value is None or (isinstance(value, float) and math.isfinite(value) and value >= 0), value


def encode(fields: dict[str, Any]) -> bytes:
    # The stdlib encoder writes what orjson cannot (integers beyond 64 bits); the body a client sent.
    return json.dumps(fields).encode()


# --- the readers, on any value ---------------------------------------------------------------


@FUZZ
@given(request=confused_requests(), entry=any_entry, files=st.sampled_from([(), ("file",)]))
def test_validation_and_token_bounds_never_raise(
    request: tuple[str, dict[str, Any]], entry: ModelEntry, files: tuple[str, ...]
) -> None:
    path, fields = request
    for violation in validate(path, fields, files, entry):
        assert isinstance(violation, Violation)
        assert violation.check in CHECKS
        assert violation.code in VIOLATION_CODES
        assert isinstance(violation.message, str)
        assert violation.message
        assert violation.param is None or isinstance(violation.param, str)
    for bound in (prompt_tokens_lower_bound(path, fields), requested_completion_tokens(fields)):
        assert type(bound) is int
        assert bound >= 0
    assert type(prompt_count(path, fields)) is int
    assert prompt_count(path, fields) >= 1
    count = image_count(fields)
    assert count is None or 1 <= count <= MAX_IMAGES
    seconds = video_seconds(fields)
    assert seconds is None or 1 <= seconds <= MAX_VIDEO_SECONDS


@FUZZ
@given(
    request=confused_requests(),
    entry=any_entry,
    units=st.none() | st.floats() | st.integers(min_value=-(2**80), max_value=2**1100),
    unit=st.sampled_from([None, "image", "second", "minute", "character", "token"]),
    tokens=st.integers(min_value=0, max_value=2**70),
)
def test_pricing_never_raises(
    request: tuple[str, dict[str, Any]], entry: ModelEntry, units: float | None, unit: str | None, tokens: int
) -> None:
    path, fields = request
    lower = prompt_tokens_lower_bound(path, fields)
    usage = Usage(prompt_tokens=tokens, completion_tokens=tokens, total_tokens=2 * tokens, units=units, unit=unit)
    assert_cost(min_cost_usd(entry, path, fields, lower))
    assert_cost(max_cost_usd(entry, path, fields))
    assert_cost(cost_usd(entry, path, usage, fields))
    assert_cost(cost_usd(entry, path, None, fields, response_units=units))


@FUZZ
@given(request=confused_requests())
def test_include_usage_rewrite_never_raises(request: tuple[str, dict[str, Any]]) -> None:
    _, fields = request
    fields["stream"] = True  # the rewrite's only case; the other fields stay confused
    assert isinstance(client_wants_usage(fields), bool)
    try:
        body = encode(fields)
    except ValueError:  # str() of an integer past Python's digit limit: no client can send it
        return
    rewritten = with_include_usage(body, fields)
    if rewritten is None:  # the client asked for usage, an odd stream_options, or not re-encodable
        return
    sent = json.loads(rewritten)
    assert sent["stream_options"]["include_usage"] is True
    assert set(sent) == set(fields) | {"stream_options"}
    assert client_wants_usage(sent)


@FUZZ
@given(fields=st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=4))
def test_model_of_answers_a_name_or_refuses(fields: dict[str, Any]) -> None:
    outcome = attempt(lambda: model_of(fields))
    assert isinstance(outcome, str) or outcome.code in ("missing_model", "invalid_model")


@FUZZ
@given(value=json_values)
def test_parse_json_object_answers_an_object_or_refuses(value: Any) -> None:
    try:
        body = json.dumps(value).encode()
    except ValueError:
        return
    outcome = attempt(lambda: parse_json_object(body))
    assert isinstance(outcome, dict) or outcome.code == "invalid_json"


@FUZZ
@given(value=json_values)
def test_the_typed_readers_never_raise(value: Any) -> None:
    assert isinstance(describe(value), str)
    assert len(describe(value)) <= 40
    assert as_choice(value, frozenset({"user"})) in (None, "user")
    number = as_number(value)
    assert number is None or math.isfinite(number)
    assert as_int(value) is None or type(value) is int


@pytest.mark.parametrize(
    "value",
    [nested(5000), {"a": nested(3000)}, 10**5000, -(2**2000), float("nan"), "x" * 10**6, [[]] * 10**5],
    ids=["deep-list", "deep-object", "many-digits", "huge-negative", "nan", "long-text", "long-list"],
)
def test_describe_is_bounded(value: Any) -> None:
    assert len(describe(value)) <= 40


# --- finding 5: a chat role of the wrong type ---------------------------------------------------


@pytest.mark.parametrize(
    "role",
    [{}, {"a": 1}, [], ["user"], nested(1100), 10**400, 10**5000, 1.5, None, True],
    ids=["object", "object-2", "array", "array-2", "deep", "huge", "many-digits", "float", "null", "bool"],
)
def test_a_role_of_any_type_is_refused_not_crashed(role: Any) -> None:
    found = list(validate(endpoints.CHAT, {"messages": [{"role": role, "content": "x"}]}, (), entry_named(CHAT_MODEL)))
    assert [(v.code, v.param) for v in found] == [("invalid_value", "messages[0].role")]


@pytest.mark.parametrize("part_type", [{}, [], ["image_url"], nested(1100)], ids=["object", "array", "array-2", "deep"])
def test_a_content_part_type_of_any_type_is_not_an_image(part_type: Any) -> None:
    no_vision = entry_named("Llama-3.1-8B-Instruct")
    messages = [{"role": "user", "content": [{"type": part_type, "text": "hi"}]}]
    assert list(validate(endpoints.CHAT, {"messages": messages}, (), no_vision)) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", 10**400), ("top_p", -(10**400)), ("presence_penalty", 10**5000), ("n", nested(1100))],
    ids=["temperature", "top_p", "presence_penalty", "n"],
)
def test_numbers_beyond_float_range_are_refused(field: str, value: Any) -> None:
    fields = {"messages": [{"role": "user", "content": "x"}], field: value}
    found = list(validate(endpoints.CHAT, fields, (), entry_named(CHAT_MODEL)))
    assert [(v.code, v.param) for v in found] == [("invalid_value", field)]


def test_stream_options_must_be_an_object() -> None:
    fields = {"messages": [{"role": "user", "content": "x"}], "stream": True, "stream_options": "yes"}
    found = list(validate(endpoints.CHAT, fields, (), entry_named(CHAT_MODEL)))
    assert [(v.code, v.param) for v in found] == [("invalid_type", "stream_options")]
    assert not list(validate(endpoints.CHAT, {**fields, "stream_options": None}, (), entry_named(CHAT_MODEL)))


@pytest.mark.parametrize(
    "role",
    [b"{}", b'{"a": [1]}', b"[]", b"[" * 1000 + b'"user"' + b"]" * 1000],  # the last: deep, yet under 1024 levels
    ids=["object", "object-2", "array", "deep"],
)
def test_gateway_refuses_an_object_role_with_a_400(
    http_client: httpx.Client, demo_state: DemoState, role: bytes
) -> None:
    body = b'{"model": "%s", "messages": [{"role": %s, "content": "hi"}]}' % (CHAT_MODEL.encode(), role)
    response = http_client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    error = assert_gateway_error(response, 400, "invalid_value", "invalid_request_error")
    assert error["param"] == "messages[0].role"
    assert requests_on(demo_state, endpoints.CHAT) == []


@pytest.fixture
def http_client(gateway: LocalServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=10, headers={"authorization": "Bearer sk-client"}) as client:
        yield client


# --- finding 8: cost fields the client chooses --------------------------------------------------

# Unit prices in the demo catalog: video 0.05 USD per second, images 0.003 USD per image, speech
# 0.000015 USD per character, transcription 0.006 USD per minute.
STT_MODEL = "whisper-large-v3"
# Lengths the upstream refuses: tiny, not a number, zero, negative, too long, fractional, spelled
# otherwise than plain ASCII digits, of another type.
BAD_SECONDS: tuple[Any, ...] = (
    1e-9, "1e-9", "NaN", "nan", "inf", 0, "0", -4, 61, "61", 4.5, 4.0, "4.0", " 4", "4_0", "٤", True, [], {},
)  # fmt: skip


@pytest.mark.parametrize("name", ["seconds", "duration"])
@pytest.mark.parametrize("value", BAD_SECONDS)
def test_video_length_must_be_whole_seconds_in_range(name: str, value: Any) -> None:
    fields = {"prompt": "waves", name: value}
    found = list(validate(endpoints.VIDEOS, fields, (), entry_named(VIDEO_MODEL)))
    assert [(v.code, v.param) for v in found] == [("invalid_value", name)]
    assert video_seconds(fields) is None
    # never a near-zero price: an invalid length prices nothing before the answer (unknown) ...
    assert cost_usd(entry_named(VIDEO_MODEL), endpoints.VIDEOS, None, fields) is None
    assert min_cost_usd(entry_named(VIDEO_MODEL), endpoints.VIDEOS, fields, 0) is None
    # ... and the most the upstream accepts when the answer cannot be read
    assert max_cost_usd(entry_named(VIDEO_MODEL), endpoints.VIDEOS, fields) == pytest.approx(MAX_VIDEO_SECONDS * 0.05)


@pytest.mark.parametrize(("value", "seconds"), [(None, 2), (1, 1), (4, 4), ("4", 4), ("12", 12), (60, 60)])
def test_valid_video_lengths(value: Any, seconds: int) -> None:
    fields = {"prompt": "waves", "seconds": value}
    assert list(validate(endpoints.VIDEOS, fields, (), entry_named(VIDEO_MODEL))) == []
    assert video_seconds(fields) == seconds
    assert cost_usd(entry_named(VIDEO_MODEL), endpoints.VIDEOS, None, fields) == pytest.approx(seconds * 0.05)


@pytest.mark.parametrize("n", [0, 11, 10**6, "2", 2.0, True, [], None])
def test_image_count(n: Any) -> None:
    fields = {"prompt": "cat", "n": n}
    expected = 1 if n is None else None
    assert image_count(fields) == expected
    cost = cost_usd(entry_named(IMAGE_MODEL), endpoints.IMAGES, None, fields)
    assert cost == (None if expected is None else pytest.approx(0.003))


def test_units_the_answer_reports_win_over_the_request() -> None:
    images, video = entry_named(IMAGE_MODEL), entry_named(VIDEO_MODEL)
    speech, stt = entry_named(TTS_MODEL), entry_named(STT_MODEL)
    # images: the answer's count of images (whatever ``n`` said)
    assert cost_usd(images, endpoints.IMAGES, Usage(units=2, unit="image"), {"n": 5}) == pytest.approx(0.006)
    assert cost_usd(images, endpoints.IMAGES, None, {"n": 5}, response_units=3) == pytest.approx(0.009)
    # video: the seconds the answer reports
    assert cost_usd(video, endpoints.VIDEOS, Usage(units=4, unit="second"), {"seconds": 8}) == pytest.approx(0.2)
    # speech: characters the answer reports
    assert cost_usd(speech, endpoints.SPEECH, Usage(units=10, unit="character"), {"input": "abc"}) == pytest.approx(
        10 * 15e-6
    )
    # transcriptions: seconds or minutes of audio, from the answer only
    assert cost_usd(stt, endpoints.TRANSCRIPTIONS, Usage(units=90, unit="second"), {}) == pytest.approx(0.009)
    assert cost_usd(stt, endpoints.TRANSCRIPTIONS, Usage(units=2, unit="minute"), {}) == pytest.approx(0.012)
    assert cost_usd(stt, endpoints.TRANSCRIPTIONS, None, {"duration": 600}) is None  # never the client's word
    # a unit the endpoint is not billed in, or a bad number: the request's validated units, or unknown
    assert cost_usd(images, endpoints.IMAGES, Usage(units=7, unit="second"), {"n": 2}) == pytest.approx(0.006)
    assert cost_usd(images, endpoints.IMAGES, Usage(units=-1, unit="image"), {"n": 2}) is None
    assert cost_usd(images, endpoints.IMAGES, Usage(units=float("nan"), unit="image"), {"n": 2}) is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": VIDEO_MODEL, "prompt": "waves", "seconds": 1e-9}, "seconds"),
        ({"model": VIDEO_MODEL, "prompt": "waves", "seconds": "NaN"}, "seconds"),
        ({"model": VIDEO_MODEL, "prompt": "waves", "duration": 3600}, "duration"),
        ({"model": IMAGE_MODEL, "prompt": "cat", "n": 1000000}, "n"),
    ],
)
def test_gateway_refuses_cost_fields_the_upstream_would_refuse(
    http_client: httpx.Client, demo_state: DemoState, body: dict[str, Any], param: str
) -> None:
    path = endpoints.VIDEOS if body["model"] == VIDEO_MODEL else endpoints.IMAGES
    response = http_client.post(path, json=body)
    error = assert_gateway_error(response, 400, "invalid_value", "invalid_request_error")
    assert error["param"] == param
    assert requests_on(demo_state, path) == []


# --- max_cost_usd: the most a request can cost ----------------------------------------------------


def token_entry(**fields: Any) -> ModelEntry:
    entry, problem = parse_entry({"model_name": "m", "category": "text", **fields})
    assert entry is not None, problem
    return entry


def priced() -> ModelEntry:
    return token_entry(context_window=1000, max_output=200, input_per_mtok=1.0, output_per_mtok=3.0)


USER = ({"role": "user", "content": "hi"},)  # a chat's messages: list(USER)


@pytest.mark.parametrize(
    ("path", "fields", "prompt_tokens", "completion_tokens"),
    [
        (endpoints.CHAT, {"messages": list(USER)}, 1000, 200),  # no cap asked: the model's max_output
        (endpoints.CHAT, {"messages": list(USER), "max_tokens": 50}, 1000, 50),
        (endpoints.CHAT, {"messages": list(USER), "max_tokens": 50, "max_completion_tokens": 20}, 1000, 20),
        (endpoints.CHAT, {"messages": list(USER), "max_tokens": 5000}, 1000, 200),  # never past max_output
        (endpoints.CHAT, {"messages": list(USER), "max_tokens": "50"}, 1000, 200),  # an invalid cap is no cap
        (endpoints.CHAT, {"messages": list(USER), "n": 3}, 1000, 600),  # n completions
        (endpoints.COMPLETIONS, {"prompt": "a b"}, 1000, 200),
        (endpoints.COMPLETIONS, {"prompt": ["a", "b", "c"], "max_tokens": 10}, 3000, 30),  # three prompts
        (endpoints.COMPLETIONS, {"prompt": [[1, 2], [3]], "max_tokens": 10}, 2000, 20),
        (endpoints.COMPLETIONS, {"prompt": [1, 2, 3], "max_tokens": 10}, 1000, 10),  # one prompt of token ids
    ],
)
def test_max_cost_of_token_requests(
    path: str, fields: dict[str, Any], prompt_tokens: int, completion_tokens: int
) -> None:
    expected = (prompt_tokens * 1.0 + completion_tokens * 3.0) / 1e6
    assert max_cost_usd(priced(), path, fields) == pytest.approx(expected)


def test_max_cost_without_max_output_or_window() -> None:
    no_max_output = token_entry(context_window=1000, input_per_mtok=1.0, output_per_mtok=3.0)
    assert max_cost_usd(no_max_output, endpoints.CHAT, {"messages": list(USER)}) == pytest.approx((1000 + 3000) / 1e6)
    capped = max_cost_usd(no_max_output, endpoints.CHAT, {"messages": list(USER), "max_tokens": 10**6})
    assert capped == pytest.approx((1000 + 3000) / 1e6)  # never past the window
    no_window = token_entry(max_output=200, input_per_mtok=1.0, output_per_mtok=3.0)
    assert max_cost_usd(no_window, endpoints.CHAT, {"messages": list(USER)}) is None  # nothing bounds the prompt
    assert max_cost_usd(token_entry(context_window=1000), endpoints.CHAT, {"messages": list(USER)}) is None  # no price
    input_only = token_entry(context_window=1000, input_per_mtok=1.0)
    assert max_cost_usd(input_only, endpoints.CHAT, {"messages": list(USER)}) is None  # the output price is unknown


def test_max_cost_of_embeddings_counts_every_input_and_no_output() -> None:
    bge = entry_named("bge-m3")  # window 8192, 0.02 USD per million in
    assert max_cost_usd(bge, endpoints.EMBEDDINGS, {"input": "a"}) == pytest.approx(8192 * 0.02 / 1e6)
    assert max_cost_usd(bge, endpoints.EMBEDDINGS, {"input": ["a", "b", "c"]}) == pytest.approx(3 * 8192 * 0.02 / 1e6)


@pytest.mark.parametrize(
    ("entry_name", "path", "fields", "expected"),
    [
        (IMAGE_MODEL, endpoints.IMAGES, {"prompt": "cat"}, 0.003),
        (IMAGE_MODEL, endpoints.IMAGES, {"prompt": "cat", "n": 4}, 4 * 0.003),
        (IMAGE_MODEL, endpoints.IMAGES, {"prompt": "cat", "n": "4"}, MAX_IMAGES * 0.003),  # invalid: the most
        (VIDEO_MODEL, endpoints.VIDEOS, {"prompt": "p"}, 2 * 0.05),
        (VIDEO_MODEL, endpoints.VIDEOS, {"prompt": "p", "seconds": "8"}, 8 * 0.05),
        (TTS_MODEL, endpoints.SPEECH, {"input": "héllo", "voice": "af_bella"}, 5 * 15e-6),
        (TTS_MODEL, endpoints.SPEECH, {"input": ["x"], "voice": "af_bella"}, None),  # no text, no bound
        (STT_MODEL, endpoints.TRANSCRIPTIONS, {"model": STT_MODEL}, None),  # answer only
        (IMAGE_MODEL, endpoints.VIDEOS, {"prompt": "p"}, None),  # no price for the unit
        (CHAT_MODEL, endpoints.VIDEO_JOB.path, {}, None),  # not billed
    ],
)
def test_max_cost_of_unit_requests(entry_name: str, path: str, fields: dict[str, Any], expected: float | None) -> None:
    entry = entry_named(entry_name)
    assert max_cost_usd(entry, path, fields) == (None if expected is None else pytest.approx(expected))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    max_tokens=st.none() | st.integers(min_value=1, max_value=5000),
    prompt=st.integers(min_value=0, max_value=1000),
    completion=st.integers(min_value=0, max_value=200),
)
def test_max_cost_bounds_every_served_cost(max_tokens: int | None, prompt: int, completion: int) -> None:
    """Whatever the upstream reports within the model's limits costs at most max_cost_usd (and at
    least min_cost_usd)."""
    fields: dict[str, Any] = {"messages": list(USER)}
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    completion = min(completion, max_tokens or completion)
    ceiling = max_cost_usd(priced(), endpoints.CHAT, fields)
    floor = min_cost_usd(priced(), endpoints.CHAT, fields, prompt_tokens_lower_bound(endpoints.CHAT, fields))
    cost = cost_usd(priced(), endpoints.CHAT, Usage(prompt_tokens=prompt, completion_tokens=completion), fields)
    assert ceiling is not None
    assert floor is not None
    assert cost is not None
    assert cost <= ceiling * (1 + 1e-12)
    assert floor <= ceiling
