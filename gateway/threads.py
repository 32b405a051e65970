"""Background threads yield the gateway's CPU to its event loop.

The gateway's writers (the access log's, the usage ledger's, the roll-up keeper's) run on threads
of the serving process. Where that process has one core to itself, as in a pinned deployment or
a container limited to one CPU, a writer that wakes up takes the core from the event loop for a
scheduler time slice (milliseconds): the requests in flight wait, and the latency percentiles
show it. ``background_priority`` lowers the calling thread's scheduling priority (Linux: a
thread's nice value is its own), so the kernel gives the event loop the core first and the writer
what the loop leaves; at nice 10 a writer still gets about a tenth of a busy core, many times what
the ledger and the log need at full load, so nothing falls behind. It also shows the thread's
Python name to the operating system (Linux: ``top -H``, ``ps -L``, /proc), where every thread
would otherwise bear the process's name: an operator can tell the writers from the event loop.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Final

# The nice value of background threads (0 is the default, 19 the lowest priority).
BACKGROUND_NICE: Final = 10


def background_priority() -> None:
    """Lower the calling thread's priority to BACKGROUND_NICE, never raise it, then show its name
    (where the platform allows it; a platform or a sandbox that does not is left as it is)."""
    thread = threading.get_native_id()
    if hasattr(os, "setpriority"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, thread, max(BACKGROUND_NICE, os.getpriority(os.PRIO_PROCESS, thread)))
    with contextlib.suppress(OSError):  # Linux keeps 15 bytes of a thread's name
        Path(f"/proc/self/task/{thread}/comm").write_text(threading.current_thread().name[:15])


def idle_priority() -> None:
    """``background_priority``, then the idle scheduling policy (Linux ``SCHED_IDLE``) where the
    platform has it: a thread that runs only when nothing else wants the core, and gives it up
    the moment the event loop does. A nice-10 writer that is running when a request arrives keeps
    the core a little longer: confined to one core, the event loop waited ~2 us a request for the
    ledger's writer (``bench/threads.py``), and the one-client p99 showed it. The price: such a
    thread gets next to nothing of a core the event loop keeps busy, and an unprivileged thread
    cannot leave the policy again, so its user must be able to move its work to a thread of
    ``background_priority`` when it falls behind (``gateway.usage.ledger`` does)."""
    background_priority()
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
