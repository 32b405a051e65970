"""Run the gateway under uvicorn: the common path of ``gateway serve`` and ``gateway demo``.

The uvicorn options ``serve`` uses (``uvicorn_options``, also read by bench/), the SIGTERM handling
that makes a completed graceful shutdown exit 0, the SQLite ledger made ready before serving
(``prepare_ledger``), and a server on a socket already bound that says when it serves
(``serve_on_socket``, for the demo's banner).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.config import Settings
from gateway.ops.heap import freeze_startup_heap
from gateway.ops.logs import configure as configure_logging
from gateway.usage.writes import prepare

if TYPE_CHECKING:
    import uvicorn


def run(settings: Settings, config_path: Path | None = None, workers: int = 1) -> None:
    """Serve until stopped (``gateway serve``): in this process, or in ``workers`` uvicorn workers."""
    import uvicorn

    from gateway.app import create_app

    configure_logging(settings.log_level, settings.log_format)
    prepare_ledger(settings)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it under the handler it found: make
    # that handler exit 0, since a requested, completed shutdown is a success.
    signal.signal(signal.SIGTERM, exit_after_graceful_shutdown)
    app: Any = "gateway.app:create_app_from_env" if workers > 1 else create_app(settings, config_path=config_path)
    freeze_startup_heap()  # (each worker of --workers N does it in create_app_from_env)
    uvicorn.run(app, factory=workers > 1, workers=workers if workers > 1 else None, **uvicorn_options(settings))


def prepare_ledger(settings: Settings) -> None:
    """Create or migrate the SQLite ledger before serving (``gateway.usage.writes.prepare``): a file
    the gateway cannot use stops the command with one line (``LedgerError``), and ``--workers N``
    find it migrated already."""
    usage = settings.usage
    if usage.path and not usage.database_url:
        prepare(Path(usage.path))


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """How `gateway serve` runs uvicorn (also used by bench/ to measure exactly that)."""
    from functools import partial

    from gateway.server.protocol import LimitedHttpToolsProtocol

    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": False,
        "server_header": False,
        "proxy_headers": False,
        "lifespan": "on",
        "timeout_graceful_shutdown": settings.server.shutdown_grace,
        "log_config": None,  # keep the handlers configure_logging installed
        # httptools with the [limits] connection limits (a partial pickles into --workers N processes).
        "http": partial(LimitedHttpToolsProtocol, limits=settings.limits),
        "timeout_keep_alive": settings.limits.keepalive_timeout,
    }


def exit_after_graceful_shutdown(signum: int, frame: object) -> None:
    """The SIGTERM handler uvicorn re-raises under after its graceful shutdown: exit 0."""
    sys.exit(0)


def serve_on_socket(
    settings: Settings,
    sock: socket.socket,
    on_started: Callable[[], None],
    *,
    config_path: Path | None,
    env: Mapping[str, str],
) -> None:
    """Run the gateway as `serve` does, on a socket already bound; ``on_started`` runs once it serves."""
    import uvicorn

    from gateway.app import create_app

    configure_logging(settings.log_level, settings.log_format)
    prepare_ledger(settings)
    signal.signal(signal.SIGTERM, exit_after_graceful_shutdown)  # as in run
    app = create_app(settings, config_path=config_path, env=env)
    freeze_startup_heap()
    _announcing_server(uvicorn.Config(app, **uvicorn_options(settings)), on_started).run(sockets=[sock])


def _announcing_server(config: uvicorn.Config, on_started: Callable[[], None]) -> uvicorn.Server:
    """A uvicorn server that calls ``on_started`` once its start-up is complete and it serves."""
    import uvicorn

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit:
                on_started()

    return AnnouncingServer(config)


def discard_stdout() -> None:
    """The reader of stdout has gone: send what is still buffered (and anything printed later,
    such as the interpreter's flush at exit) to /dev/null instead of a second BrokenPipeError."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
