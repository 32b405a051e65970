"""The ledger writes on an idle-priority thread that gives the core up at once to the event loop
(gateway.threads.idle_priority), and moves to its background-priority thread when the core is
kept busy, so that no record waits for a core it never gets: checked with a real process burning
the one CPU the ledger's threads may use."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.usage.ledger import Ledger
from tests.usage.test_ledger import rec

pytestmark = pytest.mark.skipif(
    not (hasattr(os, "sched_setaffinity") and hasattr(os, "SCHED_IDLE")), reason="Linux scheduling facilities"
)


def written(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0])


def cpu_ns(name: str) -> int:
    """The CPU time (ns, schedstat) of the live thread whose Python name is ``name``."""
    (thread,) = [t for t in threading.enumerate() if t.name == name]
    return int(Path(f"/proc/self/task/{thread.native_id}/schedstat").read_text().split()[0])


@pytest.fixture
def one_busy_cpu() -> Iterator[int]:
    """This thread (and the threads it starts) confined to one CPU that a busy-looping process of
    normal priority keeps busy; both undone afterwards (the process stopped by its pid)."""
    before = os.sched_getaffinity(0)
    cpu = min(before)
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(burner.pid, {cpu})
        os.sched_setaffinity(0, {cpu})
        yield cpu
    finally:
        os.sched_setaffinity(0, before)
        burner.kill()
        burner.wait(timeout=10)


async def test_a_starved_idle_writer_hands_its_rounds_to_the_background_one(
    tmp_path: Path, one_busy_cpu: int, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "usage.db"
    # ~0.6 s of a core's work: at the hundredth or less of the CPU the burner leaves an idle-policy
    # thread, over a minute (without the hand-over this fails); the background one gets a tenth.
    count = 60_000
    caplog.set_level(logging.INFO, logger="gateway.usage.ledger")
    async with Ledger(path, flush_interval=0.05) as ledger:
        for i in range(count):
            ledger.record(rec(i))
        for _ in range(600):  # 30 s at most
            if not ledger.pending and written(path) == count:
                break
            await asyncio.sleep(0.05)
        assert written(path) == count
        assert ledger.dropped == 0
    assert any("the idle writer fell behind" in r.getMessage() for r in caplog.records)


async def test_a_writer_with_the_core_to_spare_stays_idle(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "usage.db"
    caplog.set_level(logging.INFO, logger="gateway.usage.ledger")
    # A batch of 500 rows is a few ms of a core's work: it hands over only if it takes over a second.
    async with Ledger(path, flush_interval=1.0) as ledger:
        before = {name: cpu_ns(name) for name in ("ledger-idle_0", "ledger_0")}  # (both opened the file)
        for i in range(500):
            ledger.record(rec(i))
        for _ in range(600):  # 30 s at most
            if written(path) == 500:
                break
            await asyncio.sleep(0.05)
        assert written(path) == 500
        # The idle thread wrote them; the background one, waiting for work, used no CPU meanwhile.
        assert cpu_ns("ledger-idle_0") > before["ledger-idle_0"]
        assert cpu_ns("ledger_0") == before["ledger_0"]
    assert not any("fell behind" in r.getMessage() for r in caplog.records)
