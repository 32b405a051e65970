"""Issue #19's server-stack trial: the relay floor (bench/relay_floor.py: an ASGI app that only
relays, on aiohttp) under uvicorn, as ``gateway serve`` runs it, against the same app under
Granian (ASGI interface, uvloop, one worker), alternating, in one run.

    python bench/server_trial.py                 # 3 rounds; installs Granian into bench/.venv-granian
    python bench/server_trial.py --rounds 5 --seconds 8

Per server and round: chat at 64 clients (wrk, 'seconds' s) for req/s and the CPU the server's
process tree used (so a Rust server's threads count too), then one client for p50/p99. Medians over
the rounds. Pinned as bench/run.py pins: the server alone on one CPU, nginx and wrk on the other.
The gateway itself is not run on Granian: its connection limits, timeouts, refusals and drain are
uvicorn protocol classes (gateway/server/), which Granian has no place for; this trial asks whether
the server alone would be worth that port.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as b
import payloads

GRANIAN_VERSION = "2.8.9"
GRANIAN_VENV = b.BENCH / ".venv-granian"


def server_argv(kind: str, python: Path, config: Path, port: int) -> list[str]:
    if kind == "uvicorn":
        return [sys.executable, str(b.BENCH / "relay_floor.py"), "--config", str(config), "--port", str(port)]
    return [str(python), "-m", "granian", "--interface", "asgi", "--loop", "uvloop", "--workers", "1",
            "--host", b.HOST, "--port", str(port), "--factory", "--working-dir", str(b.BENCH),
            "--no-ws", "--log-level", "warning", "relay_floor:granian_app"]  # fmt: skip


def measure(kind: str, python: Path, workdir: Path, upstream: str, cpus: b.Cpus, seconds: float) -> dict[str, Any]:
    port = b.free_port()
    config = b.gateway_config(workdir, f"floor-{kind}", upstream, port, profile="lean")
    env = {**os.environ, "FLOOR_UPSTREAM": upstream}
    proc = b.spawn(f"{kind}-{port}", server_argv(kind, python, config, port), workdir, cpus.proxy, env=env)
    with b.running(proc):
        b.wait_ready(proc, port, "/readyz", 30.0)
        url = f"http://{b.HOST}:{port}/v1/chat/completions"
        script = b.wrk_script(workdir, f"chat-{kind}", payloads.chat_request(stream=False))
        b.run_wrk(url, script, 64, 2, cpus)  # warm-up
        pids = b.tree(proc.pid)
        cpu0 = b.cpu_seconds(pids)
        loaded = b.run_wrk(url, script, 64, seconds, cpus)
        cpu = b.cpu_seconds(pids) - cpu0
        single = b.run_wrk(url, script, 1, seconds, cpus)
    return {
        "rps": loaded["rps"],
        "cpu_ms_per_req": 1000 * cpu / max(1, loaded["requests"]),
        "cores": cpu / (loaded["duration_us"] / 1e6),
        "p50_ms": single["p50_us"] / 1000,
        "p99_ms": single["p99_us"] / 1000,
        "errors": loaded["errors"] + single["errors"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    b.ensure_system_tools()
    python = b.ensure_venv(GRANIAN_VENV, ["-c", str(b.ROOT / "constraints.txt"), "-e", str(b.ROOT),
                                          f"granian[uvloop]=={GRANIAN_VERSION}"], "Granian")  # fmt: skip
    if python is None:
        return 1
    cpus = b.Cpus.plan(True)
    b.log(f"{b.cpu_pressure()}; {cpus.describe()}")
    results: dict[str, list[dict[str, Any]]] = {"uvicorn": [], "granian": []}
    with tempfile.TemporaryDirectory(prefix="server-trial-") as tmp:
        workdir = Path(tmp)
        nginx, json_port, _ = b.start_nginx(workdir, cpus)
        with b.running(nginx):
            upstream = f"http://{b.HOST}:{json_port}"
            for round_ in range(args.rounds):
                for kind in ("uvicorn", "granian") if round_ % 2 == 0 else ("granian", "uvicorn"):
                    results[kind].append(measure(kind, python, workdir, upstream, cpus, args.seconds))
                b.log(f"round {round_ + 1}/{args.rounds} done")
    med = {k: {m: statistics.median(r[m] for r in rows) for m in rows[0]} for k, rows in results.items()}
    print(
        "| server | req/s at 64 | cores used | CPU ms/req | req/s per CPU-second | p50 at 1 (ms) | p99 at 1 (ms) "
        "| errors |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind, m in med.items():
        per_cpu = 1000 / m["cpu_ms_per_req"]
        print(f"| {kind} | {m['rps']:.0f} | {m['cores']:.2f} | {m['cpu_ms_per_req']:.3f} | {per_cpu:.0f} | "
              f"{m['p50_ms']:.3f} | {m['p99_ms']:.3f} | {m['errors']:.0f} |")  # fmt: skip
    g, u = med["granian"], med["uvicorn"]
    cpu_ratio = g["cpu_ms_per_req"] / u["cpu_ms_per_req"]
    print(f"\nGranian / uvicorn: req/s {g['rps'] / u['rps']:.2f}x, CPU per request {cpu_ratio:.2f}x, "
          f"p50 at one client {g['p50_ms'] - u['p50_ms']:+.3f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
