"""The body sent to another model: the client's bytes with only ``model`` changed.

JSON: the one ``"model": "<name>"`` member of the body (found by its exact bytes, the name as the
client spelled it, whitespace around the colon allowed) has its value replaced; every other byte
is the client's. When that member cannot be found exactly once (an escaped name, a nested object
with the same member and value), the body is re-encoded from the parsed fields with only ``model``
changed (key order kept). Multipart (transcriptions): the ``model`` form field's value is replaced
the same way (the part found from the body's boundary), or None when it cannot be found exactly
once (that model is then not tried).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson


def with_model(body: bytes, fields: Mapping[str, Any], model: str, *, boundary: bytes | None = None) -> bytes | None:
    """``body`` asking for ``model`` instead of ``fields["model"]`` (a multipart body: give its
    ``boundary``); None when it cannot be done."""
    old = fields.get("model")
    if not isinstance(old, str):
        return None
    if boundary is not None:
        return _multipart(body, boundary, old, model)
    pattern = re.compile(rb'"model"\s*:\s*' + re.escape(orjson.dumps(old)))
    found = pattern.findall(body, 0, len(body))
    if len(found) == 1:
        return pattern.sub(lambda _m: b'"model":' + orjson.dumps(model), body, count=1)
    try:
        return orjson.dumps({**fields, "model": model})
    except orjson.JSONEncodeError:  # what orjson cannot encode (an integer beyond 64 bits)
        return None


def _multipart(body: bytes, boundary: bytes, old: str, model: str) -> bytes | None:
    """The ``model`` part's value replaced: the part is found from its boundary line (which the
    client chose so that no content holds it), its headers naming ``model``, and its end."""
    delimiter = b"--" + re.escape(boundary)
    pattern = re.compile(
        rb"((?:^|\r\n)" + delimiter + rb'\r\n(?:[^\r\n]+\r\n)*?[^\r\n]*[; ]name="model"(?:;[^\r\n]*)?\r\n'
        rb"(?:[^\r\n]+\r\n)*\r\n)" + re.escape(old.encode()) + rb"(?=\r\n" + delimiter + rb")"
    )
    if len(pattern.findall(body)) != 1:
        return None
    return pattern.sub(lambda m: m.group(1) + model.encode(), body, count=1)
