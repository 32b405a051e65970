"""The settings schema: frozen section dataclasses whose field types and bounds are the rules.

Each ``[section]`` of the TOML file is one dataclass below and ``Settings`` holds them all; a field's
type (including the ``Literal`` choices) and its ``_bounded`` metadata are what the loader
(``gateway.config.loader``) checks every value against. Nothing here reads a file or the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

AuthMode = Literal["passthrough", "open", "keys"]
ValidationMode = Literal["enforce", "warn", "off"]
UpstreamClient = Literal["builtin", "aiohttp", "httpx"]
LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
TracingExporter = Literal["otlp", "console"]
CacheMode = Literal["auto", "always", "never"]
CachePartition = Literal["key", "team", "global"]
CacheBilling = Literal["free", "full"]
SharedFallback = Literal["local", "open", "closed"]
RoutingStrategy = Literal["ordered", "cheapest", "fastest"]

# What to run when [tracing] is on but OpenTelemetry is not installed.
TRACING_INSTALL = "pip install 'flexai-gateway[tracing]'"
# ... and when [shared] redis_url is set but redis-py is not installed.
SHARED_INSTALL = "pip install 'flexai-gateway[shared]'"
# ... and when [usage] database_url is set but psycopg is not installed.
POSTGRES_INSTALL = "pip install 'flexai-gateway[postgres]'"


class SettingsError(ValueError):
    """A setting is missing, unknown or invalid; the message names the key."""


def _bounded(
    default: float | None, *, gt: float | None = None, ge: float | None = None, le: float | None = None
) -> Any:
    return field(default=default, metadata={"gt": gt, "ge": ge, "le": le})


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    url: str = "https://tokens.flex.ai"
    # The HTTP client behind the upstream seam: "builtin" (the gateway's own HTTP/1.1 client on
    # httptools: the least CPU per request, the default), "aiohttp" or "httpx".
    client: UpstreamClient = "builtin"
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
    # Live health: seconds between two reads of the upstream's GET /api/status (0: not read).
    status_interval: float = _bounded(10.0, ge=0)
    # Per-model readings whose health data is older than this many seconds are not used.
    status_max_age: float = _bounded(300.0, gt=0)


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
    # The SQLite usage ledger, made absolute on load (gateway.config.paths); "" turns it off.
    path: str = "$XDG_STATE_HOME/flexai-gateway/usage.db"
    # Seconds between batched writes: at most this much is lost on a crash.
    flush_interval: float = _bounded(1.0, gt=0)
    # The ledger of record on PostgreSQL (gateway.usage.postgres); "" keeps the SQLite file above.
    database_url: str = field(default="", repr=False)  # may hold a password
    # Seconds a batch of records may stay unconfirmed with one replica before another takes it over.
    claim_after: float = _bounded(30.0, gt=0)
    # Ask the upstream for usage on streamed chat/completions (the extra chunk is hidden again).
    include_usage: bool = True
    # Add the request's cost (usage.cost_usd) to the usage chunk of streams whose client asked for usage.
    stream_cost: bool = True
    # Days of raw ledger rows kept (0: all); older rows are deleted, their hourly and daily roll-ups kept.
    raw_retention_days: int = _bounded(0, ge=0)
    # Seconds between roll-up refreshes (reports stay exact in between: they read the newer rows too).
    rollup_interval: float = _bounded(2.0, gt=0)


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
class ConsoleSettings:
    # The operator's web console under /console (docs/console.md): keys mode needs an admin key; the
    # other modes answer the gateway's own host (loopback) only.
    enabled: bool = True
    # Seconds between the live panel's updates in the browser.
    live_interval: float = _bounded(5.0, ge=1)
    # Hours a console sign-in lasts (a signed cookie; removing or disabling the key ends it at once).
    session_hours: float = _bounded(12.0, gt=0)


@dataclass(frozen=True, slots=True)
class SharedSettings:
    redis_url: str = field(default="", repr=False)  # may hold a password
    key_prefix: str = "gw"
    timeout: float = _bounded(0.1, gt=0)  # seconds for one Redis call, connecting included
    fallback: SharedFallback = "local"
    breaker_failures: int = _bounded(3, ge=1)
    breaker_cooldown: float = _bounded(5.0, gt=0)
    reservation_deadline: float = _bounded(3600.0, gt=0)
    heartbeat_interval: float = _bounded(2.0, gt=0)


@dataclass(frozen=True, slots=True)
class CacheRule:
    """One ``[[cache.rules]]`` table: the policy for an endpoint and/or a model (first match wins)."""

    endpoint: str = ""  # a /v1 path, e.g. "/v1/chat/completions"; "" = every endpoint
    model: str = ""  # a catalog model name (a glob); "" = every model
    # "auto": the built-in rule (embeddings always, chat and completions when deterministic, the
    # rest on the client's opt-in); "always": every request; "never": none.
    mode: CacheMode = "auto"
    ttl: float | None = _bounded(None, gt=0)  # seconds an answer stays fresh (capped by max_ttl)


@dataclass(frozen=True, slots=True)
class CacheSettings:
    enabled: bool = False
    max_bytes: int = _bounded(128 * 1024 * 1024, ge=0)  # memory for stored answers, in bytes
    max_entry_bytes: int = _bounded(4 * 1024 * 1024, ge=1)  # a larger answer is relayed, not stored
    ttl: float = _bounded(3600.0, gt=0)  # default freshness of a stored answer, in seconds
    max_ttl: float = _bounded(86400.0, gt=0)  # cap on any rule's ttl
    keep_stale: float = _bounded(300.0, ge=0)  # seconds an expired answer is kept for `max-stale`
    partition: CachePartition = "key"  # keys mode: whose answers a caller may receive
    collapse: bool = True  # identical requests in flight wait for the first one's answer
    collapse_timeout: float = _bounded(30.0, gt=0)  # ... at most this long for its headers
    bill_hits: CacheBilling = "free"  # what a cached answer costs its caller (budgets, cost header)
    rules: tuple[CacheRule, ...] = ()


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
    fallback: bool | None = None  # fall back to another model (docs/routing.md); None: the alias's or [routing]'s


@dataclass(frozen=True, slots=True)
class AliasSettings:
    """One ``[[aliases]]`` table: a model name clients use, served by one of ``models``."""

    name: str = ""
    models: tuple[str, ...] = ()  # catalog model names, in the order "ordered" tries them
    strategy: RoutingStrategy = "ordered"
    fallback: bool | None = None  # go on to the next model when the chosen one cannot serve (None: [routing]'s)


@dataclass(frozen=True, slots=True)
class RoutingSettings:
    # Fall back to another model when the chosen one cannot serve (a key, an alias or the request's
    # x-gateway-fallback header may say otherwise).
    fallback: bool = False
    # How a request to a catalog model name (no alias) with fallback ranks the other models of its
    # endpoint: "ordered" (catalog order), "cheapest" or "fastest".
    strategy: RoutingStrategy = "cheapest"
    # Models one request may be sent to, the first included.
    max_attempts: int = _bounded(3, ge=1)
    # Seconds from a request's arrival after which no further model is tried (0: [upstream] first_byte_timeout).
    deadline: float = _bounded(0.0, ge=0)
    # "fastest": the time to first byte of this many latest requests per model.
    fastest_window: int = _bounded(20, ge=1)


@dataclass(frozen=True, slots=True)
class AuthSettings:
    # None means "choose": passthrough without an upstream key; an upstream key needs an explicit mode.
    mode: AuthMode | None = None
    # Seconds between checks of the config file for changed keys, aliases and routing (0: only on SIGHUP).
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
    cache: CacheSettings = field(default_factory=CacheSettings)
    shared: SharedSettings = field(default_factory=SharedSettings)
    console: ConsoleSettings = field(default_factory=ConsoleSettings)
    keys: tuple[KeySettings, ...] = ()
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    aliases: tuple[AliasSettings, ...] = ()

    @property
    def auth_mode(self) -> AuthMode:
        """The effective mode (validated by ``load_settings``)."""
        return self.auth.mode or "passthrough"

    @property
    def sends_gateway_key(self) -> bool:
        """Whether the organisation's upstream key goes upstream (open and keys modes), not the
        client's: no client credential may follow it, and no answer may show it to a client."""
        return self.auth_mode in ("open", "keys") and bool(self.upstream.api_key)
