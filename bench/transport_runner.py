"""Run the gateway under uvicorn with a chosen httpx transport (the transport experiment).

    python bench/transport_runner.py --config F --port P --transport httpx|aiohttp

Both run the gateway's httpx upstream client (``[upstream] client = "httpx"``, set here whatever
the config says: the gateway's default is its own builtin client, which takes no transport).
``httpx``: ``create_app(settings)``, httpx's own ``httpx.AsyncHTTPTransport``.
``aiohttp``: ``create_app(settings, transport=AiohttpTransport(...))`` from ``httpx-aiohttp``,
with the pool sized from ``[upstream]`` like the default transport. The gateway's files are not
changed: the transport goes through the seam ``create_app`` already has. uvicorn runs with the
arguments ``gateway serve`` uses (loop and http "auto": uvloop and httptools when installed).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import httpx
import uvicorn

from gateway.app import create_app
from gateway.cli import uvicorn_options
from gateway.config import load_settings
from gateway.ops.logs import configure as configure_logging


def build_transport(kind: str, limits: httpx.Limits) -> httpx.AsyncBaseTransport | None:
    if kind == "httpx":
        return None
    from httpx_aiohttp import AiohttpTransport

    return AiohttpTransport(limits=limits, trust_env=False, retries=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--transport", choices=["httpx", "aiohttp"], default="httpx")
    args = parser.parse_args()
    env = {**os.environ, "GATEWAY_UPSTREAM_CLIENT": "httpx"}  # the client whose transports are compared
    settings = load_settings(Path(args.config), env, {"port": args.port})
    up = settings.upstream
    limits = httpx.Limits(
        max_connections=up.max_connections,
        max_keepalive_connections=up.max_keepalive_connections,
        keepalive_expiry=up.keepalive_expiry,
    )
    app = create_app(settings, transport=build_transport(args.transport, limits))
    configure_logging(settings.log_level, settings.log_format)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    config = uvicorn.Config(app, **uvicorn_options(settings))  # exactly as `gateway serve` runs it
    factory = config.get_loop_factory()
    loop = "asyncio" if factory is None else getattr(factory, "__module__", "?")
    print(
        f"client={settings.upstream.client} transport={args.transport} loop={loop} "
        f"(uvicorn loop={config.loop} http={config.http})",
        flush=True,
    )
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
