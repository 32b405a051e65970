"""The builtin upstream client on real sockets: its pool, framing, limits, TLS and refusals.

The contract it shares with aiohttp and httpx (relay, streaming, faults, timeouts, retries) is
proved by the whole suite, which runs on it (the default), and by test_upstream_clients.py; this
file covers what is its own. The stand-in is a small asyncio HTTP/1.1 server on 127.0.0.1 whose
answers each test scripts byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import select
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_settings
from gateway.errors import UpstreamTimeout, UpstreamUnavailable
from gateway.upstream.base import UpstreamStreamError
from gateway.upstream.builtin_client import BuiltinUpstream
from gateway.upstream.h1_connection import HIGH_WATER

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
WAIT = 5.0

# Given the request's head (request line and headers) and body: the bytes to answer (None: none, and
# the connection stays open), and whether to close the connection after them.
Answer = Callable[[bytes, bytes], Awaitable[tuple[bytes | None, bool]]]


class StandIn:
    """An HTTP/1.1 server that reads each request (Content-Length bodies) and answers as told."""

    def __init__(self, answer: Answer) -> None:
        self._answer = answer
        self.requests: list[tuple[bytes, bytes]] = []
        self.connections = 0  # accepted in all
        self.open = 0
        self.most_open = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.url = ""

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> StandIn:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ssl_context)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        self.close_all()
        if self._server is not None:
            self._server.close()

    def close_all(self) -> None:
        """Close every connection now (the FIN leaves at once, even while the event loop is blocked)."""
        for writer in self._writers:
            with contextlib.suppress(OSError):
                writer.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
            writer.close()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        self._writers.append(writer)
        try:
            for _ in range(1000):  # requests on one connection, bounded
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                answer, close = await self._answer(head, body)
                if answer is not None:
                    writer.write(answer)
                    await writer.drain()
                if close:
                    break
                if answer is None:
                    await reader.read()  # never answers: waits for the client to close
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.open -= 1
            writer.close()


async def ok(head: bytes, body: bytes) -> tuple[bytes | None, bool]:
    return OK, False


def client(url: str, **upstream: Any) -> BuiltinUpstream:
    return BuiltinUpstream(dataclasses.replace(load_settings(None, {}).upstream, url=url, **upstream))


async def fetch(upstream: BuiltinUpstream, method: str = "POST", body: bytes = b"{}") -> tuple[int, bytes]:
    response = await upstream.send(method, "/v1/chat/completions", [(b"content-type", b"application/json")], body)
    try:
        return response.status, b"".join([chunk async for chunk in response.iter_raw()])
    finally:
        await response.aclose()


@pytest.fixture
async def stand_in() -> AsyncIterator[Callable[[Answer], Awaitable[StandIn]]]:
    started: list[StandIn] = []

    async def start(answer: Answer) -> StandIn:
        server = await StandIn(answer).start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


async def test_kept_alive_connections_are_reused_and_requests_are_framed(stand_in: Any) -> None:
    server = await stand_in(ok)
    upstream = client(server.url + "/base")
    try:
        for _ in range(5):
            assert await fetch(upstream) == (200, b"{}")
        assert await fetch(upstream, "GET", b"") == (200, b"{}")
    finally:
        await upstream.aclose()
    assert server.connections == 1  # one connection for all six
    head, body = server.requests[0]
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /base/v1/chat/completions HTTP/1.1"
    assert f"host: {server.url.removeprefix('http://')}".encode() in lines
    assert b"content-length: 2" in lines
    assert body == b"{}"
    assert b"content-length" not in server.requests[-1][0]  # a GET without a body says no length


async def test_a_large_upload_arrives_whole(stand_in: Any) -> None:
    server = await stand_in(ok)
    upstream = client(server.url)
    upload = bytes(range(256)) * 1024  # 256 KiB: written after its head, not copied onto it
    try:
        assert await fetch(upstream, body=upload) == (200, b"{}")
    finally:
        await upstream.aclose()
    head, body = server.requests[0]
    assert b"content-length: 262144" in head.split(b"\r\n")
    assert body == upload


async def test_a_connection_the_upstream_closed_while_idle_is_not_reused(stand_in: Any) -> None:
    server = await stand_in(ok)
    upstream = client(server.url)
    try:
        assert await fetch(upstream) == (200, b"{}")
        (pooled,) = upstream._idle
        assert pooled.transport is not None
        fd = pooled.transport.get_extra_info("socket").fileno()
        server.close_all()
        # The close is in the socket, unread by the event loop (blocked here): as when it lands the
        # moment the connection is taken again. The request must not go into it.
        assert select.select([fd], [], [], WAIT)[0]
        assert not pooled.lost
        assert await fetch(upstream) == (200, b"{}")
    finally:
        await upstream.aclose()
    assert server.connections == 2
    assert len(server.requests) == 2


async def test_at_max_connections_requests_wait_for_a_free_one(stand_in: Any) -> None:
    async def slow(head: bytes, body: bytes) -> tuple[bytes | None, bool]:
        await asyncio.sleep(0.05)
        return OK, False

    server = await stand_in(slow)
    upstream = client(server.url, max_connections=2)
    try:
        results = await asyncio.gather(*(fetch(upstream) for _ in range(6)))
    finally:
        await upstream.aclose()
    assert results == [(200, b"{}")] * 6
    assert server.most_open == 2
    assert server.connections == 2


async def test_no_free_connection_within_the_connect_timeout_is_a_retryable_timeout(stand_in: Any) -> None:
    async def never(head: bytes, body: bytes) -> tuple[bytes | None, bool]:
        return None, False

    server = await stand_in(never)
    upstream = client(server.url, max_connections=1, connect_timeout=0.2, first_byte_timeout=5.0)
    try:
        hanging = asyncio.create_task(fetch(upstream))
        await asyncio.sleep(0.1)
        with pytest.raises(UpstreamTimeout) as caught:
            await fetch(upstream)
        assert caught.value.retryable
        assert "max_connections" in caught.value.message
        hanging.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hanging
        assert upstream.connections() == 0
        assert upstream._open == 0  # the cancelled exchange's connection was closed, its slot freed
    finally:
        await upstream.aclose()


async def test_no_answer_within_the_first_byte_timeout_is_a_timeout_and_the_connection_is_closed(
    stand_in: Any,
) -> None:
    async def never(head: bytes, body: bytes) -> tuple[bytes | None, bool]:
        return None, False

    server = await stand_in(never)
    upstream = client(server.url, first_byte_timeout=0.2)
    try:
        with pytest.raises(UpstreamTimeout) as caught:
            await fetch(upstream)
        assert not caught.value.retryable  # the request was sent: the upstream may be working on it
        for _ in range(100):
            if server.open == 0:
                break
            await asyncio.sleep(0.02)
        assert server.open == 0
    finally:
        await upstream.aclose()


async def test_keepalive_expiry_zero_opens_a_connection_per_request(stand_in: Any) -> None:
    server = await stand_in(ok)
    upstream = client(server.url, keepalive_expiry=0)
    try:
        for _ in range(3):
            assert await fetch(upstream) == (200, b"{}")
    finally:
        await upstream.aclose()
    assert server.connections == 3


async def test_idle_connections_are_closed_after_the_keepalive_expiry(stand_in: Any) -> None:
    server = await stand_in(ok)
    upstream = client(server.url, keepalive_expiry=0.1)
    try:
        assert await fetch(upstream) == (200, b"{}")
        for _ in range(100):
            if server.open == 0:
                break
            await asyncio.sleep(0.02)
        assert server.open == 0
        assert upstream._idle == []
        assert await fetch(upstream) == (200, b"{}")
    finally:
        await upstream.aclose()


@pytest.mark.parametrize(
    ("answer", "close", "body"),
    [
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", False, b"abcde"),
        (b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end", True, b"until the end"),
        (b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + OK, False, b"{}"),
    ],
    ids=["chunked", "until-close", "interim-103"],
)
async def test_bodies_framed_every_way_arrive_whole(stand_in: Any, answer: bytes, close: bool, body: bytes) -> None:
    async def scripted(head: bytes, _: bytes) -> tuple[bytes | None, bool]:
        return answer, close

    server = await stand_in(scripted)
    upstream = client(server.url)
    try:
        assert await fetch(upstream) == (200, body)
        assert await fetch(upstream) == (200, body)
    finally:
        await upstream.aclose()
    assert server.connections == (2 if close else 1)


async def test_bytes_beyond_the_answer_spoil_the_connection(stand_in: Any) -> None:
    async def doubled(head: bytes, body: bytes) -> tuple[bytes | None, bool]:
        return OK + b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nextra", False  # an answer nobody asked for

    server = await stand_in(doubled)
    upstream = client(server.url)
    try:
        assert await fetch(upstream) == (200, b"{}")  # the answer asked for, intact
        assert await fetch(upstream) == (200, b"{}")  # on a new connection: the first is not reused
    finally:
        await upstream.aclose()
    assert server.connections == 2


async def test_bytes_on_an_idle_connection_spoil_it(stand_in: Any) -> None:
    server = await stand_in(ok)
    upstream = client(server.url)
    try:
        assert await fetch(upstream) == (200, b"{}")
        for writer in server._writers:
            writer.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n")  # unasked, while idle
        for _ in range(100):
            if not upstream._idle or upstream._idle[0].spoiled:
                break
            await asyncio.sleep(0.02)
        assert await fetch(upstream) == (200, b"{}")
    finally:
        await upstream.aclose()
    assert server.connections == 2
    assert len(server.requests) == 2


async def test_a_body_cut_short_is_a_stream_error(stand_in: Any) -> None:
    async def cut(head: bytes, body: bytes) -> tuple[bytes | None, bool]:
        return b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this", True

    server = await stand_in(cut)
    upstream = client(server.url)
    try:
        response = await upstream.send("POST", "/v1/embeddings", [], b"{}")
        assert response.status == 200
        with pytest.raises(UpstreamStreamError):
            _ = [chunk async for chunk in response.iter_raw()]
        await response.aclose()
        assert upstream.connections() == 0
    finally:
        await upstream.aclose()


async def test_a_malformed_answer_is_502_not_a_crash(stand_in: Any) -> None:
    async def garbage(head: bytes, body: bytes) -> tuple[bytes | None, bool]:
        return b"NOT HTTP AT ALL\r\n\r\n", False

    server = await stand_in(garbage)
    upstream = client(server.url)
    try:
        with pytest.raises(UpstreamUnavailable) as caught:
            await fetch(upstream)
        assert not caught.value.retryable
    finally:
        await upstream.aclose()


async def test_a_line_break_in_a_header_is_never_sent(stand_in: Any) -> None:
    server = await stand_in(ok)
    upstream = client(server.url)
    try:
        with pytest.raises(UpstreamUnavailable, match="line break"):
            await upstream.send("POST", "/v1/embeddings", [(b"x-note", b"a\r\nx-injected: 1")], b"{}")
        assert upstream.connections() == 0
    finally:
        await upstream.aclose()
    assert server.requests == []


async def test_a_slow_reader_pauses_the_upstream_instead_of_buffering_its_body(stand_in: Any) -> None:
    size = 16 * HIGH_WATER

    async def big(head: bytes, body: bytes) -> tuple[bytes | None, bool]:
        return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size + b"x" * size, False

    server = await stand_in(big)
    upstream = client(server.url)
    try:
        response = await upstream.send("POST", "/v1/embeddings", [], b"{}")
        await asyncio.sleep(0.3)  # the upstream writes all it can; nothing is read meanwhile
        conn = response._conn  # type: ignore[attr-defined]  # (the connection under the response)
        assert conn.buffered <= HIGH_WATER + (1 << 18)  # paused at the high-water mark (plus one read)
        received = sum([len(chunk) async for chunk in response.iter_raw()])
        await response.aclose()
    finally:
        await upstream.aclose()
    assert received == size


async def test_unreachable_upstream_is_retryable_and_names_no_address() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    upstream = client(f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(UpstreamUnavailable) as caught:
            await fetch(upstream)
        assert caught.value.retryable
        assert str(port) not in caught.value.message
    finally:
        await upstream.aclose()


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl), and its key."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    openssl = shutil.which("openssl")
    assert openssl is not None, "the openssl command is needed to make the test's certificate"
    subprocess.run(  # noqa: S603 - fixed arguments
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


async def test_https_upstreams_are_verified(certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = await StandIn(ok).start(context)
    try:
        untrusted = client(server.url)
        with pytest.raises(UpstreamUnavailable) as caught:
            await fetch(untrusted)
        assert caught.value.retryable
        await untrusted.aclose()
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trusted from here on (OpenSSL's default paths)
        trusted = client(server.url)
        try:
            assert await fetch(trusted) == (200, b"{}")
            assert await fetch(trusted) == (200, b"{}")
        finally:
            await trusted.aclose()
    finally:
        await server.stop()
    assert len(server.requests) == 2
