"""Small inline upstreams for behaviour the simulated FlexAI upstream (gateway.demo) does not have.

- ``create_inline_upstream``: a Starlette app that gzips /v1/embeddings when the request's
  Accept-Encoding allows it, and streams SSE on /v1/chat/completions with X-Accel-* directives
  of its own (``X-Accel-Buffering: yes``).
- ``FaultyUpstream``: a bare asyncio TCP server speaking just enough HTTP/1.1 to serve the catalog
  (or a malformed one), then answer the other calls in a switchable mode, failing in ways uvicorn
  cannot: refuse connections, drop them before or after reading, never answer, answer slowly, stall
  or reset mid-body, send truncated or invalid SSE, a huge body, or an error status with or without
  Retry-After. It counts its open connections, so a test can tell whether the gateway let go of them.
- ``held_stream_upstream``: streams one SSE chunk, then holds the rest until the test releases it
  (``StreamControl``), so a test can act while a stream is in flight.

Both serve a copy of ``gateway.demo.default_catalog()`` on GET /api/models, and listen on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import struct
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gateway.demo import default_catalog
from tests.helpers.gateway import CHAT_MODEL, EMBEDDING_MODEL

CATALOG_JSON = orjson.dumps(default_catalog())

# --------------------------------------------------------------------------- gzip and SSE upstream

EMBEDDING_PAYLOAD = orjson.dumps(
    {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.125] * 256}],
        "model": EMBEDDING_MODEL,
        "usage": {"prompt_tokens": 2, "total_tokens": 2},
    }
)
SSE_EVENTS = (
    b'data: {"choices":[{"index":0,"delta":{"content":"one "}}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{"content":"two"}}]}\n\n',
    b"data: [DONE]\n\n",
)


# Sent with identity-encoded embeddings: an id of the upstream's own and a connection-scoped header.
UPSTREAM_OWN_HEADERS = {
    "vary": "accept-encoding",
    "x-request-id": "upstream-own-id",
    "connection": "x-upstream-hop",
    "x-upstream-hop": "connection-scoped",
    "x-upstream-info": "kept",
}


# FlexAI's rate-limit refusal (shared notes): 429, its envelope, Retry-After and x-ratelimit-* headers.
RATE_LIMITED_BODY = orjson.dumps(
    {
        "error": {
            "message": "Rate limit reached: 60 requests per minute",
            "type": "rate_limit_error",
            "code": "rate_limit_exceeded",
        }
    }
)
RATE_LIMIT_HEADERS = {
    "retry-after": "7",
    "x-ratelimit-limit-requests": "60",
    "x-ratelimit-remaining-requests": "0",
    "x-ratelimit-reset-requests": "1767225600",
}


@dataclass
class InlineUpstreamState:
    accept_encodings: list[str | None] = field(default_factory=list)  # per /v1/embeddings call
    sent: list[bytes] = field(default_factory=list)  # the body bytes put on the wire, per call


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether an Accept-Encoding value allows gzip (``gzip`` or ``*`` with a non-zero q)."""
    for token in (accept_encoding or "").split(","):
        name, _, params = token.partition(";")
        if name.strip().lower() not in ("gzip", "*"):
            continue
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        return q > 0
    return False


def create_inline_upstream(state: InlineUpstreamState) -> Starlette:
    async def api_models(_request: Request) -> Response:
        return Response(CATALOG_JSON, media_type="application/json")

    async def embeddings(request: Request) -> Response:
        await request.body()
        accept = request.headers.get("accept-encoding")
        state.accept_encodings.append(accept)
        if accepts_gzip(accept):
            body = gzip.compress(EMBEDDING_PAYLOAD, mtime=0)
            state.sent.append(body)
            headers = {"content-encoding": "gzip", "vary": "accept-encoding"}
            return Response(body, media_type="application/json", headers=headers)
        state.sent.append(EMBEDDING_PAYLOAD)
        return Response(EMBEDDING_PAYLOAD, media_type="application/json", headers=UPSTREAM_OWN_HEADERS)

    async def chat(request: Request) -> StreamingResponse:
        await request.body()

        async def events() -> AsyncIterator[bytes]:
            for event in SSE_EVENTS:
                yield event

        # Directives to a proxy in front of this upstream: the gateway must not relay them.
        headers = {"x-accel-buffering": "yes", "x-accel-limit-rate": "1024"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    async def completions(request: Request) -> Response:
        await request.body()
        return Response(RATE_LIMITED_BODY, status_code=429, media_type="application/json", headers=RATE_LIMIT_HEADERS)

    return Starlette(
        routes=[
            Route("/api/models", api_models, methods=["GET"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
        ]
    )


# --------------------------------------------------------------------------- faulty raw upstream

FaultMode = Literal[
    "ok",  # a canned chat completion (JSON, Content-Length)
    "sse",  # a healthy event stream (STREAM_EVENTS), all at once
    "close",  # drop the connection without a response (FIN)
    "garbage",  # something that is not HTTP, then close
    "hang",  # never answer (until the client hangs up, at most HANG_LIMIT_SECONDS)
    "refuse",  # nothing listens: connections are refused (entering it also drops every open connection)
    "slow",  # the headers after `head_delay`, then the whole body in pieces `chunk_gap` apart
    "stall",  # the headers and the first part of the body, then silence until the client hangs up
    "reset",  # the headers and the first part of the body, then a TCP reset (RST)
    "cut",  # the headers and the first part of the body, then a plain close (FIN) mid-body
    "truncated_sse",  # an event stream whose last event is cut in half; the HTTP body ends properly
    "invalid_sse",  # an "event stream" of lines that are not server-sent events; the body ends properly
    "huge",  # a JSON chat completion of `huge_size` bytes, generated and sent piece by piece
    "status",  # the canned answer in `status_answer` (an error status, maybe Retry-After)
]
BodyKind = Literal["sse", "json"]

OK_CHAT = orjson.dumps(
    {
        "id": "chatcmpl-raw",
        "object": "chat.completion",
        "created": 0,
        "model": CHAT_MODEL,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "This is a simulated reply from the raw upstream.",
                },
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 9, "total_tokens": 10},
    }
)


def _chunk_event(content: str, finish: str | None = None) -> bytes:
    delta = {"content": content} if content else {}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    chunk = {"id": "chatcmpl-raw", "object": "chat.completion.chunk", "created": 0, "model": CHAT_MODEL,
             "choices": [choice]}  # fmt: skip
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


# A healthy stream: three content chunks, a finish chunk, [DONE]. The faulty modes send the first
# PARTIAL_EVENTS of them, then fail.
STREAM_EVENTS = (
    _chunk_event("one "),
    _chunk_event("two "),
    _chunk_event("three"),
    _chunk_event("", "stop"),
    b"data: [DONE]\n\n",
)
PARTIAL_EVENTS = 2
# "truncated_sse": one whole event, then half of the next (no blank line ends it).
TRUNCATED_SSE = (STREAM_EVENTS[0], STREAM_EVENTS[1][: len(STREAM_EVENTS[1]) // 2])
# "invalid_sse": a line without a field, data that is not JSON, a line that is not UTF-8.
INVALID_SSE = (b"this is not an event stream\n\n", b"data: {not json\n\n", b"\xff\xfe\x00 binary\n\n")
# The first part of a JSON body that "stall", "reset" and "cut" send before failing.
PARTIAL_JSON = OK_CHAT[: len(OK_CHAT) // 2]
JSON_PIECES = 5  # "slow" sends a JSON body in this many pieces

UPSTREAM_ERROR_BODY = orjson.dumps(
    {"error": {"message": "The upstream is overloaded", "type": "server_error", "param": None, "code": "overloaded"}}
)
HANG_LIMIT_SECONDS = 15.0  # a hanging answer ends at the latest after this (or when the server stops)
HUGE_PREFIX = b'{"id":"chatcmpl-huge","object":"chat.completion","created":0,"choices":[{"index":0,"message":{"role":"assistant","content":"'  # noqa: E501
HUGE_SUFFIX = b'"},"finish_reason":"stop"}]}'
HUGE_PIECE = 1 << 20


def huge_body(size: int) -> Iterator[bytes]:
    """A valid JSON chat completion of exactly ``size`` bytes, in pieces of about 1 MiB. Every 64-byte
    line of its content is numbered, so a reordered, dropped or repeated piece changes its hash."""
    filler = size - len(HUGE_PREFIX) - len(HUGE_SUFFIX)
    if filler < 0:
        raise ValueError(f"a huge body is at least {len(HUGE_PREFIX) + len(HUGE_SUFFIX)} bytes")
    yield HUGE_PREFIX
    lines_per_piece = HUGE_PIECE // 64
    line = 0
    while filler > 0:
        piece = b"".join(b"%063d|" % n for n in range(line, line + lines_per_piece))[:filler]
        line += lines_per_piece
        filler -= len(piece)
        yield piece
    yield HUGE_SUFFIX


@dataclass(frozen=True, slots=True)
class StatusAnswer:
    """What mode "status" answers: ``status``, a Retry-After header when given, ``body`` (JSON)."""

    status: int = 503
    retry_after: str | None = None
    body: bytes = UPSTREAM_ERROR_BODY


class FaultyUpstream:
    """A bare asyncio TCP server speaking just enough HTTP/1.1 to fail in ways uvicorn cannot.

    ``GET /api/models`` answers ``catalog`` (with ``catalog_status``); any other request is answered
    as ``mode`` says (see FaultMode), or as the next mode queued with ``queue()``. Everything is
    switchable while running. Options of the modes: ``body_kind`` ("sse" or "json") for "slow",
    "stall", "reset" and "cut"; ``head_delay`` and ``chunk_gap`` for "slow"; ``end_delay`` for "sse"
    and "slow" (an event stream whose end comes a while after its last event); ``huge_size``,
    ``huge_chunked`` and ``huge_reset_after`` for "huge"; ``status_answer`` for "status".
    ``drop_connections``: the next so many new connections are closed as soon as they are accepted,
    before anything is read.

    What it saw: ``received`` lists ``METHOD target`` of every request read; ``open_connections``
    counts the connections not closed yet, ``answering`` those in the middle of an answer (a hang, a
    stall, a slow body), ``connections_accepted`` and ``connections_dropped`` are totals.
    """

    def __init__(self, mode: FaultMode = "ok") -> None:
        self._mode: FaultMode = mode
        self.url = ""
        self.port = 0
        self.open_connections = 0
        self.answering = 0
        self._script: deque[FaultMode] = deque()
        self._set_defaults()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faulty-upstream", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._error: BaseException | None = None

    def _set_defaults(self) -> None:
        self.received: list[str] = []
        self.catalog: bytes = CATALOG_JSON
        self.catalog_status = 200
        self.body_kind: BodyKind = "sse"
        self.head_delay = 0.0
        self.chunk_gap = 0.0
        self.end_delay = 0.0  # "sse" and "slow": seconds between the last piece and the end of the body
        self.huge_size = 32 << 20
        self.huge_chunked = False
        self.huge_reset_after: int | None = None  # "huge": send this many body bytes, then a TCP reset
        self.status_answer = StatusAnswer()
        self.reset_delay = 0.1  # seconds between the last bytes sent and the RST, so they are read first
        self.drop_connections = 0
        self.connections_accepted = 0
        self.connections_dropped = 0
        self._script.clear()

    def reset(self) -> None:
        """Back to mode "ok" with every option at its default and the records cleared (for reuse by
        the next test); open connections stay open."""
        self.mode = "ok"
        self._set_defaults()

    def __enter__(self) -> FaultyUpstream:
        self._thread.start()
        if not self._ready.wait(5) or self._error is not None:
            raise RuntimeError("the faulty upstream did not start") from self._error
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        self._thread.join(5)
        if self._thread.is_alive():
            raise RuntimeError("the faulty upstream did not stop within 5 s")

    @property
    def mode(self) -> FaultMode:
        return self._mode

    @mode.setter
    def mode(self, mode: FaultMode) -> None:
        """Switch behaviour; entering or leaving "refuse" closes or reopens the listening socket (same port)."""
        old, self._mode = self._mode, mode
        if (old == "refuse") != (mode == "refuse") and self._loop is not None:
            future = asyncio.run_coroutine_threadsafe(self._listen(mode != "refuse"), self._loop)
            future.result(5)

    def drop_open_connections(self) -> None:
        """Close every open connection now (the gateway's pooled ones included), as a restart would."""
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._drop_open(), self._loop).result(5)

    async def _drop_open(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    def queue(self, *modes: FaultMode) -> None:
        """The next requests (catalog loads aside) are answered in these modes, one each, then ``mode`` again."""
        self._script.extend(modes)

    @property
    def faulted(self) -> list[str]:
        return [r for r in self.received if r not in ("GET /api/models", "GET /api/status")]

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        await self._listen(True)
        self.url = f"http://127.0.0.1:{self.port}"
        if self._mode == "refuse":
            await self._listen(False)
        self._ready.set()
        await self._stop.wait()
        await self._listen(False)
        # Every handler sees the end of its stream and returns.
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _listen(self, on: bool) -> None:
        if on and self._server is None:
            self._server = await asyncio.start_server(self._connection, "127.0.0.1", self.port)
            self.port = self._server.sockets[0].getsockname()[1]
        elif not on and self._server is not None:
            self._server.close()  # the listening socket closes at once: new connections are refused
            self._server = None
            await self._drop_open()  # ... and an upstream that went away drops what it had open

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections_accepted += 1
        if self.drop_connections > 0:
            self.drop_connections -= 1
            self.connections_dropped += 1
            writer.transport.abort()  # closed before reading a byte
            return
        self._tasks.add(task)
        self._writers.add(writer)
        self.open_connections += 1
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        except asyncio.CancelledError:
            pass  # stopping: asyncio's start_server callback logs a cancelled handler task as an error
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()
            self.open_connections -= 1
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return  # the client closed the connection
            request_line, *lines = head.decode("latin-1").split("\r\n")
            method, target, _version = request_line.split(" ", 2)
            headers = {}
            for line in lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length") or 0)
            if length:
                await reader.readexactly(length)
            self.received.append(f"{method} {target}")
            if method == "GET" and target == "/api/models":
                await _respond(writer, self.catalog, self.catalog_status)
                continue
            if method == "GET" and target == "/api/status":  # an upstream without one
                await _respond(writer, b'{"error": {"message": "not found"}}', 404)
                continue
            mode = self._script.popleft() if self._script else self._mode
            self.answering += 1
            try:
                keep_alive = await self._answer(mode, reader, writer)
            finally:
                self.answering -= 1
            if not keep_alive:
                return

    async def _answer(self, mode: FaultMode, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request in ``mode``; False when the connection is finished with."""
        if mode == "ok":
            await _respond(writer, OK_CHAT)
        elif mode == "sse":
            await self._send_body(writer, "sse", STREAM_EVENTS, end_delay=self.end_delay)
        elif mode == "status":
            answer = self.status_answer
            extra = {} if answer.retry_after is None else {"retry-after": answer.retry_after}
            await _respond(writer, answer.body, answer.status, extra)
        elif mode == "slow":
            await asyncio.sleep(self.head_delay)
            await self._send_body(writer, self.body_kind, self._pieces(), gap=self.chunk_gap, end_delay=self.end_delay)
        elif mode in ("stall", "reset", "cut"):
            await self._send_body(writer, self.body_kind, self._pieces(partial=True), end=False)
            if mode == "stall":
                await _wait_for_hang_up(reader)
            elif mode == "reset":
                await asyncio.sleep(self.reset_delay)
                _reset(writer)
            else:
                writer.transport.close()  # FIN after the bytes already written
            return False
        elif mode == "truncated_sse":
            await self._send_body(writer, "sse", TRUNCATED_SSE)
        elif mode == "invalid_sse":
            await self._send_body(writer, "sse", INVALID_SSE)
        elif mode == "huge":
            pieces = huge_body(self.huge_size)
            if self.huge_reset_after is not None:
                pieces = _first_bytes(pieces, self.huge_reset_after)
            await self._send_body(writer, "json", pieces, size=self.huge_size, chunked=self.huge_chunked,
                                  end=self.huge_reset_after is None)  # fmt: skip
            if self.huge_reset_after is not None:
                await asyncio.sleep(self.reset_delay)
                _reset(writer)
                return False
        elif mode == "close" or mode == "refuse":  # "refuse" here: switched to while this request came in
            writer.transport.abort()  # no status line, no body: the connection just ends
            return False
        elif mode == "garbage":
            writer.write(b"this is not HTTP\r\n\r\n")
            await writer.drain()
            return False
        else:  # "hang"
            await _wait_for_hang_up(reader)
            return False
        return True

    def _pieces(self, *, partial: bool = False) -> tuple[bytes, ...]:
        if self.body_kind == "sse":
            return STREAM_EVENTS[:PARTIAL_EVENTS] if partial else STREAM_EVENTS
        if partial:
            return (PARTIAL_JSON,)
        step = -(-len(OK_CHAT) // JSON_PIECES)
        return tuple(OK_CHAT[i : i + step] for i in range(0, len(OK_CHAT), step))

    async def _send_body(
        self,
        writer: asyncio.StreamWriter,
        kind: BodyKind,
        pieces: Iterable[bytes],
        *,
        gap: float = 0.0,
        end: bool = True,
        end_delay: float = 0.0,
        size: int | None = None,
        chunked: bool | None = None,
    ) -> None:
        """Status line and headers, then ``pieces`` as they come (``gap`` seconds apart), flushed each.
        An event stream is chunked; JSON has a Content-Length (of the whole OK_CHAT unless ``size``)."""
        chunked = kind == "sse" if chunked is None else chunked
        content_type = "text/event-stream" if kind == "sse" else "application/json"
        framing = "transfer-encoding: chunked" if chunked else f"content-length: {size or len(OK_CHAT)}"
        writer.write(f"HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\n{framing}\r\n\r\n".encode())
        await writer.drain()
        for index, piece in enumerate(pieces):
            if gap and index:
                await asyncio.sleep(gap)
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            await writer.drain()
        if end and chunked:
            await asyncio.sleep(end_delay)
            writer.write(b"0\r\n\r\n")
            await writer.drain()


def _first_bytes(pieces: Iterable[bytes], limit: int) -> Iterator[bytes]:
    for piece in pieces:
        if limit <= 0:
            return
        yield piece[:limit]
        limit -= len(piece)


async def _wait_for_hang_up(reader: asyncio.StreamReader) -> None:
    async with asyncio.timeout(HANG_LIMIT_SECONDS):
        while await reader.read(65536):  # b"" once the client hangs up
            pass


def _reset(writer: asyncio.StreamWriter) -> None:
    """Abort the connection with a TCP RST (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


REASONS = {200: "OK", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
           503: "Service Unavailable", 504: "Gateway Timeout"}  # fmt: skip


async def _respond(
    writer: asyncio.StreamWriter, body: bytes, status: int = 200, extra: dict[str, str] | None = None
) -> None:
    headers = "".join(f"{name}: {value}\r\n" for name, value in (extra or {}).items())
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n{headers}\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()


# --------------------------------------------------------------------------- a stream held by the test

HELD_STREAM_WAIT = 10.0  # seconds: how long a held stream waits for its release at most


@dataclass
class StreamControl:
    """Lets a test hold the stand-in upstream's stream between two chunks."""

    release: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)


def held_stream_upstream(control: StreamControl) -> Starlette:
    """Sends one SSE chunk, then waits for ``control.release`` before the rest (bounded)."""
    import anyio

    async def catalog(request: Request) -> Response:
        return Response(CATALOG_JSON, media_type="application/json")

    async def chat(request: Request) -> StreamingResponse:
        await request.body()

        async def events() -> AsyncIterator[bytes]:
            control.started.set()
            try:
                yield _chunk_event("first ")
                # Poll so that a cancelled stream is noticed quickly; bounded by HELD_STREAM_WAIT.
                for _ in range(int(HELD_STREAM_WAIT / 0.01)):
                    if control.release.is_set():
                        break
                    await anyio.sleep(0.01)
                for word in ("second ", "third"):
                    yield _chunk_event(word)
                yield b"data: [DONE]\n\n"
                control.finished.set()
            except BaseException:
                control.cancelled.set()
                raise

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/api/models", catalog), Route("/v1/chat/completions", chat, methods=["POST"])])


# --------------------------------------------------------------------------- gated upstream


@dataclass
class Gate:
    """Holds the gated stand-in's answers until ``release`` is set, and counts what it served."""

    release: threading.Event = field(default_factory=threading.Event)
    calls: int = 0  # answers started (embeddings and chat)
    completed: int = 0  # answers sent to their end
    cancelled: int = 0  # streams the gateway abandoned before their end


GATED_WAIT = 10.0  # seconds: how long a gated answer waits for its release at most
GATED_USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def gated_upstream(gate: Gate) -> Starlette:
    """Embeddings answered, and chat streams continued after their first event, only once
    ``gate.release`` is set (bounded by GATED_WAIT); a stream ends with a usage chunk when asked."""
    import anyio

    async def catalog(request: Request) -> Response:
        return Response(CATALOG_JSON, media_type="application/json")

    async def held() -> None:
        for _ in range(int(GATED_WAIT / 0.01)):
            if gate.release.is_set():
                return
            await anyio.sleep(0.01)

    async def embeddings(request: Request) -> Response:
        await request.body()
        gate.calls += 1
        await held()
        gate.completed += 1
        return Response(EMBEDDING_PAYLOAD, media_type="application/json")

    async def chat(request: Request) -> StreamingResponse:
        body = orjson.loads(await request.body())
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        gate.calls += 1

        async def events() -> AsyncIterator[bytes]:
            try:
                yield _chunk_event("first ")
                await held()
                yield _chunk_event("second ")
                yield _chunk_event("third", finish="stop")
                if usage:
                    yield b"data: " + orjson.dumps({"choices": [], "usage": GATED_USAGE}) + b"\n\n"
                yield b"data: [DONE]\n\n"
                gate.completed += 1
            except BaseException:
                gate.cancelled += 1
                raise

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/api/models", catalog),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
        ]
    )
