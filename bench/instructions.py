"""The gateway's own instructions per request, counted by callgrind: the same figure every run.

    python bench/instructions.py                                  # defaults and lean, the working tree
    python bench/instructions.py --rev bd8deb6                    # and the same at a git revision
    python bench/instructions.py --profiles defaults,log,ledger,lean --scenario embed

Why: on this shared machine the CPU time of one request path varies by several percent between
runs (bench/README.md: an A/A run's rounds span 0.94-1.05x), so a change worth 1 % cannot be seen
in seconds. Instructions retired can: ``valgrind --tool=callgrind`` counts them whatever else the
machine is doing, and two runs of the same code and inputs give the same total to a few parts per
million. What they do not show is what the code costs in cache misses and waits (the access log's
buffered lines, bench/README.md): an instruction count is a floor, and a change that moves memory
rather than code needs bench/ab.py.

How: ``bench/own_cost.py`` (the whole request stack driven as an ASGI app, the upstream answering
from memory, one request at a time) runs under callgrind twice per profile, with ``--small`` and
``--large`` requests after the same warm-up, ``PYTHONHASHSEED=0``; the difference of the two totals
over the difference of the requests is the instructions per request, start-up and warm-up taken
out. Every thread's instructions count (the ledger's writer, the access log's), as in own_cost.py.
With ``--rev``, the ``gateway`` package of that revision is extracted (``git archive``) and put
first on ``PYTHONPATH`` for a second set of runs; own_cost.py stays the working tree's. Runs take
~20 s each (callgrind is ~50x slower than the CPU); nothing listens on a socket.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as b
from own_cost import PROFILES, SCENARIOS

_TOTAL = re.compile(r"I\s+refs:\s+([\d,]+)")


def instructions(profile: str, scenario: str, requests: int, warmup: int, package: Path | None) -> int:
    """The instructions callgrind counts for one own_cost.py run of ``requests`` requests."""
    env = b.gateway_env(0, package)
    argv = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
        str(b.PROJECT_BIN / "python"), str(b.BENCH / "own_cost.py"), "--profile", profile, "--scenario", scenario,
        "--rounds", "1", "--requests", str(requests), "--warmup", str(warmup),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800, check=False)
    found = _TOTAL.search(done.stderr)
    if done.returncode != 0 or found is None:
        tail = done.stderr[-2000:]
        raise SystemExit(f"instructions: own_cost.py under callgrind failed ({done.returncode}):\n{tail}")
    return int(found.group(1).replace(",", ""))


def per_request(profile: str, args: argparse.Namespace, package: Path | None) -> float:
    small = instructions(profile, args.scenario, args.small, args.warmup, package)
    large = instructions(profile, args.scenario, args.large, args.warmup, package)
    return (large - small) / (args.large - args.small)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profiles", type=lambda s: s.split(","), default=["defaults", "lean"],
                        help=f"comma-separated, of {', '.join(sorted(PROFILES))}")  # fmt: skip
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="chat")
    parser.add_argument("--rev", help="also count the gateway package of this git revision")
    parser.add_argument("--small", type=int, default=500, help="requests of the shorter run (default 500)")
    parser.add_argument("--large", type=int, default=2500, help="requests of the longer run (default 2500)")
    parser.add_argument("--warmup", type=int, default=200)
    args = parser.parse_args()
    unknown = [p for p in args.profiles if p not in PROFILES]
    if unknown or not 1 <= args.small < args.large <= 100_000 or not 0 <= args.warmup <= 10_000:
        parser.error(f"profiles among {sorted(PROFILES)}, 1 <= --small < --large <= 100000 (got {unknown or args})")
    if subprocess.run(["valgrind", "--version"], capture_output=True, check=False).returncode != 0:
        raise SystemExit("instructions: valgrind is not installed (Debian: apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="gateway-instructions-") as tmp:
        sides: dict[str, Path | None] = {"working tree": None}
        if args.rev:
            described = b.extract_baseline(args.rev, Path(tmp) / "rev")
            sides[f"{args.rev} ({described})"] = Path(tmp) / "rev"
        runs = f"({args.large} - {args.small} requests)"
        print(f"scenario {args.scenario}; instructions per request, {runs} under callgrind")
        counts: dict[tuple[str, str], float] = {}
        for side, package in sides.items():
            for profile in args.profiles:
                counts[side, profile] = per_request(profile, args, package)
                print(f"  {side[:60]:60s} {profile:9s} {counts[side, profile]:12,.0f}", flush=True)
    if args.rev:
        tree, rev = list(sides)
        for profile in args.profiles:
            print(f"  {profile}: working tree / {args.rev} = {counts[tree, profile] / counts[rev, profile]:.4f}x")
    if "lean" in args.profiles:
        for side in sides:
            for profile in args.profiles:
                if profile != "lean":
                    ratio = counts[side, profile] / counts[side, "lean"]
                    print(f"  {side[:40]}: {profile} / lean = {ratio:.4f}x")


if __name__ == "__main__":
    main()
