"""Header rules of the proxy: what goes upstream, what comes back, and the request id.

Hop-by-hop headers (RFC 9110 section 7.6.1, plus any named in Connection) are connection-level and
never forwarded in either direction. The client's Authorization is never forwarded as-is: ``auth``
decides which credential goes upstream.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable, Sequence

Header = tuple[bytes, bytes]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Set by the gateway itself on the way up (httpx computes Host and Content-Length from the request).
_REPLACED_UPSTREAM = frozenset({b"host", b"content-length", b"authorization", b"x-request-id", b"expect"})
_REPLACED_DOWNSTREAM = frozenset({b"x-request-id", b"server", b"date"})
# X-Accel-* are instructions from an upstream to the proxy in front of it (nginx strips them too);
# the gateway sets its own X-Accel-Buffering for event streams.
_PROXY_DIRECTIVE_PREFIX = b"x-accel-"

REQUEST_ID = b"x-request-id"
_VALID_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")


def request_id(client_headers: Iterable[Header], fresh: Callable[[], bytes] | None = None) -> bytes:
    """The client's X-Request-ID when it is a sane token, else a fresh one."""
    for name, value in client_headers:
        if name == REQUEST_ID:
            if _VALID_REQUEST_ID.fullmatch(value):
                return value
            break
    return fresh() if fresh is not None else uuid.uuid4().hex.encode()


def _connection_tokens(headers: Iterable[Header]) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if len(name) == 10 and name.lower() == b"connection":  # (the length test spares a lower() per header)
            tokens.update(t.strip().lower() for t in value.split(b","))
    return frozenset(tokens)


def upstream_request_headers(client_headers: Sequence[Header], authorization: bytes | None, rid: bytes) -> list[Header]:
    """Headers for the upstream request. ASGI gives header names lowercased."""
    extra_hop = _connection_tokens(client_headers)
    out = [
        (name, value)
        for name, value in client_headers
        if name not in HOP_BY_HOP and name not in _REPLACED_UPSTREAM and name not in extra_hop
    ]
    if not any(name == b"accept-encoding" for name, _ in out):
        # Bytes are relayed untouched, so do not let the upstream compress what the client did not ask for.
        out.append((b"accept-encoding", b"identity"))
    if authorization is not None:
        out.append((b"authorization", authorization))
    out.append((REQUEST_ID, rid))
    return out


def client_response_headers(upstream_headers: Sequence[Header], extra: Iterable[Header]) -> list[Header]:
    """Headers for the client: the upstream's, lowercased, minus hop-by-hop, plus the gateway's."""
    extra_hop = _connection_tokens(upstream_headers)
    out: list[Header] = []
    for name, value in upstream_headers:
        lname = name.lower()
        if (
            lname in HOP_BY_HOP
            or lname in _REPLACED_DOWNSTREAM
            or lname in extra_hop
            or lname.startswith(_PROXY_DIRECTIVE_PREFIX)
        ):
            continue
        out.append((lname, value))
    out.extend(extra)
    return out


def header_value(headers: Sequence[Header], name: bytes) -> bytes | None:
    """The first value of ``name`` (lower-case), whatever the case of the headers' names; None when absent."""
    size = len(name)
    for key, value in headers:
        if len(key) == size and key.lower() == name:
            return value
    return None


def is_event_stream(headers: Sequence[Header]) -> bool:
    content_type = header_value(headers, b"content-type")
    return content_type is not None and content_type.split(b";", 1)[0].strip().lower() == b"text/event-stream"


def content_encoding(headers: Sequence[Header]) -> bytes | None:
    """The Content-Encoding, lower-cased; None when absent or ``identity``."""
    encoding = (header_value(headers, b"content-encoding") or b"").strip().lower()
    return None if encoding in (b"", b"identity") else encoding
