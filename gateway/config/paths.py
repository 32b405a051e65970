"""File paths in the settings, made absolute when the settings load (never at import).

``[usage] path`` defaults to ``$XDG_STATE_HOME/flexai-gateway/usage.db``: the XDG state directory,
or ``~/.local/state`` when ``XDG_STATE_HOME`` is unset or not absolute (the XDG spec ignores a
relative one). A configured path may begin with ``$XDG_STATE_HOME`` or ``~`` too; any other relative
path is taken from the working directory at start-up. The result is absolute, so the server, its
logs and ``gateway usage`` name one file whatever directory they later run from. ``""`` stays ``""``
(no ledger).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

from gateway.config.schema import Settings, SettingsError

XDG_STATE_HOME = "$XDG_STATE_HOME"


def with_resolved_paths(settings: Settings, env: Mapping[str, str]) -> Settings:
    """``settings`` with ``[usage] path`` absolute (see the module docstring)."""
    path = resolve_path(settings.usage.path, env)
    if path == settings.usage.path:
        return settings
    return dataclasses.replace(settings, usage=dataclasses.replace(settings.usage, path=path))


def resolve_path(raw: str, env: Mapping[str, str]) -> str:
    """An absolute path for ``raw`` ("" stays "")."""
    if not raw:
        return ""
    if raw == XDG_STATE_HOME or raw.startswith(XDG_STATE_HOME + "/"):
        path = state_home(env) / raw.removeprefix(XDG_STATE_HOME).lstrip("/")
    elif raw == "~" or raw.startswith("~/"):
        path = _home(env) / raw[1:].lstrip("/")
    else:
        path = Path(raw)
    return os.path.abspath(path)  # a relative path: from the working directory, now


def state_home(env: Mapping[str, str]) -> Path:
    """``$XDG_STATE_HOME`` when set to an absolute path, else ``~/.local/state``."""
    configured = env.get("XDG_STATE_HOME", "")
    if configured and Path(configured).is_absolute():
        return Path(configured)
    return _home(env) / ".local" / "state"


def _home(env: Mapping[str, str]) -> Path:
    home = env.get("HOME", "")
    if home and Path(home).is_absolute():
        return Path(home)
    try:
        return Path.home()  # the user database when HOME is not set
    except RuntimeError:
        raise SettingsError(
            "[usage] path: no home directory to put the usage ledger in; set [usage] path"
            " (GATEWAY_USAGE_PATH) to an absolute path, or XDG_STATE_HOME"
        ) from None
