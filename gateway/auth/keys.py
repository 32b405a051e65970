"""Gateway keys: who is calling, and what that key may do.

Keys are never stored: the config holds the SHA-256 hex digest of each. A presented key is hashed,
looked up by digest, and the digest compared with ``hmac.compare_digest``. Errors never say which
keys exist.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from gateway.catalog.entries import ModelEntry
from gateway.config import KeySettings
from gateway.errors import AuthenticationFailed, ModelNotAllowed
from gateway.headers import header_value
from gateway.types import Header

KEY_PREFIX = "sk-gw-"


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated gateway key and its policy."""

    name: str
    team: str | None
    models: tuple[str, ...] | None
    categories: frozenset[str] | None
    rpm: int | None
    tpm: int | None
    budget_usd_daily: float | None
    budget_usd_monthly: float | None
    admin: bool
    fallback: bool | None = None  # the key's word on falling back to another model (None: not said)

    def may_use_name(self, name: str) -> bool:
        """Whether the key's model globs allow ``name`` (an alias's name: it has no category)."""
        return self.models is None or any(fnmatch.fnmatchcase(name, glob) for glob in self.models)

    def check_name(self, name: str) -> None:
        if not self.may_use_name(name):
            raise ModelNotAllowed(f"The key {self.name!r} may not use model {name!r}.", param="model")

    def may_use(self, entry: ModelEntry) -> bool:
        if self.categories is not None and entry.category not in self.categories:
            return False
        return self.models is None or any(fnmatch.fnmatchcase(entry.model_name, glob) for glob in self.models)

    def check_model(self, entry: ModelEntry) -> None:
        if not self.may_use(entry):
            raise ModelNotAllowed(f"The key {self.name!r} may not use model {entry.model_name!r}.", param="model")


@dataclass(frozen=True, slots=True)
class _Key:
    digest: bytes
    caller: Caller
    disabled: bool
    expires: datetime | None


class KeyRing:
    """The configured keys, looked up by digest. Immutable: a reload builds a new ring."""

    def __init__(self, keys: Iterable[KeySettings]) -> None:
        self._by_digest: Mapping[bytes, _Key] = {
            bytes.fromhex(k.key_sha256): _Key(
                digest=bytes.fromhex(k.key_sha256),
                caller=Caller(
                    name=k.name,
                    team=k.team,
                    models=k.models,
                    categories=frozenset(c.lower() for c in k.categories) if k.categories is not None else None,
                    rpm=k.rpm,
                    tpm=k.tpm,
                    budget_usd_daily=k.budget_usd_daily,
                    budget_usd_monthly=k.budget_usd_monthly,
                    admin=k.admin,
                    fallback=k.fallback,
                ),
                disabled=k.disabled,
                expires=k.expires,
            )
            for k in keys
        }

    def __len__(self) -> int:
        return len(self._by_digest)

    def callers(self) -> list[Caller]:
        """Every configured key's caller, by name (disabled and expired keys included)."""
        return sorted((k.caller for k in self._by_digest.values()), key=lambda c: c.name)

    def usable_digest(self, name: str, now: datetime | None = None) -> bytes | None:
        """The digest of the key named ``name`` while it may be used (not disabled, not expired)."""
        moment = now or datetime.now(UTC)
        for k in self._by_digest.values():
            if k.caller.name == name and not k.disabled and (k.expires is None or moment < k.expires):
                return k.digest
        return None

    def authenticate(self, headers: Iterable[Header], now: datetime | None = None) -> Caller:
        """The caller for the request's ``Authorization: Bearer <key>``, or AuthenticationFailed (401)."""
        presented = bearer_token(headers)
        if presented is None:
            raise AuthenticationFailed(
                "Missing API key: send `Authorization: Bearer <your gateway key>`.", code="missing_api_key"
            )
        digest = hashlib.sha256(presented).digest()
        found = self._by_digest.get(digest)
        if found is None or not hmac.compare_digest(found.digest, digest):
            raise AuthenticationFailed("Invalid API key.")
        if found.disabled or (found.expires is not None and (now or datetime.now(UTC)) >= found.expires):
            raise AuthenticationFailed("Invalid API key.")  # the same answer: no hint about which keys exist
        return found.caller


def bearer_token(headers: Iterable[Header]) -> bytes | None:
    """The token of ``Authorization: Bearer <token>``, or None."""
    value = header_value(headers, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(b" ")
    token = token.strip()
    return token if scheme.lower() == b"bearer" and token else None


def new_key() -> tuple[str, str]:
    """A fresh random key and its SHA-256 hex digest."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hashlib.sha256(key.encode()).hexdigest()
