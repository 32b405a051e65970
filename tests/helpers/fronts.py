"""``ResettingFront``: a TCP front for the simulated upstream that resets the connection of any
request naming one of ``reset_models``, after reading it and before answering a byte (a fault an
ASGI app cannot make: it has no socket). Every other request is passed to the upstream as it is
(one request per connection: ``Connection: close`` is added) and its answer back, byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from types import TracebackType
from urllib.parse import urlsplit

import orjson

PIPE_LIMIT_SECONDS = 30.0  # one relayed exchange at most (bounded: tests stop their servers)


class ResettingFront:
    def __init__(self, upstream_url: str) -> None:
        target = urlsplit(upstream_url)
        self._host, self._port = target.hostname or "127.0.0.1", target.port or 80
        self.reset_models: set[str] = set()
        self.resets = 0
        self.url = ""
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resetting-front", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def __enter__(self) -> ResettingFront:
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("the resetting front did not start")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        self._ready.set()
        async with server:
            await self._stop.wait()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, TimeoutError, asyncio.CancelledError):
            async with asyncio.timeout(PIPE_LIMIT_SECONDS):
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                body = await reader.readexactly(length) if length else b""
                if self._names_reset_model(body):
                    self.resets += 1
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()  # a TCP RST, nothing answered
                    return
                await self._relay(head, body, writer)
        writer.close()

    async def _relay(self, head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        try:
            lines = [ln for ln in head[:-4].split(b"\r\n") if not ln.lower().startswith(b"connection:")]
            up_writer.write(b"\r\n".join([*lines, b"connection: close"]) + b"\r\n\r\n" + body)
            await up_writer.drain()
            while chunk := await up_reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        finally:
            up_writer.close()

    def _names_reset_model(self, body: bytes) -> bool:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return False
        return isinstance(data, dict) and data.get("model") in self.reset_models
