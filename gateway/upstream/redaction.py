"""Keep the organisation's upstream key out of what the upstream sends back to clients.

An upstream error body may echo the credential it was sent (``"Incorrect API key provided: sk-..."``).
In open and keys modes that credential is the gateway's own upstream key, which no client may see:
``Redactor`` replaces it, and its long prefixes and suffixes that error messages often show, in a
whole error body (read whole by the relay, at most ``relay.MAX_LATE_HEADERS_BODY``). A compressed
body (gzip, deflate) is decompressed, bounded, to be searched; when it had to be changed it goes
to the client uncompressed, with its Content-Encoding removed and a new Content-Length.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Final

from gateway.headers import content_encoding
from gateway.types import Header

REDACTED: Final = b"[redacted]"
# Prefixes and suffixes shorter than this are not searched (too likely to occur by chance).
_MIN_FRAGMENT: Final = 12
_WBITS: Final = {b"gzip": 16 + zlib.MAX_WBITS, b"x-gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}


class Redactor:
    """Replaces one secret (and its long fragments) in error bodies."""

    __slots__ = ("_fragments", "_max_body")

    def __init__(self, secret: str, max_body: int) -> None:
        key = secret.encode()
        fragments = {key}
        if len(key) >= 2 * _MIN_FRAGMENT:
            half = len(key) // 2
            fragments.update({key[:half], key[-half:]})
        self._fragments = tuple(sorted(fragments, key=len, reverse=True))  # the whole key first
        self._max_body = max_body

    def redact(self, headers: Sequence[Header], body: bytes) -> tuple[list[Header], bytes]:
        """``headers`` and ``body`` with the secret replaced; the same objects' content when absent."""
        encoding = content_encoding(headers)
        plain = body if encoding is None else self._decompress(encoding, body)
        if plain is None or not any(f in plain for f in self._fragments):
            return list(headers), body
        for fragment in self._fragments:
            plain = plain.replace(fragment, REDACTED)
        kept = [(n, v) for n, v in headers if n.lower() not in (b"content-length", b"content-encoding")]
        return [*kept, (b"content-length", str(len(plain)).encode())], plain

    def _decompress(self, encoding: bytes, body: bytes) -> bytes | None:
        wbits = _WBITS.get(encoding)
        if wbits is None:
            return None  # a coding the gateway never asks for: not searchable
        try:
            decoder = zlib.decompressobj(wbits)
            out = decoder.decompress(body, self._max_body + 1)
        except zlib.error:
            return None
        return out if len(out) <= self._max_body else None
