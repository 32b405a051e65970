"""Instructions per request of a whole proxy process, the server included, counted by callgrind.

    python bench/server_instructions.py                          # gateway, gateway-lean, floor
    python bench/server_instructions.py --kinds gateway,floor --requests 2000,6000 --concurrency 16

Why: ``bench/instructions.py`` counts the gateway's own code in process (no sockets, no uvicorn,
no upstream client), and bench/run.py's CPU per request in the server moves by several percent
from run to run. This counts what the server process executes per chat request, sockets, uvicorn,
the upstream client and every thread included, the same each run: so the gateway's distance from
the floor (bench/relay_floor.py) can be split into instructions and the rest (cache misses, the
threads' interplay, the machine), which an instruction count cannot see.

How: nginx serves the canned answers (as in bench/run.py); each proxy is started under
``valgrind --tool=callgrind`` twice, sent ``--requests`` small then large (after the same
``--warmup``) chat requests from this process at ``--concurrency`` (httpx, keep-alive), and stopped
with SIGTERM (a clean shutdown, as an operator's); the difference of the two totals over the
difference of the requests is the instructions per request, start-up, warm-up and shutdown taken
out. ``PYTHONHASHSEED=0``. Nothing is pinned (instructions do not depend on it). Runs take a minute
or two each (callgrind is ~50x slower than the CPU). With ``--keep DIR`` the callgrind files are
kept, for ``callgrind_annotate`` (by C function: the Python code shows as the interpreter's).

The same code gives the same count to ~0.1 % (gateway-lean twice: 704,133 and 704,170), with one
exception: a full collection of the garbage collector, which comes every few thousand requests in
a process without the gateway's GC policy (the floor: 588,303 in a window without one, 635,621 and
643,492 with), so the windows are thousands of requests long and the floor's figure is read with
its collections in.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as b
import httpx
import payloads

KINDS = ("gateway", "gateway-lean", "floor")


async def _drive(url: str, body: bytes, requests: int, concurrency: int) -> None:
    """``requests`` chat requests at ``concurrency``; every answer must be a 200."""
    headers = {"content-type": "application/json", "authorization": f"Bearer {payloads.API_KEY}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    left = iter(range(requests))
    async with httpx.AsyncClient(limits=limits, timeout=120.0) as client:

        async def worker() -> None:
            for _ in left:
                response = await client.post(url, content=body, headers=headers)
                if response.status_code != 200:
                    raise SystemExit(f"server_instructions: {response.status_code} {response.text[:300]}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def count(
    kind: str, workdir: Path, upstream: str, requests: int, args: argparse.Namespace, keep: Path | None
) -> list[int]:
    """The instructions callgrind counts for one run of ``kind`` serving ``args.warmup + requests``: the
    whole process's, or with ``--threads`` each thread's (the main thread first)."""
    port = b.free_port()
    profile = b.GATEWAY_KIND_PROFILES.get(kind, "defaults")
    config = b.gateway_config(workdir, f"{kind}-{requests}", upstream, port, profile=profile)
    out = (keep or workdir) / f"callgrind.{kind}.{requests}"
    threads = ["--separate-threads=yes"] if args.threads else []
    argv = [
        "valgrind",
        "--tool=callgrind",
        *threads,
        f"--callgrind-out-file={out}",
        *b.gateway_argv(kind, config, port),
    ]
    proc = b.spawn(f"{kind}-{requests}", argv, workdir, None, env=b.gateway_env(0, None))
    try:
        b.wait_ready(proc, port, "/readyz", 300.0)
        url = f"http://{b.HOST}:{port}/v1/chat/completions"
        body = payloads.chat_request(stream=False)
        asyncio.run(_drive(url, body, args.warmup, args.concurrency))
        asyncio.run(_drive(url, body, requests, args.concurrency))
    finally:
        proc.stop(timeout=120.0)
    # With --threads, callgrind writes a file per thread (out-01 the main thread, then in start order).
    parts = sorted(out.parent.glob(f"{out.name}-*")) if args.threads else [out]
    totals = [_total(part) for part in parts]
    if not totals or None in totals:
        raise SystemExit(f"server_instructions: no callgrind total for {kind}:\n{proc.tail(30)}")
    return [total for total in totals if total is not None]


def _total(path: Path) -> int | None:
    text = path.read_text(errors="replace") if path.exists() else ""
    found = re.search(r"^summary:\s*(\d+)", text, re.MULTILINE) or re.search(r"^totals:\s*(\d+)", text, re.MULTILINE)
    return None if found is None else int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", type=lambda s: s.split(","), default=list(KINDS), help=", ".join(KINDS))
    parser.add_argument("--requests", type=lambda s: tuple(int(n) for n in s.split(",")), default=(2000, 6000),
                        help="requests of the shorter and the longer run (default 2000,6000)")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--keep", type=Path, help="keep the callgrind files in this folder")
    parser.add_argument("--threads", action="store_true", help="also the instructions per request of each thread")
    args = parser.parse_args()
    small, large = args.requests if len(args.requests) == 2 else (0, 0)
    if any(k not in KINDS for k in args.kinds) or not 1 <= small < large <= 100_000 or not 1 <= args.concurrency <= 256:
        parser.error(f"kinds among {KINDS}, --requests SMALL,LARGE with 1 <= SMALL < LARGE <= 100000")
    b.ensure_system_tools()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gateway-server-instructions-") as tmp:
        workdir = Path(tmp)
        nginx = b.start_nginx_servers(workdir, b.Cpus.plan(False))
        try:
            upstream = f"http://{b.HOST}:{nginx.json_port}"
            print(f"chat, {args.concurrency} in flight, ({large} - {small}) requests under callgrind, whole process")
            per: dict[str, float] = {}
            for kind in args.kinds:
                started = time.monotonic()
                short, long = (count(kind, workdir, upstream, n, args, args.keep) for n in (small, large))
                per[kind] = (sum(long) - sum(short)) / (large - small)
                print(f"  {kind:14s} {per[kind]:12,.0f} instructions per request ({time.monotonic() - started:.0f} s)",
                      flush=True)  # fmt: skip
                if args.threads and len(short) == len(long):
                    each = ", ".join(f"{(b_ - a) / (large - small):,.0f}" for a, b_ in zip(short, long, strict=True))
                    print(f"  {'':14s} by thread, the main thread first: {each}", flush=True)
        finally:
            nginx.proc.stop()
    if "floor" in per:
        for kind, value in per.items():
            if kind != "floor":
                print(f"  {kind} / floor = {value / per['floor']:.3f}x")


if __name__ == "__main__":
    main()
