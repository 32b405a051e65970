"""The floor of a Python relay: the least an ASGI app on uvicorn + aiohttp can do per request.

    python bench/relay_floor.py --config F --port P

Reads the request body, forwards it with the client's headers to ``[upstream] url`` on one shared
``aiohttp.ClientSession`` (the gateway's settings: no cookies, no decompression, no auto headers)
and relays status, headers and body back. No routing, parsing, validation, metering, metrics,
ledger, timeouts or disconnect watch: what remains is uvicorn (httptools, uvloop) and aiohttp, run
with the arguments ``gateway serve`` uses. The gateway's CPU per request minus this one's is what
the gateway's own code costs. ``GET /readyz`` answers 200 so the benchmark can start it like a proxy.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import aiohttp
import uvicorn

from gateway.cli import uvicorn_options
from gateway.config import load_settings

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Hop-by-hop headers and those aiohttp sets itself.
_DROP = frozenset({b"host", b"content-length", b"connection", b"transfer-encoding", b"keep-alive"})


class FloorRelay:
    def __init__(self, upstream: str) -> None:
        self._base = upstream.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["path"] == "/readyz":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k not in _DROP]
        assert self._session is not None
        async with self._session.request(
            scope["method"], self._base + scope["path"], headers=headers, data=body, allow_redirects=False
        ) as response:
            out = [(k, v) for k, v in response.raw_headers if k.lower() not in _DROP]
            await send({"type": "http.response.start", "status": response.status, "headers": out})
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=512, limit_per_host=0),
                    cookie_jar=aiohttp.DummyCookieJar(),
                    auto_decompress=False,
                    skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._session is not None:
                    await self._session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def granian_app() -> FloorRelay:
    """The same relay for another server (bench/server_trial.py: ``granian --factory
    relay_floor:granian_app``), its upstream from ``FLOOR_UPSTREAM``."""
    return FloorRelay(os.environ["FLOOR_UPSTREAM"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    settings = load_settings(Path(args.config), os.environ, {"port": args.port})
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    uvicorn.run(FloorRelay(settings.upstream.url), **uvicorn_options(settings))  # as `gateway serve` runs
    return 0


if __name__ == "__main__":
    sys.exit(main())
