"""A real PostgreSQL server for the tests of the usage ledger: a cluster made by ``initdb`` in a
temporary directory, ``postgres`` listening on a free loopback port (its socket in that directory
too), stopped by its pid. Each test takes a fresh database of its own (``PostgresServer.database``).

The server refuses to run as root, so as root (CI) both run as the ``postgres`` user that Debian's
package creates, in a directory that user owns. A missing binary is a failure, not a skip:
`make test` installs Debian's ``postgresql`` (tests/system-packages.sh). Debian keeps the binaries in
/usr/lib/postgresql/<version>/bin (not on PATH); the newest version there wins, else PATH.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from tests.helpers.processes import free_port

DEBIAN_BINARIES = Path("/usr/lib/postgresql")
INSTALL_HINT = "make test installs it (tests/system-packages.sh): apt-get install postgresql"


def binaries() -> Path:
    """The directory holding ``initdb`` and ``postgres``."""
    versions = sorted(
        (p for p in DEBIAN_BINARIES.glob("*/bin") if (p / "postgres").is_file() and (p / "initdb").is_file()),
        key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.name)] or [0],
    )
    if versions:
        return versions[-1]
    found = shutil.which("initdb")
    assert found is not None, f"PostgreSQL (initdb, postgres) is not installed ({INSTALL_HINT})"
    return Path(found).resolve().parent


@dataclass(frozen=True)
class PostgresServer:
    proc: subprocess.Popen[bytes]
    port: int

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new, empty database; its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # a name made here, not input
        return self.url(name)

    def pause(self) -> None:
        """SIGSTOP the server, then each of its processes (every backend runs in a session of its
        own, so not as a process group): connections stay open, nothing answers."""
        self.proc.send_signal(signal.SIGSTOP)
        for pid in children(self.proc.pid):
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in children(self.proc.pid):
            os.kill(pid, signal.SIGCONT)
        self.proc.send_signal(signal.SIGCONT)


def children(parent: int) -> list[int]:
    """The pids of ``parent``'s child processes (from /proc)."""
    found: list[int] = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # the process ended meanwhile
            continue
        if fields and int(fields[1]) == parent:
            found.append(int(stat.parent.name))
    return found


def _as_postgres() -> dict[str, Any]:
    """Popen arguments that run a command as the ``postgres`` user when this process is root."""
    if os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam("postgres")  # made by Debian's package
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def ready(port: int) -> bool:
    try:
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=1):
            return True
    except psycopg.OperationalError:
        return False


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = binaries()
    who = _as_postgres()
    # Not under pytest's tmp_path: its parent is private to root, so the postgres user could not reach it.
    directory = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
    try:
        if who:
            os.chown(directory, who["user"], who["group"])
        data = directory / "data"
        initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--locale=C"]  # fmt: skip
        subprocess.run(initdb, check=True, capture_output=True, timeout=120, **who)  # noqa: S603
        port = free_port()
        settings = {"listen_addresses": "127.0.0.1", "port": str(port), "unix_socket_directories": str(directory),
                    "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
                    "shared_buffers": "32MB", "max_connections": "200"}  # fmt: skip
        argv = [str(bin_dir / "postgres"), "-D", str(data)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        log = (directory / "server.log").open("wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=log, **who)  # noqa: S603
        log.close()
        try:
            for _ in range(300):  # at most ~30 s
                if ready(port):
                    break
                assert proc.poll() is None, "postgres exited at start: " + _tail(directory / "server.log")
                time.sleep(0.1)
            else:
                raise AssertionError("postgres did not accept connections within 30 s")
            yield PostgresServer(proc, port)
        finally:
            PostgresServer(proc, port).resume()  # a paused server cannot act on SIGINT
            proc.send_signal(signal.SIGINT)  # "fast" shutdown: ends the sessions, then stops
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-2000:]
    except OSError:
        return "(no log)"
