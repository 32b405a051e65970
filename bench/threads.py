"""The gateway's CPU and context switches per request, thread by thread, by configuration.

    python bench/threads.py                          # defaults and lean, 3 rounds of 6 s each
    python bench/threads.py --profiles defaults,quiet,lean --rounds 5 --seconds 8
    python bench/threads.py --scenario embed
    python bench/threads.py --profiles lean,quiet,defaults --connections 1 --seconds 5   # one client

Why: a writer thread that wakes up beside the event loop costs more than its own CPU where both
share a core (the event loop's thread runs slower afterwards), and the process's CPU per request,
what bench/ab.py measures, is too noisy to say which thread did what. The per-thread figures
here (user and system time, voluntary and involuntary context switches, minor page faults, all
per request) are what found the ledger's write-after-write loop (bench/README.md, "Results,
2026-12-05 (evening)"). "waited" is the time a thread was ready to run but had no CPU
(/proc/<pid>/task/<tid>/schedstat), per request: on the event loop's thread, how long the requests
waited for the writers beside it on the core, which the one-client p99 shows (bench/README.md,
"Results, 2026-12-06 (05:20)").

How: nginx serves the canned answers (as in bench/run.py); for each round and each profile
(``benchlib.GATEWAY_PROFILES``: defaults, lean, quiet) a fresh gateway starts pinned to the proxy
CPU with ``PYTHONHASHSEED=0``, gets a 3 s wrk warm-up, rests 2.5 s, then one wrk run of
``--seconds`` at ``--connections``; /proc/<pid>/task/*/stat and status are read before and after.
The profiles take turns going first, round by round: whichever runs first in a round measured
slower here (2026-12-05: the ledger's event loop +12 us a request over 7 rounds going first, -2.4
going second), so a fixed order would be read as a difference between them. The summary gives
each profile's median, and its ratio to the last profile round by round (the pairs ran together).
Threads are shown by the names the gateway gives its writers (``gateway.threads``: ``log-writer``,
``ledger-idle_0`` and ``ledger_0``, ``rollups_0``); the event loop's is the first, bearing the
process's name. Every process is started with its own process group and stopped by its pid in a
``finally`` block; everything listens on 127.0.0.1; every loop is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as b
from ab import SCENARIOS  # the same requests as the A/B


@dataclass(frozen=True)
class ThreadStat:
    """One thread's counters, as /proc gives them (times in clock ticks)."""

    name: str
    user: int
    system: int
    voluntary: int
    involuntary: int
    minor_faults: int
    waited_ns: int  # time runnable but waiting for a CPU (schedstat's run_delay; 0 where the kernel keeps none)


def thread_stats(pid: int) -> dict[int, ThreadStat]:
    """Every thread of ``pid`` (a thread gone meanwhile is left out)."""
    stats: dict[int, ThreadStat] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue
        try:
            waited = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            waited = 0
        fields = stat[stat.rindex(")") + 2 :].split()
        values = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        stats[int(tid)] = ThreadStat(
            name=stat[stat.index("(") + 1 : stat.rindex(")")],
            user=int(fields[11]),
            system=int(fields[12]),
            voluntary=int(values["voluntary_ctxt_switches"]),
            involuntary=int(values["nonvoluntary_ctxt_switches"]),
            minor_faults=int(fields[7]),
            waited_ns=waited,
        )
    return stats


def report(profile: str, rnd: int, data: dict[str, Any], before: dict[int, ThreadStat],
           after: dict[int, ThreadStat]) -> tuple[float, float, float]:  # fmt: skip
    """Print one run's table; returns the process's and the event loop's CPU per request, and the
    event loop's wait for a CPU per request (us)."""
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
    requests = int(data["requests"])
    print(f"== {profile}, round {rnd + 1}: {data['rps']:,.0f} req/s, p50 / p99 {data['p50_us'] / 1000:.3f} / "
          f"{data['p99_us'] / 1000:.3f} ms")  # fmt: skip
    print("   thread                 user us/req  sys us/req  voluntary/req  involuntary/req  minor faults/req"
          "  waited us/req")  # fmt: skip
    total = loop = loop_waited = 0.0
    zero = ThreadStat("", 0, 0, 0, 0, 0, 0)
    for index, tid in enumerate(sorted(after)):
        a, z = before.get(tid, zero), after[tid]
        user, system = (z.user - a.user) * tick_us / requests, (z.system - a.system) * tick_us / requests
        total += user + system
        waited = (z.waited_ns - a.waited_ns) / 1000 / requests
        if index == 0:
            loop, loop_waited = user + system, waited
        switches = z.voluntary - a.voluntary + z.involuntary - a.involuntary
        if user + system == 0 and switches < 10:
            continue  # idle throughout
        name = "event loop" if index == 0 else z.name
        voluntary, involuntary = (z.voluntary - a.voluntary) / requests, (z.involuntary - a.involuntary) / requests
        faults = (z.minor_faults - a.minor_faults) / requests
        print(f"   {name:22s} {user:11.1f} {system:11.1f} {voluntary:14.3f} {involuntary:16.3f} {faults:17.3f}"
              f" {waited:14.2f}")  # fmt: skip
    print(f"   process: {total:.1f} us of CPU per request")
    return total, loop, loop_waited


def summary(totals: dict[str, list[tuple[float, float, float]]]) -> list[str]:
    """Each profile's median CPU per request (process, event loop), the event loop's median wait for
    a CPU per request, and the process's CPU's ratio to the last profile's in the same round,
    median of the rounds."""
    last = list(totals)[-1]
    lines = ["\nmedian of the rounds, us per request: CPU (process / event loop), the event loop's wait for a "
             f"CPU, and the process's CPU's ratio to {last}'s in the same round:"]  # fmt: skip
    for profile, runs in totals.items():
        process = statistics.median(run[0] for run in runs)
        loop = statistics.median(run[1] for run in runs)
        waited = statistics.median(run[2] for run in runs)
        ratios = [run[0] / base[0] for run, base in zip(runs, totals[last], strict=True)]
        ratio = f"{statistics.median(ratios):.3f}x (rounds {min(ratios):.3f} - {max(ratios):.3f})"
        lines.append(f"   {profile:10s} {process:7.1f} / {loop:7.1f}   waited {waited:5.2f}   {ratio}")
    lines.append("process CPU per request (us), round by round: " + "; ".join(
        f"{p} {', '.join(f'{t[0]:.1f}' for t in ts)}" for p, ts in totals.items()))  # fmt: skip
    return lines


def run(args: argparse.Namespace) -> None:
    b.ensure_system_tools()
    cpus = b.Cpus.plan(True)
    path, body = SCENARIOS[args.scenario]
    totals: dict[str, list[tuple[float, float, float]]] = {p: [] for p in args.profiles}
    print(f"{cpus.describe()}; scenario {args.scenario}, {args.connections} connections, {args.seconds} s runs")
    with tempfile.TemporaryDirectory(prefix="gateway-threads-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        nginx = b.start_nginx_servers(work, cpus)
        stack.callback(nginx.proc.stop)
        script = b.wrk_script(work, args.scenario, body)
        for rnd in range(args.rounds):
            turn = rnd % len(args.profiles)  # each profile goes first in turn (see the docstring)
            for profile in args.profiles[turn:] + args.profiles[:turn]:
                workdir = work / f"{profile}-{rnd}"
                workdir.mkdir()
                port = b.free_port()
                config = b.gateway_config(workdir, profile, f"http://{b.HOST}:{nginx.json_port}", port, profile=profile)
                argv = [str(b.PROJECT_BIN / "gateway"), "serve", "--config", str(config), "--port", str(port)]
                env = {**os.environ, "PYTHONHASHSEED": "0"}
                proc = b.spawn(f"gateway-{profile}", argv, workdir, cpus.proxy, env=env)
                try:
                    b.wait_ready(proc, port, "/readyz", 30.0)
                    url = f"http://{b.HOST}:{port}{path}"
                    b.run_wrk(url, script, args.connections, 3, cpus)
                    time.sleep(2.5)  # the writers catch up with the warm-up
                    before = thread_stats(proc.pid)
                    data = b.run_wrk(url, script, args.connections, args.seconds, cpus)
                    after = thread_stats(proc.pid)
                finally:
                    proc.stop()
                if int(data["requests"]) == 0:
                    raise RuntimeError(f"{profile}: no request completed")
                totals[profile].append(report(profile, rnd, data, before, after))
    print("\n".join(summary(totals)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profiles", type=lambda s: s.split(","), default=["defaults", "lean"],
                        help=f"comma-separated, of {', '.join(b.GATEWAY_PROFILES)}")  # fmt: skip
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="chat")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    unknown = [p for p in args.profiles if p not in b.GATEWAY_PROFILES]
    if unknown or not 1 <= args.rounds <= 50 or not 1 <= args.seconds <= 120:
        parser.error(f"profiles among {b.GATEWAY_PROFILES}, 1-50 rounds, 1-120 seconds (got {unknown or args})")
    run(args)


if __name__ == "__main__":
    main()
