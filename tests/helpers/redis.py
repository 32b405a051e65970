"""A real redis-server for the tests of the shared state store: started in a temporary directory on
a free loopback port (no persistence), answered PING before it is used, stopped by its pid.

A missing binary is a failure, not a skip: `make test` installs Debian's redis-server (tests/system-packages.sh).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.processes import free_port


@dataclass(frozen=True)
class RedisServer:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def pause(self) -> None:
        """SIGSTOP: the server holds its connections and answers nothing (a stalled Redis)."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)


def ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def redis_server(directory: Path, port: int | None = None) -> Iterator[RedisServer]:
    """A server on ``port`` (default: a free one; a given port restarts a server where clients expect it)."""
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is not installed (make test installs it: apt-get install redis-server)"
    port = port or free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(directory), "--daemonize", "no"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
    try:
        for _ in range(200):  # at most ~10 s
            if ping(port):
                break
            assert proc.poll() is None, "redis-server exited at start"
            time.sleep(0.05)
        else:
            raise AssertionError("redis-server did not answer PING within 10 s")
        yield RedisServer(proc, port)
    finally:
        proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
