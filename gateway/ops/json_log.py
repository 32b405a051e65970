"""JSON log lines: their format (``JsonFormatter``), and the gateway's handler that writes them
(``JsonHandler``), with a buffered short way for the access log. ``gateway.ops.logs`` configures
logging with this handler when the format is JSON.

A record's line is one JSON object: ``time``, ``level``, ``logger``, then an access record's
fields (``record.access``) as the line itself, or else the message. Log text may hold what a
client sent (a request path decodes ``%0d%0a`` to CR LF): the JSON format escapes control
characters as JSON does, so that one record is one line and a client cannot forge another.

``JsonHandler`` writes a record at once, as ``logging.StreamHandler`` does. The
access log, a line per request, takes a shorter way when it can (``write_fields``): its line is
one ``orjson.dumps`` (the very text ``JsonFormatter`` makes of the record), appended to the
handler's buffer, which a writer thread writes every ``FLUSH_DELAY`` seconds (sooner once
``BATCH_LINES`` wait). Measured in the running gateway, a LogRecord, the logging machinery and a
write per request cost ~40 us of a request's CPU (~15 % at 64 clients); the short way ~8 us.

- A stderr that does not take what is written (a stalled pipe) stalls the writer thread, not the
  event loop. Only once ``MAX_LINES`` wait does the request path write them itself, and wait, as
  every log call did before: nothing is dropped, and the memory held stays bounded.
- Lines keep their order: the handler writes what is buffered before any other record (from any
  thread), and the writer and the records take the handler's lock to write.
- Lines go out as the bytes they are, below the text layer: into its buffer, or into the file
  itself when there is none (stderr under ``PYTHONUNBUFFERED=1``, as deploy/ runs the gateway),
  whole even when the file takes a part at a time.
- ``flush`` writes everything buffered: the services call it when they close (after the drain of
  a SIGTERM, once the last request has finished), logging calls it at exit, ``close`` too. Only a
  process killed outright (SIGKILL, a crash of the interpreter) loses what it held: at most the
  last ``FLUSH_DELAY`` seconds of lines.
- After a second without a line the writer waits for the next one instead of waking up.

The short way is taken only when the access record would reach nothing but the gateway's own JSON
handler, unfiltered (``sole_json_handler``): no handler or filter on ``gateway.access``,
``gateway`` or the root besides it, its level at most INFO and its formatter exactly a
``JsonFormatter``. Anything else (the console format, a test capturing with caplog, a handler an
operator added) gets the LogRecord, exactly as before.
"""

from __future__ import annotations

import errno
import functools
import io
import logging
import threading
import time
from collections import deque
from datetime import UTC, datetime
from typing import Any, Final, TextIO

import orjson

from gateway.threads import background_priority

# Buffered lines (``write_fields``) are written every this many seconds (each round wakes the
# writer's thread, which then takes the GIL from the event loop a few times: ten a second at most),
FLUSH_DELAY: Final = 0.1
# or as soon as this many wait;
BATCH_LINES: Final = 2048
# past this many waiting (stderr stalled), the caller writes them itself, and waits.
MAX_LINES: Final = 8192
# The writer stops waking up after this many rounds of FLUSH_DELAY without a line (a second).
_IDLE_ROUNDS: Final = 10


class UtcMillis:
    """Unix times (from 1970 on) as the JSON lines write them: ISO 8601 in UTC to the millisecond,
    e.g. ``2026-12-05T17:00:13.346+00:00``, the very text of ``datetime.fromtimestamp(ts,
    UTC).isoformat(timespec="milliseconds")`` (rounded to the microsecond, then truncated). Every
    line's ``time`` has this one form: a log pipeline maps a field to one type. The date and time
    to the second are made once a second, the rest looked up: ~0.3 us a time, against ~1.5 for
    ``datetime``'s. Safe from any thread (the second and its text are replaced together)."""

    __slots__ = ("_last", "_suffixes")

    def __init__(self) -> None:
        self._last = (-1, "")  # the last second seen, and its text
        self._suffixes = _millis_suffixes()

    def format(self, ts: float) -> str:
        second = int(ts)
        micros = round((ts - second) * 1e6)  # as datetime rounds (half to even); ts - second is exact
        if micros >= 1_000_000:
            second, micros = second + 1, micros - 1_000_000
        last = self._last
        if second != last[0]:
            last = self._last = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S."))
        return last[1] + self._suffixes[micros // 1000]


@functools.cache
def _millis_suffixes() -> tuple[str, ...]:
    """``"000+00:00"`` to ``"999+00:00"``: a time's milliseconds and zone (made once, on first use)."""
    return tuple(f"{millis:03d}+00:00" for millis in range(1000))


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._times = UtcMillis()

    def time_text(self, ts: float) -> str:
        """A unix time as this formatter writes a line's ``time`` (``UtcMillis``)."""
        return self._times.format(ts)

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self._times.format(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            line.update(access)
        else:
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class JsonHandler(logging.StreamHandler[TextIO]):
    """The gateway's handler for JSON lines: records as ``StreamHandler`` writes them, and lines
    already made (``write_line``) through a buffer that a thread writes (see the module docstring).

    ``delay``, ``batch_lines`` and ``max_lines`` default to ``FLUSH_DELAY``, ``BATCH_LINES`` and
    ``MAX_LINES``.
    """

    def __init__(
        self, stream: TextIO, *, delay: float = FLUSH_DELAY, batch_lines: int = BATCH_LINES, max_lines: int = MAX_LINES
    ) -> None:
        super().__init__(stream)
        self.setFormatter(JsonFormatter())
        self._delay = delay
        self._batch_lines = batch_lines
        self._max_lines = max_lines
        # The buffer: appended to without a lock (one deque.append, atomic), emptied only with the
        # handler's lock held (self.lock, as emit holds it), so that what goes out keeps its order.
        self._pending: deque[bytes] = deque()
        self._wake = threading.Event()  # a full batch, the first line after a pause, or close()
        self._writer: threading.Thread | None = None  # started with the first buffered line
        self._parked = False  # the writer waits for a line without a timeout (nothing came for a while)
        self._closing = False

    def write_line(self, line: bytes) -> None:
        """Buffer one line (UTF-8 JSON, with its newline), written within ``delay`` seconds or by
        ``flush``. From any thread; waits only when ``max_lines`` are already waiting."""
        pending = self._pending
        pending.append(line)
        if (self._parked or len(pending) >= self._batch_lines) and not self._wake.is_set():
            self._wake.set()  # (once: a set() per line would take the event's lock each time)
        if len(pending) >= self._max_lines or self._closing:
            self.flush()  # the writer is stalled (or gone): write, and wait, here
        elif self._writer is None:
            self._start_writer()

    def emit(self, record: logging.LogRecord) -> None:
        # Called with self.lock held (Handler.handle): the lines buffered before the record go first.
        self._write_pending()
        super().emit(record)

    def flush(self) -> None:
        """Write every buffered line, then flush the stream."""
        self.acquire()
        try:
            self._write_pending()
            super().flush()
        finally:
            self.release()

    def close(self) -> None:
        """Write what is buffered and stop the writer thread (later lines are written at once)."""
        self._closing = True
        self._wake.set()
        # Not joined: logging.shutdown calls this holding self.lock, which the writer may be waiting
        # for; it then finds nothing left and ends.
        self.flush()
        super().close()

    def _start_writer(self) -> None:
        self.acquire()
        try:
            if self._writer is None and not self._closing:
                self._writer = threading.Thread(target=self._run, name="log-writer", daemon=True)
                self._writer.start()
        finally:
            self.release()

    def _run(self) -> None:
        """The writer thread: every ``delay`` seconds (sooner for a full batch) write what is buffered;
        after a pause, wait for the next line without waking up."""
        background_priority()  # the event loop first (gateway.threads)
        pending, wake = self._pending, self._wake
        idle = 0
        while not self._closing:
            wake.wait(None if self._parked else self._delay)
            wake.clear()
            self._parked = False
            if not pending:
                idle += 1
                if idle >= _IDLE_ROUNDS:
                    self._parked = True  # then look again: a line appended before this is seen below
                    self._parked = not pending
                continue
            idle = 0
            self.acquire()
            try:
                self._write_pending()
            finally:
                self.release()

    def _write_pending(self) -> None:
        """Write what is buffered (with self.lock held)."""
        pending = self._pending
        count = len(pending)  # only grows meanwhile: these many are there to take
        if not count:
            return
        data = b"".join([pending.popleft() for _ in range(count)])
        try:
            # A text stream's bytes below it: a buffer, or the file itself (stderr under PYTHONUNBUFFERED=1).
            buffer = getattr(self.stream, "buffer", None)
            if isinstance(buffer, io.BufferedIOBase | io.RawIOBase):
                self.stream.flush()  # what records wrote through the text layer goes first
                _write_all(buffer, data)  # the lines are UTF-8 already: no decoding and encoding again
                buffer.flush()
            else:
                self.stream.write(data.decode())  # the same text the records' emit would write
                self.stream.flush()
        except RecursionError:
            raise
        except Exception:
            lost = logging.makeLogRecord({"msg": "%d buffered log lines were lost", "args": (count,)})
            self.handleError(lost)


def _write_all(below: io.BufferedIOBase | io.RawIOBase, data: bytes) -> None:
    """Write all of ``data`` below a text stream. A buffer takes it all at once; the file itself may
    take a part at a time (a pipe write that a signal interrupted), where the text layer would
    write once and drop the rest, cutting a line. Each round takes at least a byte, or this raises
    (a non-blocking file that is full: ``_write_pending`` reports the lines lost)."""
    view = memoryview(data)
    while view:
        written = below.write(view)
        if not written:  # None (it would block) or 0 (it took nothing)
            raise BlockingIOError(errno.EAGAIN, "the log stream took none of the buffered lines")
        view = view[written:]


def write_fields(logger: logging.Logger, fields: dict[str, Any], *, whole: bool = False) -> bool:
    """Write ``fields`` as the JSON line of an INFO record of ``logger`` whose ``access`` they are,
    straight into the gateway's JSON handler's buffer, when that handler is all the record would
    reach (see the module docstring). False: nothing was written, log the record the usual way.

    The line is what ``JsonFormatter`` writes for that record: ``time``, ``level``, ``logger``, then
    ``fields`` (whose own ``time``, if any, replaces the record's in first place). ``whole``: the
    fields are that line already (``time``, ``"level": "info"`` and ``logger`` first), as the access
    log builds it, sparing a copy."""
    handler = sole_json_handler(logger)
    if handler is None:
        return False
    if not whole:
        # "time" first: the fields' own time, or the time a record would have had, made the same way.
        formatter = handler.formatter
        assert isinstance(formatter, JsonFormatter)  # (sole_json_handler checked it)
        stamp = None if "time" in fields else formatter.time_text(time.time())
        fields = {"time": stamp, "level": "info", "logger": logger.name, **fields}
    try:
        line = orjson.dumps(fields, default=str, option=orjson.OPT_APPEND_NEWLINE)
    except orjson.JSONEncodeError:
        return False  # (text that is not UTF-8): the record's way, whose handler reports it
    handler.write_line(line)
    return True


def sole_json_handler(logger: logging.Logger) -> JsonHandler | None:
    """The ``JsonHandler`` an INFO record of ``logger`` would reach, if it reaches only that one,
    through no filter, and the handler formats with a ``JsonFormatter``; else None. (The caller
    has checked ``logger.isEnabledFor(logging.INFO)``.)"""
    if logger.disabled:
        return None
    found: JsonHandler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        for handler in current.handlers:
            if found is not None or type(handler) is not JsonHandler:
                return None
            found = handler
        if not current.propagate:
            break
        current = current.parent
    if found is None or found.filters or found.level > logging.INFO or type(found.formatter) is not JsonFormatter:
        return None
    return found


def flush() -> None:
    """Write what the root's handlers hold (the JSON handler's buffered lines): on shutdown."""
    for handler in logging.getLogger().handlers:
        handler.flush()
