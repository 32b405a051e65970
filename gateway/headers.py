"""Header rules of the proxy: what goes upstream, what comes back, and the request id.

Hop-by-hop headers (RFC 9110 section 7.6.1, plus any named in Connection) are connection-level and
never forwarded in either direction. The client's Authorization is never forwarded as-is: ``auth``
decides which credential goes upstream. Headers that belong to the client's side of the gateway
(cookies, its proxy chain, trace context, OpenAI account routing) never cross to the upstream, and
the upstream's cookies and ``x-gateway-*`` headers never cross to the client.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from typing import Any

from gateway.types import Header

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
# Set by the gateway itself on the way up (the client library computes Host and Content-Length).
_REPLACED_UPSTREAM = frozenset(
    {b"host", b"content-length", b"authorization", b"x-request-id", b"expect", b"accept-encoding"}
)
# The client's side only: its cookies, its own proxy chain (the gateway sets X-Forwarded-For itself
# when configured to), OpenAI account routing, and trace context (with tracing on, the gateway's
# own traceparent replaces it).
_CLIENT_SIDE = frozenset(
    {
        b"cookie",
        b"forwarded",
        b"x-real-ip",
        b"openai-organization",
        b"openai-project",
        b"traceparent",
        b"tracestate",
        b"baggage",
    }
)
_CLIENT_SIDE_PREFIXES = (b"x-forwarded-", b"x-gateway-")
# A credential some clients send besides Authorization: dropped when the gateway's key goes upstream.
API_KEY_HEADER = b"x-api-key"
# The client's headers never forwarded by name: one set to look in per header.
_NOT_FORWARDED = HOP_BY_HOP | _REPLACED_UPSTREAM | _CLIENT_SIDE
_NOT_FORWARDED_WITH_API_KEY = _NOT_FORWARDED | {API_KEY_HEADER}
_REPLACED_DOWNSTREAM = frozenset({b"x-request-id", b"server", b"date", b"set-cookie", b"set-cookie2"})
# The gateway's own response headers: an upstream's are never relayed (the client would see two).
GATEWAY_PREFIX = b"x-gateway-"
# Content-Codings whose answers the usage meter can read (``usage.DECODABLE_ENCODINGS``).
_METERABLE_CODINGS = (b"gzip", b"deflate")
# X-Accel-* are instructions from an upstream to the proxy in front of it (nginx strips them too);
# the gateway sets its own X-Accel-Buffering for event streams.
_PROXY_DIRECTIVE_PREFIX = b"x-accel-"
# Prefixes of the upstream's headers never relayed (one startswith call per header).
_NOT_RELAYED_PREFIXES = (_PROXY_DIRECTIVE_PREFIX, GATEWAY_PREFIX)

REQUEST_ID = b"x-request-id"
_VALID_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
_HEADERS_STATE = "headers_by_name"  # request_headers' key in the scope's state


def request_headers(scope: MutableMapping[str, Any]) -> Mapping[bytes, bytes]:
    """The request's headers by lower-cased name (each name's first value), made once per request
    and kept in the scope's ``state``: one pass over the list instead of one per header looked up
    (the gateway looks up six or seven; an OpenAI SDK request carries ~17 headers). Made at the first
    lookup (the outermost middleware's): no middleware of the gateway changes a request's headers."""
    state = scope.setdefault("state", {})
    found: dict[bytes, bytes] | None = state.get(_HEADERS_STATE)
    if found is None:
        found = state[_HEADERS_STATE] = {name.lower(): value for name, value in reversed(scope["headers"])}
    return found


def request_id(client_value: bytes | None, fresh: Callable[[], bytes] | None = None) -> bytes:
    """The client's X-Request-ID (``client_value``) when it is a sane token, else a fresh one."""
    value = client_value
    if value is not None and _VALID_REQUEST_ID.fullmatch(value):
        return value
    return fresh() if fresh is not None else uuid.uuid4().hex.encode()


def _connection_tokens(headers: Iterable[Header]) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if len(name) == 10 and name.lower() == b"connection":  # (the length test spares a lower() per header)
            tokens.update(t.strip().lower() for t in value.split(b","))
    return frozenset(tokens)


def upstream_request_headers(
    client_headers: Sequence[Header],
    authorization: bytes | None,
    rid: bytes,
    *,
    accept_encoding: bytes = b"identity",
    drop_api_key: bool = False,
    forwarded: Sequence[Header] = (),
) -> list[Header]:
    """Headers for the upstream request. ASGI gives header names lowercased.

    ``accept_encoding`` replaces the client's (see ``upstream_accept_encoding``); ``drop_api_key``
    when the gateway's own credential goes upstream; ``forwarded``: the gateway's own X-Forwarded-*.
    """
    dropped = _NOT_FORWARDED_WITH_API_KEY if drop_api_key else _NOT_FORWARDED
    extra_hop = _connection_tokens(client_headers)
    if extra_hop:
        dropped = dropped | extra_hop
    out = [
        (name, value)
        for name, value in client_headers
        if name not in dropped and not name.startswith(_CLIENT_SIDE_PREFIXES)
    ]
    out.append((b"accept-encoding", accept_encoding))
    out.extend(forwarded)
    if authorization is not None:
        out.append((b"authorization", authorization))
    out.append((REQUEST_ID, rid))
    return out


def upstream_accept_encoding(client_value: bytes | None, streaming: bool) -> bytes:
    """The Accept-Encoding the gateway sends upstream: only codings whose answers it can meter.

    Usage (and so limits and budgets) is read from the answer, so the client's choice of coding must
    never make it unreadable: an event stream is asked for uncompressed (the meter reads SSE as it
    passes), anything else for the codings the client accepts among gzip and deflate, else
    ``identity``. The client still receives compressed bytes when it asked for them.
    """
    if streaming or not client_value:
        return b"identity"
    accepted: list[bytes] = []
    refused: set[bytes] = set()
    star = False
    for item in client_value.lower().split(b","):
        coding, _, params = item.partition(b";")
        coding = coding.strip()
        if _zero_quality(params):
            refused.add(coding)
        elif coding == b"*":
            star = True
        elif coding in (b"x-gzip", b"gzip"):
            accepted.append(b"gzip")
        elif coding == b"deflate":
            accepted.append(b"deflate")
    if star:
        accepted.extend(c for c in _METERABLE_CODINGS if c not in refused)
    chosen = [c for c in _METERABLE_CODINGS if c in accepted and c not in refused]
    return b", ".join(chosen) if chosen else b"identity"


def _zero_quality(params: bytes) -> bool:
    """Whether an Accept-Encoding item's parameters say ``q=0`` (the coding is refused)."""
    for param in params.split(b";"):
        name, _, value = param.partition(b"=")
        if name.strip() == b"q":
            try:
                return float(value.strip()) <= 0
            except ValueError:
                return False
    return False


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
            or lname.startswith(_NOT_RELAYED_PREFIXES)
        ):
            continue
        out.append((lname, value))
    out.extend(extra)
    return out


def header_safe(text: str, limit: int = 256) -> bytes:
    """Text from elsewhere (the catalog, the upstream) as a header value: printable ASCII only, so
    that it can never end the header or start another, at most ``limit`` bytes."""
    return bytes(c if 0x20 <= c < 0x7F else 0x3F for c in text.encode("utf-8", "replace")[:limit])


def header_value(headers: Iterable[Header], name: bytes) -> bytes | None:
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
