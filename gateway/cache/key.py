"""The response cache's key: what a request asks, reduced to bytes that are equal exactly when two
requests ask the same thing of the same model for the same caller, and hashed.

A JSON body is encoded canonically (``canonical_json``): the same parsed value gives the same
bytes whatever the key order, whitespace, string escaping or number spelling of the request. A
multipart body is reduced to its parts' names, file names, content types and data digests
(``multipart_material``), never its boundary. ``cache_key`` hashes the material with the endpoint,
model, caller partition, namespace and variant, each length-prefixed, so no two different tuples
give the same hashed bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import orjson
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

# Bumped whenever the material or the hashed tuple changes meaning: old keys then simply miss.
KEY_VERSION = 2  # 2: the body's model is left out of the material (the resolved model is a component)
# What ``short`` keeps of a key: enough to tell entries apart in logs and headers.
SHORT_KEY_CHARS = 12

_KEY_DOMAIN = b"flexai-gateway/cache-key"
_PARTITION_DOMAIN = b"flexai-gateway/cache-partition/v1"
_MULTIPART_DOMAIN = b"flexai-gateway/multipart/v1"
# Integers wider than this are written in hexadecimal: decimal str() of an int is refused beyond
# sys.get_int_max_str_digits() digits (640 at the least), and the encoding must not depend on that
# setting. 2048 bits is at most 617 digits, and the integral value of any float fits in 1024 bits.
_MAX_DECIMAL_INT_BITS = 2048
_OPENERS = frozenset(b"[{")
_END = object()


def canonical_json(value: Any) -> bytes:
    """A parsed JSON value as canonical bytes: equal values give equal bytes.

    Object members are sorted by key (code point order, which is UTF-8 byte order), there is no
    whitespace, strings are escaped one way (orjson's: only ``"``, ``\\`` and control characters),
    and numbers equal in value are written once: an integral float as the integer (``0.0``,
    ``-0.0`` and ``0`` give ``0``; ``1e3`` gives ``1000``), other floats as Python's shortest
    round-trip repr, integers of any size exactly. The walk is iterative, so nesting depth is
    bounded only by memory. Raises TypeError for a value no JSON parser produces.
    """
    out = bytearray()
    # One frame per open array or object: its remaining children and whether it is an object.
    frames: list[tuple[Iterator[Any], bool]] = []
    while True:
        if type(value) is str:  # the commonest value, first
            out += _string(value)
        elif isinstance(value, dict):
            out += b"{"
            frames.append((iter(sorted(value.items(), key=_item_key)), True))
        elif isinstance(value, list | tuple):
            out += b"["
            frames.append((iter(value), False))
        else:
            out += _scalar(value)
        while True:
            if not frames:
                return bytes(out)
            children, is_object = frames[-1]
            child: Any = next(children, _END)
            if child is _END:
                frames.pop()
                out += b"}" if is_object else b"]"
                continue
            if out[-1] not in _OPENERS:  # not the first child: the container's last byte is its opener
                out += b","
            if is_object:
                name, value = child
                out += _string(name)
                out += b":"
            else:
                value = child
            break


def json_material(fields: Mapping[str, Any], omit: Collection[tuple[str, ...]] = ()) -> bytes:
    """The canonical bytes of a JSON body object without the members at the ``omit`` paths.

    A path names a member of nested objects, e.g. ``("stream_options", "include_usage")``. A path
    that is not there (or that passes through a non-object) is ignored, and a nested object emptied
    by an omission goes too (``"stream_options": {}`` means what no ``stream_options`` means). The
    body is not changed: only the objects along a path are copied.
    """
    body: Mapping[str, Any] = fields
    for path in omit:
        if path:
            body = _without(body, path)
    return canonical_json(body if isinstance(body, dict) else dict(body))


def multipart_material(body: bytes, boundary: bytes, omit: Collection[bytes] = ()) -> bytes:
    """The meaning of a multipart/form-data body as bytes, independent of its boundary.

    For each part in order: its name and file name (from Content-Disposition, as python-multipart
    reads it, as the upstream's form parser most likely does), its content type (lower-cased,
    without parameters) and the SHA-256 of its data, each length-prefixed. The file name is
    included because an upstream may use its extension to detect an audio file's format; a part
    without one and a part with an empty one differ. Part data is hashed as it is parsed, never
    copied. Raises ValueError for a malformed or truncated body, and for a part that repeats its
    Content-Disposition or Content-Type (which one an upstream would honour is anyone's guess).
    The parts named in ``omit`` are left out (their data is still parsed, never kept).
    """
    out = bytearray(_MULTIPART_DOMAIN)
    state: dict[str, Any] = {"ended": False, "open": False}

    def on_part_begin() -> None:
        state.update(open=True, field=b"", value=b"", headers={}, digest=hashlib.sha256())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        name = state["field"].strip().lower()
        if name in state["headers"]:
            raise ValueError(f"a multipart part repeats its {name.decode('latin-1')} header")
        state["headers"][name] = state["value"]
        state["field"] = state["value"] = b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["digest"].update(memoryview(data)[start:end])

    def on_part_end() -> None:
        headers: dict[bytes, bytes] = state["headers"]
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        content_type, _ = parse_options_header(headers.get(b"content-type", b""))
        state["open"] = False
        name = disposition.get(b"name", b"")
        if name in omit:
            return
        out.extend(_field(name))
        filename = disposition.get(b"filename")
        out.extend(b"\x00" if filename is None else b"\x01" + _field(filename))
        out.extend(_field(content_type.lower()))
        out.extend(state["digest"].digest())

    def on_end() -> None:
        state["ended"] = True

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_end": on_end,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise ValueError(f"malformed multipart body: {exc}") from None
    if state["open"] or not state["ended"]:
        raise ValueError("truncated multipart body: no closing boundary")
    return bytes(out)


def cache_key(*, endpoint: str, model: str, partition: str, namespace: str, material: bytes, variant: str = "") -> str:
    """The hex SHA-256 of (KEY_VERSION, endpoint, model, partition, namespace, variant, material),
    every field length-prefixed. ``variant`` separates answers of different shapes to the same
    question, e.g. ``"stream"`` (an event stream) from ``"json"``."""
    digest = hashlib.sha256(_field(_KEY_DOMAIN))
    digest.update(KEY_VERSION.to_bytes(4, "big"))
    for text in (endpoint, model, partition, namespace, variant):
        digest.update(_field(_utf8(text)))
    digest.update(_field(material))
    return digest.hexdigest()


def partition_of_credential(credential: bytes, *, secret: bytes = b"") -> str:
    """The cache partition of a caller known only by its credential (pass-through mode): a
    domain-separated SHA-256 of it, in hex, or an HMAC-SHA256 keyed with ``secret`` when one is
    given (then not even a guessed credential can be checked against a logged partition)."""
    if secret:
        return hmac.new(secret, _field(_PARTITION_DOMAIN) + credential, hashlib.sha256).hexdigest()
    return hashlib.sha256(_field(_PARTITION_DOMAIN) + credential).hexdigest()


def short(key: str) -> str:
    """What logs and response headers may show of a key (or partition): its first 12 characters."""
    return key[:SHORT_KEY_CHARS]


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _item_key(item: tuple[str, Any]) -> str:
    return item[0]


def _without(body: Mapping[str, Any], path: tuple[str, ...]) -> Mapping[str, Any]:
    """``body`` without the member at ``path``: copies of the objects along it, or ``body`` itself
    when there is nothing to remove. (Recursion as deep as the path, which the caller writes.)"""
    head = path[0]
    if head not in body:
        return body
    if len(path) == 1:
        copy = dict(body)
        del copy[head]
        return copy
    child = body[head]
    if not isinstance(child, Mapping):
        return body
    new_child = _without(child, path[1:])
    if new_child is child:
        return body
    copy = dict(body)
    if new_child:
        copy[head] = new_child
    else:
        del copy[head]
    return copy


def _scalar(value: Any) -> bytes:
    if value is None:
        return b"null"
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, int):
        return _integer(value)
    if isinstance(value, float):
        return _float(value)
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def _string(text: str) -> bytes:
    try:
        return orjson.dumps(text)
    except orjson.JSONEncodeError:  # a lone surrogate (Python's json module lets "\ud800" through)
        return json.dumps(text, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _integer(number: int) -> bytes:
    if number.bit_length() <= _MAX_DECIMAL_INT_BITS:
        return str(number).encode()
    # Not JSON, but unambiguous: no JSON value is written as a bare 0x... (hex() of an int is exact).
    return hex(number).encode()


def _float(number: float) -> bytes:
    if not math.isfinite(number):  # no JSON parser gives these; written anyway rather than raising
        return b"NaN" if math.isnan(number) else (b"Infinity" if number > 0 else b"-Infinity")
    if number.is_integer():  # 0.0 and -0.0 -> 0; 1e3 -> 1000; 2.0**60 -> its exact integer
        return _integer(int(number))
    return repr(number).encode()
