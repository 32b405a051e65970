"""The seam between the gateway and the upstream HTTP API.

``Upstream`` is the interface the rest of the gateway calls; no httpx type crosses it, so another
client can stand behind it. ``HttpxUpstream`` is the implementation on a shared
``httpx.AsyncClient`` whose transport is injectable (tests, other transports). Library errors are
translated here, once, into the gateway's own:

- before response headers: connection failures -> UpstreamUnavailable (502), timeouts ->
  UpstreamTimeout (504);
- while streaming the body: anything -> UpstreamStreamError (the response has started, so the relay
  can only end the stream).

Timeouts are per phase: ``connect_timeout`` to open a connection, ``first_byte_timeout`` for the
response headers, ``idle_timeout`` between two body chunks. There is no total timeout, so a long,
healthy stream is never cut.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Protocol, TypeVar

import httpx

from gateway.cancellation import take_back_cancellation
from gateway.config import UpstreamSettings
from gateway.errors import UpstreamTimeout, UpstreamUnavailable

logger = logging.getLogger("gateway.upstream.base")

Headers = Sequence[tuple[bytes, bytes]]


class UpstreamStreamError(Exception):
    """The upstream failed after its response started (reset, timeout, protocol error)."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class UpstreamResponse(Protocol):
    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Headers:
        """As received, names in their original case."""
        ...

    def iter_raw(self) -> AsyncIterator[bytes]:
        """The body as it came off the wire (still compressed); raises UpstreamStreamError."""
        ...

    def arrived_size(self) -> int | None:
        """The body's size when all of it has arrived already (reading it cannot wait), else None."""
        ...

    async def aclose(self) -> None: ...


class Upstream(Protocol):
    async def send(self, method: str, target: str, headers: Headers, body: bytes) -> UpstreamResponse:
        """Send a request; returns once the response headers arrived. ``target`` is path + query."""
        ...

    async def get_bytes(self, target: str) -> bytes:
        """GET a small resource and return its body; non-2xx raises UpstreamUnavailable."""
        ...

    def connections(self) -> int:
        """Connections in use: the exchanges in progress (from sending until the response is closed),
        each holding one connection (HTTP/1.1) or waiting for one at ``max_connections``. Counted by
        the client itself: neither aiohttp nor httpx tells its pool's state through public API, so
        idle connections are not reported."""
        ...

    async def aclose(self) -> None: ...


T = TypeVar("T")


class InUse:
    """The count behind ``Upstream.connections()``: taken when an exchange starts, given back once
    when its response is closed (or when it failed before a response)."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    async def counted(self, sending: Awaitable[T]) -> T:
        """``await sending`` with the exchange counted; given back here if it fails (else by the
        response's ``aclose``)."""
        self.count += 1
        try:
            return await sending
        except BaseException:
            self.count -= 1
            raise


class _HttpxResponse:
    __slots__ = ("_idle_timeout", "_in_use", "_response", "headers", "status")

    def __init__(self, response: httpx.Response, idle_timeout: float, origin: bytes, in_use: InUse) -> None:
        self._response = response
        self._idle_timeout = idle_timeout
        self._in_use: InUse | None = in_use
        self.status = response.status_code
        self.headers = relative_locations(response.headers.raw, origin)

    def iter_raw(self) -> AsyncIterator[bytes]:
        return watched_chunks(self._response.aiter_raw(), self._idle_timeout, (httpx.HTTPError,))

    def arrived_size(self) -> int | None:
        return None  # httpx reads the body only when asked

    async def aclose(self) -> None:
        in_use, self._in_use = self._in_use, None
        if in_use is not None:
            in_use.count -= 1
        await self._response.aclose()


class HttpxUpstream:
    def __init__(self, settings: UpstreamSettings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._base = settings.url.rstrip("/")
        url = httpx.URL(self._base)
        self._origin = f"{url.scheme}://{url.netloc.decode('ascii')}".encode()
        self._first_byte_timeout = settings.first_byte_timeout
        self._idle_timeout = settings.idle_timeout
        limits = httpx.Limits(
            max_connections=settings.max_connections,
            max_keepalive_connections=settings.max_keepalive_connections,
            keepalive_expiry=settings.keepalive_expiry,
        )
        self._client = httpx.AsyncClient(
            # read=None: first-byte and idle deadlines are enforced per phase in send()/iter_raw().
            timeout=httpx.Timeout(
                connect=settings.connect_timeout,
                read=None,
                write=settings.write_timeout,
                pool=settings.connect_timeout,
            ),
            transport=transport or httpx.AsyncHTTPTransport(limits=limits, retries=0),
            follow_redirects=False,
            trust_env=False,
        )
        self._client.headers.clear()  # forward the client's headers, not httpx's defaults
        # One client serves every caller: it must never keep cookies from one answer for the next request.
        self._client.cookies.jar.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        self._in_use = InUse()

    async def send(self, method: str, target: str, headers: Headers, body: bytes) -> UpstreamResponse:
        response = await self._in_use.counted(self._send(method, target, headers, body))
        return _HttpxResponse(response, self._idle_timeout, self._origin, self._in_use)

    async def _send(self, method: str, target: str, headers: Headers, body: bytes) -> httpx.Response:
        request = self._client.build_request(method, self._base + target, headers=list(headers), content=body)
        try:
            async with asyncio.timeout(self._first_byte_timeout):
                response = await self._client.send(request, stream=True)
        except TimeoutError:
            raise UpstreamTimeout(
                f"The upstream did not start answering within {self._first_byte_timeout:g}s."
            ) from None
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # Nothing was sent: safe to retry, even a POST.
            error_class = UpstreamUnavailable if isinstance(exc, httpx.ConnectError) else UpstreamTimeout
            raise error_class(f"The upstream could not be reached: {describe_error(exc)}.", retryable=True) from None
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"The upstream timed out: {describe_error(exc)}.") from None
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(f"The upstream could not be reached: {describe_error(exc)}.") from None
        return response

    async def get_bytes(self, target: str) -> bytes:
        self._in_use.count += 1
        try:
            response = await self._client.get(self._base + target, headers={"accept": "application/json"})
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"GET {target} timed out: {describe_error(exc)}") from None
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(f"GET {target} failed: {describe_error(exc)}") from None
        finally:
            self._in_use.count -= 1  # the body is read whole: the connection went back to the pool
        if not response.is_success:
            raise UpstreamUnavailable(
                f"GET {target} answered HTTP {response.status_code}", upstream_status=response.status_code
            )
        return response.content

    def connections(self) -> int:
        return self._in_use.count

    async def aclose(self) -> None:
        await self._client.aclose()


class _IdleWatchdog:
    """Cancels the reading task when the upstream stays silent for ``idle`` seconds.

    One timer per stream, moved lazily: chunks arriving only update a timestamp. Time spent sending
    to a slow client does not count: only the waits for the upstream's next chunk do.
    """

    __slots__ = ("_handle", "_idle", "_loop", "_task", "fired", "waiting_since")

    def __init__(self, idle: float) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._idle = idle
        self.fired = False
        self.waiting_since: float | None = None
        self._handle = self._loop.call_later(idle, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        since = self.waiting_since
        if since is not None and now - since >= self._idle:
            self.fired = True
            self._task.cancel()
            return
        self._handle = self._loop.call_at((since if since is not None else now) + self._idle, self._check)

    def close(self) -> None:
        self._handle.cancel()


async def watched_chunks(
    chunks: AsyncIterator[bytes], idle_timeout: float, errors: tuple[type[BaseException], ...]
) -> AsyncIterator[bytes]:
    """``chunks`` with the idle timeout enforced and ``errors`` mapped to UpstreamStreamError."""
    watchdog = _IdleWatchdog(idle_timeout)
    loop = asyncio.get_running_loop()
    try:
        while True:
            watchdog.waiting_since = loop.time()
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if not watchdog.fired:
                    raise
                take_back_cancellation()  # the watchdog's own cancellation: raise the timeout instead
                raise UpstreamStreamError(f"the upstream sent nothing for {idle_timeout:g}s", timed_out=True) from None
            except errors as exc:
                raise UpstreamStreamError(describe_error(exc)) from exc
            watchdog.waiting_since = None
            yield chunk
    finally:
        watchdog.close()


def describe_error(exc: BaseException) -> str:
    """What a client may be told about a library error: its class only. Library messages name the
    upstream's host and port, so the detail goes to the server log instead."""
    logger.warning("upstream failure: %s: %s", type(exc).__name__, str(exc).split("\n", 1)[0])
    return type(exc).__name__


def relative_locations(headers: list[tuple[bytes, bytes]], origin: bytes) -> list[tuple[bytes, bytes]]:
    """A redirect to the upstream's own origin becomes a relative one, so the client stays on the
    gateway and never learns the upstream's address (nginx's proxy_redirect default)."""
    if not any(name.lower() == b"location" for name, _ in headers):
        return headers
    out = []
    for name, value in headers:
        if name.lower() == b"location" and value.lower().startswith(origin.lower()):
            rest = value[len(origin) :]
            if not rest or rest[:1] in (b"/", b"?"):
                value = rest if rest.startswith(b"/") else b"/" + rest
        out.append((name, value))
    return out
