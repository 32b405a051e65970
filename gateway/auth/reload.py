"""Reload gateway keys without a restart: on SIGHUP, and when the config file changes on disk.

A reload validates the whole file exactly as start-up does. A bad file is refused with a log line
and the running keys keep serving; a good one swaps the key ring in one assignment (atomic for the
requests in flight), then hands the new settings to ``apply`` (the services' own swap of what else
is reloadable: ``[[aliases]]`` and ``[routing]``, named in ``applied``), in the same turn of the
event loop. Other settings whose value in the file (or environment) changed since
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
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

from gateway.auth.keys import KeyRing
from gateway.auth.middleware import HasKeyRing
from gateway.config import Settings, SettingsError, load_settings

logger = logging.getLogger("gateway.auth.reload")


class KeyReloader:
    def __init__(
        self,
        path: Path,
        env: Mapping[str, str],
        running: Settings,
        runtime: HasKeyRing,
        apply: Callable[[Settings], None] | None = None,
        applied: Collection[str] = (),
    ) -> None:
        """``apply`` swaps in the reloadable settings other than keys; ``applied`` names them (the
        ``Settings`` fields), so a change there is not reported as needing a restart."""
        self._path = path
        self._apply = apply
        self._reloaded = frozenset(("keys", *applied))
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
        if self._apply is not None:
            self._apply(new)  # no await in between: requests see the old settings or the new ones
        self.reloads += 1
        changed = changed_settings(self._started_from, new, self._reloaded)
        if changed:
            logger.warning(
                "config reloaded: %d keys, %d aliases; changed since start-up, applied only after a restart: %s",
                len(new.keys),
                len(new.aliases),
                ", ".join(changed),
            )
        else:
            logger.info("config reloaded: %d keys, %d aliases", len(new.keys), len(new.aliases))
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


def changed_settings(old: Settings, new: Settings, reloaded: Collection[str] = ("keys",)) -> list[str]:
    """The settings other than the ``reloaded`` ones (``[[keys]]``) that differ, named as in the
    file (``port``, ``[catalog] ttl``)."""
    changed: list[str] = []
    for f in dataclasses.fields(Settings):
        if f.name in reloaded:
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
