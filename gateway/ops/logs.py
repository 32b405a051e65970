"""Logging for the gateway process: JSON lines, or a readable console format on a terminal.

Every logger (the gateway's, uvicorn's) goes through one handler on stderr (``configure``). An
access record carries its fields in ``record.access``: the JSON format (``gateway.ops.json_log``,
whose handler buffers the access log's lines) writes them as the line itself, the console format
as a short summary.

Log text may hold what a client sent (a request path decodes ``%0d%0a`` to CR LF): the JSON format
escapes control characters as JSON does, and the console format writes them as ``\\r``, ``\\n``,
``\\xNN``, so that one record is one line and a client cannot forge another.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, Literal

from gateway.ops.json_log import JsonHandler

LogFormat = Literal["auto", "json", "console"]
CONSOLE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

# C0 controls, DEL and C1 controls, and the Unicode line and paragraph separators.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED_ESCAPES = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (``\\r``, ``\\n``, ``\\x1b``, ...)."""
    return _CONTROL.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED_ESCAPES.get(char) or (f"\\x{ord(char):02x}" if ord(char) <= 0xFF else f"\\u{ord(char):04x}")


class ConsoleFormatter(logging.Formatter):
    """The readable format: one line per record, control characters escaped. A traceback keeps its
    lines, each indented, so that no line of it can pass for a record of its own."""

    def __init__(self) -> None:
        super().__init__(CONSOLE_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("    " + escape_controls(line) for line in text.split("\n"))


def configure(level: str, log_format: LogFormat) -> None:
    """Route every logger through one stderr handler in the chosen format."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    handler: logging.Handler
    if use_json:
        handler = JsonHandler(sys.stderr)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(ConsoleFormatter())
    root = logging.getLogger()
    for previous in root.handlers:
        if isinstance(previous, JsonHandler):
            previous.close()  # writes its buffered lines, stops its writer
    root.handlers = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
    # httpx logs every request (with its URL) at INFO: not an access log, and noisy.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
