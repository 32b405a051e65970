"""One write for a response's head and its body, where uvicorn makes two.

uvicorn's response cycle writes the status line and headers when the app sends
``http.response.start``, and the body when it sends ``http.response.body``: two ``send`` system
calls for an answer the gateway hands over whole, and a system call is the dearest thing on the
relay path (~5-10 us here, as much as the gateway's admission of a request). ``HeadCork`` is the
transport the cycle writes to (``LimitedHttpToolsProtocol`` gives it one per request): it holds
the head until the next write, which then goes out with it in one call, or until the end of the
event loop's current iteration, so a streamed answer whose first chunk is not there yet still
sends its head at once. Everything else goes to the connection's transport as it is.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

# Past this many bytes a body is not copied onto the head: the two go out as two writes.
MAX_JOINED: Final = 1 << 16


class HeadCork:
    """The transport of one response cycle: holds its first write (the head) until the second."""

    __slots__ = ("_flush_handle", "_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._held: bytes | None = None
        self._flush_handle: asyncio.Handle | None = None  # set by the first write: the head was given
        self._loop = loop

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if self._flush_handle is not None:
                self._flush_handle.cancel()
            if len(data) <= MAX_JOINED:
                self._transport.write(held + data)
            else:
                self._transport.write(held)
                self._transport.write(data)
        elif self._flush_handle is None:  # the first write: hold it for the next one (or this iteration's end)
            self._held = data
            self._flush_handle = self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        """Write what is held (at the end of the loop iteration of the head's write, or before a close)."""
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:  # anything else uvicorn may ask of its transport
        return getattr(self._transport, name)
