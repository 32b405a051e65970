"""HeadCork on a real socket: a response's head goes out with its body, never later than the loop
iteration it was written in, and before a close. (That it saves a system call per answer is the
benchmark's to show: bench/README.md.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.server.cork import MAX_JOINED, HeadCork

WAIT = 5.0
HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"


class Recorder(asyncio.Protocol):
    """The server side: the transport the cork writes to, and each write that reached it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.made = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.made.set()


@pytest.fixture
async def pair() -> AsyncIterator[tuple[HeadCork, asyncio.StreamReader, list[bytes]]]:
    """A cork on the server side of a loopback connection, the client's reader, and the writes
    that reached the server's transport."""
    loop = asyncio.get_running_loop()
    recorder = Recorder()
    server = await loop.create_server(lambda: recorder, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await asyncio.wait_for(recorder.made.wait(), WAIT)
    assert recorder.transport is not None
    writes: list[bytes] = []
    real_write = recorder.transport.write

    class Counting:  # the transport as uvicorn's cycle sees it, counting the writes that go out
        def __getattr__(self, name: str) -> object:
            return getattr(recorder.transport, name)

        def write(self, data: bytes) -> None:
            writes.append(data)
            real_write(data)

    yield HeadCork(Counting(), loop), reader, writes  # type: ignore[arg-type]
    writer.close()
    server.close()


async def test_a_whole_answer_goes_out_in_one_write(pair: tuple[HeadCork, asyncio.StreamReader, list[bytes]]) -> None:
    cork, reader, writes = pair
    cork.write(HEAD)
    cork.write(b"hello")
    assert writes == [HEAD + b"hello"]
    assert await asyncio.wait_for(reader.readexactly(len(HEAD) + 5), WAIT) == HEAD + b"hello"
    cork.write(b"more")  # later writes go straight through
    assert writes[-1] == b"more"


async def test_a_head_alone_goes_out_at_the_end_of_the_loop_iteration(
    pair: tuple[HeadCork, asyncio.StreamReader, list[bytes]],
) -> None:
    cork, reader, writes = pair
    cork.write(HEAD)
    assert writes == []
    assert await asyncio.wait_for(reader.readexactly(len(HEAD)), WAIT) == HEAD  # no body was written
    assert writes == [HEAD]
    cork.write(b"hello")
    assert writes == [HEAD, b"hello"]


async def test_a_close_sends_the_head_first(pair: tuple[HeadCork, asyncio.StreamReader, list[bytes]]) -> None:
    cork, reader, _ = pair
    cork.write(HEAD)
    cork.close()
    assert await asyncio.wait_for(reader.read(), WAIT) == HEAD


async def test_a_large_body_is_not_copied_onto_the_head(
    pair: tuple[HeadCork, asyncio.StreamReader, list[bytes]],
) -> None:
    cork, reader, writes = pair
    body = b"x" * (MAX_JOINED + 1)
    cork.write(HEAD)
    cork.write(body)
    assert writes == [HEAD, body]
    assert await asyncio.wait_for(reader.readexactly(len(HEAD) + len(body)), WAIT) == HEAD + body
