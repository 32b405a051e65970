"""The gateway's settings: the schema (``schema``), its loader (``loader``) and cross-field checks (``checks``).

The rest of the code imports the public names from here: ``from gateway.config import Settings, load_settings``.
"""

from gateway.config.loader import DEFAULT_CONFIG_PATH, ENV_PREFIX, load_settings, resolve_config_path
from gateway.config.schema import (
    TRACING_INSTALL,
    AuthMode,
    AuthSettings,
    CacheRule,
    CacheSettings,
    CatalogSettings,
    KeySettings,
    LimitsSettings,
    LogFormat,
    LogLevel,
    MetricsSettings,
    ServerSettings,
    Settings,
    SettingsError,
    TracingExporter,
    TracingSettings,
    UpstreamClient,
    UpstreamSettings,
    UsageSettings,
    ValidationMode,
    ValidationSettings,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ENV_PREFIX",
    "TRACING_INSTALL",
    "AuthMode",
    "AuthSettings",
    "CacheRule",
    "CacheSettings",
    "CatalogSettings",
    "KeySettings",
    "LimitsSettings",
    "LogFormat",
    "LogLevel",
    "MetricsSettings",
    "ServerSettings",
    "Settings",
    "SettingsError",
    "TracingExporter",
    "TracingSettings",
    "UpstreamClient",
    "UpstreamSettings",
    "UsageSettings",
    "ValidationMode",
    "ValidationSettings",
    "load_settings",
    "resolve_config_path",
]
