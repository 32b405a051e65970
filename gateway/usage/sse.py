"""Split a server-sent event stream into events, incrementally, as its chunks arrive.

An ``SseSplitter`` is fed the chunks of one ``text/event-stream`` body and reports, per chunk, the
events that ended in it: where each ended in the chunk, its data (the values of its ``data:``
lines joined by LF) and whether it had lines other than ``data:`` lines. Events and lines may be
split across chunks at any byte; a line ends with LF, CRLF or CR (a CRLF split between two chunks is
one line end); a blank line ends an event. Memory is bounded: a line, or an event's data, longer
than ``max_event_bytes`` is not kept, and its event is reported without data. Nothing is copied
when a line lies within one chunk.

This is the framing only (the WHATWG "event stream interpretation" for ``data`` lines, without
``event``/``id``/``retry`` semantics); ``gateway.usage.meter`` decides what an event means.
"""

from __future__ import annotations

from typing import Final

# An SSE event (or line) longer than this is not inspected, and not held back for stripping.
MAX_EVENT_BYTES: Final = 1 << 20

_CR: Final = 0x0D
_LF: Final = 0x0A
_COLON: Final = 0x3A

# One event that ended in a chunk: (end, data, data_only).
# - end: the offset in the chunk just past the blank line that ended the event (past its LF too
#   when a CRLF lies in the chunk; a CR at the chunk's very end: see ``SseSplitter.cr_pending``).
# - data: the values of its ``data:`` lines joined by LF (``b""`` for one empty ``data:``), or None
#   when it had none, or a line or its data exceeded ``max_event_bytes``.
# - data_only: whether every line of the event was a ``data:`` line (no comments, ``event:``, ...).
# A plain tuple rather than a class: one is made per event on the relay's hot path.
SseEvent = tuple[int, bytes | None, bool]


class SseSplitter:
    """Finds the events of one event stream across its chunks.

    ``events = splitter.feed(chunk)`` for each chunk, in order; ``splitter.close()`` at the end
    gives the data of an event the stream ended (or was cut) inside, if any. After each ``feed``:
    ``lead`` is 1 when the chunk's first byte was the LF of a CRLF whose CR ended the previous
    chunk (that LF belongs to the previous chunk's last line end), else 0; ``cr_pending`` tells
    whether the chunk ended with a CR (whose LF, if any, starts the next chunk).
    """

    __slots__ = (
        "_data",
        "_data_only",
        "_data_size",
        "_event_oversize",
        "_line",
        "_line_oversize",
        "_max_event",
        "cr_pending",
        "lead",
    )

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._max_event = max_event_bytes
        self._line = bytearray()  # the unfinished line's bytes from earlier chunks (no line end)
        self._line_oversize = False  # ... which grew past max_event_bytes (its bytes are dropped)
        self._data: list[bytes] = []  # the current event's data values
        self._data_size = 0
        self._data_only = True  # the current event has data lines only (so far)
        self._event_oversize = False  # the current event is past max_event_bytes: reported without data
        self.cr_pending = False
        self.lead = 0

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """The events that end in ``chunk``, in order (see ``SseEvent``); an empty chunk changes nothing."""
        events: list[SseEvent] = []
        n = len(chunk)
        if not n:
            self.lead = 0
            return events
        pos = 0
        if self.cr_pending:
            self.cr_pending = False
            if chunk[0] == _LF:  # the LF of a CRLF that the previous chunk's CR started
                pos = 1
        self.lead = pos
        find = chunk.find
        next_cr = find(b"\r", pos)
        next_lf = find(b"\n", pos)
        line = self._line
        if next_cr < 0 and next_lf < 0:  # no line end: all of the chunk continues the current line
            if not self._line_oversize and pos < n:  # _keep_partial, inlined: the case of most small chunks
                if len(line) + n - pos > self._max_event:
                    line.clear()
                    self._line_oversize = True
                else:
                    line += chunk[pos:] if pos else chunk
            return events
        data = self._data
        max_event = self._max_event
        while pos < n:
            if 0 <= next_cr < pos:
                next_cr = find(b"\r", pos)
            if 0 <= next_lf < pos:
                next_lf = find(b"\n", pos)
            if next_cr < 0:
                if next_lf < 0:
                    self._keep_partial(chunk, pos, n)
                    break
                j = next_lf
            elif next_lf < 0 or next_cr < next_lf:
                j = next_cr
            else:
                j = next_lf
            end = j + 1
            if j == next_cr:
                if end < n:
                    if chunk[end] == _LF:
                        end += 1
                else:
                    self.cr_pending = True
            # The line is chunk[pos:j], after what earlier chunks held of it.
            if line or self._line_oversize:
                self._keep_partial(chunk, pos, j)
                pos = end
                if self._line_oversize:
                    self._line_oversize = False
                    self._event_oversize = True
                    data.clear()
                    continue
                value = bytes(line)
                line.clear()
            elif j == pos:  # a blank line: the event ends
                pos = end
                if data and not self._event_oversize:
                    events.append((end, data[0] if len(data) == 1 else b"\n".join(data), self._data_only))
                    data.clear()
                else:
                    events.append((end, None, self._data_only))
                self._data_size = 0
                self._event_oversize = False
                self._data_only = True
                continue
            elif j - pos > max_event:
                pos = end
                self._event_oversize = True
                data.clear()
                continue
            else:
                value = chunk[pos:j]
                pos = end
            if self._event_oversize:
                continue
            if not value.startswith(b"data"):
                self._data_only = False
                continue
            if len(value) == 4:
                value = b""
            elif value[4] == _COLON:
                value = value[6:] if value[5:6] == b" " else value[5:]
            else:  # another field whose name starts with "data"
                self._data_only = False
                continue
            self._data_size += len(value)
            if self._data_size > max_event:
                self._event_oversize = True
                data.clear()
            else:
                data.append(value)
        return events

    def close(self) -> bytes | None:
        """The data of the event the stream ended inside (its unfinished last line included), or None.

        The splitter is then empty (as new, ready for another stream).
        """
        if self._line and not self._line_oversize:
            self.feed(b"\n")  # end the last line; it cannot end the event (the line is not blank)
        data = self._data
        result = None
        if data and not self._event_oversize:
            result = data[0] if len(data) == 1 else b"\n".join(data)
        data.clear()
        self._line.clear()
        self._line_oversize = False
        self._data_size = 0
        self._data_only = True
        self._event_oversize = False
        self.cr_pending = False
        self.lead = 0
        return result

    def _keep_partial(self, chunk: bytes, start: int, stop: int) -> None:
        """Hold ``chunk[start:stop]``, a part of an unfinished line, unless the line grew too long."""
        if start >= stop or self._line_oversize:
            return
        if len(self._line) + stop - start > self._max_event:
            self._line.clear()
            self._line_oversize = True
            return
        self._line += chunk if start == 0 and stop == len(chunk) else chunk[start:stop]
