"""The upstream seam on the gateway's own HTTP/1.1 client: pooled keep-alive connections, httptools.

The gateway sends one kind of request to one origin: a method, a target, headers it has already
filtered, a body it holds whole. aiohttp does far more per request (URL parsing and quoting, cookie
and redirect machinery, traces, header merging, a writer task): against nginx, 96.7 us of CPU per
request against 25.9 us here (bench/upstream_clients.py). The hard part of HTTP/1.1, parsing a
response (status line, headers, chunked and length framing), is httptools' (the llhttp parser
uvicorn uses on the client side of the gateway); this package only pools connections and writes
requests. Same contract as ``AiohttpUpstream``: bodies relayed raw (no decompression), no
cookies, no redirects followed, per-phase timeouts, errors translated into the gateway's own:

- connecting (or waiting for a pool slot) past ``connect_timeout``: UpstreamTimeout, retryable;
  refused, unreachable, TLS failure: UpstreamUnavailable, retryable (nothing was sent);
- the request sent, no response head within ``first_byte_timeout``: UpstreamTimeout; the connection
  lost or a malformed head before it: UpstreamUnavailable (not retryable: the upstream may have acted);
- while the body is read: UpstreamStreamError (``watched_chunks`` adds the idle timeout).

Connections: at most ``max_connections`` open (a request waits for a free one up to the connect
timeout), at most ``max_keepalive_connections`` kept idle, each for ``keepalive_expiry`` seconds
(0: a connection per request). A connection goes back to the pool only after a complete response
that allows keep-alive; an abandoned or broken one is closed, which stops the upstream's work. A
pooled connection is checked for a close that arrived but was not read yet (an upstream's idle
timeout, a restart) before it is reused, as urllib3 and httpcore do (one ``poll`` with no wait,
~0.5 us), so a request is not sent into a connection the upstream already closed.
A body the client reads slower than the upstream sends stops the reading at 64 KiB buffered (TCP
flow control then slows the upstream down). One connection's protocol (parsing, the body's
chunks, flow control) is ``gateway.upstream.h1_connection``; this module is the pool and requests.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import Final
from urllib.parse import quote, urlsplit

from gateway.config import UpstreamSettings
from gateway.errors import UpstreamTimeout, UpstreamUnavailable
from gateway.upstream.base import (
    Headers,
    InUse,
    UpstreamResponse,
    UpstreamStreamError,
    describe_error,
    relative_locations,
    watched_chunks,
)
from gateway.upstream.h1_connection import Connection, UpstreamProtocolError

_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})  # Content-Length even when the body is empty
# A target sent as it is (anything else is percent-encoded first, as aiohttp's URL handling would).
_PLAIN_TARGET: Final = re.compile(r"[A-Za-z0-9\-._~/%:@!$&'()*+,;=?]*")
_TARGET_SAFE: Final = "/%:@!$&'()*+,;=?~"


class _BuiltinResponse:
    __slots__ = ("_client", "_conn", "headers", "status")

    def __init__(self, client: BuiltinUpstream, conn: Connection) -> None:
        self._client: BuiltinUpstream | None = client
        self._conn = conn
        self.status = conn.status
        self.headers: Headers = relative_locations(conn.headers, client.origin)

    def iter_raw(self) -> AsyncIterator[bytes]:
        body = self._conn.body()
        if self.arrived_size() is not None or self._client is None:  # buffered whole: cannot wait nor fail
            return body
        return watched_chunks(body, self._client.idle_timeout, _CHUNK_ERRORS)

    def arrived_size(self) -> int | None:
        conn = self._conn
        return conn.received if conn.complete else None

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.release(self._conn)


# (UpstreamClosed is a ConnectionError, so an OSError.)
_CHUNK_ERRORS = (UpstreamProtocolError, OSError)


class BuiltinUpstream:
    def __init__(self, settings: UpstreamSettings) -> None:
        url = urlsplit(settings.url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"[upstream] url must be an http:// or https:// URL, not {settings.url!r}")
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self.origin = f"{url.scheme}://{url.netloc}".encode()  # a Location to it becomes relative
        self._path = url.path.encode("latin-1")  # the base path every target goes under
        self._host_line = b"host: " + url.netloc.encode("idna") + b"\r\n"
        self._connect_timeout = settings.connect_timeout
        self._first_byte_timeout = settings.first_byte_timeout
        self.idle_timeout = settings.idle_timeout  # between two chunks of a body
        self._max_connections = settings.max_connections
        self._max_idle = settings.max_keepalive_connections if settings.keepalive_expiry > 0 else 0
        self._keepalive = settings.keepalive_expiry
        self._in_use = InUse()
        self._idle: list[Connection] = []  # most recently used last
        self._open = 0  # connections open or opening, counted against max_connections
        self._waiters: deque[asyncio.Future[Connection | None]] = deque()  # for a connection (or a free slot)
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False

    async def send(self, method: str, target: str, headers: Headers, body: bytes) -> UpstreamResponse:
        conn = await self._in_use.counted(self._exchange(method, self._request(method, target, headers, body)))
        return _BuiltinResponse(self, conn)

    async def _exchange(self, method: str, request: tuple[bytes, bytes]) -> Connection:
        """Send ``request`` on a connection; the connection once the response head has arrived."""
        loop = asyncio.get_running_loop()
        conn = await self._acquire(loop)
        try:
            waiter = conn.start(request, head_only=method == "HEAD")
            timer = loop.call_later(self._first_byte_timeout, conn.time_out)
            try:
                await waiter
            finally:
                timer.cancel()
        except BaseException as exc:
            conn.close()
            self.done_with(conn)
            raise self._send_error(exc) from None
        return conn

    async def get_bytes(self, target: str) -> bytes:
        response = await self.send("GET", target, ((b"accept", b"application/json"),), b"")
        try:
            if not 200 <= response.status < 300:
                raise UpstreamUnavailable(
                    f"GET {target} answered HTTP {response.status}", upstream_status=response.status
                )
            parts = [chunk async for chunk in response.iter_raw()]
        except UpstreamStreamError as exc:
            raise UpstreamUnavailable(f"GET {target} failed: {exc}") from None
        finally:
            await response.aclose()
        return b"".join(parts)

    def connections(self) -> int:
        return self._in_use.count

    async def aclose(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()
        if self._sweep is not None:
            self._sweep.cancel()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(UpstreamUnavailable("The upstream client is closed."))

    # --- the request ----------------------------------------------------------------------------

    def _request(self, method: str, target: str, headers: Headers, body: bytes) -> tuple[bytes, bytes]:
        """The request's head and body. Header names and values, and the target, come from the ASGI server's
        parser or the gateway's own checks; a line break in any of them is refused all the same."""
        if not _PLAIN_TARGET.fullmatch(target):
            target = quote(target, safe=_TARGET_SAFE)
        lines = [method.encode("latin-1"), b" ", self._path, target.encode("latin-1"), b" HTTP/1.1\r\n"]
        lines.append(self._host_line)
        for name, value in headers:
            lines += (name, b": ", value, b"\r\n")
        ends = len(headers) + 3  # the request line, Host, the headers, the blank line
        if body or method in _BODY_METHODS:
            lines.append(b"content-length: %d\r\n" % len(body))
            ends += 1
        lines.append(b"\r\n")
        head = b"".join(lines)
        if head.count(b"\n") != ends or head.count(b"\r") != ends or b"\0" in head:
            raise UpstreamUnavailable("The request cannot go upstream: a header or its path holds a line break.")
        return head, body

    def _send_error(self, exc: BaseException) -> BaseException:
        if isinstance(exc, TimeoutError):
            return UpstreamTimeout(f"The upstream did not start answering within {self._first_byte_timeout:g}s.")
        if isinstance(exc, _CHUNK_ERRORS):
            return UpstreamUnavailable(f"The upstream failed: {describe_error(exc)}.")
        return exc  # a cancellation, or the gateway's own error: as it is

    # --- the pool -------------------------------------------------------------------------------

    async def _acquire(self, loop: asyncio.AbstractEventLoop) -> Connection:
        """A connection to send on: an idle one, a new one, or (at max_connections) the next one freed."""
        if self._closed:
            raise UpstreamUnavailable("The upstream client is closed.")
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.gone():
                return conn
            conn.close()
            self._open -= 1
        if self._open >= self._max_connections:
            waiter: asyncio.Future[Connection | None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(self._connect_timeout):
                    handed = await waiter
            except TimeoutError:
                raise UpstreamTimeout(
                    f"No upstream connection was free within {self._connect_timeout:g}s "
                    f"(max_connections = {self._max_connections}).",
                    retryable=True,
                ) from None
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._give_back(waiter.result())  # handed over just as the wait ended
                raise
            if handed is not None:
                return handed
        else:
            self._open += 1  # (a waiter handed None was given the slot of a closed connection)
        try:
            return await self._connect(loop)
        except BaseException:
            self._give_back(None)
            raise

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> Connection:
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: Connection(loop), self._host, self._port, ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )  # fmt: skip
        except TimeoutError:
            raise UpstreamTimeout(
                f"The upstream could not be reached within {self._connect_timeout:g}s.", retryable=True
            ) from None
        except (OSError, ssl.SSLError) as exc:
            # Nothing was sent: safe to retry, even a POST.
            reason = describe_error(exc)
            raise UpstreamUnavailable(f"The upstream could not be reached: {reason}.", retryable=True) from None
        return conn

    def release(self, conn: Connection) -> None:
        """A response is closed: its exchange no longer counts, its connection is pooled or closed."""
        self._in_use.count -= 1
        self.done_with(conn)

    def done_with(self, conn: Connection) -> None:
        """The exchange on ``conn`` is over: pool it (a complete, kept-alive answer) or close it."""
        conn.in_exchange = False
        sound = conn.complete and conn.error is None and not (conn.lost or conn.spoiled)
        reusable = sound and conn.keep_alive and not self._closed
        if not reusable:
            conn.close()
        self._give_back(conn if reusable else None)

    def _give_back(self, conn: Connection | None) -> None:
        """A connection to reuse, or None: a slot freed (its connection closed or never opened)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)  # the slot (and the connection, if any) goes to the waiter
                return
        if conn is None or len(self._idle) >= self._max_idle:
            if conn is not None:
                conn.close()
            self._open -= 1
            return
        conn.idle_since = asyncio.get_running_loop().time()
        conn.chunks.clear()
        self._idle.append(conn)
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(self._keepalive, self._expire)

    def _expire(self) -> None:
        """Close the connections idle longer than keepalive_expiry; look again later while any is idle."""
        self._sweep = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() - self._keepalive
        keep: list[Connection] = []
        for conn in self._idle:
            if conn.idle_since > deadline and not conn.lost:
                keep.append(conn)
            else:
                conn.close()
                self._open -= 1
        self._idle = keep
        if keep:
            self._sweep = loop.call_later(self._keepalive, self._expire)
