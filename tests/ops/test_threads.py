"""The gateway's writer threads run below the event loop's priority (gateway.threads), so that on a
core of their own they take it only when the loop leaves it, and bear their names where the
operating system shows threads (top -H): checked on the real threads."""

from __future__ import annotations

import io
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from gateway.ops.json_log import JsonHandler
from gateway.threads import BACKGROUND_NICE
from gateway.usage.ledger import Ledger
from gateway.usage.rollups import RollupKeeper
from tests.usage.test_ledger import rec

LINUX = sys.platform == "linux"  # where /proc shows each thread's name
pytestmark = pytest.mark.skipif(not hasattr(os, "getpriority"), reason="thread priorities are a POSIX facility")


def shown_names(prefix: str) -> list[str]:
    """What the operating system calls each live thread whose Python name starts with ``prefix``."""
    return [
        Path(f"/proc/self/task/{t.native_id}/comm").read_text().strip()
        for t in threading.enumerate()
        if t.name.startswith(prefix) and t.native_id is not None
    ]


def nice_of(prefix: str) -> list[int]:
    """The nice value of each live thread whose name starts with ``prefix``."""
    return [
        os.getpriority(os.PRIO_PROCESS, t.native_id)
        for t in threading.enumerate()
        if t.name.startswith(prefix) and t.native_id is not None
    ]


def policy_of(prefix: str) -> list[int]:
    """The scheduling policy of each live thread whose name starts with ``prefix``."""
    return [
        os.sched_getscheduler(t.native_id)
        for t in threading.enumerate()
        if t.name.startswith(prefix) and t.native_id is not None
    ]


async def test_the_ledger_and_roll_up_threads_run_at_background_priority(tmp_path: Path) -> None:
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    async with Ledger(tmp_path / "usage.db", flush_interval=0.01) as ledger:
        ledger.record(rec(1))
        keeper = RollupKeeper(tmp_path / "usage.db", interval=0.01)
        await keeper.start()
        try:
            # The ledger's two writers: the idle one (below) and the one it falls back on.
            assert nice_of("ledger") == [max(base, BACKGROUND_NICE)] * 2
            assert nice_of("rollups") == [max(base, BACKGROUND_NICE)]
            if LINUX:
                assert sorted(shown_names("ledger")) == ["ledger-idle_0", "ledger_0"]
                assert shown_names("rollups") == ["rollups_0"]
                assert policy_of("ledger_") == [os.SCHED_OTHER]
                assert policy_of("ledger-idle") == [os.SCHED_IDLE]
        finally:
            await keeper.aclose()
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # the loop's own is untouched
    if LINUX:
        assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_the_access_log_writer_runs_at_background_priority() -> None:
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    handler = JsonHandler(io.StringIO())
    try:
        handler.write_line(b'{"a":1}\n')  # the first buffered line starts the writer
        # The writer sets both as it starts: wait for it (bounded: 5 s).
        deadline = time.monotonic() + 5.0
        while nice_of("log-writer") != [max(base, BACKGROUND_NICE)] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert nice_of("log-writer") == [max(base, BACKGROUND_NICE)]
        while LINUX and shown_names("log-writer") != ["log-writer"] and time.monotonic() < deadline:
            time.sleep(0.01)
        if LINUX:
            assert shown_names("log-writer") == ["log-writer"]
    finally:
        handler.close()
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
