"""Load the settings: defaults < TOML file < ``GATEWAY_*`` environment < command-line overrides.

A TOML key ``[section] key`` is overridden by the environment variable ``GATEWAY_SECTION_KEY``
(top-level keys: ``GATEWAY_KEY``). Every value is coerced to its field's type in
``gateway.config.schema`` and bounds-checked; unknown keys, wrong types and out-of-range values raise
``SettingsError`` naming the key (the environment variable when the value came from there), before
any socket is bound. The cross-field rules are ``gateway.config.checks``.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal

from gateway.config.checks import check_settings
from gateway.config.paths import with_resolved_paths
from gateway.config.schema import Settings, SettingsError
from gateway.jsonvalues import as_int

DEFAULT_CONFIG_PATH = Path("config/gateway.toml")
ENV_PREFIX = "GATEWAY_"


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
    settings = with_resolved_paths(settings, env)  # [usage] path made absolute, now
    check_settings(settings, check_auth=check_auth)
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
    if as_int(raw) is None and (hint is int or not isinstance(raw, float)):  # a float only where one is wanted
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
