"""Who may open the console.

Keys mode: an admin key, presented as ``Authorization: Bearer`` (scripts) or once on the sign-in
form, which sets a session cookie. The cookie holds the key's name, an expiry and an HMAC of both,
keyed by the organisation's upstream key (a secret every replica shares, never sent to a browser)
and the gateway key's digest: it never holds the key, any replica can check it without shared
state, and it stops working at once when that key is removed, disabled or expires, or its secret
changes. Passthrough and open modes have no keys to check: the console answers clients on the
gateway's own host (loopback) only, and not through a proxy (a request with a Forwarded,
X-Forwarded-For or X-Real-IP header is refused: a reverse proxy on the same host would otherwise
make every client look local).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import time
from collections.abc import Callable
from typing import Final

from starlette.requests import Request

from gateway.auth.keys import KeyRing, bearer_token
from gateway.errors import AuthenticationFailed, PermissionDenied

COOKIE: Final = "gw_console"
# A request a proxy forwarded is not from the gateway's own host, even when the proxy runs there.
PROXY_HEADERS: Final = (b"forwarded", b"x-forwarded-for", b"x-real-ip")


class SignInNeeded(Exception):
    """A browser without a valid console session: show the sign-in form."""


class ConsoleAccess:
    def __init__(
        self,
        keys: Callable[[], KeyRing | None],
        secret: str,
        session_hours: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = keys  # read per request: a reload swaps the ring
        self._secret = secret.encode()
        self._session_s = session_hours * 3600
        self._clock = clock

    @property
    def keys_mode(self) -> bool:
        return self._keys() is not None

    def viewer(self, request: Request) -> str | None:
        """The admin key's name (keys mode) or None (loopback in the other modes); raises
        ``SignInNeeded``, ``AuthenticationFailed`` (401) or ``PermissionDenied`` (403)."""
        ring = self._keys()
        if ring is None:
            if not _from_this_host(request):
                raise PermissionDenied(
                    "Without gateway keys the console answers the gateway's own host only (docs/console.md)."
                )
            return None
        headers = request.scope["headers"]
        if bearer_token(headers) is not None:
            caller = ring.authenticate(headers)
            if not caller.admin:
                raise AuthenticationFailed("The console needs an admin key.", code="admin_key_required")
            return caller.name
        name = self._session_name(ring, request.cookies.get(COOKIE, ""))
        if name is None:
            raise SignInNeeded
        return name

    def sign_in(self, key: str) -> tuple[str, str]:
        """The admin key's name and the session cookie's value; raises ``AuthenticationFailed``."""
        ring = self._keys()
        if ring is None:
            raise PermissionDenied("Signing in needs keys mode.")
        caller = ring.authenticate([(b"authorization", b"Bearer " + key.strip().encode())])
        if not caller.admin:
            raise AuthenticationFailed("The console needs an admin key.", code="admin_key_required")
        digest = ring.usable_digest(caller.name)
        assert digest is not None  # it just authenticated
        expires = int(self._clock() + self._session_s)
        label = base64.urlsafe_b64encode(caller.name.encode()).decode()
        return caller.name, f"{label}.{expires}.{self._mac(digest, caller.name, expires)}"

    @property
    def max_age(self) -> int:
        return int(self._session_s)

    def _session_name(self, ring: KeyRing, cookie: str) -> str | None:
        label, _, rest = cookie.rpartition(".")
        label, _, expires_text = label.rpartition(".")
        try:
            name = base64.urlsafe_b64decode(label.encode()).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        if not name or not expires_text.isdigit() or int(expires_text) <= self._clock():
            return None
        digest = ring.usable_digest(name)
        if digest is None:
            return None
        admin = any(c.name == name and c.admin for c in ring.callers())
        if not admin or not hmac.compare_digest(self._mac(digest, name, int(expires_text)), rest):
            return None
        return name

    def _mac(self, digest: bytes, name: str, expires: int) -> str:
        key = hmac.new(self._secret, b"gateway-console-session:" + digest, hashlib.sha256).digest()
        return hmac.new(key, f"{name}\n{expires}".encode(), hashlib.sha256).hexdigest()


def _from_this_host(request: Request) -> bool:
    client = request.client
    if client is None or any(name in PROXY_HEADERS for name, _ in request.scope["headers"]):
        return False
    try:
        return ipaddress.ip_address(client.host).is_loopback
    except ValueError:
        return False
