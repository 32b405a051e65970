"""Small inline upstreams for behaviour the simulated FlexAI upstream (gateway.demo) does not have.

- ``create_inline_upstream``: a Starlette app that gzips /v1/embeddings when the request's
  Accept-Encoding allows it, and streams SSE on /v1/chat/completions with X-Accel-* directives
  of its own (``X-Accel-Buffering: yes``).
- ``FaultyUpstream``: a bare asyncio TCP server speaking just enough HTTP/1.1 to serve the catalog,
  then fail the other calls in ways uvicorn cannot (drop the connection without an answer, or never
  answer at all).

Both serve a copy of ``gateway.demo.default_catalog()`` on GET /api/models, and listen on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import gzip
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gateway.demo import default_catalog
from tests.helpers_gateway import CHAT_MODEL, EMBEDDING_MODEL

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

FaultMode = Literal["close", "garbage", "hang", "ok"]

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
HANG_LIMIT_SECONDS = 15.0  # a hanging answer ends at the latest after this (or when the server stops)


class FaultyUpstream:
    """``GET /api/models`` answers the catalog; any other request, depending on ``mode`` (changeable
    while running): "close" drops the connection without a response, "garbage" answers something that is
    not HTTP and closes, "hang" never answers (until the client hangs up), "ok" answers a canned chat
    completion. ``received`` lists ``METHOD target``."""

    def __init__(self, mode: FaultMode) -> None:
        self.mode: FaultMode = mode
        self.received: list[str] = []
        self.url = ""
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faulty-upstream", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._error: BaseException | None = None

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
    def faulted(self) -> list[str]:
        return [r for r in self.received if r != "GET /api/models"]

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._ready.set()
        async with server:
            await self._stop.wait()
            # Hang up on every open connection: each handler sees the end of its stream and returns.
            for writer in list(self._writers):
                writer.transport.abort()
            if self._tasks:
                _done, pending = await asyncio.wait(self._tasks, timeout=5)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
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
                await _respond(writer, CATALOG_JSON)
                continue
            mode = self.mode
            if mode == "ok":
                await _respond(writer, OK_CHAT)
            elif mode == "close":
                writer.transport.abort()  # no status line, no body: the connection just ends
                return
            elif mode == "garbage":
                writer.write(b"this is not HTTP\r\n\r\n")
                await writer.drain()
                return
            else:
                async with asyncio.timeout(HANG_LIMIT_SECONDS):
                    await reader.read()  # b"" once the client hangs up
                return


async def _respond(writer: asyncio.StreamWriter, body: bytes) -> None:
    head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    writer.write(head.encode() + body)
    await writer.drain()
