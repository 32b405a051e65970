"""The gateway's own CPU per request, in process: no sockets, no uvicorn, no upstream client.

    python bench/own_cost.py                      # chat, defaults (access log + ledger on)
    python bench/own_cost.py --profile lean       # the access log and the ledger off
    python bench/own_cost.py --scenario embed     # embeddings instead of chat
    python bench/own_cost.py --cprofile 30        # and the 30 functions with the most own time
    python bench/own_cost.py --opcodes 40 --rounds 1 --requests 500   # bytecodes run, by function

The gateway's whole request stack (``build_stack``: request ids, tracing, keys, the proxy, the
accounting, the ledger, the access log) is driven directly as an ASGI app, with an upstream that
answers at once from memory (the benchmark's canned payloads). What is left is the gateway's own
code: the figure bench/run.py can only get as "the gateway's CPU minus the floor's", here without
the noise of the sockets, uvicorn and aiohttp, and attributable function by function (``--cprofile``).
CPU is the process's (``time.process_time``: every thread, so the ledger's writer and the access
log's too), after a warm-up, over ``--requests`` requests, ``--rounds`` times (the median is
given). Compare revisions with ``--rev`` as bench/ab.py does: runs alternate in one process each.

``--opcodes N`` counts the bytecode instructions and the Python function calls the event loop's
thread runs per request, by function (``sys.settrace`` with opcode events; the times it prints are
then meaningless): the same count every run, and where the interpreter's work goes function by
function, which callgrind (``bench/instructions.py``, ``bench/server_instructions.py``) sees only as
``_PyEval_EvalFrameDefault``. A call costs far more than a bytecode (dropping ~11 small calls a
request, 3ef562b, saved ~1.7 % of the instructions; their ~120 bytecodes alone would be ~0.4 %).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
import payloads

from gateway.app import build_stack
from gateway.config import load_settings
from gateway.ops.heap import freeze_startup_heap
from gateway.ops.logs import configure as configure_logging
from gateway.services import open_services


class _Canned:
    """An upstream answer that has arrived whole (as a small non-streamed answer has)."""

    __slots__ = ("_body", "headers", "status")

    def __init__(self, body: bytes) -> None:
        self.status = 200
        self._body = body
        self.headers = [
            (b"Content-Type", b"application/json"),
            (b"Content-Length", str(len(body)).encode()),
            (b"Date", b"Sat, 05 Dec 2026 09:00:00 GMT"),
        ]

    async def _chunks(self) -> AsyncIterator[bytes]:
        yield self._body

    def iter_raw(self) -> AsyncIterator[bytes]:
        return self._chunks()

    def arrived_size(self) -> int | None:
        return len(self._body)

    async def aclose(self) -> None:
        return None


class _CannedUpstream:
    """The ``Upstream`` seam answering every request at once with one body."""

    def __init__(self, body: bytes, catalog: bytes) -> None:
        self._body = body
        self._catalog = catalog

    async def send(self, method: str, target: str, headers: Any, body: bytes) -> _Canned:
        return _Canned(self._body)

    async def get_bytes(self, target: str) -> bytes:
        return self._catalog

    def connections(self) -> int:
        return 0

    async def aclose(self) -> None:
        return None


SCENARIOS = {
    "chat": ("/v1/chat/completions", payloads.chat_request(stream=False), payloads.chat_response()),
    "embed": ("/v1/embeddings", payloads.embeddings_request(), payloads.embeddings_response()),
}


# What each profile turns off of the defaults: the access log, the ledger.
PROFILES = {"defaults": (False, False), "lean": (True, True), "ledger": (True, False), "log": (False, True)}


def _config(workdir: Path, profile: str, usage_extra: str) -> Path:
    no_log, no_ledger = PROFILES[profile]
    path = workdir / "gateway.toml"
    path.write_text(
        'host = "127.0.0.1"\nport = 1\n'
        + ("access_log = false\n" if no_log else "")
        + '\n[upstream]\nurl = "http://127.0.0.1:1"\n\n[usage]\n'
        + ('path = ""\n' if no_ledger else f'path = "{workdir / "usage.db"}"\n')
        + usage_extra
        + "\n[catalog]\nttl = 86400.0\n"
    )
    return path


async def _drive(args: argparse.Namespace, workdir: Path) -> list[float]:
    path, request, answer = SCENARIOS[args.scenario]
    settings = load_settings(_config(workdir, args.profile, "".join(f"{u}\n" for u in args.usage)), {})
    configure_logging(settings.log_level, settings.log_format)
    catalog = payloads.catalog_bytes()
    transport = httpx.MockTransport(lambda r: httpx.Response(200, content=catalog))
    async with open_services(settings, transport=transport, env={}) as services:
        services.upstream = _CannedUpstream(answer, catalog)
        app = build_stack(settings, services).proxy
        freeze_startup_heap()  # the collector's serving policy, as `gateway serve` sets it
        headers = [
            (b"host", b"127.0.0.1"),
            (b"authorization", f"Bearer {payloads.API_KEY}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(request)).encode()),
            (b"user-agent", b"wrk"),
        ]
        if args.client == "sdk":  # what the OpenAI Python SDK (1.x, httpx) sends besides those
            headers[-1] = (b"user-agent", b"OpenAI/Python 1.109.1")
            headers += [
                (b"accept-encoding", b"gzip, deflate"), (b"connection", b"keep-alive"),
                (b"accept", b"application/json"),
                (b"x-stainless-lang", b"python"), (b"x-stainless-package-version", b"1.109.1"),
                (b"x-stainless-os", b"Linux"), (b"x-stainless-arch", b"x64"), (b"x-stainless-runtime", b"CPython"),
                (b"x-stainless-runtime-version", b"3.11.7"), (b"x-stainless-async", b"false"),
                (b"x-stainless-retry-count", b"0"), (b"x-stainless-read-timeout", b"600"),
            ]  # fmt: skip
        scope: dict[str, Any] = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": headers, "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 1),
        }  # fmt: skip
        statuses: list[int] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": request, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        async def sequence(n: int) -> None:
            for _ in range(n):
                await app(dict(scope), receive, send)

        async def batch(n: int) -> None:
            """``n`` requests, ``--concurrency`` at a time (each of them interleaved with the others
            wherever the request path yields to the event loop)."""
            await asyncio.gather(*(sequence(n // args.concurrency) for _ in range(args.concurrency)))

        await batch(args.warmup)
        if set(statuses) != {200}:
            raise SystemExit(f"the warm-up got statuses {sorted(set(statuses))}, not only 200")
        rounds: list[float] = []
        profiler = cProfile.Profile() if args.cprofile else None
        opcodes: collections.Counter[str] = collections.Counter()
        calls: collections.Counter[str] = collections.Counter()
        for _ in range(args.rounds):
            statuses.clear()
            start = time.process_time()
            if profiler is not None:
                profiler.enable()
            if args.opcodes:
                sys.settrace(_opcode_tracer(opcodes, calls))
            await batch(args.requests)
            sys.settrace(None)
            if profiler is not None:
                profiler.disable()
            rounds.append((time.process_time() - start) / (args.requests // args.concurrency * args.concurrency) * 1e6)
            if set(statuses) != {200}:
                raise SystemExit(f"got statuses {sorted(set(statuses))}, not only 200")
            await asyncio.sleep(0.05)  # let the ledger's and the log's writers catch up between rounds
        if profiler is not None:
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.cprofile)
            print(out.getvalue())
        if opcodes:
            requests = args.rounds * (args.requests // args.concurrency * args.concurrency)
            print(f"per request: {opcodes.total() / requests:,.0f} bytecodes, {calls.total() / requests:,.0f} calls "
                  "(and resumptions) of Python functions; by function, its own bytecodes and calls:")  # fmt: skip
            for where, n in opcodes.most_common(args.opcodes):
                print(f"  {n / requests:8.1f} {calls[where] / requests:6.1f}  {where}")
    return rounds


def _opcode_tracer(counts: collections.Counter[str], calls: collections.Counter[str]) -> Any:
    """A ``sys.settrace`` function that counts each function's bytecodes into ``counts`` and its
    calls (a coroutine's or generator's resumptions included) into ``calls``."""
    root = str(Path(__file__).resolve().parent.parent) + os.sep

    def call(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        code = frame.f_code
        where = f"{code.co_filename.removeprefix(root)}:{code.co_firstlineno} {code.co_qualname}"
        if code.co_filename == "<string>" and "self" in frame.f_locals:  # a generated __init__ (dataclasses)
            where += f" of {type(frame.f_locals['self']).__qualname__}"
        calls[where] += 1

        def each(frame: Any, event: str, arg: Any) -> Any:
            if event == "opcode":
                counts[where] += 1
            return each

        return each

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="chat")
    parser.add_argument("--client", choices=("wrk", "sdk"), default="wrk",
                        help="request headers: wrk's 5 (as bench/run.py sends) or the OpenAI SDK's 17")  # fmt: skip
    parser.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="defaults",
        help="defaults (access log and ledger on), lean (both off), ledger (the ledger only), log (the log only)",
    )
    parser.add_argument("--usage", action="append", default=[], metavar="LINE", help="a line for [usage]")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight at once (default 1)")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N", help="print the N top functions by own time")
    parser.add_argument("--opcodes", type=int, default=0, metavar="N", help="print the N top functions by bytecodes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="own-cost-") as tmp:
        # The access log goes to stderr, as under ``gateway serve``: to a file here, as bench/run.py does.
        saved = os.dup(2)
        with (Path(tmp) / "access.log").open("wb") as log:
            os.dup2(log.fileno(), 2)
            try:
                rounds = asyncio.run(_drive(args, Path(tmp)))
            finally:
                os.dup2(saved, 2)
                os.close(saved)
    median = statistics.median(rounds)
    print(
        f"{args.scenario} ({args.profile}): {median:.1f} us CPU per request, median of {args.rounds} rounds of "
        f"{args.requests} (rounds: {', '.join(f'{r:.1f}' for r in rounds)})"
    )


if __name__ == "__main__":
    main()
