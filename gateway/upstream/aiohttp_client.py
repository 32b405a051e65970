"""The upstream seam on aiohttp: the default client on the relay path.

Chosen by the benchmark (bench/README.md): httpx 0.28's connection pool scans every pooled
connection on each request (encode/httpx#3215), which capped the gateway near 120 requests/s at 64
clients; aiohttp's pool does not. Same contract as ``HttpxUpstream``: bodies relayed raw (no
decompression), no cookies kept, no redirects followed, per-phase timeouts, and library errors
translated here into the gateway's own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from gateway.config import UpstreamSettings
from gateway.errors import UpstreamTimeout, UpstreamUnavailable
from gateway.upstream.base import (
    Headers,
    InUse,
    UpstreamResponse,
    describe_error,
    relative_locations,
    watched_chunks,
)

# What aiohttp would otherwise add on its own: the client's headers are forwarded instead.
_SKIP_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})
_CHUNK_ERRORS = (aiohttp.ClientError, OSError)
# aiohttp's ClientOSError when writing the request body failed (client_reqrep.ClientRequest.write_bytes):
# its only mark (tests/upstream/test_reused_connection.py fails if a new aiohttp changes it).
_BODY_NOT_WRITTEN = "Can not write request body"


class _AiohttpResponse:
    __slots__ = ("_idle_timeout", "_in_use", "_response", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse, idle_timeout: float, origin: bytes, in_use: InUse) -> None:
        self._response = response
        self._idle_timeout = idle_timeout
        self._in_use: InUse | None = in_use
        self.status = response.status
        self.headers: Headers = relative_locations(list(response.raw_headers), origin)

    def iter_raw(self) -> AsyncIterator[bytes]:
        content = self._response.content
        if self.arrived_size() is not None:  # buffered whole: reading it can neither wait nor fail
            return content.iter_any()
        return watched_chunks(content.iter_any(), self._idle_timeout, _CHUNK_ERRORS)

    def arrived_size(self) -> int | None:
        content = self._response.content
        return content.total_bytes if content.is_eof() and content.exception() is None else None

    async def aclose(self) -> None:
        # A fully read body gives its connection back to the pool; anything else closes it, so an
        # abandoned stream stops the upstream generation.
        in_use, self._in_use = self._in_use, None
        if in_use is not None:
            in_use.count -= 1
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class AiohttpUpstream:
    def __init__(self, settings: UpstreamSettings) -> None:
        self._base = settings.url.rstrip("/")
        url = URL(self._base)
        self._origin = f"{url.scheme}://{url.raw_authority}".encode()
        self._first_byte_timeout = settings.first_byte_timeout
        self._idle_timeout = settings.idle_timeout
        self._in_use = InUse()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=settings.max_connections,
                limit_per_host=0,
                keepalive_timeout=settings.keepalive_expiry or None,
                force_close=settings.keepalive_expiry == 0,
            ),
            cookie_jar=aiohttp.DummyCookieJar(),  # one session serves every caller: keep no cookies
            auto_decompress=False,  # relay bytes as they came, Content-Encoding included
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            # The first-byte and idle deadlines are enforced per phase in send() and iter_raw().
            timeout=aiohttp.ClientTimeout(total=None, connect=settings.connect_timeout, sock_read=None),
            read_bufsize=2**16,
        )

    async def send(self, method: str, target: str, headers: Headers, body: bytes) -> UpstreamResponse:
        response = await self._in_use.counted(self._send(method, target, headers, body))
        return _AiohttpResponse(response, self._idle_timeout, self._origin, self._in_use)

    async def _send(self, method: str, target: str, headers: Headers, body: bytes) -> aiohttp.ClientResponse:
        wire = CIMultiDict((name.decode("latin-1"), value.decode("latin-1")) for name, value in headers)
        try:
            async with asyncio.timeout(self._first_byte_timeout):
                response = await self._session.request(
                    method, self._base + target, headers=wire, data=body or None, allow_redirects=False
                )
        except TimeoutError:
            raise UpstreamTimeout(
                f"The upstream did not start answering within {self._first_byte_timeout:g}s."
            ) from None
        except aiohttp.ConnectionTimeoutError as exc:
            raise UpstreamTimeout(
                f"The upstream could not be reached: {describe_error(exc)}.", retryable=True
            ) from None
        except aiohttp.ClientConnectorError as exc:
            # Nothing was sent: safe to retry, even a POST.
            raise UpstreamUnavailable(
                f"The upstream could not be reached: {describe_error(exc)}.", retryable=True
            ) from None
        except aiohttp.ClientOSError as exc:
            # The body could not be handed to the connection (typically a kept-alive one the upstream
            # closed just as it was reused): the upstream got at most a part of the request, never
            # all of it, so it cannot have acted on it: safe to retry, on a new connection.
            retryable = _BODY_NOT_WRITTEN in str(exc)
            raise UpstreamUnavailable(f"The upstream failed: {describe_error(exc)}.", retryable=retryable) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailable(f"The upstream failed: {describe_error(exc)}.") from None
        return response

    async def get_bytes(self, target: str) -> bytes:
        self._in_use.count += 1
        try:
            async with self._session.get(
                self._base + target, headers={"Accept": "application/json"}, allow_redirects=False
            ) as response:
                if not 200 <= response.status < 300:
                    raise UpstreamUnavailable(
                        f"GET {target} answered HTTP {response.status}", upstream_status=response.status
                    )
                return await response.read()
        except aiohttp.ClientResponseError as exc:
            raise UpstreamUnavailable(f"GET {target} failed: {describe_error(exc)}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailable(f"GET {target} failed: {describe_error(exc)}") from None
        finally:
            self._in_use.count -= 1  # the response is closed: its connection went back (or away)

    def connections(self) -> int:
        return self._in_use.count

    async def aclose(self) -> None:
        await self._session.close()
