"""Logs: JSON lines by default off a terminal, the access line as fields, nothing secret, no forged
console lines."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import httpx
import orjson
import pytest

from gateway.ops.json_log import JsonFormatter
from gateway.ops.logs import ConsoleFormatter, configure
from gateway.server.thread import LocalServer
from tests.helpers.gateway import CHAT_MODEL
from tests.helpers.processes import free_port, running, stop, wait_ready


def test_json_formatter_writes_access_fields_as_the_line() -> None:
    record = logging.LogRecord("gateway.access", logging.INFO, __file__, 1, "POST /v1/x 200", None, None)
    record.access = {"request_id": "r1", "status": 200}
    line = orjson.loads(JsonFormatter().format(record))
    assert line["logger"] == "gateway.access"
    assert (line["request_id"], line["status"], line["level"]) == ("r1", 200, "info")
    assert "message" not in line
    plain = logging.LogRecord("gateway.catalog.cache", logging.WARNING, __file__, 1, "refresh %s", ("failed",), None)
    assert orjson.loads(JsonFormatter().format(plain))["message"] == "refresh failed"


def test_serve_logs_json_lines_with_one_access_line_per_request(tmp_path: Path, upstream: LocalServer) -> None:
    port = free_port()
    env = {"GATEWAY_UPSTREAM_URL": upstream.url, "GATEWAY_USAGE_PATH": ""}
    with running(["serve", "--port", str(port)], env, tmp_path) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        answer = httpx.post(
            url + "/v1/chat/completions",
            json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "PRIVATE TEXT"}]},
            headers={"authorization": "Bearer sk-client-secret", "x-request-id": "log-test-1"},
            timeout=10,
        )
        assert answer.status_code == 200
        code, out = stop(proc, signal.SIGTERM)
    assert code == 0
    lines = [orjson.loads(line) for line in out.splitlines() if line.strip()]  # every line is JSON
    access = [line for line in lines if line["logger"] == "gateway.access"]
    assert [(a["request_id"], a["status"], a["model"]) for a in access] == [("log-test-1", 200, CHAT_MODEL)]
    assert any(line["logger"].startswith("uvicorn") for line in lines)  # uvicorn's own lines too
    assert "sk-client-secret" not in out
    assert "PRIVATE TEXT" not in out


def test_auto_format_is_json_off_a_terminal_and_console_is_readable(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
        configure("info", "auto")
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
        monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
        configure("info", "auto")
        assert not isinstance(root.handlers[0].formatter, JsonFormatter)
        configure("warning", "console")
        record = logging.LogRecord("gateway.catalog.cache", logging.WARNING, __file__, 1, "refresh failed", None, None)
        line = root.handlers[0].format(record)
        assert " WARNING gateway.catalog.cache: refresh failed" in line
        assert root.level == logging.WARNING
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def test_console_log_lines_cannot_be_forged() -> None:
    forged = "/v1/x\r\n2026-01-01 00:00:00,000 INFO    gateway.access: forged\x1b[2J\u2028"
    record = logging.LogRecord("gateway.access", logging.INFO, __file__, 1, "GET %s 404", (forged,), None)
    line = ConsoleFormatter().format(record)
    assert "\n" not in line
    assert "\r" not in line
    assert "\x1b" not in line
    assert "\u2028" not in line
    assert "/v1/x\\r\\n2026-01-01" in line
    try:
        raise ValueError("bad\n2026-01-01 00:00:00,000 INFO    gateway.access: forged")
    except ValueError:
        record = logging.LogRecord("gateway", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    lines = ConsoleFormatter().format(record).split("\n")
    assert all(line.startswith("    ") for line in lines[1:])  # a traceback never passes for a record
