"""The upstream clients alone: CPU per request of each behind the gateway's seam, against nginx.

    python bench/upstream_clients.py                      # builtin, aiohttp, httpx: chat, 64 at once
    python bench/upstream_clients.py --clients builtin,aiohttp --rounds 5 --requests 20000

Each client is the gateway's own class (``BuiltinUpstream``, ``AiohttpUpstream``, ``HttpxUpstream``)
with the default ``[upstream]`` settings, in a process of its own pinned to CPU 1 (nginx, serving
the benchmark's canned chat answer, on CPU 0). ``--concurrency`` tasks send the chat request
through ``send`` and read the whole body with ``iter_raw``, as the relay does; after a warm-up the
process's CPU time (every thread) over ``--requests`` requests is the figure, one round per client
in turn, ``--rounds`` times; medians and the ratio to the builtin client are printed. What this
leaves out (uvicorn, the gateway's own code) is the same whatever the client: the difference per
request is what the client choice changes in the gateway's CPU per request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as b
import payloads

CLIENTS = ("builtin", "aiohttp", "httpx")
HEADERS = [
    (b"authorization", f"Bearer {payloads.API_KEY}".encode()),
    (b"content-type", b"application/json"),
    (b"user-agent", b"bench"),
    (b"accept-encoding", b"identity"),
    (b"x-request-id", b"0123456789abcdef0123456789abcdef"),
]


async def _one_client(kind: str, url: str, requests: int, concurrency: int, warmup: int) -> float:
    """CPU microseconds per request of ``kind`` (in this process)."""
    from gateway.config import load_settings
    from gateway.upstream.aiohttp_client import AiohttpUpstream
    from gateway.upstream.base import HttpxUpstream, Upstream
    from gateway.upstream.builtin_client import BuiltinUpstream

    settings = load_settings(None, {"GATEWAY_UPSTREAM_URL": url, "GATEWAY_UPSTREAM_CLIENT": kind}).upstream
    upstream: Upstream = {"builtin": BuiltinUpstream, "aiohttp": AiohttpUpstream, "httpx": HttpxUpstream}[kind](
        settings
    )
    body = payloads.chat_request(stream=False)

    async def worker(count: int) -> None:
        for _ in range(count):
            response = await upstream.send("POST", "/v1/chat/completions", HEADERS, body)
            try:
                if response.status != 200:
                    raise SystemExit(f"{kind}: HTTP {response.status}")
                async for _chunk in response.iter_raw():
                    pass
            finally:
                await response.aclose()

    try:
        await asyncio.gather(*(worker(warmup // concurrency) for _ in range(concurrency)))
        start = time.process_time()
        await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
        return (time.process_time() - start) / (requests // concurrency * concurrency) * 1e6
    finally:
        await upstream.aclose()


def _child(args: argparse.Namespace) -> None:
    import uvloop

    us = uvloop.run(_one_client(args.child, args.url, args.requests, args.concurrency, args.warmup))
    print(json.dumps({"us": us}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--warmup", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return 0
    clients = [c for c in args.clients.split(",") if c]
    unknown = set(clients) - set(CLIENTS)
    if unknown:
        raise SystemExit(f"unknown clients: {sorted(unknown)}")
    b.ensure_system_tools()
    cpus = b.Cpus.plan(not args.no_pin)
    figures: dict[str, list[float]] = {c: [] for c in clients}
    with tempfile.TemporaryDirectory(prefix="upstream-clients-") as tmp, contextlib.ExitStack() as stack:
        nginx = b.start_nginx_servers(Path(tmp), cpus)
        stack.callback(nginx.proc.stop)
        url = f"http://{b.HOST}:{nginx.json_port}"
        for round_ in range(args.rounds):
            for kind in clients:
                argv = [sys.executable, __file__, "--child", kind, "--url", url, "--requests", str(args.requests),
                        "--warmup", str(args.warmup), "--concurrency", str(args.concurrency)]  # fmt: skip
                done = subprocess.run(
                    b.pinned(argv, cpus.proxy), capture_output=True, text=True, timeout=600, check=False
                )
                if done.returncode != 0:
                    raise SystemExit(f"{kind} failed: {done.stderr[-800:]}")
                us = json.loads(done.stdout.strip().splitlines()[-1])["us"]
                figures[kind].append(us)
                b.log(f"round {round_ + 1}/{args.rounds}: {kind} {us:.1f} us CPU per request")
    base = statistics.median(figures[clients[0]])
    about = f"{args.concurrency} at once, {args.requests} requests per round, medians of {args.rounds}"
    print(f"\n{cpus.describe()}; {about}")
    print(f"\n| client | CPU us per request | vs {clients[0]} |\n|---|---:|---:|")
    for kind in clients:
        median = statistics.median(figures[kind])
        print(f"| {kind} | {median:.1f} | {median / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
