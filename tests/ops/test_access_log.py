"""The access log's short way (gateway.ops.json_log.write_fields): the same JSON line as the logging
path, written in batches by a thread, in order, never lost on flush or close, bounded in memory;
and the logging path whenever anything but the gateway's own JSON handler would see the record."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import queue
import random
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.accounting import Accounting, access_line_template, access_logger
from gateway.app import build_stack
from gateway.auth.keys import Caller
from gateway.config import load_settings
from gateway.exchange import Exchange, Outcome
from gateway.ops.json_log import JsonFormatter, JsonHandler, UtcMillis, sole_json_handler, write_fields
from gateway.ops.logs import ConsoleFormatter
from gateway.server.thread import LocalServer
from gateway.services import open_services
from gateway.usage.model import Usage
from tests.helpers.gateway import CHAT_MODEL, chat_body, wait_until
from tests.helpers.processes import free_port, running, stop, wait_ready

NEVER = 3600.0  # a flush delay no test waits out: only flush(), close(), emit() or a full buffer write
ACCESS_FIELDS: dict[str, Any] = {
    "time": "2026-01-01T00:00:00.123+00:00",
    "request_id": "req-1",
    "key": "alice",
    "team": None,
    "method": "POST",
    "endpoint": "/v1/chat/completions",
    "model": "Qwen2.5-32B-Instruct-FP8",
    "status": 200,
    "outcome": Outcome.COMPLETED,
    "error_code": None,
    "latency_ms": 12.34,
    "ttfb_ms": 3.5,
    "prompt_tokens": 12,
    "completion_tokens": 34,
    "cost_usd": 1.2e-05,
    "cache": None,
}


class Opaque:
    """A value JSON has no form for: both paths write its str()."""

    def __str__(self) -> str:
        return "opaque"


@contextmanager
def only_root(*handlers: logging.Handler) -> Iterator[list[logging.Handler]]:
    """The root logger with these handlers only (pytest's capture removed), at INFO; restored after."""
    root = logging.getLogger()
    saved, saved_level = root.handlers[:], root.level
    root.handlers[:] = handlers
    root.setLevel(logging.INFO)
    try:
        yield root.handlers
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = saved
        root.setLevel(saved_level)


def formatted(fields: dict[str, Any]) -> str:
    """What the logging path writes for an access record carrying ``fields`` (JsonFormatter + newline)."""
    record = logging.LogRecord("gateway.access", logging.INFO, __file__, 1, "summary", None, None)
    record.access = fields
    return JsonFormatter().format(record) + "\n"


@pytest.mark.parametrize(
    "fields",
    [
        ACCESS_FIELDS,
        {**ACCESS_FIELDS, "endpoint": '/v1/x\r\n{"forged": 1}\x1b[2J\u2028é中', "error_code": "not_found"},
        {**ACCESS_FIELDS, "cost_usd": 0.1 + 0.2, "latency_ms": 1e-7, "prompt_tokens": 2**53 - 1, "key": Opaque()},
    ],
)
def test_the_buffered_line_is_the_line_json_formatter_writes(fields: dict[str, Any]) -> None:
    stream = io.StringIO()
    with only_root(handler := JsonHandler(stream, delay=NEVER)):
        assert write_fields(access_logger, fields)
        assert stream.getvalue() == ""  # buffered
        handler.flush()
    assert stream.getvalue() == formatted(fields)
    line = orjson.loads(stream.getvalue())
    assert list(line)[:3] == ["time", "level", "logger"]
    assert (line["time"], line["level"], line["logger"]) == (fields["time"], "info", "gateway.access")


def test_fields_json_cannot_encode_take_the_logging_path() -> None:
    """A lone surrogate (not UTF-8): JsonFormatter fails on it as orjson does, so the record is
    handed to logging, whose handler reports the failure as it always did."""
    stream = io.StringIO()
    with only_root(handler := JsonHandler(stream, delay=NEVER)):
        assert not write_fields(access_logger, {**ACCESS_FIELDS, "endpoint": "/v1/\udc80"})
        handler.flush()
    assert stream.getvalue() == ""


def test_fields_without_a_time_get_the_records_kind_of_time() -> None:
    stream = io.StringIO()
    with only_root(JsonHandler(stream, delay=NEVER)):
        assert write_fields(logging.getLogger("gateway.other"), {"request_id": "r"})
    line = orjson.loads(stream.getvalue())  # (written by close)
    assert list(line) == ["time", "level", "logger", "request_id"]
    assert datetime.fromisoformat(line["time"]).tzinfo == UTC
    assert len(line["time"]) == len("2026-01-01T00:00:00.000+00:00")


def test_accounting_writes_the_same_access_line_either_way() -> None:
    """The access line of one request through the logging path (a plain StreamHandler with the
    JsonFormatter: the gateway's handler before) and through the short way, byte for byte."""
    caller = Caller("alice", "red", None, None, None, None, None, None, admin=False)
    exchange = Exchange("req-7", "POST", "/v1/chat/completions", arrived=1767225600.4567, caller=caller)
    exchange.status, exchange.outcome, exchange.cost = 200, Outcome.COMPLETED, 0.000123
    exchange.usage = Usage(prompt_tokens=11, completion_tokens=22, total_tokens=33)
    before, after = io.StringIO(), io.StringIO()
    plain = logging.StreamHandler(before)
    plain.setFormatter(JsonFormatter())
    with only_root(plain):
        Accounting._log(exchange, 12.3456, 4.5, UtcMillis(), access_line_template())
    with only_root(handler := JsonHandler(after, delay=NEVER)):
        Accounting._log(exchange, 12.3456, 4.5, UtcMillis(), access_line_template())
        assert after.getvalue() == ""  # buffered: the short way was taken
        handler.flush()
    assert after.getvalue() == before.getvalue()
    line = orjson.loads(after.getvalue())
    assert line["request_id"] == "req-7"
    # The arrival in UTC to the millisecond, as every line's time; the latencies to 10 us (docs/usage.md).
    assert (line["time"], line["latency_ms"], line["ttfb_ms"]) == ("2026-01-01T00:00:00.456+00:00", 12.35, 4.5)


@pytest.mark.parametrize("seed", range(3))
def test_times_are_what_datetime_writes_to_the_millisecond(seed: int) -> None:
    """One formatter for every line's time: the very text of ``datetime.isoformat`` (rounded to the
    microsecond, then truncated to the millisecond), across seconds, days and years, in any order."""
    rng = random.Random(seed)
    times = UtcMillis()
    stamps = [rng.uniform(0, 4_102_444_800) for _ in range(2000)]  # 1970 to 2100
    # a new year; a microsecond that rounds up into the next second, and one that does not
    stamps += [1767225599.9995, 1767225600.0, 1767225600.001, 1767225600.999, 1767225599.9999996, 1767225599.9999994]
    for ts in stamps + sorted(stamps):
        assert times.format(ts) == datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds"), ts


def test_the_logging_path_is_kept_for_anything_but_the_gateways_own_handler() -> None:
    json_handler = JsonHandler(io.StringIO(), delay=NEVER)
    gateway_logger = logging.getLogger("gateway")
    with only_root(json_handler) as handlers:
        assert sole_json_handler(access_logger) is json_handler

        captured = logging.StreamHandler(io.StringIO())  # caplog, an operator's file, ...
        handlers.append(captured)
        assert sole_json_handler(access_logger) is None
        handlers.remove(captured)

        access_logger.addHandler(captured)
        assert sole_json_handler(access_logger) is None
        access_logger.removeHandler(captured)

        nothing = logging.Filter("nothing")
        gateway_logger.addFilter(nothing)
        assert sole_json_handler(access_logger) is None
        gateway_logger.removeFilter(nothing)

        json_handler.setLevel(logging.WARNING)
        assert sole_json_handler(access_logger) is None
        json_handler.setLevel(logging.NOTSET)

        class OwnFormatter(JsonFormatter):
            pass

        json_handler.setFormatter(OwnFormatter())
        assert sole_json_handler(access_logger) is None
        json_handler.setFormatter(JsonFormatter())

        console = logging.StreamHandler(io.StringIO())
        console.setFormatter(ConsoleFormatter())
        handlers[:] = [console]
        assert sole_json_handler(access_logger) is None
        assert not write_fields(access_logger, ACCESS_FIELDS)

        handlers[:] = [json_handler]
        assert sole_json_handler(access_logger) is json_handler  # and back


def test_caplog_sees_the_access_record_as_before(caplog: pytest.LogCaptureFixture) -> None:
    exchange = Exchange("req-c", "GET", "/v1/models", arrived=1767225600.0)
    exchange.status, exchange.outcome = 200, Outcome.COMPLETED
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        Accounting._log(exchange, 1.0, None, UtcMillis(), access_line_template())
    [record] = [r for r in caplog.records if r.name == "gateway.access"]
    assert record.getMessage() == "GET /v1/models 200 completed 1.0ms"
    assert getattr(record, "access", {})["request_id"] == "req-c"


def test_records_write_what_is_buffered_first_and_flush_writes_the_rest() -> None:
    stream = io.StringIO()
    with only_root(handler := JsonHandler(stream, delay=NEVER)):
        write_fields(access_logger, {**ACCESS_FIELDS, "request_id": "first"})
        logging.getLogger("gateway.catalog.cache").warning("refresh failed")  # from this thread
        other = threading.Thread(target=write_fields, args=(access_logger, {**ACCESS_FIELDS, "request_id": "third"}))
        other.start()
        other.join()
        report = threading.Thread(target=logging.getLogger("gateway.usage.ledger").warning, args=("ledger slow",))
        report.start()
        report.join()
        write_fields(access_logger, {**ACCESS_FIELDS, "request_id": "last"})
        handler.flush()
        written = stream.getvalue()
    lines = [orjson.loads(line) for line in written.splitlines()]
    assert [line.get("request_id") or line["message"] for line in lines] == [
        "first",
        "refresh failed",
        "third",
        "ledger slow",
        "last",
    ]


def test_close_writes_what_is_buffered_and_later_lines_at_once() -> None:
    stream = io.StringIO()
    handler = JsonHandler(stream, delay=NEVER)
    handler.write_line(b'{"n":1}\n')
    handler.write_line(b'{"n":2}\n')
    assert stream.getvalue() == ""
    handler.close()
    assert stream.getvalue() == '{"n":1}\n{"n":2}\n'
    handler.write_line(b'{"n":3}\n')
    assert stream.getvalue().endswith('{"n":3}\n')


def test_the_writer_thread_writes_a_line_within_the_delay() -> None:
    stream = io.StringIO()
    handler = JsonHandler(stream, delay=0.01)
    try:
        handler.write_line(b'{"n":1}\n')
        assert wait_until(lambda: stream.getvalue() == '{"n":1}\n', timeout=5)
        # After a pause the writer waits for the next line without waking up; that line wakes it.
        assert wait_until(lambda: handler._parked, timeout=5)
        handler.write_line(b'{"n":2}\n')
        assert wait_until(lambda: stream.getvalue() == '{"n":1}\n{"n":2}\n', timeout=5)
    finally:
        handler.close()


class ShortWrites(io.FileIO):
    """An unbuffered file that takes at most ``most`` bytes a write (as a pipe does when a signal
    interrupts a write), below a text stream as stderr is under ``PYTHONUNBUFFERED=1``; what it
    takes is kept in ``written`` (the file is /dev/null)."""

    def __init__(self, most: int) -> None:
        super().__init__(os.devnull, "w")
        self.most = most
        self.written = bytearray()
        self.calls = 0

    def write(self, data: Any) -> int:
        self.calls += 1
        taken = bytes(data[: self.most])
        self.written += taken
        return len(taken)


def test_an_unbuffered_stderr_gets_every_line_whole_however_little_a_write_takes() -> None:
    raw = ShortWrites(most=7)
    stream = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)  # stderr under PYTHONUNBUFFERED=1
    handler = JsonHandler(stream, delay=NEVER)
    lines = [orjson.dumps({"n": n, "text": "é" * n}, option=orjson.OPT_APPEND_NEWLINE) for n in range(50)]
    try:
        for line in lines:
            handler.write_line(line)
        handler.flush()
        assert bytes(raw.written) == b"".join(lines)
        assert raw.calls >= len(raw.written) // 7  # it did take 7 bytes at a time
    finally:
        handler.close()
        stream.close()  # (and the file below it)


class StalledStream(io.StringIO):
    """A stderr whose reader stopped: write() blocks until ``resume`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.resume = threading.Event()
        self.blocked = threading.Event()

    def write(self, text: str) -> int:
        self.blocked.set()
        self.resume.wait(10)
        return super().write(text)


def test_a_stalled_stderr_stalls_the_writer_not_the_caller_until_the_buffer_is_full() -> None:
    stream = StalledStream()
    handler = JsonHandler(stream, delay=0.001, batch_lines=2, max_lines=10)
    try:
        handler.write_line(b'{"n":0}\n')
        assert stream.blocked.wait(5)  # the writer took line 0 and is stuck writing it
        for n in range(1, 10):
            handler.write_line(b'{"n":%d}\n' % n)  # returns at once: buffered behind the stuck write
        full = threading.Thread(target=handler.write_line, args=(b'{"n":10}\n',))
        full.start()  # the 10th line waiting: this caller writes them, so waits for the stuck write
        full.join(0.2)
        assert full.is_alive()
        stream.resume.set()
        full.join(5)
        assert not full.is_alive()
        handler.flush()
        assert [orjson.loads(line)["n"] for line in stream.getvalue().splitlines()] == list(range(11))
    finally:
        stream.resume.set()
        handler.close()


async def test_the_services_write_the_buffered_lines_when_they_close(
    upstream: LocalServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A request's access line takes the short way through the real stack and is written, at the
    latest, when the services close (here the writer is never due: only the close path writes)."""
    caplog.set_level(logging.WARNING, logger="httpx")  # the test client's own INFO lines would write it
    stream = io.StringIO()
    settings = load_settings(None, {"GATEWAY_UPSTREAM_URL": upstream.url, "GATEWAY_USAGE_PATH": ""})
    with only_root(JsonHandler(stream, delay=NEVER)):
        async with open_services(settings) as services:
            await services.catalog.current()
            stack = build_stack(settings, services)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=stack.proxy), base_url="http://gw") as http:
                answer = await http.post("/v1/chat/completions", json=chat_body(), headers={"x-request-id": "svc-1"})
            assert answer.status_code == 200
            assert '"logger":"gateway.access"' not in stream.getvalue()  # buffered
        written = stream.getvalue()
    [line] = [line for line in map(orjson.loads, written.splitlines()) if line["logger"] == "gateway.access"]
    assert (line["logger"], line["request_id"], line["status"], line["model"]) == (
        "gateway.access",
        "svc-1",
        200,
        CHAT_MODEL,
    )


def access_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith('{"time":') and '"logger":"gateway.access"' in line]


@pytest.mark.parametrize("unbuffered", ["", "1"], ids=["buffered-stderr", "PYTHONUNBUFFERED"])
def test_serve_loses_no_access_line_or_ledger_row_on_a_clean_shutdown(
    tmp_path: Path, upstream: LocalServer, unbuffered: str
) -> None:
    """Requests, then SIGTERM at once (the last lines are still in the buffer): every line is
    written, each the very line the logging path wrote (JsonFormatter's), and every ledger row;
    with stderr buffered and, as deploy/ runs it, not (``PYTHONUNBUFFERED=1``)."""
    port, ledger = free_port(), tmp_path / "usage.db"
    env = {"GATEWAY_UPSTREAM_URL": upstream.url, "GATEWAY_USAGE_PATH": str(ledger), "GATEWAY_LOG_FORMAT": "json",
           "PYTHONUNBUFFERED": unbuffered}  # fmt: skip
    ids = [f"shutdown-{i}" for i in range(40)]
    with running(["serve", "--port", str(port)], env, tmp_path) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        with httpx.Client(base_url=url, timeout=10) as http:
            for request_id in ids:
                answer = http.post("/v1/chat/completions", json=chat_body(), headers={"x-request-id": request_id})
                assert answer.status_code == 200
        code, out = stop(proc, signal.SIGTERM)
    assert code == 0
    lines = access_lines(out)
    assert [orjson.loads(line)["request_id"] for line in lines] == ids
    # One form of time on every line, the access lines' and the records' (uvicorn's, the drain's):
    # a log pipeline maps the field to one type.
    every = [orjson.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(every) > len(lines)
    assert all(datetime.fromisoformat(line["time"]).utcoffset() == timedelta(0) for line in every)
    for raw in lines:
        fields = {k: v for k, v in orjson.loads(raw).items() if k not in ("level", "logger")}
        assert raw + "\n" == formatted(fields)
    assert list(orjson.loads(lines[0])) == [
        "time", "level", "logger", "request_id", "key", "team", "method", "endpoint", "model", "status",
        "outcome", "error_code", "latency_ms", "ttfb_ms", "prompt_tokens", "completion_tokens", "cost_usd", "cache",
        "requested_model", "fallback_from",
    ]  # fmt: skip
    conn = sqlite3.connect(ledger)
    try:
        assert [row[0] for row in conn.execute("SELECT request_id FROM usage ORDER BY id")] == ids
    finally:
        conn.close()


def test_serve_writes_a_requests_line_within_a_bounded_time_while_serving(
    tmp_path: Path, upstream: LocalServer
) -> None:
    port = free_port()
    env = {"GATEWAY_UPSTREAM_URL": upstream.url, "GATEWAY_USAGE_PATH": "", "GATEWAY_LOG_FORMAT": "json"}
    with running(["serve", "--port", str(port)], env, tmp_path) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        assert proc.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        output = proc.stdout

        def read() -> None:
            for line in output:
                lines.put(line)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        answer = httpx.post(url + "/v1/chat/completions", json=chat_body(), headers={"x-request-id": "soon-1"})
        assert answer.status_code == 200
        sent = time.monotonic()
        seen = None
        while seen is None and time.monotonic() - sent < 5.0:  # bounded: the writer is due in 0.1 s
            with contextlib.suppress(queue.Empty):
                line = lines.get(timeout=0.1)
                if '"request_id":"soon-1"' in line:
                    seen = time.monotonic() - sent
        assert seen is not None, "the access line was not written while the gateway served"
        assert proc.poll() is None  # written by the running gateway, not by its shutdown
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        reader.join(5)


def test_serve_in_console_format_logs_the_access_record_as_before(tmp_path: Path, upstream: LocalServer) -> None:
    port = free_port()
    env = {"GATEWAY_UPSTREAM_URL": upstream.url, "GATEWAY_USAGE_PATH": "", "GATEWAY_LOG_FORMAT": "console"}
    with running(["serve", "--port", str(port)], env, tmp_path) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        answer = httpx.post(url + "/v1/chat/completions", json=chat_body(), headers={"x-request-id": "console-1"})
        assert answer.status_code == 200
        code, out = stop(proc, signal.SIGTERM)
    assert code == 0
    [line] = [line for line in out.splitlines() if " gateway.access: " in line]
    assert " INFO    gateway.access: POST /v1/chat/completions 200 completed " in line
    assert not access_lines(out)
