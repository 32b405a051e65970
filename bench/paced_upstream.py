"""A tiny paced upstream: SSE streams of N events with a fixed gap, for TTFB and per-chunk cost.

nginx serves a canned SSE body in one write, so it cannot show time to first byte or what a proxy
costs per relayed chunk. This stand-in can. It is a raw asyncio ``Protocol`` server (uvloop when
installed), HTTP/1.1 keep-alive, with one timer wheel for all open streams, so that hundreds of
concurrent streams cost it one wake-up per tick instead of one timer per chunk.

- ``GET  .../api/models``        the benchmark catalog (Content-Length)
- ``POST .../chat/completions``  with ``"stream": true``: ``200 text/event-stream``, chunked; the
  first event is written together with the response headers (time to first token = 0), then one
  event every ``--gap-ms``, then ``data: [DONE]``. Without it: the canned chat JSON.
- ``POST .../embeddings``        the canned embeddings JSON
- anything else                  ``404``

Run: ``python bench/paced_upstream.py --port P --events 40 --gap-ms 25``. Prints ``READY port`` on
stdout once listening; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import payloads

_STREAM_FLAG = re.compile(rb'"stream"\s*:\s*true')
_MAX_HEADER = 64 * 1024
_TICK = 0.001  # timer-wheel resolution, seconds


def _response(status: str, content_type: bytes, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nServer: paced\r\nContent-Type: ".encode()
        + content_type
        + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    )
    return head + body


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Wheel:
    """Writes the next event of every due stream; one asyncio task for all streams."""

    def __init__(self, events: int, gap: float) -> None:
        self.events = [_chunk(payloads.sse_event(i, events)) for i in range(events)]
        self.tail = _chunk(payloads.SSE_DONE) + b"0\r\n\r\n"
        self.gap_ticks = max(1, round(gap / _TICK))
        self.slots: defaultdict[int, list[tuple[Conn, int]]] = defaultdict(list)
        self.t0 = time.monotonic()
        self.done_tick = 0
        self.wake = asyncio.Event()

    def now_tick(self) -> int:
        return int((time.monotonic() - self.t0) / _TICK)

    def start(self, conn: Conn, head: bytes) -> None:
        conn.transport.write(head + self.events[0])
        self._schedule(conn, 1, self.now_tick() + self.gap_ticks)

    def _schedule(self, conn: Conn, index: int, tick: int) -> None:
        self.slots[max(tick, self.done_tick + 1)].append((conn, index))
        self.wake.set()

    async def run(self) -> None:
        while True:
            if not self.slots:
                self.wake.clear()
                await self.wake.wait()
            due = min(self.slots)
            delay = self.t0 + due * _TICK - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = self.now_tick()
            for tick in sorted(t for t in self.slots if t <= now):
                for conn, index in self.slots.pop(tick):
                    if conn.transport.is_closing():
                        continue
                    if index < len(self.events):
                        conn.transport.write(self.events[index])
                        self._schedule(conn, index + 1, tick + self.gap_ticks)
                    else:
                        conn.transport.write(self.tail)
                        conn.stream_done()
                self.done_tick = tick


class Conn(asyncio.Protocol):
    def __init__(self, wheel: Wheel, catalog: bytes, chat: bytes, embeddings: bytes) -> None:
        self.wheel = wheel
        self.catalog = catalog
        self.chat = chat
        self.embeddings = embeddings
        self.buffer = bytearray()
        self.streaming = False
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > 64 * 1024 * 1024:
            self.transport.close()
            return
        self._process()

    def stream_done(self) -> None:
        self.streaming = False
        self._process()

    def _process(self) -> None:
        while not self.streaming and not self.transport.is_closing():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > _MAX_HEADER:
                    self.transport.close()
                return
            head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            method, path = ([*head[0].split(" "), "", ""])[:2]
            self._answer(method, path.split("?", 1)[0], body)

    def _answer(self, method: str, path: str, body: bytes) -> None:
        if method == "GET" and path.endswith("/api/models"):
            self.transport.write(_response("200 OK", b"application/json", self.catalog))
        elif method == "POST" and path.endswith("/chat/completions"):
            if _STREAM_FLAG.search(body):
                self.streaming = True
                head = (
                    b"HTTP/1.1 200 OK\r\nServer: paced\r\nContent-Type: text/event-stream\r\n"
                    b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
                )
                self.wheel.start(self, head)
            else:
                self.transport.write(_response("200 OK", b"application/json", self.chat))
        elif method == "POST" and path.endswith("/embeddings"):
            self.transport.write(_response("200 OK", b"application/json", self.embeddings))
        elif method == "GET" and path in ("/", "/health"):
            self.transport.write(_response("200 OK", b"text/plain", b"ok\n"))
        else:
            self.transport.write(_response("404 Not Found", b"application/json", b'{"error":"not found"}'))


async def serve(host: str, port: int, events: int, gap: float) -> None:
    loop = asyncio.get_running_loop()
    wheel = Wheel(events, gap)
    catalog, chat, embeddings = payloads.catalog_bytes(), payloads.chat_response(), payloads.embeddings_response()
    server = await loop.create_server(
        lambda: Conn(wheel, catalog, chat, embeddings), host, port, backlog=4096, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ticker = asyncio.create_task(wheel.run())
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    ticker.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await ticker
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--events", type=int, default=40, help="content events per stream")
    parser.add_argument("--gap-ms", type=float, default=25.0, help="gap between two events")
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("the benchmark only listens on loopback")
    main_task = serve(args.host, args.port, args.events, args.gap_ms / 1000)
    try:
        import uvloop
    except ImportError:  # plain asyncio still works, just slower
        asyncio.run(main_task)
    else:
        uvloop.run(main_task)


if __name__ == "__main__":
    main()
