"""RSS per open stream by gateway configuration: which default (access log, ledger) the measure holds.

    python bench/stream_memory.py                 # 4 configurations x 3 repetitions (~4 min)
    python bench/stream_memory.py --repeat 5 --streams 256

bench/run.py's "RSS per open stream" is the growth of the gateway's resident set during one run of
256 paced streams (peak minus before) divided by 256, so growth that happens once during that run
(a thread's allocator arena, a cache filling) counts as per-stream memory. This tool separates the
two: for each configuration (defaults; access log off; ledger off; both off) it starts
``gateway serve`` in front of the paced stand-in (bench/paced_upstream.py), warms it with 16
streams, then runs ``--streams`` concurrent streams **twice in the same process** and reports each
run's growth per stream. Growth that the first run shows and the second does not is one-time.

The configurations run in turn within each repetition (medians reported); the gateway is pinned
alone to the last CPU, the stand-in and the stream client to the others (as in bench/run.py).
Everything listens on 127.0.0.1; each process is stopped by its pid in a ``finally`` block; every
loop is bounded. Writes bench/results/stream-memory-<time>.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as b
import payloads

# name -> (top-level TOML lines, ledger on)
CONFIGS = {
    "defaults": ("", True),
    "access log off": ("access_log = false", True),
    "ledger off": ("", False),
    "both off": ("access_log = false", False),
}


def config_file(workdir: Path, name: str, upstream: str, port: int) -> Path:
    top, ledger = CONFIGS[name]
    slug = name.replace(" ", "-")
    usage = f'path = "{workdir / (slug + "-usage.db")}"' if ledger else 'path = ""'
    path = workdir / f"{slug}.toml"
    path.write_text(
        f'host = "{b.HOST}"\nport = {port}\n{top}\n\n[upstream]\nurl = "{upstream}"\n\n[usage]\n{usage}\n\n'
        "[catalog]\nttl = 86400.0\n"
    )
    return path


def measure(name: str, rep: int, work: Path, upstream: str, args: argparse.Namespace, cpus: b.Cpus) -> dict[str, Any]:
    workdir = work / f"{rep}-{name.replace(' ', '-')}"
    workdir.mkdir()
    port = b.free_port()
    config = config_file(workdir, name, upstream, port)
    argv = [str(b.PROJECT_BIN / "gateway"), "serve", "--config", str(config), "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    proc = b.spawn("gateway", argv, workdir, cpus.proxy, env=env)
    try:
        b.wait_ready(proc, port, "/readyz", 30.0)
        url = f"http://{b.HOST}:{port}/v1/chat/completions"
        body = payloads.chat_request(True)
        stream_s = args.stream_events * args.stream_gap_ms / 1000
        b.run_streams(url, body, 16, args.seconds, stream_s, cpus)  # warm-up
        sampler = b.Sampler(proc.pid)
        runs = []
        try:
            for _ in range(2):
                pids = sampler.pids()
                b.wait_idle(pids)
                sampler.take_peak()
                before = b.rss_kb(pids)
                data = b.run_streams(url, body, args.streams, args.seconds, stream_s, cpus)
                peak = sampler.take_peak()
                bad = data["errors"] + data["bad_status"] + data["bad_body"] + data["unfinished"]
                runs.append(
                    {"before_kb": before, "peak_kb": peak, "per_stream_kb": (peak - before) / args.streams, "bad": bad}
                )
        finally:
            sampler.stop()
        result = {"config": name, "rep": rep, "runs": runs}
        b.log(
            f"{name:>15} rep {rep}: per stream {runs[0]['per_stream_kb']:.1f} KB (first run), "
            f"{runs[1]['per_stream_kb']:.1f} KB (second); RSS {runs[0]['before_kb'] / 1024:.1f} -> "
            f"{runs[1]['peak_kb'] / 1024:.1f} MB"
        )
        return result
    finally:
        proc.stop()


def render(results: dict[str, Any]) -> str:
    m = results["meta"]
    rows = []
    for name in CONFIGS:
        entries = [r for r in results["results"] if r["config"] == name]
        if not entries:
            continue
        first = [r["runs"][0]["per_stream_kb"] for r in entries]
        second = [r["runs"][1]["per_stream_kb"] for r in entries]
        bad = sum(run["bad"] for r in entries for run in r["runs"])
        rows.append(
            f"| {name} | {statistics.median(first):.1f} KB ({', '.join(f'{x:.1f}' for x in first)}) | "
            f"{statistics.median(second):.1f} KB ({', '.join(f'{x:.1f}' for x in second)}) | {bad} |"
        )
    return "\n".join(
        [
            f"## RSS per open stream by configuration, {m['date']}",
            "",
            f"{m['streams']} concurrent paced streams ({m['stream_events']} events {m['stream_gap_ms']:g} ms apart, "
            f"{m['seconds']:g} s of starts), twice in one gateway process, {m['repeat']} repetitions (medians, "
            f"then each repetition's figure). Machine split: {m['pinning']}. Load average "
            f"{m['loadavg_start'][0]:.2f} at the start, {m.get('loadavg_end', [0])[0]:.2f} at the end.",
            "",
            "| configuration | first run: growth per stream | second run, same process | bad streams |",
            "|---|---:|---:|---:|",
            *rows,
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="RSS per open stream of the gateway, by configuration.")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of every configuration (default 3)")
    parser.add_argument("--streams", type=int, default=256, help="concurrent streams (default 256)")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds of stream starts per run (default 4)")
    parser.add_argument("--stream-events", type=int, default=40, help="events per paced stream (default 40)")
    parser.add_argument("--stream-gap-ms", type=float, default=25.0, help="gap between paced events (default 25)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the gateway and the load to separate CPUs")
    parser.add_argument("--render", metavar="JSON", help="only print the table of a saved run")
    args = parser.parse_args(argv)
    if not 1 <= args.repeat <= 20 or not 1 <= args.streams <= 2048 or not 0 < args.seconds <= 60:
        parser.error("--repeat 1..20, --streams 1..2048, --seconds in (0, 60]")
    return args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the finally blocks that stop every process


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return 0
    signal.signal(signal.SIGTERM, _interrupt)
    b.ensure_system_tools()
    cpus = b.Cpus.plan(not args.no_pin)
    meta: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "pinning": cpus.describe(),
        "streams": args.streams,
        "seconds": args.seconds,
        "stream_events": args.stream_events,
        "stream_gap_ms": args.stream_gap_ms,
        "repeat": args.repeat,
        "loadavg_start": os.getloadavg(),
    }
    results: dict[str, Any] = {"meta": meta, "results": []}
    try:
        with tempfile.TemporaryDirectory(prefix="gateway-stream-memory-") as tmp, contextlib.ExitStack() as stack:
            work = Path(tmp)
            paced, port = b.start_paced(work, cpus, args.stream_events, args.stream_gap_ms)
            stack.callback(paced.stop)
            for rep in range(args.repeat):
                for name in CONFIGS:
                    results["results"].append(measure(name, rep, work, f"http://{b.HOST}:{port}", args, cpus))
    except KeyboardInterrupt:
        b.log("interrupted: every process started has been stopped; no results written")
        return 130
    meta["loadavg_end"] = os.getloadavg()
    b.RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "stream-memory-" + time.strftime("%Y%m%d-%H%M%S")
    (b.RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=1))
    text = render(results)
    (b.RESULTS / f"{stem}.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
