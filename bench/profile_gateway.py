"""Profile the gateway's hot path under load with py-spy: a flamegraph and the top functions.

    python bench/profile_gateway.py                       # chat, 64 clients, 10 s of samples
    python bench/profile_gateway.py --scenario paced_256  # the streaming relay instead
    python bench/profile_gateway.py --kind runner-aiohttp # the gateway on the httpx-aiohttp transport
    python bench/profile_gateway.py --kind gateway-cache --scenario embed_64   # answers from the cache
    python bench/profile_gateway.py --kind gateway-lean  # the access log and the ledger off (default: on)
    python bench/profile_gateway.py --kind floor         # bench/relay_floor.py: no gateway code

Starts nginx (or the paced stand-in) and the gateway as bench/run.py does (same pinning), drives it
with wrk (or bench/streams.py), and while the load runs attaches py-spy (installed into
bench/.venv-tools) twice: once for a flamegraph SVG, once for raw collapsed stacks, from which the
functions with the most own time (the leaf of the sampled stack) and the most inclusive time are
listed. Idle samples (the event loop waiting in epoll) are not counted, so percentages are of the
time the gateway's thread was busy. Writes bench/results/profile-<scenario>-<time>.{svg,txt,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as b
import payloads
from run import BY_NAME

_LINENO = re.compile(r":\d+\)$")


# Leaf frames of threads that wait rather than run, which py-spy's idle detection can miss: a
# thread-pool worker blocked in ``work_queue.get()`` (its leaf is ``_worker`` itself, the C call
# below it is not shown; a worker that runs something has ``run`` or deeper as its leaf).
IDLE_LEAVES = ("_worker (concurrent/futures/thread.py)", "_bootstrap_inner (threading.py)")


def parse_collapsed(text: str) -> tuple[Counter[str], Counter[str], int, int]:
    """Own and inclusive sample counts per function (``name (file)``), busy and idle totals."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = idle = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_LINENO.sub(")", f) for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        if frames[-1] in IDLE_LEAVES:
            idle += count
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    for frame in [f for f, c in inclusive.items() if c == total]:
        del inclusive[frame]  # the entry points every sample shares say nothing
    return own, inclusive, total, idle


# Where a leaf frame's file lies, for the own time by package (first match wins).
PACKAGES = (
    ("gateway/", "gateway"),
    ("relay_floor.py", "the floor's relay"),
    ("aiohttp/", "aiohttp"),
    ("uvicorn/", "uvicorn"),
    ("asyncio/", "asyncio (the event loop is uvloop: its own time shows as Runner.run)"),
    ("logging/", "logging"),
    ("sqlite3/", "sqlite3"),
    ("threading.py", "threading"),
    ("concurrent/", "concurrent.futures"),
    ("yarl/", "yarl, multidict"),
    ("multidict/", "yarl, multidict"),
)


def by_package(own: Counter[str]) -> Counter[str]:
    """Own samples summed by the package of the leaf frame's file."""
    out: Counter[str] = Counter()
    for frame, count in own.items():
        where = frame.rpartition("(")[2]
        out[next((name for mark, name in PACKAGES if mark in where), "other")] += count
    return out


def top_table(counter: Counter[str], total: int, n: int, title: str) -> str:
    lines = [f"### {title}", "", "| # | function (file) | samples | % of busy samples |", "|---:|---|---:|---:|"]
    for i, (frame, count) in enumerate(counter.most_common(n), 1):
        lines.append(f"| {i} | `{frame}` | {count} | {100 * count / total:.1f} % |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--scenario", default="chat_64", choices=sorted(BY_NAME))
    parser.add_argument(
        "--kind",
        default="gateway",
        choices=["gateway", "gateway-lean", "gateway-cache", "floor", "runner-httpx", "runner-aiohttp"],
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds of sampling per recording")
    parser.add_argument("--rate", type=int, default=200, help="samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--native", action="store_true", help="also sample C extensions (py-spy --native)")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--from-raw", metavar="TXT", help="only re-analyse a saved collapsed-stack file")
    args = parser.parse_args()
    if args.from_raw:
        print(render(f"## py-spy profile: {args.from_raw}", "Re-analysed.", Path(args.from_raw), args.top))
        return 0
    if not 1 <= args.duration <= 120:
        parser.error("--duration must be 1..120")
    b.ensure_system_tools()
    python = b.ensure_venv(b.TOOLS_VENV, list(b.TOOLS_SPEC), "matplotlib and py-spy")
    if python is None:
        raise SystemExit("bench: py-spy could not be installed")
    py_spy = str(python.parent / "py-spy")
    scenario = BY_NAME[args.scenario]
    cpus = b.Cpus.plan(not args.no_pin)
    b.RESULTS.mkdir(parents=True, exist_ok=True)
    stem = b.RESULTS / f"profile-{args.kind}-{args.scenario}-{time.strftime('%Y%m%d-%H%M%S')}"
    load_seconds = 2 * args.duration + 6
    with tempfile.TemporaryDirectory(prefix="gateway-profile-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        if scenario.phase == "paced":
            upstream, port = b.start_paced(workdir, cpus, 40, 25.0)
        else:
            nginx = b.start_nginx_servers(workdir, cpus)
            upstream = nginx.proc
            port = {"json": nginx.json_port, "sse": nginx.sse_port, "sse100": nginx.long_sse_port}[scenario.phase]
        stack.callback(upstream.stop)
        started = b.start_proxy(args.kind, workdir, f"http://{b.HOST}:{port}", cpus, scenario.phase, 30.0)
        stack.callback(started.proc.stop)
        url = f"http://{b.HOST}:{started.port}{scenario.path}"
        if scenario.kind == "wrk":
            script = b.wrk_script(workdir, scenario.name, scenario.body)
            b.run_wrk(url, script, scenario.connections, 2, cpus)  # warm-up
            load_argv = b.pinned(
                [
                    "wrk",
                    "-t",
                    "1",
                    "-c",
                    str(scenario.connections),
                    "-d",
                    f"{load_seconds}s",
                    "--timeout",
                    "30s",
                    "-s",
                    str(script),
                    url,
                ],
                cpus.load,
            )
        else:
            load_argv = b.pinned(
                [
                    sys.executable, str(b.BENCH / "streams.py"), "--url", url, "--body", scenario.body.decode(),
                    "--key", payloads.API_KEY, "--concurrency", str(scenario.connections),
                    "--seconds", str(load_seconds), "--stagger", "1",
                ],
                cpus.load,
            )  # fmt: skip
        load = b.spawn("load", load_argv, workdir, None)
        stack.callback(load.stop)
        time.sleep(2)
        common = ["--pid", str(started.proc.pid), "--duration", str(args.duration), "--rate", str(args.rate)]
        if args.native:
            common.append("--native")
        outputs = []
        for fmt, suffix in (("flamegraph", ".svg"), ("raw", ".txt")):
            out = stem.with_suffix(suffix)
            argv = b.pinned([py_spy, "record", *common, "--format", fmt, "--output", str(out)], cpus.load)
            done = subprocess.run(argv, capture_output=True, text=True, timeout=args.duration + 60, check=False)
            if done.returncode != 0 or not out.exists():
                raise SystemExit(f"py-spy failed (rc {done.returncode}): {done.stderr[-800:]}")
            outputs.append(out)
        try:  # let the load generator finish to get its summary (bounded), else stop it
            load.popen.wait(load_seconds + 30)
        except subprocess.TimeoutExpired:
            load.stop()
        load_out = load.tail(40)
    header = f"## py-spy profile: {args.kind}, {scenario.title}"
    about = (
        f"{args.duration} s at {args.rate} Hz per recording; {cpus.describe()}. "
        f"Flamegraph: `{outputs[0].relative_to(b.ROOT)}`; collapsed stacks: `{outputs[1].relative_to(b.ROOT)}`."
    )
    report = render(header, about, outputs[1], args.top, load_out)
    stem.with_suffix(".md").write_text(report + "\n")
    print(report)
    b.log(f"profile: {stem.with_suffix('.md').relative_to(b.ROOT)}")
    return 0


def render(header: str, about: str, raw: Path, top: int, load_out: str = "") -> str:
    own, inclusive, total, idle = parse_collapsed(raw.read_text())
    parts = [
        header,
        f"{about} {total} busy samples ({idle} samples of idle pool threads left out).",
        top_table(by_package(own), total, top, "Own time by package (of the sampled leaf frame)"),
        top_table(own, total, top, "Own time (the sampled leaf frame)"),
        top_table(inclusive, total, top, "Inclusive time (the frame anywhere on the stack)"),
    ]
    if load_out:
        parts.append("Load generator output:\n\n```\n" + load_out.strip() + "\n```")
    return "\n\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
