"""A kept-alive upstream connection that the upstream closes just as the gateway reuses it.

aiohttp takes the pooled connection (still open as far as the event loop knows), then finds the
transport closing when it writes the request body: ``ClientOSError: Can not write request body``.
The upstream never got the request, so the gateway retries it (``[upstream] retries``) on a new
connection instead of answering 502. Seen once under load in a full run; made deterministic here:
a raw TCP upstream stand-in (blocking sockets, in its own threads) closes its connections when the
gateway reuses one, and the reuse waits until the close has reached the gateway's socket, unread,
before the request goes on (aiohttp's ``on_connection_reuseconn`` trace hook, on the gateway's own
upstream session). The gateway is the real stack over the real services and aiohttp client.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import threading
from types import SimpleNamespace

import aiohttp
import httpx
import orjson

from gateway.app import build_stack
from gateway.config import load_settings
from gateway.demo import default_catalog
from gateway.services import open_services
from gateway.upstream.aiohttp_client import AiohttpUpstream
from tests.helpers.gateway import CHAT_PATH, chat_body
from tests.helpers.upstreams import OK_CHAT

WAIT = 5.0


class KeepAliveUpstream:
    """Answers ``GET /api/models`` (the demo catalog) and any POST (a chat completion) on kept-alive
    connections, recording each request it read whole; ``close_all`` closes every connection now."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.received: list[tuple[str, bytes]] = []
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self._catalog = orjson.dumps(default_catalog())
        threading.Thread(target=self._accept, name="keepalive-upstream", daemon=True).start()

    def close_all(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()

    def stop(self) -> None:
        self._listener.close()
        self.close_all()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            connection.settimeout(WAIT * 6)
            with self._lock:
                self._connections.append(connection)
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        buffered = b""
        with contextlib.suppress(OSError):
            for _ in range(1000):  # requests on one connection, bounded
                while b"\r\n\r\n" not in buffered:
                    data = connection.recv(65536)
                    if not data:
                        return
                    buffered += data
                head, _, buffered = buffered.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                length = next((int(v) for n, _, v in (ln.partition(":") for ln in lines[1:])
                               if n.strip().lower() == "content-length"), 0)  # fmt: skip
                while len(buffered) < length:
                    data = connection.recv(65536)
                    if not data:
                        return  # closed with the request unread: it never counts as received
                    buffered += data
                body, buffered = buffered[:length], buffered[length:]
                self.received.append((lines[0], body))
                answer = self._catalog if lines[0].startswith("GET /api/models") else OK_CHAT
                connection.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    + f"content-length: {len(answer)}\r\n\r\n".encode()
                    + answer
                )


async def test_a_request_whose_body_could_not_be_written_on_a_reused_connection_is_retried() -> None:
    stand_in = KeepAliveUpstream()
    env = {
        "GATEWAY_UPSTREAM_URL": stand_in.url,
        "GATEWAY_UPSTREAM_CLIENT": "aiohttp",  # (aiohttp's own case; the builtin client's: test_builtin_client)
        "GATEWAY_USAGE_PATH": "",
        "GATEWAY_CATALOG_STATUS_INTERVAL": "0",
    }
    settings = load_settings(None, env)
    armed = False
    closed_on_reuse = 0
    session: aiohttp.ClientSession | None = None  # the gateway's upstream session, once open

    async def close_as_it_is_reused(_: aiohttp.ClientSession, __: SimpleNamespace, ___: object) -> None:
        nonlocal armed, closed_on_reuse
        if not armed:
            return
        armed = False
        assert session is not None
        assert session.connector is not None
        (reused,) = session.connector._acquired  # the connection being reused (aiohttp's own set)
        assert reused.transport is not None
        fd = reused.transport.get_extra_info("socket").fileno()
        stand_in.close_all()
        # The upstream's close is in the gateway's socket, unread by the event loop: the request goes
        # on with the connection aiohttp believes open, as when the close lands at the moment of reuse.
        closed_on_reuse += bool(select.select([fd], [], [], WAIT)[0])
        await asyncio.sleep(0)

    trace = aiohttp.TraceConfig()
    trace.on_connection_reuseconn.append(close_as_it_is_reused)
    trace.freeze()
    try:
        async with open_services(settings) as services:
            assert isinstance(services.upstream, AiohttpUpstream)
            session = services.upstream._session
            session._trace_configs.append(trace)  # on the gateway's own upstream session
            await services.catalog.current()
            stack = build_stack(settings, services)
            transport = httpx.ASGITransport(app=stack.proxy)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=WAIT) as http:
                first = await http.post(CHAT_PATH, json=chat_body("first"))
                armed = True
                second = await http.post(CHAT_PATH, json=chat_body("second"))
            metrics = services.metrics.render().decode()
    finally:
        stand_in.stop()
    assert first.status_code == 200, first.text
    assert closed_on_reuse == 1  # the fault happened: the kept-alive connection was closed as it was reused
    assert second.status_code == 200, second.text
    assert second.content == OK_CHAT
    chats = [orjson.loads(body)["messages"][0]["content"] for line, body in stand_in.received if "POST" in line]
    assert chats == ["first", "second"]  # the second was sent whole once: on the new connection
    assert f'gateway_upstream_retries_total{{endpoint="{CHAT_PATH}"}} 1.0' in metrics
