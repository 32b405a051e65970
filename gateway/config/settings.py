"""Frozen, validated settings from a TOML file and ``GATEWAY_*`` environment variables.

Every setting lives in a section dataclass below; its type and bounds are the schema. A TOML key
``[section] key`` is overridden by the environment variable ``GATEWAY_SECTION_KEY`` (top-level keys:
``GATEWAY_KEY``). Unknown keys, wrong types and out-of-range values raise ``SettingsError`` naming
the key, before any socket is bound.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from gateway.endpoints import CATEGORIES

DEFAULT_CONFIG_PATH = Path("config/gateway.toml")
ENV_PREFIX = "GATEWAY_"

AuthMode = Literal["passthrough", "open", "keys"]
ValidationMode = Literal["enforce", "warn", "off"]
UpstreamClient = Literal["aiohttp", "httpx"]
LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
TracingExporter = Literal["otlp", "console"]

# What to run when [tracing] is on but OpenTelemetry is not installed.
TRACING_INSTALL = "pip install 'flexai-gateway[tracing]'"


class SettingsError(ValueError):
    """A setting is missing, unknown or invalid; the message names the key."""


def _bounded(
    default: float | None, *, gt: float | None = None, ge: float | None = None, le: float | None = None
) -> Any:
    return field(default=default, metadata={"gt": gt, "ge": ge, "le": le})


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    url: str = "https://tokens.flex.ai"
    # The HTTP client behind the upstream seam: "aiohttp" (fastest, the default) or "httpx".
    client: UpstreamClient = "aiohttp"
    api_key: str = field(default="", repr=False)
    connect_timeout: float = _bounded(10.0, gt=0)
    first_byte_timeout: float = _bounded(600.0, gt=0)
    idle_timeout: float = _bounded(300.0, gt=0)
    write_timeout: float = _bounded(60.0, gt=0)
    max_connections: int = _bounded(512, ge=1)
    max_keepalive_connections: int = _bounded(128, ge=0)
    keepalive_expiry: float = _bounded(30.0, ge=0)
    # Extra attempts for a request that certainly did not reach the upstream (connection failures)
    # or that it refused with 429/503 and a Retry-After of at most retry_max_wait seconds.
    retries: int = _bounded(2, ge=0)
    retry_max_wait: float = _bounded(2.0, ge=0)
    # The gateway's own cap on requests to the upstream (0: none): at once, and per minute. A request
    # waits up to queue_timeout seconds for room, then gets 429 upstream_capacity.
    concurrency: int = _bounded(0, ge=0)
    rpm: int = _bounded(0, ge=0)
    queue_timeout: float = _bounded(5.0, ge=0)
    # Circuit breaker per model: open after this many consecutive upstream failures (0: off) ...
    breaker_failures: int = _bounded(5, ge=0)
    # ... for this many seconds, then let one probe request through.
    breaker_cooldown: float = _bounded(30.0, gt=0)
    # Send the client's address upstream as X-Forwarded-For (and X-Forwarded-Proto). The client's own
    # Forwarded / X-Forwarded-* / X-Real-IP headers are never relayed either way.
    forward_client_ip: bool = False


@dataclass(frozen=True, slots=True)
class CatalogSettings:
    ttl: float = _bounded(60.0, gt=0)
    fetch_timeout: float = _bounded(5.0, gt=0)
    max_staleness: float = _bounded(86400.0, ge=0)
    unknown_model_refresh_interval: float = _bounded(5.0, ge=0)
    refresh_backoff_max: float = _bounded(60.0, gt=0)
    routable_health: tuple[str, ...] = field(default=("healthy", "degraded"), metadata={"lower": True})


@dataclass(frozen=True, slots=True)
class LimitsSettings:
    max_body_bytes: int = _bounded(32 * 1024 * 1024, ge=1)
    # Requests relayed at once; beyond it an immediate 503 "overloaded" (0: no cap).
    max_in_flight: int = _bounded(1000, ge=0)
    # Connection limits (gateway.server.protocol), before the app sees a request. The header block
    # (request line and headers): its size and number of headers (431 beyond either).
    max_header_bytes: int = _bounded(64 * 1024, ge=1024)
    max_headers: int = _bounded(100, ge=1)
    # Seconds to send the whole header block, and a request body's longest stall (408 for both).
    header_timeout: float = _bounded(10.0, gt=0)
    body_timeout: float = _bounded(30.0, gt=0)
    # Open client connections per process; beyond it an immediate 503 "too_many_connections" (0: no cap).
    max_connections: int = _bounded(2048, ge=0)
    # Seconds an idle kept-alive connection stays open, and requests per connection (0: no cap).
    keepalive_timeout: float = _bounded(5.0, gt=0)
    max_keepalive_requests: int = _bounded(1000, ge=0)


@dataclass(frozen=True, slots=True)
class ServerSettings:
    # Seconds in-flight requests and streams may take to finish after SIGTERM before they are stopped
    # (gateway.ops.drain: meanwhile /readyz answers 503 and new requests are refused).
    shutdown_grace: int = _bounded(30, ge=0)


@dataclass(frozen=True, slots=True)
class ValidationSettings:
    """Per check: "enforce" (refuse with 400), "warn" (forward, flag in a header and the log), "off"."""

    shape: ValidationMode = "enforce"
    tools: ValidationMode = "enforce"
    vision: ValidationMode = "enforce"
    streaming: ValidationMode = "enforce"
    max_output: ValidationMode = "enforce"
    context_window: ValidationMode = "enforce"


@dataclass(frozen=True, slots=True)
class UsageSettings:
    # The SQLite usage ledger (relative paths are from the working directory); "" turns it off.
    path: str = "usage.db"
    # Seconds between batched writes: at most this much is lost on a crash.
    flush_interval: float = _bounded(1.0, gt=0)
    # Ask the upstream for usage on streamed chat/completions (the extra chunk is hidden again).
    include_usage: bool = True
    # Add the request's cost (usage.cost_usd) to the usage chunk of streams whose client asked for usage.
    stream_cost: bool = True


@dataclass(frozen=True, slots=True)
class TracingSettings:
    # OpenTelemetry spans per proxied request (needs the `tracing` extra). Off: nothing is imported.
    enabled: bool = False
    # "otlp": OTLP over HTTP/protobuf to `endpoint`; "console": spans as JSON lines on stderr.
    exporter: TracingExporter = "otlp"
    # The collector's traces URL (http://collector:4318/v1/traces); "": the OTel SDK's default and
    # its OTEL_EXPORTER_OTLP_* environment variables.
    endpoint: str = ""
    service_name: str = "flexai-gateway"
    # Share of new traces recorded; a request that arrives with a traceparent follows its sampled flag.
    sample_ratio: float = _bounded(1.0, ge=0, le=1)


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    # Keys mode: /metrics lists every key's name, tokens and spend, so it answers only an admin key
    # or the scrape token below. True opens it to anyone who reaches the gateway (other modes: open).
    public: bool = False
    # SHA-256 (hex) of a bearer token that may read /metrics and nothing else (for Prometheus).
    token_sha256: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class KeySettings:
    """One gateway key: who it is, the SHA-256 of its secret, and its policy ([[keys]] tables)."""

    name: str = ""
    key_sha256: str = field(default="", repr=False)
    team: str | None = None
    models: tuple[str, ...] | None = None  # globs on model_name; None = all
    categories: tuple[str, ...] | None = None  # None = all
    rpm: int | None = _bounded(None, ge=1)
    tpm: int | None = _bounded(None, ge=1)
    budget_usd_daily: float | None = _bounded(None, gt=0)
    budget_usd_monthly: float | None = _bounded(None, gt=0)
    disabled: bool = False
    expires: datetime | None = None
    admin: bool = False  # may read /admin/*


@dataclass(frozen=True, slots=True)
class AuthSettings:
    # None means "choose": passthrough without an upstream key; an upstream key needs an explicit mode.
    mode: AuthMode | None = None
    # Seconds between checks of the config file for changed keys (0: only on SIGHUP).
    reload_interval: float = _bounded(5.0, ge=0)


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = _bounded(8080, ge=0)
    log_level: LogLevel = "info"
    # "json" lines, "console" (readable), or "auto": console on a terminal, else json.
    log_format: LogFormat = "auto"
    # One line per request on the `gateway.access` logger (never keys or bodies).
    access_log: bool = True
    server: ServerSettings = field(default_factory=ServerSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    catalog: CatalogSettings = field(default_factory=CatalogSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    usage: UsageSettings = field(default_factory=UsageSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    keys: tuple[KeySettings, ...] = ()

    @property
    def auth_mode(self) -> AuthMode:
        """The effective mode (validated by ``load_settings``)."""
        return self.auth.mode or "passthrough"


def resolve_config_path(explicit: str | None, env: Mapping[str, str]) -> Path | None:
    """--config, else GATEWAY_CONFIG, else config/gateway.toml when present, else built-in defaults."""
    chosen = explicit or env.get(ENV_PREFIX + "CONFIG")
    if chosen:
        path = Path(chosen)
        if not path.is_file():
            raise SettingsError(f"config file {chosen!r} does not exist")
        return path
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None


def load_settings(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    check_auth: bool = True,
) -> Settings:
    """Build and validate Settings: defaults < TOML file < environment < ``overrides`` (CLI flags).

    ``check_auth=False`` skips the checks that tie ``[auth] mode``, ``[upstream] api_key`` and
    ``[[keys]]`` together (each key table is still validated): for commands that never serve, such
    as ``gateway usage``, which reads only the ledger.
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"cannot read config file {str(path)!r}: {exc}") from exc
    settings: Settings = _build(Settings, data, env, section=None, overrides=overrides or {})
    _check_cross_field(settings, check_auth=check_auth)
    return settings


def _build(
    cls: type[Any],
    data: Mapping[str, Any],
    env: Mapping[str, str],
    section: str | None,
    overrides: Mapping[str, Any],
) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise SettingsError(f"unknown setting {_label(section, key)}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            sub = data.get(name, {})
            if not isinstance(sub, dict):
                raise SettingsError(f"[{name}] must be a table")
            values[name] = _build(hint, sub, env, section=name, overrides={})
            continue
        table_cls = _table_list_item(hint)
        if table_cls is not None:
            # [[name]] tables are set in the file only (no environment overrides).
            tables = data.get(name, [])
            if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
                raise SettingsError(f"[[{name}]] must be a list of tables")
            values[name] = tuple(
                _build(table_cls, t, {}, section=f"{name}[{i}]", overrides={}) for i, t in enumerate(tables)
            )
            continue
        env_name = ENV_PREFIX + (f"{section}_{name}" if section else name).upper()
        label = _label(section, name)
        if section is None and name in overrides and overrides[name] is not None:
            raw, source = overrides[name], "command line"
        elif env_name in env:
            raw, source = env[env_name], "env"
        elif name in data:
            raw, source = data[name], "toml"
        else:
            continue
        where = env_name if source == "env" else label
        value = _coerce(raw, hint, where, from_env=source == "env")
        if f.metadata.get("lower"):
            value = tuple(v.lower() for v in value)
        _check_bounds(value, f.metadata, where)
        values[name] = value
    return cls(**values)


def _table_list_item(hint: Any) -> type[Any] | None:
    """The dataclass of a ``tuple[SomeTable, ...]`` field, else None."""
    if typing.get_origin(hint) is tuple:
        (item, *_rest) = typing.get_args(hint)
        if isinstance(item, type) and dataclasses.is_dataclass(item):
            return item
    return None


def _label(section: str | None, key: str) -> str:
    return f"[{section}] {key}" if section else key


def _coerce(raw: Any, hint: Any, where: str, *, from_env: bool) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        (hint,) = [a for a in args if a is not type(None)]
        return _coerce(raw, hint, where, from_env=from_env)
    if origin is Literal:
        value = raw.strip().lower() if isinstance(raw, str) else raw
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise SettingsError(f"{where}: must be one of {choices}, got {raw!r}")
        return value
    if origin is tuple:
        if from_env and isinstance(raw, str):
            raw = [part.strip() for part in raw.split(",") if part.strip()]
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            raise SettingsError(f"{where}: must be a list of strings, got {raw!r}")
        return tuple(x.strip() for x in raw)
    if hint is datetime:
        return _datetime(raw, where)
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if (
            from_env
            and isinstance(raw, str)
            and raw.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off")
        ):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        raise SettingsError(f"{where}: must be true or false, got {raw!r}")
    if hint in (int, float):
        return _number(raw, hint, where, from_env=from_env)
    if hint is str:
        if not isinstance(raw, str):
            raise SettingsError(f"{where}: must be a string, got {raw!r}")
        return raw.strip()
    raise SettingsError(f"{where}: unsupported setting type {hint!r}")  # pragma: no cover


def _datetime(raw: Any, where: str) -> datetime:
    """A TOML date or datetime (or an ISO 8601 string); naive values are UTC."""
    if isinstance(raw, str):
        try:
            raw = datetime.fromisoformat(raw.strip())
        except ValueError:
            raise SettingsError(f"{where}: must be a date or date-time (ISO 8601), got {raw!r}") from None
    if isinstance(raw, date) and not isinstance(raw, datetime):
        raw = datetime(raw.year, raw.month, raw.day)
    if not isinstance(raw, datetime):
        raise SettingsError(f"{where}: must be a date or date-time, got {raw!r}")
    return raw if raw.tzinfo is not None else raw.replace(tzinfo=UTC)


def _number(raw: Any, hint: type[int] | type[float], where: str, *, from_env: bool) -> int | float:
    kind = "an integer" if hint is int else "a number"
    if from_env and isinstance(raw, str):
        try:
            raw = hint(raw.strip())
        except ValueError:
            raise SettingsError(f"{where}: must be {kind}, got {raw!r}") from None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or (hint is int and isinstance(raw, float)):
        raise SettingsError(f"{where}: must be {kind}, got {raw!r}")
    value = hint(raw)
    if value != value or value in (float("inf"), float("-inf")):
        raise SettingsError(f"{where}: must be a finite number, got {raw!r}")
    return value


def _check_bounds(value: Any, metadata: Mapping[str, Any], where: str) -> None:
    gt, ge, le = metadata.get("gt"), metadata.get("ge"), metadata.get("le")
    if gt is not None and not value > gt:
        raise SettingsError(f"{where}: must be greater than {gt}, got {value!r}")
    if ge is not None and not value >= ge:
        raise SettingsError(f"{where}: must be at least {ge}, got {value!r}")
    if le is not None and not value <= le:
        raise SettingsError(f"{where}: must be at most {le}, got {value!r}")


def _check_cross_field(s: Settings, *, check_auth: bool = True) -> None:
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
    if s.metrics.token_sha256 and not _SHA256_HEX.fullmatch(s.metrics.token_sha256.lower()):
        raise SettingsError("[metrics] token_sha256: must be 64 hex digits (the SHA-256 of the scrape token)")

    _check_keys(s)
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
