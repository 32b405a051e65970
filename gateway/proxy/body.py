"""Read a request body once (bounded) and find what admission needs in it, without changing it.

The bytes read here are the bytes forwarded upstream: parsing only looks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from gateway.errors import BodyTooLarge, InvalidRequest, UnsupportedMediaType
from gateway.types import Receive

# Text fields of a multipart form longer than this are not needed for admission and not kept.
_MAX_FORM_FIELD = 64 * 1024


class ClientDisconnected(Exception):
    """The client went away before its request body arrived."""


async def read_body(receive: Receive, content_length: int | None, limit: int) -> bytes:
    """The whole request body, refusing (413) as soon as it is known to exceed ``limit``.

    Content-Length is checked first, but the limit is enforced on the bytes actually received. A
    body that stalls is the server protocol's to end (``[limits] body_timeout``).
    """
    if content_length is not None and content_length > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk: bytes = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"The request body is larger than this gateway accepts ({limit} bytes).")


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 saying what is wrong with it."""
    if not body.strip():
        raise InvalidRequest("The request body is empty; expected a JSON object.", code="invalid_json")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"The request body must be a JSON object, not {_json_type(data)}.", code="invalid_json")
    return data


def model_of(fields: dict[str, Any]) -> str:
    """The ``model`` field: present, a non-empty string."""
    model = fields.get("model")
    if model is None:
        raise InvalidRequest(
            "The request must name a model: the `model` field is missing or null.",
            param="model",
            code="missing_model",
        )
    if not isinstance(model, str) or not model:
        raise InvalidRequest(
            f"`model` must be a non-empty string, not {_json_type(model)}.",
            param="model",
            code="invalid_model",
        )
    return model


@dataclass(slots=True)
class Form:
    """What a multipart body holds: its small text fields and the names of its file parts."""

    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)  # field name -> size in bytes
    boundary: bytes = b""  # the body's boundary (to find a part in its bytes again)


def parse_multipart(body: bytes, content_type: str) -> Form:
    """Walk a multipart/form-data body (python-multipart's streaming parser) without copying files."""
    mime, options = parse_options_header(content_type)
    if mime != b"multipart/form-data":
        raise UnsupportedMediaType(
            "This endpoint takes multipart/form-data (a `file` part and a `model` field), "
            f"not {mime.decode('latin-1') or 'a body without Content-Type'}."
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise InvalidRequest("The multipart Content-Type has no boundary.", code="invalid_multipart")
    form = _walk_form(body, boundary)
    form.boundary = boundary
    return form


def _walk_form(body: bytes, boundary: bytes) -> Form:
    form = Form()
    part: dict[str, Any] = {}

    def on_part_begin() -> None:
        part.clear()
        part.update(header_name=b"", header_value=b"", headers={}, chunks=[], size=0)

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part["header_name"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part["header_value"] += data[start:end]

    def on_header_end() -> None:
        part["headers"][part["header_name"].lower()] = part["header_value"]
        part["header_name"] = part["header_value"] = b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part["size"] += end - start
        if part["size"] <= _MAX_FORM_FIELD:
            part["chunks"].append(data[start:end])

    def on_part_end() -> None:
        _, options = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in options:
            form.files[name] = part["size"]
        elif part["size"] <= _MAX_FORM_FIELD:
            form.fields[name] = b"".join(part["chunks"]).decode("utf-8", "replace")

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise InvalidRequest(f"The multipart body is malformed: {exc}.", code="invalid_multipart") from None
    return form


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
