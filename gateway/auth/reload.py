"""Reload gateway keys without a restart: on SIGHUP, and when the config file changes on disk.

A reload validates the whole file exactly as start-up does. A bad file is refused with a log line
and the running keys keep serving; a good one swaps the key ring in one assignment (atomic for the
requests in flight). Other settings whose value in the file (or environment) changed since
start-up are reported as needing a restart; the settings the process was started with (command-line
flags such as ``--port`` included) are not compared with the file, so only a real change is reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import threading
from collections.abc import Mapping
from pathlib import Path

from gateway.auth.keys import KeyRing
from gateway.auth.middleware import HasKeyRing
from gateway.config import Settings, SettingsError, load_settings

logger = logging.getLogger("gateway.auth.reload")


class KeyReloader:
    def __init__(self, path: Path, env: Mapping[str, str], running: Settings, runtime: HasKeyRing) -> None:
        self._path = path
        self._env = env
        self._running = running
        self._runtime = runtime
        self._mtime = self._stat()
        # What the file and environment said at start-up, before any command-line override: a later
        # reload is compared with this, so a flag such as --port is not mistaken for a change.
        self._started_from = self._load_quietly() or running
        self.reloads = 0

    def _load_quietly(self) -> Settings | None:
        try:
            return load_settings(self._path, self._env)
        except SettingsError:
            return None

    def reload(self) -> bool:
        """Apply the file's keys if the file is valid; True when applied."""
        self._mtime = self._stat()
        try:
            new = load_settings(self._path, self._env)
        except SettingsError as exc:
            logger.error("config reload refused, the running keys keep serving: %s", exc)
            return False
        if new.auth_mode != "keys":
            logger.error("config reload refused: [auth] mode changed to %r (needs a restart)", new.auth_mode)
            return False
        self._runtime.keys = KeyRing(new.keys)
        self.reloads += 1
        changed = changed_settings(self._started_from, new)
        if changed:
            logger.warning(
                "config reloaded: %d keys; changed since start-up, applied only after a restart: %s",
                len(new.keys),
                ", ".join(changed),
            )
        else:
            logger.info("config reloaded: %d keys", len(new.keys))
        return True

    def _stat(self) -> float | None:
        try:
            return os.stat(self._path).st_mtime
        except OSError:
            return None

    async def watch(self, interval: float) -> None:
        """Reload on SIGHUP (main thread only) and whenever the file's mtime changes."""
        loop = asyncio.get_running_loop()
        on_main_thread = threading.current_thread() is threading.main_thread()
        if on_main_thread:
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            while interval > 0:
                await asyncio.sleep(interval)
                if self._stat() != self._mtime:
                    self.reload()
            await asyncio.Event().wait()  # SIGHUP only: wait to be cancelled
        finally:
            if on_main_thread:
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(signal.SIGHUP)


def changed_settings(old: Settings, new: Settings) -> list[str]:
    """The settings other than ``[[keys]]`` that differ, named as in the file (``port``,
    ``[catalog] ttl``)."""
    changed: list[str] = []
    for f in dataclasses.fields(Settings):
        if f.name == "keys":
            continue
        before, after = getattr(old, f.name), getattr(new, f.name)
        if before == after:
            continue
        if dataclasses.is_dataclass(before) and dataclasses.is_dataclass(after):
            changed.extend(
                f"[{f.name}] {sub.name}"
                for sub in dataclasses.fields(before)
                if getattr(before, sub.name) != getattr(after, sub.name)
            )
        else:
            changed.append(f.name)
    return changed
