"""Instructions per request of a whole proxy process, the server included, counted by callgrind.

    python bench/server_instructions.py                          # gateway, gateway-lean, floor
    python bench/server_instructions.py --kinds gateway,floor --requests 2000,6000 --concurrency 16
    python bench/server_instructions.py --kinds gateway,gateway-lean --threads --cache-sim
    python bench/server_instructions.py --kinds gateway --env GATEWAY_USAGE_FLUSH_INTERVAL=3600

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

``--cache-sim`` has callgrind simulate the caches too (a first-level cache for instructions and one
for data, and a last-level cache, sized as this machine's; ~2x slower): the misses per request of
each level, and an estimate of the cycles, ``Ir + 10 x first-level misses + 100 x last-level
misses`` (the rough weights of valgrind's manual). Callgrind runs one thread at a time on one
simulated cache, as the proxy's threads share the one core they are pinned to in bench/run.py: a
writer thread that evicts the event loop's lines shows as the event loop's misses. callgrind has
two levels; ``--ll 1048576,8,64`` makes the last one a core's own second-level cache (1 MiB on this
machine) rather than the shared third.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

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


# callgrind's events with --cache-sim=yes: instructions, data reads and writes, then the misses.
FIRST_LEVEL_MISSES: Final = ("I1mr", "D1mr", "D1mw")
LAST_LEVEL_MISSES: Final = ("ILmr", "DLmr", "DLmw")


def count(
    kind: str, workdir: Path, upstream: str, requests: int, args: argparse.Namespace, keep: Path | None
) -> list[dict[str, int]]:
    """What callgrind counts for one run of ``kind`` serving ``args.warmup + requests`` (each event:
    ``Ir``, and with ``--cache-sim`` the misses): the whole process's, or with ``--threads`` each
    thread's (the main thread first)."""
    port = b.free_port()
    profile = b.GATEWAY_KIND_PROFILES.get(kind, "defaults")
    config = b.gateway_config(workdir, f"{kind}-{requests}", upstream, port, profile=profile)
    out = (keep or workdir) / f"callgrind.{kind}.{requests}"
    options = ["--separate-threads=yes"] if args.threads else []  # callgrind's, besides the output file
    if args.cache_sim:
        options += ["--cache-sim=yes", *([f"--LL={args.ll}"] if args.ll else [])]
    argv = [
        "valgrind",
        "--tool=callgrind",
        *options,
        f"--callgrind-out-file={out}",
        *b.gateway_argv(kind, config, port),
    ]
    env = b.gateway_env(0, None) | dict(args.env)
    proc = b.spawn(f"{kind}-{requests}", argv, workdir, None, env=env)
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
    totals = [_totals(part) for part in parts]
    if not totals or not all(totals):
        raise SystemExit(f"server_instructions: no callgrind total for {kind}:\n{proc.tail(30)}")
    return totals


def _totals(path: Path) -> dict[str, int]:
    """A callgrind file's totals by event (empty: none found)."""
    text = path.read_text(errors="replace") if path.exists() else ""
    events = re.search(r"^events:\s*(.+)$", text, re.MULTILINE)
    found = re.search(r"^summary:\s*(.+)$", text, re.MULTILINE) or re.search(r"^totals:\s*(.+)$", text, re.MULTILINE)
    if events is None or found is None:
        return {}
    return dict(zip(events.group(1).split(), (int(n) for n in found.group(1).split()), strict=False))


def _per_request(short: dict[str, int], long: dict[str, int], requests: int) -> dict[str, float]:
    return {event: (long[event] - short.get(event, 0)) / requests for event in long}


def _misses(per: dict[str, float]) -> tuple[float, float]:
    """The first-level and the last-level misses (0 without --cache-sim)."""
    return sum(per.get(e, 0.0) for e in FIRST_LEVEL_MISSES), sum(per.get(e, 0.0) for e in LAST_LEVEL_MISSES)


def _cycles(per: dict[str, float]) -> float:
    """valgrind's rough estimate of cycles from the instructions and the misses."""
    first, last = _misses(per)
    return per["Ir"] + 10 * first + 100 * last


def _cache_line(per: dict[str, float]) -> str:
    first, last = _misses(per)
    return f"{first:,.0f} first-level / {last:,.0f} last-level misses, ~{_cycles(per):,.0f} cycles"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", type=lambda s: s.split(","), default=list(KINDS), help=", ".join(KINDS))
    parser.add_argument("--requests", type=lambda s: tuple(int(n) for n in s.split(",")), default=(2000, 6000),
                        help="requests of the shorter and the longer run (default 2000,6000)")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--keep", type=Path, help="keep the callgrind files in this folder")
    parser.add_argument("--threads", action="store_true", help="also the instructions per request of each thread")
    parser.add_argument("--env", type=_setting, action="append", default=[], metavar="GATEWAY_NAME=VALUE",
                        help="a gateway setting (repeatable): GATEWAY_USAGE_FLUSH_INTERVAL=3600")  # fmt: skip
    parser.add_argument("--cache-sim", action="store_true", help="also simulate the caches: misses, cycles")
    parser.add_argument("--ll", help="the simulated last-level cache, SIZE,ASSOC,LINE (bytes; default: this machine's)")
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
            cycles: dict[str, float] = {}
            for kind in args.kinds:
                started = time.monotonic()
                short, long = (count(kind, workdir, upstream, n, args, args.keep) for n in (small, large))
                whole = _per_request(_sum(short), _sum(long), large - small)
                per[kind], cycles[kind] = whole["Ir"], _cycles(whole)
                print(f"  {kind:14s} {per[kind]:12,.0f} instructions per request ({time.monotonic() - started:.0f} s)",
                      flush=True)  # fmt: skip
                if args.cache_sim:
                    print(f"  {'':14s} {_cache_line(whole)}", flush=True)
                if args.threads and len(short) == len(long):
                    threads = [_per_request(a, b_, large - small) for a, b_ in zip(short, long, strict=True)]
                    each = ", ".join(f"{thread['Ir']:,.0f}" for thread in threads)
                    print(f"  {'':14s} by thread, the main thread first: {each}", flush=True)
                    if args.cache_sim:
                        for i, thread in enumerate(threads, 1):
                            print(f"  {'':14s}   thread {i}: {_cache_line(thread)}", flush=True)
        finally:
            nginx.proc.stop()
    if "floor" in per:
        for kind, value in per.items():
            if kind != "floor":
                print(f"  {kind} / floor = {value / per['floor']:.3f}x")
    if args.cache_sim and len(cycles) > 1:
        last = args.kinds[-1]
        for kind in args.kinds[:-1]:
            ratios = f"{per[kind] / per[last]:.3f}x instructions, {cycles[kind] / cycles[last]:.3f}x cycles"
            print(f"  {kind} / {last}: {ratios}")


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("GATEWAY_"):
        raise argparse.ArgumentTypeError(f"{text!r}: GATEWAY_NAME=VALUE")
    return name, value


def _sum(threads: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for thread in threads:
        for event, value in thread.items():
            total[event] = total.get(event, 0) + value
    return total


if __name__ == "__main__":
    main()
