"""The one primitive for a task that must answer after being cancelled.

asyncio cancels a task to stop it; the gateway sometimes cancels its own request task on purpose
(the client hung up, an idle upstream, the end of the shutdown grace) and then wants that task to
go on just long enough to end the exchange cleanly (an error answer, a last SSE event, a log
line). ``take_back_cancellation`` withdraws the pending cancellation from the current task
(``Task.uncancel``) so that later awaits in it are not cancelled again; call it only in the
``except CancelledError`` block of a cancellation the gateway itself caused, and re-raise every
other one.
"""

from __future__ import annotations

import asyncio


def take_back_cancellation() -> None:
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
