"""Benchmark: the shared state store in Redis vs the in-process one, and two replicas' limit accuracy.

One run, ratios against the in-process row (bench/README.md, "Shared state"):

- ``in-process``: one gateway, keys mode, a key with rpm and tpm limits (huge: counted, never
  refused), the SQLite ledger; ``redis``: the same with ``[shared] redis_url`` (every request one
  admission script and one settlement script); ``redis+postgres``: the same with the ledger on
  PostgreSQL too (``[usage] database_url``: records through the Redis Stream), when PostgreSQL's
  binaries are installed. Each row: p50 latency at one client and req/s at 64 (wrk), alternating
  the rows ``--rounds`` times, medians.
- two replicas sharing one Redis, a key limited to ``--limit`` requests per minute, both driven at
  once: requests admitted / the limit (1.000 is exact) and the req/s offered.

``--rev REV`` adds a row ``redis@REV``: the same as ``redis`` with the ``gateway`` package of a git
revision (extracted with ``git archive``, first on ``PYTHONPATH``, as bench/ab.py does), so that
before and after a change are measured in one interleaved run.

nginx is the upstream (canned answers), as in run.py. The gateway under test is pinned alone to one
CPU (``--no-pin``: not pinned); the two replicas are not pinned. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import benchlib as b
import payloads

HUGE = 1_000_000_000


def config(workdir: Path, name: str, upstream: str, port: int, rpm: int) -> Path:
    """Keys mode, one key (the one wrk sends) with rpm and tpm limits, a fresh SQLite ledger."""
    digest = hashlib.sha256(payloads.API_KEY.encode()).hexdigest()
    path = workdir / f"{name}.toml"
    path.write_text(
        f"""host = "{b.HOST}"
port = {port}
log_level = "warning"
access_log = false

[upstream]
url = "{upstream}"
api_key = "sk-bench-upstream"

[auth]
mode = "keys"
reload_interval = 0

[usage]
path = "{workdir / f"{name}-usage.db"}"

[catalog]
ttl = 86400.0

[metrics]
public = true

[[keys]]
name = "bench"
key_sha256 = "{digest}"
rpm = {rpm}
tpm = {HUGE}
"""
    )
    return path


def start_redis(workdir: Path, cpus: b.Cpus) -> tuple[b.Proc, int]:
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("bench: redis-server is not installed (apt-get install redis-server)")
    port = b.free_port()
    argv = [server, "--port", str(port), "--bind", b.HOST, "--save", "", "--appendonly", "no"]
    proc = b.spawn("redis", argv, workdir, cpus.load)
    for _ in range(200):
        with contextlib.suppress(OSError), socket.create_connection((b.HOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            if sock.recv(16).startswith(b"+PONG"):
                return proc, port
        time.sleep(0.05)
    proc.stop()
    raise RuntimeError("redis-server did not answer PING")


def start_gateway(workdir: Path, name: str, upstream: str, cpus: tuple[int, ...] | None, rpm: int,
                  env: dict[str, str]) -> tuple[b.Proc, int]:  # fmt: skip
    port = b.free_port()
    argv = [str(b.PROJECT_BIN / "gateway"), "serve", "--config", str(config(workdir, name, upstream, port, rpm))]
    base = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_") and k != "PYTHONPATH"}
    proc = b.spawn(name, argv, workdir, cpus, env={**base, **env})
    try:
        b.wait_ready(proc, port, "/readyz", 30.0)
    except BaseException:
        proc.stop()
        raise
    return proc, port


def extract(rev: str, workdir: Path) -> Path:
    """The ``gateway`` package of ``rev`` in a directory of its own (for ``PYTHONPATH``)."""
    target = workdir / f"rev-{rev.replace('/', '_')}"
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(b.ROOT), "archive", rev, "gateway"], capture_output=True, check=True,
                             timeout=60)  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True, timeout=60)
    return target


def compare(args: argparse.Namespace, workdir: Path, upstream: str, cpus: b.Cpus, rows: dict[str, dict[str, str]],
            script: Path) -> dict[str, Any]:  # fmt: skip
    """Each row's p50 at one client and req/s at 64, alternating the rows, medians of the rounds."""
    results: dict[str, dict[str, list[float]]] = {name: {"p50_ms": [], "rps": []} for name in rows}
    with contextlib.ExitStack() as stack:
        ports = {}
        for name, env in rows.items():
            proc, ports[name] = start_gateway(workdir, name, upstream, cpus.proxy, HUGE, env)
            stack.enter_context(b.running(proc))
        for port in ports.values():  # warm up: the catalog, connections, scripts loaded
            b.run_wrk(f"http://{b.HOST}:{port}/v1/chat/completions", script, 8, 1, cpus)
        for round_ in range(args.rounds):
            order = list(ports) if round_ % 2 == 0 else list(reversed(ports))
            for name in order:
                url = f"http://{b.HOST}:{ports[name]}/v1/chat/completions"
                one = b.run_wrk(url, script, 1, args.seconds, cpus)
                many = b.run_wrk(url, script, 64, args.seconds, cpus)
                if one["errors"] or many["errors"]:
                    raise RuntimeError(f"{name}: wrk saw errors: {one} {many}")
                results[name]["p50_ms"].append(one["p50_us"] / 1000)
                results[name]["rps"].append(many["rps"])
            b.log(f"round {round_ + 1}/{args.rounds} done")
        for name, port in ports.items():  # a row measured on Redis must not have fallen back to local
            results[name]["fallbacks"] = [fallbacks(port)]
    return {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()}


def fallbacks(port: int) -> float:
    """``gateway_shared_store_fallbacks_total``: admissions decided without Redis (0 without the metric)."""
    with urllib.request.urlopen(f"http://{b.HOST}:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("gateway_shared_store_fallbacks_total"):
                return float(line.split()[-1])
    return 0.0


def accuracy(args: argparse.Namespace, workdir: Path, upstream: str, redis_url: str, script: Path) -> dict[str, Any]:
    """Two replicas on one Redis, driven at once: admitted requests / the key's requests per minute."""
    cpus = b.Cpus(None, None)
    env = {"GATEWAY_SHARED_REDIS_URL": redis_url, "GATEWAY_SHARED_KEY_PREFIX": f"acc{int(time.time())}"}
    with contextlib.ExitStack() as stack:
        ports = []
        for i in range(2):
            proc, port = start_gateway(workdir, f"replica-{i}", upstream, None, args.limit, env)
            stack.enter_context(b.running(proc))
            ports.append(port)
        with ThreadPoolExecutor(2) as pool:
            runs = list(pool.map(
                lambda port: b.run_wrk(f"http://{b.HOST}:{port}/v1/chat/completions", script, 32, args.seconds, cpus),
                ports,
            ))  # fmt: skip
    admitted = sum(r["requests"] - r["status"] for r in runs)
    offered = sum(r["requests"] for r in runs)
    return {"limit": args.limit, "admitted": admitted, "offered": offered,
            "accuracy": admitted / args.limit, "offered_rps": sum(r["rps"] for r in runs)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="alternations of the rows (default 4)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per wrk run (default 3)")
    parser.add_argument("--limit", type=int, default=2000, help="the two replicas' key rpm (default 2000)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the gateway and the load apart")
    parser.add_argument("--no-postgres", action="store_true", help="skip the redis+postgres row")
    parser.add_argument("--redis-timeout", type=float, help="[shared] timeout of the Redis rows (default: the default)")
    parser.add_argument("--rev", help="add a row redis@REV: the redis row at a git revision (before/after)")
    args = parser.parse_args(argv)
    b.ensure_system_tools()
    cpus = b.Cpus.plan(not args.no_pin)
    workdir = Path(tempfile.mkdtemp(prefix="bench-shared-"))
    script = b.wrk_script(workdir, "chat", payloads.chat_request(stream=False))
    with contextlib.ExitStack() as stack:
        nginx = b.start_nginx_servers(workdir, cpus)
        stack.enter_context(b.running(nginx.proc))
        upstream = f"http://{b.HOST}:{nginx.json_port}"
        redis, redis_port = start_redis(workdir, cpus)
        stack.enter_context(b.running(redis))
        redis_url = f"redis://{b.HOST}:{redis_port}/0"
        rows = {"in-process": {}, "redis": {"GATEWAY_SHARED_REDIS_URL": redis_url}}
        if args.redis_timeout:  # a longer timeout: no admission falls back while the machine stalls
            rows["redis"]["GATEWAY_SHARED_TIMEOUT"] = str(args.redis_timeout)
        if args.rev:
            rows[f"redis@{args.rev}"] = {**rows["redis"], "PYTHONPATH": str(extract(args.rev, workdir))}
        if not args.no_postgres:
            from tests.helpers.postgres import postgres_server  # the tests' own server, in a temp dir

            postgres = stack.enter_context(postgres_server())
            rows["redis+postgres"] = {**rows["redis"], "GATEWAY_USAGE_DATABASE_URL": postgres.database()}
        b.log(f"{b.cpu_pressure()}; {cpus.describe()}")
        compared = compare(args, workdir, upstream, cpus, rows, script)
        replicas = accuracy(args, workdir, upstream, redis_url, script)
    base = compared["in-process"]
    print("| backend | p50 at 1 client (ms) | added p50 (ms) | req/s at 64 | req/s vs in-process | fallbacks |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, row in compared.items():
        print(f"| {name} | {row['p50_ms']:.3f} | {row['p50_ms'] - base['p50_ms']:+.3f} | {row['rps']:.0f} "
              f"| {row['rps'] / base['rps']:.2f}x | {row['fallbacks']:.0f} |")  # fmt: skip
    print(
        f"\nTwo replicas, one Redis, rpm {replicas['limit']}: admitted {replicas['admitted']} of "
        f"{replicas['offered']} offered ({replicas['offered_rps']:.0f} req/s): accuracy {replicas['accuracy']:.3f}"
    )
    print(json.dumps({"compare": compared, "replicas": replicas}), file=sys.stderr)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
