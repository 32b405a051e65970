"""The body sent to another model: the client's bytes with only ``model`` changed.

JSON: the one ``"model": "<name>"`` member of the body (found by its exact bytes, the name as the
client spelled it, whitespace around the colon allowed) has its value replaced; every other byte
is the client's. When that member cannot be found exactly once (an escaped name, a nested object
with the same member and value), the body is re-encoded from the parsed fields with only ``model``
changed (key order kept). Multipart (transcriptions): the ``model`` form field's value is replaced
the same way, or None when it cannot be found exactly once (that model is then not tried).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson


def with_model(body: bytes, fields: Mapping[str, Any], model: str, *, multipart: bool) -> bytes | None:
    """``body`` asking for ``model`` instead of ``fields["model"]``; None when it cannot be done."""
    old = fields.get("model")
    if not isinstance(old, str):
        return None
    if multipart:
        return _multipart(body, old, model)
    pattern = re.compile(rb'"model"\s*:\s*' + re.escape(orjson.dumps(old)))
    found = pattern.findall(body, 0, len(body))
    if len(found) == 1:
        return pattern.sub(lambda _m: b'"model":' + orjson.dumps(model), body, count=1)
    try:
        return orjson.dumps({**fields, "model": model})
    except orjson.JSONEncodeError:  # what orjson cannot encode (an integer beyond 64 bits)
        return None


def _multipart(body: bytes, old: str, model: str) -> bytes | None:
    pattern = re.compile(rb'(name="model"[^\r\n]*\r\n(?:[^\r\n]+\r\n)*\r\n)' + re.escape(old.encode()) + rb"\r\n")
    if len(pattern.findall(body)) != 1:
        return None
    return pattern.sub(lambda m: m.group(1) + model.encode() + b"\r\n", body, count=1)
