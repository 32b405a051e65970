"""Reload gateway keys without a restart: on SIGHUP, and when the config file changes on disk.

A reload validates the whole file exactly as start-up does. A bad file is refused with a log line
and the running keys keep serving; a good one swaps the key ring in one assignment (atomic for the
requests in flight). Other changed settings are reported as needing a restart.
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

from gateway.key_auth import HasKeyRing
from gateway.keys import KeyRing
from gateway.settings import Settings, SettingsError, load_settings

logger = logging.getLogger("gateway.reload")


class KeyReloader:
    def __init__(self, path: Path, env: Mapping[str, str], running: Settings, runtime: HasKeyRing) -> None:
        self._path = path
        self._env = env
        self._running = running
        self._runtime = runtime
        self._mtime = self._stat()
        self.reloads = 0

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
        others = [
            f.name
            for f in dataclasses.fields(Settings)
            if f.name != "keys" and getattr(new, f.name) != getattr(self._running, f.name)
        ]
        logger.info("config reloaded: %d keys%s", len(new.keys), f"; {', '.join(others)} need a restart" * bool(others))
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
