"""Who may open the console: loopback only (and not through a proxy) without keys; the session
cookie's expiry and revocation in keys mode; the console turned off."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.requests import Request

from gateway.auth.keys import KeyRing
from gateway.config import KeySettings
from gateway.console.access import COOKIE, ConsoleAccess, SignInNeeded
from gateway.errors import AuthenticationFailed, PermissionDenied
from tests.helpers.clocks import FakeClock
from tests.helpers.gateway import StartGateway, assert_error_envelope, key_secret, key_sha256


def request(client: tuple[str, int] | None, headers: dict[str, str] | None = None, cookie: str = "") -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if cookie:
        raw.append((b"cookie", f"{COOKIE}={cookie}".encode()))
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": "/console/usage",
        "headers": raw,
        "client": client,
    }
    return Request(scope)


def test_without_keys_only_the_gateways_own_host_gets_in(start_gateway: StartGateway) -> None:
    gateway = start_gateway()  # passthrough
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        page = http.get("/console/usage")
        assert page.status_code == 200
        assert "Local access (no gateway keys)" in page.text
        assert http.get("/console/login").headers["location"] == "/console/usage"
        for header in ({"X-Forwarded-For": "203.0.113.9"}, {"Forwarded": "for=203.0.113.9"}, {"X-Real-IP": "10.1.2.3"}):
            proxied = http.get("/console/usage", headers=header)
            assert proxied.status_code == 403, header
            assert_error_envelope(proxied.content, code="permission_denied")
    access = ConsoleAccess(lambda: None, "", 12)
    assert access.viewer(request(("127.0.0.1", 5000))) is None
    assert access.viewer(request(("::1", 5000))) is None
    for client in (("203.0.113.9", 5000), ("10.0.0.7", 5000), None):
        with pytest.raises(PermissionDenied):
            access.viewer(request(client))


def test_the_console_can_be_turned_off(start_gateway: StartGateway) -> None:
    gateway = start_gateway({"GATEWAY_CONSOLE_ENABLED": "false"})
    answer = httpx.get(gateway.url + "/console/usage", timeout=10)
    assert answer.status_code == 404
    assert_error_envelope(answer.content, code="unknown_url")


def ring(*, admin_disabled: bool = False) -> KeyRing:
    return KeyRing([
        KeySettings(name="admin", key_sha256=key_sha256(key_secret("admin")), admin=True, disabled=admin_disabled),
        KeySettings(name="alice", key_sha256=key_sha256(key_secret("alice"))),
    ])  # fmt: skip


def test_a_session_ends_when_it_expires_or_its_key_is_disabled(clock: FakeClock) -> None:
    keys = {"ring": ring()}
    access = ConsoleAccess(lambda: keys["ring"], "sk-org", 1, clock=clock)
    name, cookie = access.sign_in(key_secret("admin"))
    assert name == "admin"
    assert key_secret("admin") not in cookie
    assert access.viewer(request(("198.51.100.1", 1), cookie=cookie)) == "admin"  # any client with a session
    clock.advance(3599)
    assert access.viewer(request(("198.51.100.1", 1), cookie=cookie)) == "admin"
    clock.advance(2)
    with pytest.raises(SignInNeeded):
        access.viewer(request(("198.51.100.1", 1), cookie=cookie))
    _, cookie = access.sign_in(key_secret("admin"))
    keys["ring"] = ring(admin_disabled=True)  # a reload disabled the key
    with pytest.raises(SignInNeeded):
        access.viewer(request(("198.51.100.1", 1), cookie=cookie))
    # Signed with another organisation key (another deployment): not accepted.
    keys["ring"] = ring()
    other = ConsoleAccess(lambda: keys["ring"], "sk-other-org", 1, clock=clock)
    with pytest.raises(SignInNeeded):
        other.viewer(request(("198.51.100.1", 1), cookie=cookie))
    with pytest.raises(AuthenticationFailed):
        access.sign_in(key_secret("alice"))  # not an admin
    for junk in ("", "x", "YWRtaW4.notanumber.00", "!!!.1.2", f"YWRtaW4.{int(clock()) + 100}.00"):
        with pytest.raises(SignInNeeded):
            access.viewer(request(("198.51.100.1", 1), cookie=junk))
