"""Reading the body once (bounded) and finding the model in JSON or multipart."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import pytest

from gateway.errors import BodyTooLarge, InvalidRequest, UnsupportedMediaType
from gateway.proxy.body import model_of, parse_json_object, parse_multipart, read_body


def receiver(*chunks: bytes) -> Any:
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive() -> MutableMapping[str, Any]:
        return messages.pop(0)

    return receive


async def test_read_body_joins_chunks() -> None:
    assert await read_body(receiver(b"ab", b"", b"cd"), None, 10) == b"abcd"


async def test_limit_is_enforced_on_received_bytes_whatever_content_length_says() -> None:
    with pytest.raises(BodyTooLarge):
        await read_body(receiver(b"x" * 6, b"x" * 6), 3, 10)  # Content-Length lies
    with pytest.raises(BodyTooLarge):
        await read_body(receiver(b""), 11, 10)  # refused from the header alone
    assert await read_body(receiver(b"x" * 10), None, 10) == b"x" * 10


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "empty"),
        (b"   ", "empty"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "not an array"),
        (b'"s"', "not a string"),
        (b"null", "not null"),
        (b"1e999999", "not valid JSON"),
    ],
)
def test_bad_json_bodies(body: bytes, fragment: str) -> None:
    with pytest.raises(InvalidRequest, match=fragment):
        parse_json_object(body)


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({}, "missing_model"),
        ({"model": None}, "missing_model"),
        ({"model": 3}, "invalid_model"),
        ({"model": ""}, "invalid_model"),
        ({"model": ["a"]}, "invalid_model"),
    ],
)
def test_model_field_must_be_a_non_empty_string(fields: dict[str, Any], code: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        model_of(fields)
    assert (caught.value.code, caught.value.param) == (code, "model")


def multipart(parts: list[tuple[str, bytes, str | None]], boundary: str = "XyZ") -> tuple[bytes, str]:
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_multipart_fields_and_files_without_copying_the_file() -> None:
    audio = bytes(range(256)) * 100 + b"\r\n--XyZ-not-a-boundary"
    body, content_type = multipart([("file", audio, "a.wav"), ("model", b"whisper-large-v3", None)])
    form = parse_multipart(body, content_type)
    assert form.fields == {"model": "whisper-large-v3"}
    assert form.files == {"file": len(audio)}
    assert model_of(dict(form.fields)) == "whisper-large-v3"


def test_multipart_errors() -> None:
    body, _ = multipart([("file", b"x", "a.wav")])
    with pytest.raises(UnsupportedMediaType):
        parse_multipart(body, "application/json")
    with pytest.raises(InvalidRequest, match="no boundary"):
        parse_multipart(body, "multipart/form-data")
    with pytest.raises(InvalidRequest, match="malformed"):
        parse_multipart(b"garbage without boundaries\r\n\r\n", "multipart/form-data; boundary=XyZ")
    with pytest.raises(InvalidRequest, match="missing"):
        model_of(dict(parse_multipart(body, "multipart/form-data; boundary=XyZ").fields))
