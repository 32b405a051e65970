"""Interleaved A/B: the gateway's CPU per request at a git revision (A) against the working tree (B).

    python bench/ab.py                                  # HEAD~1 vs the working tree: chat, seeds 0,1,2, 12 rounds
    python bench/ab.py --rev 7b5acc1 --rounds 16 --scenario embed
    python bench/ab.py --rev HEAD --b-rev HEAD --rounds 8     # A/A: identical code, the noise floor
    python bench/ab.py --config lean                    # both with the access log and the ledger off
    python bench/ab.py --rev HEAD --b-rev HEAD --config lean --b-config defaults   # what the defaults cost
    python bench/ab.py --floor --b-rev HEAD --rounds 6 --seconds 5   # the gateway against the bare relay floor
    python bench/ab.py --rev HEAD --b-rev HEAD --config lean --b-config defaults --writers-beside   # writers elsewhere
    python bench/ab.py --rev HEAD --b-rev HEAD --config lean --b-config defaults --connections 1 --seconds 5  # p99
    python bench/ab.py --rev HEAD --b-venv /tmp/venv-3.12   # B: the same code on another interpreter
    python bench/ab.py --render bench/results/ab-....json   # re-print a saved comparison

Why: on a shared 2-CPU machine, two gateway processes running identical code differ by up to ~5 %
of CPU per request depending on ``PYTHONHASHSEED`` (dict and set layouts, hence cache behaviour),
and two consecutive runs of bench/run.py differ by 10-15 %. One before/after pair cannot resolve a
budget of a few percent; this tool can.

How: nginx serves the canned answers (as in bench/run.py). For each hash seed, two gateways run at
once, both pinned to the SAME proxy CPU, both with that ``PYTHONHASHSEED``, each with a fresh work
directory and ledger of its own (a ledger written by a newer schema makes an older gateway refuse
to start), both configured as ``--config`` says (default: the gateway's defaults, access log and
ledger on; the access log goes to a file in the work directory): A is the installed ``gateway``
console script with the ``gateway`` package of ``--rev`` (extracted with ``git archive``, nothing
else in the repository is touched) first on ``PYTHONPATH``; B is the same console script on the
working tree (or, with ``--b-rev``, on another extracted revision). Both are warmed up, then for
``--rounds`` rounds each gets one short wrk run (``--seconds``, ``--connections``), A first in even
rounds and B first in odd ones, so that drift in the machine's load falls on both alike. Each run's
CPU is the gateway process tree's user + system time from /proc, before and after; a round's
figure is B's CPU per request divided by A's. Reported: every round's ratio, the median per seed,
the median over all rounds, and the spread of the per-seed medians (the hash-seed effect); and
each side's wrk p50 and p99, median over the rounds (with ``--connections 1``: issue #19's
one-client latency, the two sides interleaved, which one run of bench/run.py cannot resolve).

With ``--floor``, side A is bench/relay_floor.py (uvicorn + aiohttp, no gateway code) instead of a
gateway revision: B/A is then the gateway's CPU per request over the floor's, measured the same
interleaved way (the inverse of issue #19's "0.8x the floor" ratio, per CPU-second).

Below 1 means B (the working tree) spends less CPU per request than A (``--rev``). Writes
bench/results/ab-<time>.json and .md. Everything listens on 127.0.0.1; every process is started
with its own process group and stopped by its pid in a ``finally`` block (Ctrl-C and SIGTERM
included); every loop is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as b
import payloads

SIDES = ("A", "B")
# What each --config means, for the report (a saved run without one used "quiet").
CONFIGS = {
    "defaults": "the defaults (access log on at log level info, to a file; SQLite ledger on)",
    "lean": "the access log and the ledger off",
    "quiet": 'log_level = "warning" (no access log lines; ledger on)',
}
FLOOR = "the bare relay floor (bench/relay_floor.py: uvicorn + aiohttp, no gateway code)"
SCENARIOS = {
    "chat": ("/v1/chat/completions", payloads.chat_request(False)),
    "embed": ("/v1/embeddings", payloads.embeddings_request()),
}


@dataclass(frozen=True)
class Sample:
    """One wrk run against one side."""

    cpu_us_per_req: float
    rps: float
    requests: int
    errors: int
    cpu_s: float
    p50_us: int = 0  # wrk's latency percentiles (0: a run saved before they were kept)
    p99_us: int = 0


@dataclass
class Side:
    """One running gateway: A (``--rev``) or B (the working tree, or ``--b-rev``)."""

    name: str
    proc: b.Proc
    port: int
    pids: list[int]


# ---------------------------------------------------------------------------------------------
# Running


# Per side, the directory holding its extracted ``gateway`` package (put first on PYTHONPATH), or
# None: the working tree, as installed (editable) in the project's venv.
Code = dict[str, Path | None]


def side_env(side: str, seed: int, code: Code) -> dict[str, str]:
    """The environment of a gateway: no GATEWAY_* overrides, the seed, and an extracted package first."""
    return b.gateway_env(seed, code[side])


def check_imports(code: Code, cwd: Path, b_venv: Path | None = None) -> None:
    """Each side must import the package meant for it (an editable install through an import hook,
    rather than a path entry, would win over PYTHONPATH and make A run the working tree's code)."""
    for side in SIDES:
        where = (code[side] or b.ROOT) / "gateway"
        python = b_venv / "bin" / "python" if side == "B" and b_venv else b.PROJECT_BIN / "python"
        done = subprocess.run(
            [str(python), "-c", "import gateway, os; print(os.path.dirname(gateway.__file__))"],
            capture_output=True,
            text=True,
            env=side_env(side, 0, code),
            cwd=cwd,  # not the repository: `python -c` puts the current directory first on sys.path
            timeout=60,
            check=True,
        )
        found = Path(done.stdout.strip()).resolve()
        if found != where.resolve():
            raise SystemExit(f"ab: side {side} imports gateway from {found}, expected {where}")


def start_side(
    side: str, seed: int, work: Path, code: Code, upstream: str, cpus: b.Cpus, args: argparse.Namespace
) -> Side:
    workdir = work / f"seed{seed}-{side}"  # fresh: its own config and ledger
    workdir.mkdir(parents=True)
    port = b.free_port()
    profile = args.b_config if side == "B" and args.b_config else args.config
    config = b.gateway_config(workdir, side, upstream, port, profile=profile)
    kind = "floor" if side == "A" and args.floor else "gateway"
    argv = b.gateway_argv(kind, config, port)
    if side == "B" and args.b_venv:
        argv[0] = str(args.b_venv / "bin" / "gateway")  # the same CLI, another interpreter
    proc = b.spawn(f"{kind}-{side}-seed{seed}", argv, workdir, cpus.proxy, env=side_env(side, seed, code))
    try:
        startup = b.wait_ready(proc, port, "/readyz", 30.0)
    except BaseException:
        proc.stop()
        raise
    b.log(f"seed {seed}: {side} ready on port {port} after {startup * 1000:.0f} ms (pid {proc.pid})")
    return Side(side, proc, port, b.tree(proc.pid))


def measure(side: Side, both: list[int], url_path: str, script: Path, args: argparse.Namespace, cpus: b.Cpus) -> Sample:
    """One wrk run against ``side``, once both gateways (``both``: their pids) are idle."""
    if not side.proc.alive():
        raise RuntimeError(f"gateway {side.name} died:\n{side.proc.tail()}")
    b.wait_idle(both, max_wait=5.0)  # neither carries work over from the previous run
    cpu0 = b.cpu_seconds(side.pids)
    data = b.run_wrk(f"http://{b.HOST}:{side.port}{url_path}", script, args.connections, args.seconds, cpus)
    cpu = b.cpu_seconds(side.pids) - cpu0
    requests = int(data["requests"])
    if requests == 0:
        raise RuntimeError(f"gateway {side.name}: no request completed in {args.seconds} s")
    return Sample(
        cpu * 1e6 / requests, float(data["rps"]), requests, int(data["errors"]), cpu, data["p50_us"], data["p99_us"]
    )


def measure_seed(
    seed: int, work: Path, code: Code, upstream: str, script: Path, args: argparse.Namespace, cpus: b.Cpus
) -> dict[str, Any]:
    url_path = SCENARIOS[args.scenario][0]
    rounds: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        sides: dict[str, Side] = {}
        for name in SIDES:
            sides[name] = start_side(name, seed, work, code, upstream, cpus, args)
            stack.callback(sides[name].proc.stop)
        both = [pid for side in sides.values() for pid in side.pids]
        for name in SIDES:  # warm-up: imports, caches, the upstream pool, the first collections
            url = f"http://{b.HOST}:{sides[name].port}{url_path}"
            b.run_wrk(url, script, args.connections, args.warmup, cpus)
            if args.writers_beside and cpus.load is not None:  # (the log's writer starts with the first line)
                moved = b.move_writer_threads(sides[name].proc.pid, cpus.load)
                b.log(f"seed {seed}: {name}'s writer threads on CPUs {cpus.load}: {', '.join(moved) or 'none'}")
        for index in range(args.rounds):
            order = SIDES if index % 2 == 0 else SIDES[::-1]
            samples = {name: measure(sides[name], both, url_path, script, args, cpus) for name in order}
            ratio = samples["B"].cpu_us_per_req / samples["A"].cpu_us_per_req
            rounds.append(
                {"round": index, "order": "".join(order), "ratio": ratio, **{k: asdict(v) for k, v in samples.items()}}
            )
            b.log(
                f"seed {seed} round {index + 1:2d}/{args.rounds} ({''.join(order)}): "
                f"A {samples['A'].cpu_us_per_req:6.1f} us/req {samples['A'].rps:7.0f} req/s, "
                f"B {samples['B'].cpu_us_per_req:6.1f} us/req {samples['B'].rps:7.0f} req/s, B/A {ratio:.3f}; "
                f"p99 A {samples['A'].p99_us / 1000:.3f} B {samples['B'].p99_us / 1000:.3f} ms"
            )
    return {"seed": seed, "rounds": rounds, **seed_stats(rounds)}


def seed_stats(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    ratios = [r["ratio"] for r in rounds]
    out: dict[str, Any] = {
        "median_ratio": statistics.median(ratios),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
    }
    for name in SIDES:
        out[f"{name}_cpu_us_median"] = statistics.median(r[name]["cpu_us_per_req"] for r in rounds)
        out[f"{name}_rps_median"] = statistics.median(r[name]["rps"] for r in rounds)
        out[f"{name}_errors"] = sum(r[name]["errors"] for r in rounds)
        for pct in ("p50_us", "p99_us"):
            out[f"{name}_{pct}_median"] = statistics.median(r[name].get(pct, 0) for r in rounds)
    return out


def overall(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    ratios = sorted(r["ratio"] for s in seeds for r in s["rounds"])
    medians = [s["median_ratio"] for s in seeds]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    rps = sorted(r["B"]["rps"] / r["A"]["rps"] for s in seeds for r in s["rounds"])
    rps_quartiles = statistics.quantiles(rps, n=4) if len(rps) >= 2 else [rps[0]] * 3
    return {
        # B's req/s over A's in the same round (both on the same CPU: the throughput ratio issue #19's
        # targets are stated in), median over every round, and its quartiles.
        "rps_ratio": statistics.median(rps),
        "rps_ratio_q1": rps_quartiles[0],
        "rps_ratio_q3": rps_quartiles[2],
        "median_ratio": statistics.median(ratios),  # over every round of every seed
        "median_of_seed_medians": statistics.median(medians),
        "seed_median_min": min(medians),
        "seed_median_max": max(medians),
        "round_ratio_q1": quartiles[0],
        "round_ratio_q3": quartiles[2],
        "rounds": len(ratios),
        # Each side's latency percentiles, median over every round (at --connections 1: the one-client
        # p50 and p99 of issue #19's targets, the two sides interleaved).
        **{
            f"{name}_{pct}_median": statistics.median(r[name].get(pct, 0) for s in seeds for r in s["rounds"])
            for name in SIDES
            for pct in ("p50_us", "p99_us")
        },
    }


def git_describe(rev: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(b.ROOT), "log", "-1", "--format=%h %s", rev], capture_output=True, text=True, check=False
    )
    return done.stdout.strip()[:120]


def working_tree() -> str:
    head = git_describe("HEAD")[:60]
    dirty = subprocess.run(
        ["git", "-C", str(b.ROOT), "status", "--porcelain", "gateway"], capture_output=True, text=True, check=False
    )
    return head + (" + uncommitted changes to gateway/" if dirty.stdout.strip() else "")


def run(args: argparse.Namespace) -> dict[str, Any]:
    b.ensure_system_tools()
    cpus = b.Cpus.plan(not args.no_pin)
    meta: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "pinning": cpus.describe(),
        "writers_beside": args.writers_beside,
        "rev": "floor" if args.floor else args.rev,
        "b_rev": args.b_rev,
        "tree": None if args.b_rev else working_tree(),
        "scenario": args.scenario,
        "config": args.config,
        "b_config": args.b_config,
        "b_python": _python_version(args.b_venv) if args.b_venv else None,
        "python": _python_version(b.PROJECT_BIN.parent),
        "connections": args.connections,
        "seconds": args.seconds,
        "warmup_s": args.warmup,
        "rounds": args.rounds,
        "seeds": args.seeds,
        "loadavg_start": os.getloadavg(),
        "cpu_pressure_start": b.cpu_pressure(),
    }
    results: dict[str, Any] = {"meta": meta, "seeds": []}
    with tempfile.TemporaryDirectory(prefix="gateway-ab-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        code: Code = {"A": None if args.floor else work / "rev-a", "B": work / "rev-b" if args.b_rev else None}
        if args.floor:
            meta["rev_described"] = FLOOR
        else:
            meta["rev_described"] = b.extract_baseline(args.rev, work / "rev-a")
        if args.b_rev:
            meta["b_rev_described"] = b.extract_baseline(args.b_rev, work / "rev-b")
        check_imports(code, work, args.b_venv)
        b.log(f"A = {meta['rev_described']}; B = {_side_b(meta)}; {cpus.describe()}")
        nginx = b.start_nginx_servers(work, cpus)
        stack.callback(nginx.proc.stop)
        upstream = f"http://{b.HOST}:{nginx.json_port}"
        script = b.wrk_script(work, args.scenario, SCENARIOS[args.scenario][1])
        for seed in args.seeds:
            results["seeds"].append(measure_seed(seed, work, code, upstream, script, args, cpus))
    results["overall"] = overall(results["seeds"])
    meta["loadavg_end"] = os.getloadavg()
    meta["cpu_pressure_end"] = b.cpu_pressure()
    return results


# ---------------------------------------------------------------------------------------------
# Rendering


def _python_version(venv: Path) -> str:
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import platform; print(platform.python_version())"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return done.stdout.strip()


def _side_b(meta: dict[str, Any]) -> str:
    python = f" on Python {meta['b_python']} (A on {meta['python']})" if meta.get("b_python") else ""
    if meta.get("b_rev"):
        return f"`{meta['b_rev']}` ({_short(meta['b_rev_described'])}){python}"
    return f"the working tree ({meta['tree']}){python}"


def _configs(meta: dict[str, Any]) -> str:
    a = meta.get("config", "quiet")
    b_config = meta.get("b_config") or a
    if meta.get("rev") == "floor":
        return f"B: {CONFIGS[b_config]} (A is the floor)"
    if a == b_config:
        return CONFIGS[a]
    return f"A: {CONFIGS[a]}; B: {CONFIGS[b_config]}"


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _writers(m: dict[str, Any]) -> str:
    return "; their writer threads on the load CPUs after the warm-up" if m.get("writers_beside") else ""


def _pct(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.1f} %"


def render(results: dict[str, Any]) -> str:
    m, o = results["meta"], results["overall"]
    rows = []
    for s in results["seeds"]:
        errors = s["A_errors"] + s["B_errors"]
        rows.append(
            f"| {s['seed']} | {s['A_cpu_us_median']:.1f} | {s['B_cpu_us_median']:.1f} | {s['median_ratio']:.3f}x "
            f"({_pct(s['median_ratio'])}) | {s['min_ratio']:.3f} - {s['max_ratio']:.3f} | "
            f"{s['A_rps_median']:,.0f} / {s['B_rps_median']:,.0f} | {errors} |"
        )
    per_round = [
        f"- seed {s['seed']}: " + ", ".join(f"{r['ratio']:.3f}" for r in s["rounds"]) for s in results["seeds"]
    ]
    return "\n".join(
        [
            f"## Interleaved A/B {m['date']}",
            "",
            f"A = `{m['rev']}` ({_short(m['rev_described'])}); B = {_side_b(m)}. Gateway configuration: "
            f"{_configs(m)}. Scenario {m['scenario']}, {m['connections']} connections, "
            f"{m['seconds']} s wrk runs after a {m['warmup_s']} s warm-up of each, {m['rounds']} rounds per "
            f"hash seed, the order swapped every round; {m['pinning']} "
            f"(both gateways on the same CPU{_writers(m)}). Load average {m['loadavg_start'][0]:.2f} at the start, "
            f"{m.get('loadavg_end', [0])[0]:.2f} at the end; CPU pressure at the end: "
            f"`{m.get('cpu_pressure_end', 'n/a')}`.",
            "",
            "| PYTHONHASHSEED | A CPU us/req | B CPU us/req | B/A, median of rounds | rounds' min - max | "
            "req/s A / B | errors |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"**B/A CPU per request: {o['median_ratio']:.3f}x ({_pct(o['median_ratio'])})**, median of all "
            f"{o['rounds']} rounds (quartiles {o['round_ratio_q1']:.3f} - {o['round_ratio_q3']:.3f}); median of the "
            f"per-seed medians {o['median_of_seed_medians']:.3f}x; the per-seed medians span "
            f"{o['seed_median_min']:.3f} - {o['seed_median_max']:.3f}x "
            f"({(o['seed_median_max'] - o['seed_median_min']) * 100:.1f} points: the hash-seed effect plus the "
            "rounds' noise; an A/A run, `--b-rev` = `--rev`, shows the noise alone).",
            *(
                [
                    "",
                    f"B/A req/s, the same rounds: **{o['rps_ratio']:.3f}x**, median (quartiles "
                    f"{o['rps_ratio_q1']:.3f} - {o['rps_ratio_q3']:.3f}).",
                ]
                if "rps_ratio" in o  # (saved before 2026-12-05 15:10)
                else []
            ),
            *(
                [
                    "",
                    "Latency (wrk's, per run), median of the rounds: A p50 / p99 "
                    f"{o['A_p50_us_median'] / 1000:.3f} / {o['A_p99_us_median'] / 1000:.3f} ms, B "
                    f"{o['B_p50_us_median'] / 1000:.3f} / {o['B_p99_us_median'] / 1000:.3f} ms.",
                ]
                if o.get("A_p99_us_median")  # (saved before 2026-12-06 05:00)
                else []
            ),
            "",
            "Per-round B/A ratios:",
            "",
            *per_round,
        ]
    )


# ---------------------------------------------------------------------------------------------
# Main


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the finally blocks that stop every process


def _seeds(text: str) -> list[int]:
    seeds = [int(s) for s in text.split(",") if s.strip()]
    if not 1 <= len(seeds) <= 20 or any(not 0 <= s <= 4_294_967_295 for s in seeds):
        raise argparse.ArgumentTypeError("1 to 20 seeds, each in 0..4294967295")
    return seeds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Interleaved A/B of the gateway's CPU per request: git revision A vs the working tree."
    )
    parser.add_argument("--rev", default="HEAD~1", help="git revision of side A (default HEAD~1)")
    parser.add_argument(
        "--b-rev",
        metavar="REV",
        help="side B at a git revision too, instead of the working tree (--rev X --b-rev X: an A/A run, the noise "
        "floor; or a fixed pair while the tree changes)",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="side A is bench/relay_floor.py (uvicorn + aiohttp, no gateway code) instead of a revision: "
        "the gateway's CPU per request against the floor's, interleaved (issue #19's 0.8x target)",
    )
    parser.add_argument(
        "--b-venv",
        type=Path,
        metavar="DIR",
        help="side B runs the gateway CLI of this virtualenv (the project installed into it, e.g. with another "
        "Python): the interpreter's cost, same code",
    )
    parser.add_argument("--rounds", type=int, default=12, help="rounds per hash seed (default 12)")
    parser.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="PYTHONHASHSEED values (default 0,1,2)")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="chat", help="request (default chat)")
    parser.add_argument(
        "--config",
        choices=b.GATEWAY_PROFILES,
        default="defaults",
        help="both gateways' configuration: defaults (access log and ledger on, as users run it; the default), "
        'lean (both off), quiet (log_level = "warning": no access log, ledger on; the runs before 2026-12-05)',
    )
    parser.add_argument(
        "--b-config",
        choices=b.GATEWAY_PROFILES,
        help="side B's configuration, when it differs from --config (--rev X --b-rev X --config lean --b-config "
        "defaults: what the defaults cost, same code)",
    )
    parser.add_argument("--seconds", type=int, default=2, help="seconds per wrk run (default 2)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per gateway and seed (default 2)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the gateways and the load to separate CPUs")
    parser.add_argument(
        "--writers-beside",
        action="store_true",
        help="after the warm-up, the gateways' writer threads (access log, ledger, roll-ups) run on the load CPUs, "
        "the event loop alone on the proxy CPU: as on an unpinned machine with a core to spare (the CPU per "
        "request still counts every thread)",
    )
    parser.add_argument("--render", metavar="JSON", help="only print the table of a saved comparison")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 200:
        parser.error("--rounds must be 1..200")
    if not 1 <= args.seconds <= 60 or not 1 <= args.warmup <= 60:
        parser.error("--seconds and --warmup must be 1..60")
    if not 1 <= args.connections <= 1024:
        parser.error("--connections must be 1..1024")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return 0
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.perf_counter()
    try:
        results = run(args)
    except KeyboardInterrupt:
        b.log("interrupted: every process the comparison started has been stopped; no results written")
        return 130
    results["meta"]["total_s"] = round(time.perf_counter() - started, 1)
    b.RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "ab-" + time.strftime("%Y%m%d-%H%M%S")
    json_path = b.RESULTS / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=1))
    text = render(results)
    (b.RESULTS / f"{stem}.md").write_text(text + "\n")
    print(text)
    b.log(f"results: {json_path.relative_to(b.ROOT)} and .md ({results['meta']['total_s']} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
