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
