"""Run an ASGI app under uvicorn on a background thread, with its own event loop.

The listening socket is bound here, before uvicorn starts, so ``port=0`` picks a free port
that is known before the first request. ``serve_in_thread`` returns once uvicorn reports
that it is serving and stops it (bounded) when the ``with`` block ends. uvicorn installs
signal handlers only in the main thread, so a server in a thread leaves Ctrl-C to the
caller. Used by ``gateway demo`` (the simulated upstream) and by the tests.

uvicorn's ``log_level`` sets the level of the process's one ``uvicorn.error`` logger: a server
beside another (the demo's upstream beside the gateway) would log at the other's level. So the
records made on this server's thread are held to its own ``log_level`` (``warning`` by default):
the demo shows one start and one shutdown, the gateway's.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import uvicorn
from starlette.types import ASGIApp

START_TIMEOUT_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 10.0
_POLL_SECONDS = 0.01
_DEFAULT_CONFIG: MappingProxyType[str, Any] = MappingProxyType(
    {
        "log_level": "warning",
        "access_log": False,
        "lifespan": "on",
        # As `gateway serve`: the peer address is the socket's, never a client's X-Forwarded-For.
        "proxy_headers": False,
        # Open streams get this long to finish once shutdown starts, then they are cancelled.
        "timeout_graceful_shutdown": 3,
    }
)


@dataclass(frozen=True)
class LocalServer:
    """Where a server started by ``serve_in_thread`` listens."""

    host: str
    port: int
    url: str


class _ServerThread(threading.Thread):
    """Runs ``uvicorn.Server.run`` on one pre-bound socket and keeps what it raised."""

    def __init__(self, server: uvicorn.Server, sock: socket.socket) -> None:
        super().__init__(name=f"uvicorn-{sock.getsockname()[1]}", daemon=True)
        self.server = server
        self.sock = sock
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as exc:  # uvicorn ends a failed startup with sys.exit()
            self.error = exc

    def wait_started(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.is_alive():
                raise RuntimeError("uvicorn exited before it started serving") from self.error
            if time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start within {timeout} s")
            time.sleep(_POLL_SECONDS)

    def stop(self, timeout: float) -> None:
        self.server.should_exit = True
        self.join(timeout)
        if self.is_alive():  # a connection that never ends: stop waiting for it
            self.server.force_exit = True
            self.join(timeout)
        if self.is_alive():
            raise RuntimeError(f"uvicorn thread {self.name} did not stop within {2 * timeout} s")


class _ThreadLevel(logging.Filter):
    """Lets through records made on other threads, and this thread's from ``level`` up."""

    def __init__(self, thread_name: str, level: int) -> None:
        super().__init__()
        self._thread_name = thread_name
        self._level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self._level or record.threadName != self._thread_name


def _level(log_level: object) -> int | None:
    """uvicorn's ``log_level`` option (a name or a number) as a number; None when it is unset."""
    if isinstance(log_level, str):
        return uvicorn.config.LOG_LEVELS[log_level.lower()]
    return log_level if isinstance(log_level, int) else None


def bind_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A TCP socket listening on host:port (port 0: a free one); closed again if binding fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.contextmanager
def serve_in_thread(
    app: ASGIApp, *, host: str = "127.0.0.1", port: int = 0, **uvicorn_config_kwargs: Any
) -> Iterator[LocalServer]:
    """Serve ``app`` on ``host:port`` in a daemon thread for the duration of the block.

    ``uvicorn_config_kwargs`` go to ``uvicorn.Config`` and override the defaults
    (``log_level="warning"``, ``access_log=False``, ``lifespan="on"``,
    ``timeout_graceful_shutdown=3``). Raises ``RuntimeError`` if the server does not start
    within ``START_TIMEOUT_SECONDS`` or does not stop within twice ``STOP_TIMEOUT_SECONDS``.
    """
    sock = bind_socket(host, port)
    try:
        bound_port: int = sock.getsockname()[1]
        options = {**_DEFAULT_CONFIG, **uvicorn_config_kwargs}
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=bound_port, **options))
        thread = _ServerThread(server, sock)
        level = _level(options.get("log_level"))
        held = None if level is None else _ThreadLevel(thread.name, level)
        server_logger = logging.getLogger("uvicorn.error")
        if held is not None:
            server_logger.addFilter(held)
        thread.start()
        try:
            thread.wait_started(START_TIMEOUT_SECONDS)
            yield LocalServer(host=host, port=bound_port, url=_url(host, bound_port))
        finally:
            try:
                thread.stop(STOP_TIMEOUT_SECONDS)
            finally:
                if held is not None:
                    server_logger.removeFilter(held)
        if thread.error is not None:
            raise RuntimeError("uvicorn thread failed") from thread.error
    finally:
        sock.close()
