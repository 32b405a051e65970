"""Gateway processes for the tests that run the `gateway` command: a free port, start, wait until
ready, stop by signal. Every process is stopped by its own pid."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

# The console script of this venv's install.
GATEWAY = str(Path(sys.executable).parent / "gateway")


def free_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def wait_ready(url: str, proc: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    """Poll ``url``/readyz until the gateway process ``proc`` is ready (bounded); fail if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the gateway exited during start-up"
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("the gateway did not become ready in time")


def clean_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any GATEWAY_* setting (GATEWAY_CONFIG included), then ``env``."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} | (env or {})


@contextmanager
def running(args: list[str], env: dict[str, str], cwd: Path) -> Iterator[subprocess.Popen[str]]:
    """Start a gateway process (none of this process's GATEWAY_* settings, then ``env``); always
    stop it by its pid."""
    proc = subprocess.Popen(  # noqa: S603 - our own console script
        [GATEWAY, *args],
        cwd=cwd,
        env=clean_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def stop(proc: subprocess.Popen[str], sig: signal.Signals) -> tuple[int, str]:
    """Send ``sig``; the exit status and all the output."""
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=15)
    return proc.returncode, out
