"""Who may call, and which credential goes upstream.

- passthrough: the client's own Authorization goes upstream unchanged (each caller uses its key).
- open: the gateway's upstream key goes upstream; the client's Authorization is never forwarded.
- keys: as open, once the client's gateway key was checked (``key_auth``).
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.config import Settings


class UpstreamAuth:
    __slots__ = ("_gateway_key",)

    def __init__(self, settings: Settings) -> None:
        # In open and keys modes the gateway's own upstream key goes upstream, never the client's.
        self._gateway_key = b"Bearer " + settings.upstream.api_key.encode() if settings.sends_gateway_key else None

    def upstream_authorization(self, client_headers: Mapping[bytes, bytes]) -> bytes | None:
        """What goes upstream as Authorization; ``client_headers``: ``headers.request_headers``."""
        if self._gateway_key is not None:
            return self._gateway_key
        return client_headers.get(b"authorization")
