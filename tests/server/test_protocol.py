"""The connection limits of gateway.server.protocol, unit-tested where sockets prove nothing: the
protocol fed by hand through a fake transport (the same limits over real sockets: tests/e2e/
test_hostile_client.py), and the protocol as the CLI hands it to uvicorn's worker processes."""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

from uvicorn.config import Config
from uvicorn.server import ServerState

from gateway.cli import uvicorn_options
from gateway.config import LimitsSettings, load_settings
from gateway.server.protocol import LimitedHttpToolsProtocol


class FakeTransport(asyncio.Transport):
    """What the protocol writes, and whether it half-closed or closed."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False
        self.eof = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


def fake_connection(limits: LimitsSettings) -> tuple[LimitedHttpToolsProtocol, FakeTransport, ServerState]:
    config = Config(ok_app, lifespan="off", log_config=None, proxy_headers=False)
    state = ServerState()
    protocol = LimitedHttpToolsProtocol(config, state, {}, asyncio.get_running_loop(), limits=limits)
    transport = FakeTransport()
    protocol.connection_made(transport)
    return protocol, transport, state


async def test_a_header_block_sent_in_small_pieces_is_counted_exactly() -> None:
    limits = LimitsSettings(max_header_bytes=4096)
    protocol, transport, _ = fake_connection(limits)
    raw = b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 10_000
    fed = 0
    for start in range(0, len(raw), 100):
        if transport.written:
            break
        protocol.data_received(raw[start : start + 100])
        fed += 100
    assert transport.written.startswith(b"HTTP/1.1 431 ")
    assert fed <= limits.max_header_bytes + 100  # refused within one piece of the bound
    assert transport.eof  # half-closed: lingering
    protocol.data_received(b"a" * 100_000)  # discarded, not parsed
    protocol.connection_lost(None)


async def test_an_endless_trailer_is_a_header_block_too() -> None:
    limits = LimitsSettings(max_header_bytes=4096)
    protocol, transport, state = fake_connection(limits)
    protocol.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: ")
    for _ in range(100):  # 10 KB of one trailer that never ends
        if transport.written:
            break
        protocol.data_received(b"a" * 100)
    assert transport.written.startswith(b"HTTP/1.1 431 "), bytes(transport.written)
    assert transport.eof
    for _ in range(100):  # the app's task sees a disconnect, and its own answer is dropped
        if not state.tasks:
            break
        await asyncio.sleep(0.01)
    assert transport.written.count(b"HTTP/1.1") == 1
    protocol.connection_lost(None)


async def test_many_pipelined_requests_in_one_chunk_are_each_their_own_header_block() -> None:
    limits = LimitsSettings(max_header_bytes=4096)
    protocol, transport, state = fake_connection(limits)
    one = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 3000 + b"\r\n\r\n"
    # Three whole requests (9 KB) and the start of a fourth in one chunk, the rest of it in another.
    protocol.data_received(one * 3 + one[:2000])
    protocol.data_received(one[2000:])
    for _ in range(100):
        if transport.written.count(b"HTTP/1.1 200 OK") == 4 and not state.tasks:
            break
        await asyncio.sleep(0.01)
    assert transport.written.count(b"HTTP/1.1 200 OK") == 4, bytes(transport.written)
    protocol.connection_lost(None)


async def test_a_connection_beyond_max_connections_is_answered_503_at_once() -> None:
    limits = LimitsSettings(max_connections=1)
    first, first_transport, state = fake_connection(limits)
    config = Config(ok_app, lifespan="off", log_config=None)
    second = LimitedHttpToolsProtocol(config, state, {}, asyncio.get_running_loop(), limits=limits)
    second_transport = FakeTransport()
    second.connection_made(second_transport)
    assert second_transport.written.startswith(b"HTTP/1.1 503 ")
    assert b"retry-after: 1\r\n" in second_transport.written
    assert second not in state.connections
    assert not first_transport.written
    second.connection_lost(None)
    first.connection_lost(None)


async def test_a_body_that_arrives_with_its_headers_arms_no_timer() -> None:
    """The common case costs nothing: no body timer when the whole body came with the headers."""
    protocol, _transport, _state = fake_connection(LimitsSettings(body_timeout=0.2))
    protocol.data_received(b"POST /x HTTP/1.1\r\nHost: g\r\nContent-Length: 2\r\n\r\n{}")
    assert protocol._body_timer is None
    protocol.data_received(b"POST /x HTTP/1.1\r\nHost: g\r\nContent-Length: 4\r\n\r\n{}")
    assert protocol._body_timer is not None  # half a body: watched
    protocol.connection_lost(None)
    assert protocol._body_timer is None


def test_the_served_protocol_and_its_limits_pickle_for_worker_processes() -> None:
    settings = load_settings(None, {"GATEWAY_LIMITS_MAX_HEADERS": "7"})
    options = uvicorn_options(settings)
    protocol = pickle.loads(pickle.dumps(options["http"]))  # noqa: S301 - our own object
    assert protocol.func is LimitedHttpToolsProtocol
    assert protocol.keywords["limits"].max_headers == 7
    assert options["timeout_keep_alive"] == settings.limits.keepalive_timeout
