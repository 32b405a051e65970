"""The one change the gateway makes to request bytes: ask for streamed usage (``include_usage``).

FlexAI reports the usage of a streamed completion only when asked; ``with_include_usage`` adds the
ask to a request body, and the response's ``UsageMeter`` (``strip_usage_chunk=True``) then removes
the extra usage event again. ``client_wants_usage`` tells whether the client asked for it itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import orjson

from gateway.jsonvalues import as_object

_INCLUDE_USAGE_MEMBER: Final = b'"stream_options":{"include_usage":true},'


def client_wants_usage(fields: Mapping[str, Any]) -> bool:
    """Whether the client itself asked for streamed usage (``stream_options.include_usage: true``)."""
    options = as_object(fields.get("stream_options"))
    return options is not None and options.get("include_usage") is True


def with_include_usage(body: bytes, fields: Mapping[str, Any]) -> bytes | None:
    """The request body with ``stream_options.include_usage = true``, or None to forward it as is.

    This is the one place the gateway changes request bytes: FlexAI reports the usage of a streamed
    completion only when asked, and without it spend cannot be tracked. Call it only for
    ``/v1/chat/completions`` and ``/v1/completions``; ``fields`` is ``body`` already parsed (a JSON
    object). Then the meter of the response must strip the extra usage event
    (``UsageMeter(True, strip_usage_chunk=True)``) and the caller must send the new Content-Length.

    - Not streamed (``fields["stream"] is not True``), or the client already set
      ``include_usage: true``: None.
    - No ``stream_options`` key: the bytes ``"stream_options":{"include_usage":true},`` are
      inserted right after the body's first ``{``; every other byte (key order, whitespace,
      number spelling, escapes) is the client's.
    - ``stream_options`` present (null, or an object whose ``include_usage`` is not ``true``): the
      whole body is re-encoded with orjson from ``fields``, ``stream_options`` keeping its place and
      its other options, ``include_usage`` set to ``true``. Whitespace and number spelling may
      change; key order is kept (duplicate keys collapse to the last value, as parsed).
    - ``stream_options`` of another type (the upstream will refuse it), or a body orjson cannot
      re-encode: None.
    """
    if fields.get("stream") is not True or client_wants_usage(fields):
        return None
    if "stream_options" not in fields:
        brace = body.find(b"{")
        if brace < 0:
            return None
        return body[: brace + 1] + _INCLUDE_USAGE_MEMBER + body[brace + 1 :]
    raw = fields["stream_options"]
    options = as_object(raw)
    if options is None and raw is not None:
        return None
    try:
        return orjson.dumps({**fields, "stream_options": {**(options or {}), "include_usage": True}})
    except orjson.JSONEncodeError:  # what orjson cannot encode (an integer beyond 64 bits, deep nesting)
        return None
