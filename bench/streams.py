"""Concurrent SSE stream client: time to first byte, full-stream time and inter-chunk gaps.

``C`` workers, each on its own keep-alive HTTP/1.1 connection (raw asyncio streams, uvloop when
installed), open streams back to back for ``--seconds``; worker ``i`` starts ``i/C`` of a stream
duration late so the load is steady from the start. Per stream it records:

- TTFB: from writing the request to the first body byte (the first SSE event);
- the full-stream time: to the end of the body;
- the longest silence between two reads of the body (a *stall* is one longer than ``--stall-ms``);
- the number of ``data:`` events, which must be the upstream's count plus ``[DONE]``.

Every stream has a timeout, no stream starts after ``--seconds`` and in-flight streams get
``--grace`` seconds to finish before they are cancelled and counted as unfinished. Prints one JSON
object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Totals:
    ttfb: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    max_gap: list[float] = field(default_factory=list)
    events: int = 0
    reads: int = 0
    bad_status: int = 0
    bad_body: int = 0
    errors: int = 0
    unfinished: int = 0
    stalls: int = 0
    last_error: str = ""
    first_start: float = 0.0
    last_end: float = 0.0


class BadResponse(Exception):
    pass


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def one_stream(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, stall: float, totals: Totals
) -> bool:
    """One request/response on an open connection; returns whether the connection may be reused."""
    t_send = time.perf_counter()
    writer.write(request)
    status, headers = await _read_head(reader)
    if status != 200:
        totals.bad_status += 1
    body = bytearray()
    stamps: list[float] = []
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers expected: the empty line
                break
            data = await reader.readexactly(size + 2)
            stamps.append(time.perf_counter())
            body += data[:-2]
    elif "content-length" in headers:
        remaining = int(headers["content-length"])
        while remaining > 0:
            data = await reader.read(min(remaining, 65536))
            if not data:
                raise BadResponse("connection closed mid-body")
            stamps.append(time.perf_counter())
            body += data
            remaining -= len(data)
    else:
        raise BadResponse("neither chunked nor content-length")
    t_end = time.perf_counter()
    if status == 200:
        events = (b"\n" + bytes(body)).count(b"\ndata:")
        totals.events += events
        totals.reads += len(stamps)
        if not body.rstrip().endswith(b"data: [DONE]"):
            totals.bad_body += 1
        first = stamps[0] if stamps else t_end
        totals.ttfb.append(first - t_send)
        totals.total.append(t_end - t_send)
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        worst = max(gaps, default=0.0)
        totals.max_gap.append(worst)
        totals.stalls += sum(1 for g in gaps if g > stall)
        totals.last_end = time.perf_counter()
    return headers.get("connection", "").lower() != "close"


async def worker(index: int, args: argparse.Namespace, request: bytes, deadline: float, totals: Totals) -> None:
    url = urlsplit(args.url)
    await asyncio.sleep(index * args.stagger / max(1, args.concurrency))
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    streams = 0
    try:
        while time.perf_counter() < deadline and streams < args.max_streams_per_worker:
            streams += 1
            try:
                if writer is None or reader is None:
                    reader, writer = await asyncio.open_connection(url.hostname, url.port)
                async with asyncio.timeout(args.stream_timeout):
                    reusable = await one_stream(reader, writer, request, args.stall_ms / 1000, totals)
                if not reusable:
                    writer.close()
                    reader = writer = None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, BadResponse, ValueError) as exc:
                totals.errors += 1
                totals.last_error = f"{type(exc).__name__}: {exc}"
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.05)
            except TimeoutError:
                totals.errors += 1
                totals.last_error = f"stream timeout after {args.stream_timeout}s"
                if writer is not None:
                    writer.close()
                reader = writer = None
    except asyncio.CancelledError:
        totals.unfinished += 1
        raise
    finally:
        if writer is not None:
            writer.close()


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


async def run(args: argparse.Namespace) -> dict[str, object]:
    url = urlsplit(args.url)
    if url.hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit("streams.py only talks to loopback")
    body = args.body.encode()
    if any(":" not in h or "\r" in h or "\n" in h for h in args.header):
        raise SystemExit("streams.py: --header takes one 'Name: value' line")
    request = (
        f"POST {url.path or '/'} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nAuthorization: Bearer {args.key}\r\n"
        + "".join(f"{h}\r\n" for h in args.header)
        + f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    totals = Totals()
    start = time.perf_counter()
    totals.first_start = start
    deadline = start + args.seconds
    tasks = [asyncio.create_task(worker(i, args, request, deadline, totals)) for i in range(args.concurrency)]
    _, pending = await asyncio.wait(tasks, timeout=args.seconds + args.grace)
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    completed = len(totals.total)
    elapsed = (totals.last_end or time.perf_counter()) - start
    ms = 1000.0
    return {
        "concurrency": args.concurrency,
        "completed": completed,
        "elapsed_s": round(elapsed, 3),
        "streams_per_s": round(completed / elapsed, 2) if elapsed > 0 else 0.0,
        "events": totals.events,
        "reads": totals.reads,
        "events_per_stream": round(totals.events / completed, 2) if completed else 0,
        "ttfb_ms": {
            q: (round(v * ms, 3) if (v := _pct(totals.ttfb, p)) is not None else None)
            for q, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
        },
        "total_ms": {
            q: (round(v * ms, 3) if (v := _pct(totals.total, p)) is not None else None)
            for q, p in (("p50", 50), ("p99", 99), ("max", 100))
        },
        "max_gap_ms": {
            q: (round(v * ms, 3) if (v := _pct(totals.max_gap, p)) is not None else None)
            for q, p in (("p50", 50), ("p99", 99), ("max", 100))
        },
        "stalls": totals.stalls,
        "bad_status": totals.bad_status,
        "bad_body": totals.bad_body,
        "errors": totals.errors,
        "unfinished": totals.unfinished,
        "last_error": totals.last_error,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", required=True, help="http://127.0.0.1:PORT/v1/chat/completions")
    parser.add_argument("--body", required=True, help="the JSON request body (with stream: true)")
    parser.add_argument("--key", required=True, help="sent as Authorization: Bearer KEY")
    parser.add_argument("--header", action="append", default=[], help="an extra request header, 'Name: value'")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=4.0, help="no stream starts after this")
    parser.add_argument("--stagger", type=float, default=1.0, help="spread worker starts over this")
    parser.add_argument("--grace", type=float, default=15.0, help="then in-flight streams are cancelled")
    parser.add_argument("--stream-timeout", type=float, default=30.0)
    parser.add_argument("--stall-ms", type=float, default=500.0, help="a silence longer than this is a stall")
    parser.add_argument("--max-streams-per-worker", type=int, default=10_000)
    args = parser.parse_args()
    try:
        import uvloop

        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
