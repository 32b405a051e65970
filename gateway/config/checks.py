"""The cross-field checks of loaded settings: what no single field's type and bounds can say.

The upstream URL's shape, the port range, tracing's endpoint and installed packages, the metrics
token, every ``[[keys]]`` table (unique names and digests, known categories) and how ``[auth] mode``,
the upstream key and ``[[keys]]`` fit together. Each failure raises ``SettingsError`` naming the key.
"""

from __future__ import annotations

import importlib.util
import re
from urllib.parse import urlsplit

from gateway.config.schema import TRACING_INSTALL, Settings, SettingsError, TracingSettings
from gateway.endpoints import CATEGORIES


def check_settings(s: Settings, *, check_auth: bool = True) -> None:
    """Raise ``SettingsError`` for the first rule ``s`` breaks (``check_auth=False``: see ``load_settings``)."""
    url = urlsplit(s.upstream.url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise SettingsError(f"[upstream] url: must be an http(s) URL with a host, got {s.upstream.url!r}")
    if url.query or url.fragment:
        raise SettingsError("[upstream] url: must not carry a query or fragment")
    if s.port > 65535:
        raise SettingsError(f"port: must be at most 65535, got {s.port}")
    if not s.host:
        raise SettingsError("host: must not be empty")
    if not s.catalog.routable_health:
        raise SettingsError("[catalog] routable_health: must name at least one health status")
    _check_tracing(s.tracing)
    if s.usage.database_url and urlsplit(s.usage.database_url).scheme not in ("postgres", "postgresql"):
        raise SettingsError("[usage] database_url: must be a postgresql:// URL (its scheme is not shown here)")
    if s.metrics.token_sha256 and not _SHA256_HEX.fullmatch(s.metrics.token_sha256.lower()):
        raise SettingsError("[metrics] token_sha256: must be 64 hex digits (the SHA-256 of the scrape token)")

    retention = s.usage.raw_retention_days
    if 0 < retention < 32:
        raise SettingsError(
            "[usage] raw_retention_days: must be 0 (keep all) or at least 32, so that monthly budgets "
            f"are seeded from the raw rows at start-up, got {retention}"
        )
    _check_keys(s)
    _check_aliases(s)
    if check_auth:
        _check_auth(s)


def _check_auth(s: Settings) -> None:
    """How ``[auth] mode``, the upstream key and ``[[keys]]`` must fit together to serve."""
    has_key = bool(s.upstream.api_key)
    mode = s.auth.mode
    if s.keys and mode != "keys":
        raise SettingsError(
            f'[[keys]] are defined but [auth] mode is {mode or "not set"}: set mode = "keys" to use them'
        )
    if mode == "keys" and not s.keys:
        raise SettingsError('[auth] mode: "keys" needs at least one [[keys]] table (`gateway keys new NAME` makes one)')
    if mode == "keys" and not has_key:
        raise SettingsError('[auth] mode: "keys" sends the gateway\'s upstream key, but none is set')
    if mode is None and has_key:
        raise SettingsError(
            "[auth] mode: an upstream key is set (GATEWAY_UPSTREAM_API_KEY or [upstream] api_key) but no "
            "way to authenticate clients is: anyone who reaches the gateway would spend that key. "
            'Set [auth] mode = "keys" and give each caller a gateway key (`gateway keys new NAME` prints one '
            'and its [[keys]] table), or set [auth] mode = "open" (or GATEWAY_AUTH_MODE=open) to accept an '
            "open relay explicitly."
        )
    if mode == "passthrough" and has_key:
        raise SettingsError(
            '[auth] mode: "passthrough" forwards each client\'s own key, so an upstream key must not be set '
            '(remove it, or use mode = "open")'
        )
    if mode == "open" and not has_key:
        raise SettingsError('[auth] mode: "open" sends the gateway\'s upstream key, but none is set')


def _check_tracing(t: TracingSettings) -> None:
    if t.endpoint:
        url = urlsplit(t.endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise SettingsError(f"[tracing] endpoint: must be an http(s) URL with a host, got {t.endpoint!r}")
    if not t.service_name:
        raise SettingsError("[tracing] service_name: must not be empty")
    if t.enabled:
        needed = ["opentelemetry.sdk.trace"]
        if t.exporter == "otlp":
            needed.append("opentelemetry.exporter.otlp.proto.http.trace_exporter")
        missing = [name for name in needed if not _installed(name)]
        if missing:
            raise SettingsError(
                f"[tracing] enabled: tracing needs OpenTelemetry, which is not installed ({', '.join(missing)} "
                f"not found): {TRACING_INSTALL}, or turn tracing off"
            )


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported (its parent packages are imported to find out)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _check_keys(s: Settings) -> None:
    names: set[str] = set()
    digests: set[str] = set()
    for i, key in enumerate(s.keys):
        where = f"[[keys]] #{i + 1}" + (f" ({key.name})" if key.name else "")
        if not key.name:
            raise SettingsError(f"{where}: name is required")
        if key.name in names:
            raise SettingsError(f"{where}: the name {key.name!r} is used twice")
        digest = key.key_sha256.lower()
        if not _SHA256_HEX.fullmatch(digest):
            raise SettingsError(f"{where}: key_sha256 must be 64 hex digits (the SHA-256 of the key)")
        if digest in digests:
            raise SettingsError(f"{where}: the same key_sha256 is used twice")
        unknown = set(c.lower() for c in key.categories or ()) - CATEGORIES
        if unknown:
            raise SettingsError(f"{where}: unknown categories {sorted(unknown)}; known: {sorted(CATEGORIES)}")
        if key.models is not None and not all(key.models):
            raise SettingsError(f"{where}: models must be non-empty globs")
        names.add(key.name)
        digests.add(digest)


def _check_aliases(s: Settings) -> None:
    names: set[str] = set()
    for i, alias in enumerate(s.aliases):
        where = f"[[aliases]] #{i + 1}" + (f" ({alias.name})" if alias.name else "")
        if not alias.name:
            raise SettingsError(f"{where}: name is required")
        if alias.name in names:
            raise SettingsError(f"{where}: the name {alias.name!r} is used twice")
        if not alias.models or not all(alias.models):
            raise SettingsError(f"{where}: models must list at least one catalog model name")
        if alias.name in alias.models:
            raise SettingsError(f"{where}: an alias cannot list itself")
        names.add(alias.name)
