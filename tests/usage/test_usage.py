"""Reading usage out of JSON bodies and SSE streams as they pass, and asking FlexAI for streamed usage."""

from __future__ import annotations

import gzip
import itertools
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.usage.meter import UsageMeter
from gateway.usage.model import Usage, usage_from_response
from gateway.usage.rewrite import client_wants_usage, with_include_usage

PROPERTY = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

USAGE_BLOCK = {
    "prompt_tokens": 12,
    "completion_tokens": 5,
    "total_tokens": 17,
    "cache_read_input_tokens": 4,
    "cache_creation_input_tokens": 0,
}
USAGE = Usage(prompt_tokens=12, completion_tokens=5, total_tokens=17, cached_tokens=4)
FRAMINGS = [b"\n", b"\r\n", b"\r"]


def chunk_payload(delta: dict[str, Any], finish: str | None = None, *, usage: Any = ...) -> bytes:
    payload: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }
    if usage is not ...:
        payload["usage"] = usage
    return orjson.dumps(payload)


def usage_payload(block: dict[str, Any] | None = None) -> bytes:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    return orjson.dumps({**base, "choices": [], "usage": block or USAGE_BLOCK})


def event(payload: bytes, nl: bytes) -> bytes:
    return b"data: " + payload + nl + nl


def chat_stream(
    nl: bytes = b"\n", tokens: int = 4, *, with_usage: bool = True, usage_null: bool = False, keepalive: bool = False
) -> tuple[bytes, bytes]:
    """A real-looking streamed chat (role, content tokens, finish, usage chunk, [DONE]) and its usage event."""
    null: Any = None if usage_null else ...
    texts = ["Hé", "llo ", "wörld 👋", " a\nb", ' "quoted"', "usage"]
    parts = [event(chunk_payload({"role": "assistant", "content": ""}, usage=null), nl)]
    if keepalive:
        parts.append(b": keep-alive" + nl + nl)
    parts += [event(chunk_payload({"content": texts[i % len(texts)]}, usage=null), nl) for i in range(tokens)]
    parts.append(event(chunk_payload({}, "stop", usage=null), nl))
    usage_event = event(usage_payload(), nl)
    if with_usage:
        parts.append(usage_event)
    parts.append(b"data: [DONE]" + nl + nl)
    stream = b"".join(parts)
    assert stream.count(usage_event) == (1 if with_usage else 0)
    return stream, usage_event


def run(meter: UsageMeter, parts: list[bytes]) -> tuple[bytes, Usage | None]:
    out = b"".join(meter.feed(part) for part in parts)
    return out + meter.flush(), meter.finish()


def split(data: bytes, offsets: list[int]) -> list[bytes]:
    cuts = [0, *sorted(set(offsets)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(cuts)]


# JSON bodies


def test_json_body_usage_and_chunks_returned_unchanged() -> None:
    body = orjson.dumps({"id": "x", "choices": [{"message": {"content": "hi"}}], "usage": USAGE_BLOCK})
    meter = UsageMeter(event_stream=False, strip_usage_chunk=True)  # stripping is for streams only
    parts = split(body, [1, 10, 30])
    for part in parts:
        assert meter.feed(part) is part
    assert meter.flush() == b""
    assert meter.finish() == USAGE
    assert meter.finish() == USAGE  # idempotent


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"usage": {"prompt_tokens": 7, "total_tokens": 7}}, Usage(7, 0, 7, 0)),  # embeddings
        (
            {"usage": {"prompt_tokens": 9, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 8}}},
            Usage(9, 1, 10, 8),  # OpenAI's cached tokens; total computed when absent
        ),
        ({"usage": {"input_tokens": 3, "output_tokens": 2}}, Usage(3, 2, 5, 0)),
        ({"usage": {"prompt_tokens": "3", "completion_tokens": -1, "total_tokens": True}}, Usage(0, 0, 0, 0)),
        ({"text": "hi", "usage": {"type": "duration", "seconds": 61}}, Usage(units=61.0, unit="second")),
        (
            {"text": "hi", "duration": 60.5, "usage": {"type": "duration", "seconds": 61}},
            Usage(units=60.5, unit="second"),
        ),
        ({"task": "transcribe", "duration": 2.25, "text": "hi"}, Usage(units=2.25, unit="second")),
        ({"text": "hi"}, None),
        ({"usage": None}, None),
        ([1, 2], None),
    ],
)
def test_usage_from_response(obj: Any, expected: Usage | None) -> None:
    assert usage_from_response(obj) == expected


@pytest.mark.parametrize("body", [b"", b"{not json", b'{"usage": {"prompt_tokens": 1}'])
def test_unparsable_json_body_gives_none(body: bytes) -> None:
    meter = UsageMeter(event_stream=False, strip_usage_chunk=False)
    assert run(meter, [body]) == (body, None)


def test_json_body_over_the_bound_is_dropped_and_usage_unknown() -> None:
    padding = "x" * (1 << 20)
    body = orjson.dumps({"data": [{"b64_json": padding}], "usage": USAGE_BLOCK})
    meter = UsageMeter(event_stream=False, strip_usage_chunk=False)
    out, usage = run(meter, split(body, list(range(0, len(body), 65536))))
    assert out == body
    assert usage is None


def test_json_body_memory_does_not_grow_with_the_body() -> None:
    chunk = b"x" * 65536
    meter = UsageMeter(event_stream=False, strip_usage_chunk=False, max_json_bytes=65536)
    tracemalloc.start()
    try:
        for _ in range(256):  # 16 MiB relayed
            meter.feed(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 512 * 1024
    assert meter.finish() is None


# Event streams


@pytest.mark.parametrize("nl", FRAMINGS)
def test_stream_in_one_chunk(nl: bytes) -> None:
    stream, usage_event = chat_stream(nl)
    meter = UsageMeter(event_stream=True, strip_usage_chunk=False)
    out = meter.feed(stream)
    assert out is stream
    assert run(meter, []) == (b"", USAGE)
    meter = UsageMeter(event_stream=True, strip_usage_chunk=True)
    assert run(meter, [stream]) == (stream.replace(usage_event, b""), USAGE)


@pytest.mark.parametrize("nl", FRAMINGS)
@pytest.mark.parametrize("strip", [False, True])
def test_stream_split_at_every_offset(nl: bytes, strip: bool) -> None:
    stream, usage_event = chat_stream(nl, tokens=3, keepalive=True)
    expected = stream.replace(usage_event, b"") if strip else stream
    for offset in range(len(stream) + 1):
        assert run(UsageMeter(True, strip), split(stream, [offset])) == (expected, USAGE), offset
    byte_by_byte = [stream[i : i + 1] for i in range(len(stream))]
    assert run(UsageMeter(True, strip), byte_by_byte) == (expected, USAGE)


@PROPERTY
@given(st.data())
def test_stream_split_at_random_offsets(data: st.DataObject) -> None:
    nl = data.draw(st.sampled_from(FRAMINGS), label="framing")
    stream, usage_event = chat_stream(
        nl,
        tokens=data.draw(st.integers(1, 12), label="tokens"),
        usage_null=data.draw(st.booleans(), label="usage_null"),
        keepalive=data.draw(st.booleans(), label="keepalive"),
    )
    offsets = data.draw(st.lists(st.integers(0, len(stream)), max_size=40), label="offsets")
    parts = split(stream, offsets)
    assert run(UsageMeter(True, False), parts) == (stream, USAGE)
    assert run(UsageMeter(True, True), parts) == (stream.replace(usage_event, b""), USAGE)


def test_mixed_line_ends_and_multiline_data_event_is_stripped_whole() -> None:
    usage_lines = b'data: {"choices": [],\r\ndata:  "usage": ' + orjson.dumps(USAGE_BLOCK) + b"}\r\n\r\n"
    first = event(chunk_payload({"content": "hi"}), b"\n")
    done = b"data: [DONE]\r\r"
    stream = first + b"id: 7\nevent: message\n" + first + usage_lines + done
    for offset in range(len(stream) + 1):
        assert run(UsageMeter(True, True), split(stream, [offset])) == (
            first + b"id: 7\nevent: message\n" + first + done,
            USAGE,
        )
        assert run(UsageMeter(True, False), split(stream, [offset])) == (stream, USAGE)


def test_only_usage_only_events_are_stripped() -> None:
    # Continuous usage (vLLM): usage in chunks that also carry choices; the last one wins, none is stripped.
    first = event(chunk_payload({"content": "a"}, usage={"prompt_tokens": 3, "completion_tokens": 1}), b"\n")
    second = event(chunk_payload({"content": "b"}, usage={"prompt_tokens": 3, "completion_tokens": 2}), b"\n")
    # choices: [] without usage (e.g. a content-filter preamble) is not ours to remove either.
    preamble = b'data: {"choices": [], "prompt_filter_results": []}\n\n'
    later_null = event(chunk_payload({}, "stop", usage=None), b"\n")
    stream = preamble + first + second + later_null + b"data: [DONE]\n\n"
    assert run(UsageMeter(True, True), [stream]) == (stream, Usage(3, 2, 5, 0))


def test_complete_events_are_not_delayed_and_only_a_partial_tail_is_held() -> None:
    stream, usage_event = chat_stream(b"\n", tokens=2)
    events = stream.split(b"\n\n")
    first = events[0] + b"\n\n"
    meter = UsageMeter(True, True)
    assert meter.feed(first) == first  # a complete event goes out at once
    partial = events[1][:10]
    assert meter.feed(partial) == b""  # only the unfinished event is held back (stripping on)
    rest = stream[len(first) + len(partial) :]
    out = meter.feed(rest)
    assert out == (stream[len(first) :]).replace(usage_event, b"")
    passthrough = UsageMeter(True, False)
    assert passthrough.feed(partial) is partial  # stripping off: nothing is ever held


def test_unterminated_last_event_is_flushed() -> None:
    stream = event(chunk_payload({"content": "a"}), b"\n") + b"data: [DONE]\n"
    meter = UsageMeter(True, True)
    out = meter.feed(stream)
    assert out + meter.flush() == stream
    assert meter.flush() == b""


def test_an_oversized_event_is_passed_on_not_held() -> None:
    big = event(chunk_payload({"content": "x" * 5000}), b"\n")
    stream, usage_event = chat_stream(b"\n", tokens=1)
    meter = UsageMeter(True, True, max_event_bytes=1024)
    outs = [meter.feed(part) for part in split(big, list(range(0, len(big), 512)))]
    assert sum(len(o) for o in outs[:-1]) >= len(big) - 2048  # sent on as it came, not held to the end
    out, usage = run(meter, [stream])
    assert b"".join(outs) + out == big + stream.replace(usage_event, b"")
    assert usage == USAGE


@pytest.mark.parametrize("strip", [False, True])
def test_stream_cut_before_the_usage_chunk(strip: bool) -> None:
    stream, usage_event = chat_stream(b"\n")
    cut = stream[: stream.index(usage_event)]
    assert run(UsageMeter(True, strip), [cut]) == (cut, None)
    # cut inside the usage event: what arrived of it is not valid JSON
    inside = stream[: stream.index(usage_event) + 40]
    meter = UsageMeter(True, strip)
    meter.feed(inside)
    assert meter.finish() is None


def test_stream_cut_after_the_usage_json_without_blank_line_still_counts() -> None:
    stream, usage_event = chat_stream(b"\n")
    cut = stream[: stream.index(usage_event) + len(usage_event) - 2]  # "data: {...}" without its line ends
    meter = UsageMeter(True, False)
    meter.feed(cut)
    assert meter.finish() == USAGE


def test_stream_cut_with_continuous_usage_returns_the_last_seen() -> None:
    first = event(chunk_payload({"content": "a"}, usage={"prompt_tokens": 3, "completion_tokens": 1}), b"\n")
    second = event(chunk_payload({"content": "b"}, usage={"prompt_tokens": 3, "completion_tokens": 2}), b"\n")
    meter = UsageMeter(True, False)
    meter.feed(first + second[:20])
    assert meter.finish() == Usage(3, 1, 4, 0)


def test_stream_without_usage() -> None:
    stream, _ = chat_stream(b"\n", with_usage=False, usage_null=True)
    assert run(UsageMeter(True, True), [stream]) == (stream, None)


# Annotating the usage chunk with the cost (the client asked for usage itself)


def cost_of(usage: Usage) -> dict[str, float]:
    return {"cost_usd": usage.total_tokens / 1000}


def annotated(usage_event: bytes) -> bytes:
    obj = orjson.loads(usage_event.strip()[len(b"data: ") :])
    obj["usage"] = {**obj["usage"], "cost_usd": USAGE.total_tokens / 1000}
    return b"data: " + orjson.dumps(obj) + b"\n\n"


@pytest.mark.parametrize("nl", FRAMINGS)
def test_usage_chunk_annotated_at_every_split(nl: bytes) -> None:
    stream, usage_event = chat_stream(nl, tokens=3, keepalive=True)
    expected = stream.replace(usage_event, annotated(usage_event))
    assert b'"cost_usd":0.017' in expected
    for offset in range(len(stream) + 1):
        meter = UsageMeter(True, False, annotate=cost_of)
        assert meter.rewrites
        assert run(meter, split(stream, [offset])) == (expected, USAGE), offset
    byte_by_byte = [stream[i : i + 1] for i in range(len(stream))]
    assert run(UsageMeter(True, False, annotate=cost_of), byte_by_byte) == (expected, USAGE)


def test_annotation_leaves_other_events_and_non_data_events_alone() -> None:
    # Continuous usage: every usage object gets the cost of the usage it reports.
    first = event(chunk_payload({"content": "a"}, usage={"prompt_tokens": 3, "completion_tokens": 1}), b"\n")
    with_id = b"id: 9\n" + event(usage_payload(), b"\n")  # an event with other fields: not re-encoded
    null_usage = event(chunk_payload({}, "stop", usage=None), b"\n")
    stream = first + with_id + null_usage + b"data: [DONE]\n\n"
    out, usage = run(UsageMeter(True, False, annotate=cost_of), [stream])
    assert usage == USAGE
    first_out = orjson.loads(out.split(b"\n\n")[0].removeprefix(b"data: "))
    assert first_out["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "cost_usd": 0.004}
    assert out.endswith(with_id + null_usage + b"data: [DONE]\n\n")


def test_annotation_declined_leaves_the_stream_byte_for_byte() -> None:
    stream, _ = chat_stream(b"\n")
    assert run(UsageMeter(True, False, annotate=lambda usage: None), split(stream, [50, 300])) == (stream, USAGE)
    assert not UsageMeter(True, False).rewrites
    assert not UsageMeter(False, True, annotate=cost_of).rewrites  # JSON bodies are never rewritten


# Compressed JSON bodies


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        (b"gzip", gzip.compress),
        (b"x-gzip", gzip.compress),
        (b"deflate", zlib.compress),
    ],
)
def test_compressed_json_body_is_metered_from_a_copy(encoding: bytes, compress: Callable[[bytes], bytes]) -> None:
    body = compress(orjson.dumps({"id": "x", "choices": [], "usage": USAGE_BLOCK}))
    meter = UsageMeter(False, False, content_encoding=encoding)
    parts = split(body, [1, 7, 20])
    assert [meter.feed(part) for part in parts] == parts  # the client gets the compressed bytes
    assert meter.finish() == USAGE


def test_compressed_json_body_garbage_or_bomb_gives_unknown_usage_in_bounded_memory() -> None:
    assert run(UsageMeter(False, False, content_encoding=b"gzip"), [b"not gzip at all"]) == (b"not gzip at all", None)
    bomb = gzip.compress(b'{"usage": {"prompt_tokens": 1}, "pad": "' + b"x" * (64 << 20) + b'"}')
    meter = UsageMeter(False, False, content_encoding=b"gzip", max_json_bytes=65536)
    tracemalloc.start()
    try:
        for part in split(bomb, list(range(0, len(bomb), 16384))):
            meter.feed(part)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # 64 MiB of output never materialises
    assert meter.finish() is None


# Asking for streamed usage


def test_include_usage_inserted_without_touching_the_clients_bytes() -> None:
    body = b' \n{ "stream" :true,\n  "model": "m",  "messages": [{"role": "user", "content": "h\\u00e9"}], "n": 1.0 }'
    fields = orjson.loads(body)
    out = with_include_usage(body, fields)
    assert out == (
        b' \n{"stream_options":{"include_usage":true}, "stream" :true,\n  "model": "m",  '
        b'"messages": [{"role": "user", "content": "h\\u00e9"}], "n": 1.0 }'
    )
    assert orjson.loads(out) == {**fields, "stream_options": {"include_usage": True}}
    assert client_wants_usage(orjson.loads(out))


@pytest.mark.parametrize(
    "options",
    [None, {"include_usage": False}, {"continuous_usage_stats": True}, {"include_usage": 1, "x": [1, 2]}],
)
def test_include_usage_set_in_existing_stream_options(options: Any) -> None:
    fields = {"model": "m", "stream_options": options, "stream": True, "messages": []}
    out = with_include_usage(orjson.dumps(fields), fields)
    assert out is not None
    decoded = orjson.loads(out)
    assert list(decoded) == list(fields)  # key order kept
    expected_options = {**(options or {}), "include_usage": True}
    assert decoded == {**fields, "stream_options": expected_options}
    assert list(decoded["stream_options"]) == list(expected_options)


@pytest.mark.parametrize(
    "fields",
    [
        {"model": "m", "messages": []},
        {"model": "m", "stream": False},
        {"model": "m", "stream": "true"},
        {"model": "m", "stream": True, "stream_options": {"include_usage": True}},
        {"model": "m", "stream": True, "stream_options": "yes"},  # not ours to fix: the upstream refuses it
    ],
)
def test_include_usage_not_needed(fields: dict[str, Any]) -> None:
    assert with_include_usage(orjson.dumps(fields), fields) is None


def test_client_wants_usage() -> None:
    assert client_wants_usage({"stream_options": {"include_usage": True}})
    assert not client_wants_usage({"stream_options": {"include_usage": 1}})
    assert not client_wants_usage({"stream_options": None})
    assert not client_wants_usage({})


def test_units_the_answer_reports_are_read() -> None:
    """Billing follows what the answer says was made, not what the request asked for."""
    images = {"created": 1, "data": [{"b64_json": "aGk="}, {"url": "https://x/y.png"}]}
    assert usage_from_response(images) == Usage(units=2.0, unit="image")
    video = {"id": "video-1", "object": "video", "status": "queued", "seconds": "8"}
    assert usage_from_response(video) == Usage(units=8.0, unit="second")
    assert usage_from_response({"object": "video.generation", "seconds": 4}) == Usage(units=4.0, unit="second")
    assert usage_from_response({"object": "video", "seconds": "1e999"}) is None
    embeddings = {"object": "list", "data": [{"object": "embedding", "embedding": [0.1]}]}
    assert usage_from_response(embeddings) is None
    transcription = {"text": "hi", "duration": 2.5}
    assert usage_from_response(transcription) == Usage(units=2.5, unit="second")
