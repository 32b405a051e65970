"""The gateway's benchmark: direct vs the gateway vs Portkey and the LiteLLM proxy, in one run, on 127.0.0.1.

    python bench/run.py                  # everything (make bench)
    python bench/run.py --no-litellm     # without the LiteLLM row (--no-portkey: without Portkey's)
    python bench/run.py --transport-experiment   # gateway on httpx's transport vs httpx-aiohttp's
    python bench/run.py --render bench/results/bench-....json   # re-print a saved run's tables
    python bench/run.py --no-litellm --cache    # and the response-cache rows (forwarded vs hits)

Starts nginx (canned catalog, chat JSON, embeddings, SSE), a paced SSE stand-in, then each proxy in
front of them, drives them with wrk and bench/streams.py, stops everything and prints markdown
tables. Results go to bench/results/ as JSON, markdown and a PNG. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as b
import payloads

PROXIES = (
    "gateway",
    "gateway-lean",
    "gateway-cache",
    "baseline",
    "floor",
    "portkey",
    "litellm",
    "runner-httpx",
    "runner-aiohttp",
)
# The row with the access log and the ledger off: what the defaults cost, in the same run.
LEAN_ROW = "gateway-lean"
# The --cache row: the installed gateway with `[cache] enabled = true`, run on the cache scenarios
# only, each primed so that every measured request is a hit.
CACHE_ROW = "gateway-cache"
# A cached run whose hits (the gateway's own counter) are under this share of its requests fails.
MIN_HIT_SHARE = 0.99
LABELS = {
    "direct": "direct (no proxy)",
    "gateway": "gateway (defaults: access log + ledger on)",
    LEAN_ROW: "gateway, access log + ledger off",
    CACHE_ROW: "gateway, response cache on (hits)",
    "baseline": "gateway, baseline commit",
    "floor": "bare relay floor (uvicorn + aiohttp)",
    "portkey": "Portkey AI gateway (Node)",
    "litellm": "LiteLLM proxy",
    "runner-httpx": "gateway, httpx transport",
    "runner-aiohttp": "gateway, httpx-aiohttp transport",
}


@dataclass(frozen=True)
class Scenario:
    name: str
    phase: str  # which upstream: "json" (nginx), "sse" (nginx, canned SSE), "paced" (paced stand-in)
    kind: str  # "wrk" or "streams"
    path: str
    body: bytes
    connections: int
    title: str
    cache: bool = False  # the --cache row runs it (its request is cacheable)
    cache_only: bool = False  # part of --cache: only the direct, gateway and cache rows run it


SCENARIOS = (
    Scenario(
        "latency_1",
        "json",
        "wrk",
        "/v1/chat/completions",
        payloads.chat_request(False),
        1,
        "One client: chat completion (non-streamed)",
    ),
    Scenario(
        "chat_64",
        "json",
        "wrk",
        "/v1/chat/completions",
        payloads.chat_request(False),
        64,
        "64 concurrent clients: chat completion (non-streamed)",
    ),
    Scenario(
        "embed_64",
        "json",
        "wrk",
        "/v1/embeddings",
        payloads.embeddings_request(),
        64,
        "64 concurrent clients: embeddings (1024 floats, ~10 KB answer)",
        cache=True,
    ),
    Scenario(
        "sse_16",
        "sse",
        "wrk",
        "/v1/chat/completions",
        payloads.chat_request(True),
        16,
        "16 concurrent SSE streams, canned (nginx sends 20 events + [DONE] at once)",
    ),
    Scenario(
        "sse_256",
        "sse",
        "wrk",
        "/v1/chat/completions",
        payloads.chat_request(True),
        256,
        "256 concurrent SSE streams, canned",
    ),
    Scenario(
        "paced_16",
        "paced",
        "streams",
        "/v1/chat/completions",
        payloads.chat_request(True),
        16,
        "16 concurrent SSE streams, paced",
    ),
    Scenario(
        "paced_256",
        "paced",
        "streams",
        "/v1/chat/completions",
        payloads.chat_request(True),
        256,
        "256 concurrent SSE streams, paced",
    ),
    # The response-cache scenarios (--cache): cacheable requests, forwarded by the gateway row and
    # answered from the cache by the cache row.
    Scenario(
        "det_latency_1",
        "json",
        "wrk",
        "/v1/chat/completions",
        payloads.chat_request(False, deterministic=True),
        1,
        "One client: deterministic chat (temperature 0), forwarded and from the cache",
        cache=True,
        cache_only=True,
    ),
    Scenario(
        "sse100_16",
        "sse100",
        "wrk",
        "/v1/chat/completions",
        payloads.chat_request(True, deterministic=True),
        16,
        f"16 concurrent SSE streams of {payloads.SSE_LONG_EVENTS} events (temperature 0, canned, unpaced): "
        "live and replayed from the cache",
        cache=True,
        cache_only=True,
    ),
    Scenario(
        "sse100_1",
        "sse100",
        "wrk",
        "/v1/chat/completions",
        payloads.chat_request(True, deterministic=True),
        1,
        f"One client: an SSE stream of {payloads.SSE_LONG_EVENTS} events (temperature 0), time to last byte",
        cache=True,
        cache_only=True,
    ),
)
BY_NAME = {s.name: s for s in SCENARIOS}
# Which upstream: nginx's JSON server, its 20-event SSE server, its 100-event SSE server, the paced one.
PHASES = ("json", "sse", "sse100", "paced")


def runs_on(row: str, scenario: Scenario) -> bool:
    """Whether ``row`` runs ``scenario``: the cache row runs the cacheable scenarios only; the
    cache-only scenarios run on the direct, gateway (forwarded) and cache rows only."""
    if row == CACHE_ROW:
        return scenario.cache
    if scenario.cache_only:
        return row in ("direct", "gateway")
    return True


# Rows measured together, scenario by scenario (``Bench.measure_rows``): the ones compared with each
# other for the targets. The direct row, Portkey and LiteLLM run on their own (an idle LiteLLM is not
# idle enough to share the proxy's CPU with a row being measured).
INTERLEAVED = ("gateway", "gateway-lean", "gateway-cache", "baseline", "floor", "runner-httpx", "runner-aiohttp")


def row_groups(rows: list[str], rep: int, transport_experiment: bool) -> list[list[str]]:
    """The groups of ``rows`` that repetition ``rep`` measures, in order (the direct row once, unless
    the transport experiment asks for it each time)."""
    together = [row for row in rows if row in INTERLEAVED]
    groups: list[list[str]] = []
    for row in rows:
        if row == "direct" and rep > 0 and not transport_experiment:
            continue
        if row not in INTERLEAVED:
            groups.append([row])
        elif row == together[0]:
            groups.append(together)
    return groups


# ---------------------------------------------------------------------------------------------
# Running


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack) -> None:
        self.args = args
        self.workdir = workdir
        self.stack = stack
        self.cpus = b.Cpus.plan(not args.no_pin)
        self.scenarios = [BY_NAME[n] for n in args.scenarios]
        self.scripts = {s.name: b.wrk_script(workdir, s.name, s.body) for s in self.scenarios if s.kind == "wrk"}
        self.headers: dict[str, str] = {}  # what the proxy being measured needs on each request (Portkey)
        self._scripts_with_headers: dict[tuple[str, tuple[tuple[str, str], ...]], Path] = {}
        self.upstreams: dict[str, tuple[b.Proc, int]] = {}

    def start_upstreams(self) -> None:
        phases = {s.phase for s in self.scenarios}
        if phases & {"json", "sse", "sse100"}:
            nginx = b.start_nginx_servers(self.workdir, self.cpus)
            self.stack.callback(nginx.proc.stop)
            self.upstreams["json"] = (nginx.proc, nginx.json_port)
            self.upstreams["sse"] = (nginx.proc, nginx.sse_port)
            self.upstreams["sse100"] = (nginx.proc, nginx.long_sse_port)
        if "paced" in phases:
            paced, port = b.start_paced(self.workdir, self.cpus, self.args.stream_events, self.args.stream_gap_ms)
            self.stack.callback(paced.stop)
            self.upstreams["paced"] = (paced, port)

    def measure_rows(self, rows: list[str], rep: int) -> list[dict[str, Any]]:
        """Repetition ``rep`` of ``rows``, interleaved: for each upstream (phase) every row's proxy is
        started, then each scenario runs on every row back to back, in an order that turns with each
        scenario. Rows compared with each other (the gateway, its lean twin, the floor) are so
        measured seconds apart, not minutes: on a machine whose speed drifts, their ratios compare
        like with like. A row that fails gets an ``error`` entry; the others go on."""
        results: dict[str, dict[str, Any]] = {
            row: {"row": row, "rep": rep, "starts": [], "scenarios": {}} for row in rows
        }
        failed: dict[str, str] = {}
        turn = rep
        for phase in PHASES:
            scenarios = [s for s in self.scenarios if s.phase == phase]
            wanted = [row for row in rows if row not in failed and any(runs_on(row, s) for s in scenarios)]
            if not wanted:
                continue
            upstream_proc, upstream_port = self.upstreams[phase]
            started: dict[str, b.Started | None] = {}
            try:
                for row in wanted:
                    try:
                        started[row] = self._start(row, phase, upstream_port, results[row])
                    except RuntimeError as exc:
                        failed[row] = str(exc)
                for scenario in scenarios:
                    order = [row for row in started if row not in failed and runs_on(row, scenario)]
                    turn += 1
                    first = turn % len(order) if order else 0
                    for row in order[first:] + order[:first]:
                        proxy = started[row]
                        port = upstream_port if proxy is None else proxy.port
                        self.headers = {} if proxy is None else proxy.headers
                        try:
                            self._run_phase(row, proxy, port, [scenario], upstream_proc, results[row])
                        except RuntimeError as exc:
                            failed[row] = str(exc)
                        finally:
                            self.headers = {}
                for row, proxy in started.items():
                    if proxy is not None and row not in failed:
                        pids = b.tree(proxy.proc.pid)
                        results[row]["starts"][-1]["hwm_kb"] = sum(b.status_kb(p, "VmHWM") or 0 for p in pids)
            finally:
                for proxy in started.values():
                    if proxy is not None:
                        proxy.proc.stop()
        for row, error in failed.items():
            b.log(f"{row} failed: {error}")
        return [
            {"row": row, "rep": rep, "error": failed[row][:2000]} if row in failed else results[row] for row in rows
        ]

    def _start(self, row: str, phase: str, upstream_port: int, result: dict[str, Any]) -> b.Started | None:
        """``row``'s proxy in front of ``phase``'s upstream, its start recorded (None: the direct row)."""
        if row == "direct":
            return None
        timeout = {"litellm": 180.0, "portkey": 60.0}.get(row, 30.0)
        started = b.start_proxy(row, self.workdir, f"http://{b.HOST}:{upstream_port}", self.cpus, phase, timeout)
        result["starts"].append(
            {
                "phase": phase,
                "startup_s": started.startup_s,
                "rest_rss_kb": started.rest_rss_kb,
                "extensions": started.extensions,
            }
        )
        b.log(
            f"{row} ({phase}): first 200 after {started.startup_s * 1000:.0f} ms, "
            f"RSS {started.rest_rss_kb / 1024:.1f} MB, {started.extensions}"
        )
        return started

    def _run_phase(
        self,
        row: str,
        started: b.Started | None,
        port: int,
        scenarios: list[Scenario],
        upstream: b.Proc,
        result: dict[str, Any],
    ) -> None:
        """Run ``scenarios`` against ``port`` (the proxy's, or the upstream's for the direct row)."""
        base = f"http://{b.HOST}:{port}"
        cached = row == CACHE_ROW
        sampler = b.Sampler(started.proc.pid) if started else None
        try:
            for scenario in scenarios:
                if started and not started.proc.alive():
                    raise RuntimeError(f"{row} died:\n{started.proc.tail()}")
                if cached:
                    _prime(scenario, port)
                self._warm_up(scenario, base)
                pids = sampler.pids() if sampler else []
                settle = b.wait_idle(pids) if pids else 0.0
                if sampler:
                    sampler.take_peak()
                rss_before = b.rss_kb(pids) if pids else 0
                upstream_pids = b.tree(upstream.pid)  # nginx: the master and its worker
                counts0 = b.cache_requests(port, scenario.path) if cached else {}
                cpu0, up0, t0 = b.cpu_seconds(pids), b.cpu_seconds(upstream_pids), time.perf_counter()
                data = self._drive(scenario, base)
                wall = time.perf_counter() - t0
                data["proxy_cpu_s"] = b.cpu_seconds(pids) - cpu0 if pids else None
                data["upstream_cpu_pct"] = 100 * (b.cpu_seconds(upstream_pids) - up0) / wall
                data["wall_s"] = wall
                data["settle_s"] = round(settle, 2)
                if cached:  # after the CPU reading: the scrape is not part of the run
                    data["cache_check"] = _cache_check(counts0, b.cache_requests(port, scenario.path), data)
                if scenario.phase == "sse100":
                    data["stream_check"] = _stream_check(scenario, port, cached)
                if sampler:
                    data["rss_before_kb"] = rss_before
                    data["rss_peak_kb"] = sampler.take_peak()
                result["scenarios"][scenario.name] = data
                b.log(f"{row:>15} {scenario.name:<13} {_brief(scenario, data)}")
                for problem in _problems(row, scenario.name, data):
                    b.log(f"FAILED: {problem}")
        finally:
            if sampler:
                sampler.stop()

    def _script(self, scenario: Scenario) -> Path:
        """The scenario's wrk script, with the headers the proxy being measured needs."""
        if not self.headers:
            return self.scripts[scenario.name]
        key = (scenario.name, tuple(sorted(self.headers.items())))
        if key not in self._scripts_with_headers:
            name = f"{scenario.name}-h{len(self._scripts_with_headers)}"
            self._scripts_with_headers[key] = b.wrk_script(self.workdir, name, scenario.body, self.headers)
        return self._scripts_with_headers[key]

    def _warm_up(self, scenario: Scenario, base: str) -> None:
        if self.args.warmup <= 0:
            return
        if scenario.kind == "wrk":
            b.run_wrk(base + scenario.path, self._script(scenario), scenario.connections, self.args.warmup, self.cpus)
        else:
            b.run_streams(base + scenario.path, scenario.body, 4, 0.05, 0.0, self.cpus, self.headers)

    def _drive(self, scenario: Scenario, base: str) -> dict[str, Any]:
        if scenario.kind == "wrk":
            return b.run_wrk(
                base + scenario.path, self._script(scenario), scenario.connections, self.args.duration, self.cpus
            )
        stream_s = self.args.stream_events * self.args.stream_gap_ms / 1000
        return b.run_streams(
            base + scenario.path,
            scenario.body,
            scenario.connections,
            self.args.stream_seconds,
            stream_s,
            self.cpus,
            self.headers,
        )


def _prime(scenario: Scenario, port: int) -> None:
    """Store ``scenario``'s answer in the cache row's cache, and prove it: the second of two identical
    requests must be a hit, or the row fails here (whatever the warm-up's length)."""
    for attempt in (1, 2):
        status, headers, _ = b.http_post(port, scenario.path, scenario.body)
        cache_status = headers.get("cache-status", "")
        if status != 200:
            raise RuntimeError(f"{scenario.name}: priming request {attempt} answered {status} ({cache_status!r})")
    if "; hit" not in cache_status:
        raise RuntimeError(
            f"{scenario.name}: the second identical request was not answered from the cache "
            f"(Cache-Status {cache_status!r}): is the response cache on, and the request cacheable?"
        )


def _cache_check(before: dict[str, float], after: dict[str, float], data: dict[str, Any]) -> dict[str, Any]:
    """The gateway's own count of what its cache did during a measured run, against wrk's requests.

    wrk counts the requests it completed; the gateway also counts those still in flight when wrk
    stopped (at most one per connection), so ``hits`` may exceed ``requests`` by that much.
    """
    results = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in sorted(set(before) | set(after))}
    results = {k: v for k, v in results.items() if v}
    hits, total, requests = results.get("hit", 0.0), sum(results.values()), int(data["requests"])
    share = hits / total if total else 0.0
    ok = requests > 0 and share >= MIN_HIT_SHARE and hits >= MIN_HIT_SHARE * requests
    return {
        "hits": hits,
        "cache_requests": total,
        "requests": requests,
        "hit_share": share,
        "results": results,
        "ok": ok,
    }


def _stream_check(scenario: Scenario, port: int, cached: bool) -> dict[str, Any]:
    """One more stream after the run, read whole: its events, whether it ends with ``data: [DONE]``
    and (cache row) whether it was a hit, i.e. a replay."""
    status, headers, body = b.http_post(port, scenario.path, scenario.body)
    events = [line for line in body.split(b"\n") if line.startswith(b"data: ")]
    done = body.rstrip(b"\n").endswith(b"data: [DONE]")
    count = len(events) - (1 if done else 0)
    cache_status = headers.get("cache-status", "")
    ok = status == 200 and done and count == payloads.SSE_LONG_EVENTS and (not cached or "; hit" in cache_status)
    return {
        "status": status,
        "events": count,
        "bytes": len(body),
        "ends_with_done": done,
        "cache_status": cache_status,
        "ok": ok,
    }


def _problems(row: str, name: str, data: dict[str, Any]) -> list[str]:
    """What makes a run of the cache scenarios invalid: not (almost) all hits, a broken stream."""
    out = []
    check = data.get("cache_check")
    if check is not None and not check["ok"]:
        out.append(
            f"{LABELS[row]}, {name}: {check['hits']:.0f} hits of {check['cache_requests']:.0f} cache decisions "
            f"({check['results']}) for {check['requests']} requests: not (almost) all hits"
        )
    stream = data.get("stream_check")
    if stream is not None and not stream["ok"]:
        out.append(
            f"{LABELS[row]}, {name}: the stream after the run: status {stream['status']}, {stream['events']} events, "
            f"ends with [DONE]: {stream['ends_with_done']}, Cache-Status {stream['cache_status']!r}"
        )
    return out


def _brief(scenario: Scenario, data: dict[str, Any]) -> str:
    if scenario.kind == "wrk":
        check = data.get("cache_check")
        hits = f"  hits {check['hits']:.0f}/{check['cache_requests']:.0f}" if check else ""
        return (
            f"{data['rps']:9.1f} req/s  p50 {data['p50_us'] / 1000:8.3f} ms  p99 {data['p99_us'] / 1000:8.3f} ms"
            f"  errors {data['errors']}{hits}"
        )
    return (
        f"{data['completed']:5d} streams  TTFB p50 {_f(data['ttfb_ms']['p50'])} ms p99 {_f(data['ttfb_ms']['p99'])} ms"
        f"  stream p50 {_f(data['total_ms']['p50'])} ms  stalls {data['stalls']}"
        f"  errors {data['errors'] + data['bad_status'] + data['bad_body']} unfinished {data['unfinished']}"
    )


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def litellm_available(args: argparse.Namespace) -> str | None:
    """The installed LiteLLM version, or None (with the reason logged) when the row is skipped."""
    if args.no_litellm:
        b.log("LiteLLM row skipped (--no-litellm)")
        return None
    python = b.ensure_venv(b.LITELLM_VENV, [args.litellm_spec], "the LiteLLM proxy")
    if python is None:
        b.log("LiteLLM row skipped: it could not be installed from the package registry")
        return None
    done = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0 or not (b.LITELLM_VENV / "bin" / "litellm").exists():
        b.log("LiteLLM row skipped: installed but not runnable")
        return None
    return done.stdout.strip()


def portkey_available(args: argparse.Namespace) -> dict[str, str] | None:
    """The installed Portkey's versions (and node's), or None (with the reason logged) when skipped."""
    if args.no_portkey:
        b.log("Portkey row skipped (--no-portkey)")
        return None
    if b.ensure_portkey(args.portkey_version) is None:
        b.log("Portkey row skipped: it could not be installed from the npm registry")
        return None
    return b.portkey_versions()


def ensure_aiohttp_transport() -> bool:
    python = b.PROJECT_BIN / "python"
    probe = [str(python), "-c", "import httpx_aiohttp"]
    if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        return True
    b.log("installing httpx-aiohttp into the project venv for the transport experiment (not a dependency)")
    install = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", "httpx-aiohttp"]
    subprocess.run(install, capture_output=True, check=False)
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def version(argv: list[str]) -> str:
        with contextlib.suppress(OSError):
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            return (done.stdout + done.stderr).strip().splitlines()[0]
        return "?"

    git = subprocess.run(["git", "-C", str(b.ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(b.ROOT), "status", "--porcelain", "gateway"], capture_output=True, text=True
    )
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": version([b._which("nginx") or "nginx", "-v"]),
        "wrk": version([b._which("wrk") or "wrk", "--version"]),
        "gateway_commit": git.stdout.strip() + ("+dirty" if dirty.stdout.strip() else ""),
        "loadavg_start": os.getloadavg(),
        "cpu_pressure_start": b.cpu_pressure(),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    b.ensure_system_tools()
    meta = machine()
    rows = ["direct"]
    if args.transport_experiment:
        if not ensure_aiohttp_transport():
            raise SystemExit("bench: httpx-aiohttp could not be installed; no transport experiment")
        rows += ["runner-httpx", "runner-aiohttp"]
    else:
        rows.append("gateway")
        if not args.no_lean:
            rows.append(LEAN_ROW)
        if args.cache:
            rows.append(CACHE_ROW)
        if args.baseline:
            rows.append("baseline")
            meta["baseline"] = b.extract_baseline(args.baseline)
        if not args.no_floor:
            rows.append("floor")
        portkey = portkey_available(args)
        if portkey:
            rows.append("portkey")
            meta["portkey"] = portkey
        version = litellm_available(args)
        if version:
            rows.append("litellm")
            meta["litellm"] = version
    meta.update(
        {
            "pinning": b.Cpus.plan(not args.no_pin).describe(),
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "stream_events": args.stream_events,
            "stream_gap_ms": args.stream_gap_ms,
            "stream_seconds": args.stream_seconds,
            "repeat": args.repeat,
            "scenarios": args.scenarios,
            "cache": args.cache,
            "kind": "transport-experiment" if args.transport_experiment else "benchmark",
        }
    )
    b.log(f"{meta['nproc']} CPUs ({meta['cpu_model']}), {meta['pinning']}; rows: {', '.join(rows)}")
    results: dict[str, Any] = {"meta": meta, "runs": []}
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        bench = Bench(args, workdir, stack)
        try:
            bench.start_upstreams()
            for rep in range(args.repeat):
                for group in row_groups(rows, rep, args.transport_experiment):
                    results["runs"].extend(bench.measure_rows(group, rep))
        finally:
            if args.keep_logs:
                keep = b.RESULTS / "logs"
                keep.mkdir(parents=True, exist_ok=True)
                for log_file in workdir.glob("*.log"):
                    (keep / log_file.name).write_bytes(log_file.read_bytes())
    meta["loadavg_end"] = os.getloadavg()
    meta["cpu_pressure_end"] = b.cpu_pressure()
    return results


# ---------------------------------------------------------------------------------------------
# Rendering


class View:
    """Medians over repetitions of one row's numbers."""

    def __init__(self, results: dict[str, Any]) -> None:
        self.meta = results["meta"]
        self.runs: dict[str, list[dict[str, Any]]] = {}
        for entry in results["runs"]:
            self.runs.setdefault(entry["row"], []).append(entry)
        self.rows = [r for r in LABELS if r in self.runs]

    def ok_runs(self, row: str) -> list[dict[str, Any]]:
        return [r for r in self.runs.get(row, []) if "error" not in r]

    def metric(self, row: str, scenario: str, get: Callable[[dict[str, Any]], float | None]) -> float | None:
        values = []
        for run_ in self.ok_runs(row):
            data = run_["scenarios"].get(scenario)
            if data is not None and (value := get(data)) is not None:
                values.append(value)
        return statistics.median(values) if values else None

    def paired(
        self, row: str, other: str, scenario: str, get: Callable[[dict[str, Any]], float | None]
    ) -> float | None:
        """The median over repetitions of ``row``'s value / ``other``'s in the same repetition. Within
        a repetition two interleaved rows (``INTERLEAVED``) ran the scenario seconds apart (a row run
        on its own, minutes apart), so a machine slower for a while weighs on both: more robust than
        the ratio of the medians when the machine's speed drifts."""
        theirs = {}
        for run_ in self.ok_runs(other):
            data = run_["scenarios"].get(scenario)
            if data is not None and (value := get(data)):
                theirs[run_["rep"]] = value
        ratios = []
        for run_ in self.ok_runs(row):
            data = run_["scenarios"].get(scenario)
            if data is not None and (value := get(data)) is not None and run_["rep"] in theirs:
                ratios.append(value / theirs[run_["rep"]])
        return statistics.median(ratios) if ratios else None

    def starts(self, row: str, key: str) -> list[float]:
        return [s[key] for r in self.ok_runs(row) for s in r["starts"] if s.get(key) is not None]

    def has(self, scenario: str) -> bool:
        return any(scenario in r["scenarios"] for row in self.rows for r in self.ok_runs(row))


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or reference is None or reference == 0:
        return "-"
    ratio = value / reference
    return f"{ratio:.3g}x" if ratio < 100 else f"{ratio:.0f}x"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _ms(us: float | None) -> float | None:
    return None if us is None else us / 1000


def _cpu_per(data: dict[str, Any], count_key: str, scale: float) -> float | None:
    cpu, count = data.get("proxy_cpu_s"), data.get(count_key)
    if cpu is None or not count:
        return None
    return float(cpu) / float(count) * scale


def render(results: dict[str, Any]) -> str:
    v = View(results)
    m = v.meta
    out = [
        f"## Benchmark run {m['date']}",
        "",
        f"{m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, Python {m['python']}; {m['nginx']}; "
        f"{m['wrk']}; gateway {m['gateway_commit']}"
        + (f"; baseline row: {m['baseline']}" if m.get("baseline") else "")
        + (f"; LiteLLM {m['litellm']}" if m.get("litellm") else "; LiteLLM: not measured")
        + (f"; Portkey {_portkey_versions(m['portkey'])}" if m.get("portkey") else "; Portkey: not measured")
        + f". Machine split: {m['pinning']}. Load average {m['loadavg_start'][0]:.2f} at the start, "
        f"{m.get('loadavg_end', [0])[0]:.2f} at the end; CPU pressure (PSI) at the end: "
        f"`{m.get('cpu_pressure_end', 'n/a')}`. wrk runs {m['duration_s']:g} s after a "
        f"{m['warmup_s']:g} s warm-up; paced streams: {m['stream_events']} events {m['stream_gap_ms']:g} ms apart, "
        f"{m['stream_seconds']:g} s of stream starts; medians of {m['repeat']} repetition(s).",
        "",
    ]
    failed = [r for rows in v.runs.values() for r in rows if "error" in r]
    for r in failed:
        out += [f"**{LABELS[r['row']]} failed:** `{r['error'].splitlines()[0][:300]}`", ""]
    for problem in problems(results):
        out += [f"**FAILED:** {problem}", ""]
    ref_lite = "litellm" if v.ok_runs("litellm") else None

    def lite(scenario: str, get: Callable[[dict[str, Any]], float | None]) -> float | None:
        return v.metric(ref_lite, scenario, get) if ref_lite else None

    if m.get("kind") != "transport-experiment":
        out += _targets(v, lite)
    if v.ok_runs(LEAN_ROW):
        out += _defaults_cost(v)
    if v.ok_runs(CACHE_ROW):
        out += _cache_sections(v)
    # Start-up and memory
    rows = []
    for row in v.rows:
        if row == "direct":
            continue
        startups = v.starts(row, "startup_s")
        rest = v.starts(row, "rest_rss_kb")
        hwm = v.starts(row, "hwm_kb")
        per_stream = _per_stream_kb(v, row)
        ext: dict[str, bool] = next((s["extensions"] for r in v.ok_runs(row) for s in r["starts"]), {})
        rows.append(
            [
                LABELS[row],
                f"{statistics.median(startups) * 1000:.0f} ms (max {max(startups) * 1000:.0f}, n={len(startups)})"
                if startups
                else "-",
                f"{rest[0] / 1024:.1f} MB" if rest else "-",
                f"{max(hwm) / 1024:.1f} MB" if hwm else "-",
                _f(per_stream, 1) + " KB" if per_stream is not None else "-",
                f"uvloop {'yes' if ext.get('uvloop') else 'no'}, httptools {'yes' if ext.get('httptools') else 'no'}"
                if row != "portkey"
                else "- (Node)",
            ]
        )
    if rows:
        out += [
            "### Start-up and memory",
            "",
            _table(
                [
                    "row",
                    "start-up to first 200",
                    "RSS at rest",
                    "peak RSS (VmHWM)",
                    "RSS per open stream (256 paced)",
                    "uvicorn auto picked",
                ],
                rows,
            ),
            "",
        ]
    # One client
    for name in ("latency_1", "det_latency_1", "sse100_1"):
        if v.has(name):
            out += _one_client(v, name, lite)
    # Throughput scenarios
    for name in ("chat_64", "embed_64", "sse_16", "sse_256", "sse100_16"):
        if not v.has(name):
            continue
        unit = "streams/s" if name.startswith("sse") else "req/s"
        direct = v.metric("direct", name, lambda d: d["rps"])
        lite_rps = lite(name, lambda d: d["rps"])
        floor_rps = v.metric("floor", name, lambda d: d["rps"])
        portkey_rps = v.metric("portkey", name, lambda d: d["rps"])
        rows = []
        for row in v.rows:
            if not runs_on(row, BY_NAME[name]):
                continue
            rps = v.metric(row, name, lambda d: d["rps"])
            none_done = f"> {m['duration_s']:g} s (none done)"
            rows.append(
                [
                    LABELS[row],
                    _f(rps, 1),
                    _f(v.metric(row, name, _completed(_percentile_ms("p50"))), 2) if rps else none_done,
                    _f(v.metric(row, name, _completed(_percentile_ms("p99"))), 2) if rps else none_done,
                    _f(v.metric(row, name, lambda d: d["errors"]), 0),
                    _f(v.metric(row, name, lambda d: _cpu_per(d, "requests", 1000)), 3),
                    _f(v.metric(row, name, lambda d: d["upstream_cpu_pct"]), 0) + " %",
                    _ratio(rps, direct) if row != "direct" else "1x",
                    _ratio(rps, floor_rps) if row != "floor" else "1x",
                    _ratio(rps, portkey_rps) if row != "portkey" else "1x",
                    _ratio(rps, lite_rps) if row != "litellm" else "1x",
                ]
            )
        out += [
            f"### {BY_NAME[name].title}",
            "",
            _table(
                [
                    "row",
                    unit,
                    "p50 ms",
                    "p99 ms",
                    "errors",
                    "proxy CPU ms/req",
                    "upstream CPU",
                    f"{unit} x direct",
                    f"{unit} x floor",
                    f"{unit} x Portkey",
                    f"{unit} x LiteLLM",
                ],
                rows,
            ),
            "",
            *(_portkey_stream_note(v) if name.startswith("sse") else []),
        ]
    # Paced streams
    for name in ("paced_16", "paced_256"):
        if not v.has(name):
            continue
        d_ttfb = v.metric("direct", name, lambda d: d["ttfb_ms"]["p50"])
        d_total = v.metric("direct", name, lambda d: d["total_ms"]["p50"])
        lite_cpu = lite(name, lambda d: _cpu_per(d, "events", 1e6))
        rows = []
        for row in v.rows:
            if not runs_on(row, BY_NAME[name]):
                continue
            ttfb = v.metric(row, name, lambda d: d["ttfb_ms"]["p50"])
            total = v.metric(row, name, lambda d: d["total_ms"]["p50"])
            events = v.metric(row, name, lambda d: d["events_per_stream"])
            cpu_chunk = v.metric(row, name, lambda d: _cpu_per(d, "events", 1e6))
            added_chunk = (
                (total - d_total) / events * 1000 if total is not None and d_total is not None and events else None
            )
            bad = v.metric(row, name, lambda d: d["errors"] + d["bad_status"] + d["bad_body"] + d["unfinished"])
            rows.append(
                [
                    LABELS[row],
                    _f(v.metric(row, name, lambda d: d["completed"]), 0),
                    _f(v.metric(row, name, lambda d: d["streams_per_s"]), 1),
                    _f(ttfb, 2),
                    _f(v.metric(row, name, lambda d: d["ttfb_ms"]["p99"]), 2),
                    _f(None if ttfb is None or d_ttfb is None else ttfb - d_ttfb, 2) if row != "direct" else "-",
                    _f(total, 1),
                    _f(added_chunk, 1) if row != "direct" else "-",
                    _f(v.metric(row, name, lambda d: d["max_gap_ms"]["max"]), 1),
                    _f(v.metric(row, name, lambda d: d["stalls"]), 0),
                    _f(bad, 0),
                    _f(cpu_chunk, 1),
                    _ratio(cpu_chunk, lite_cpu) if row not in ("direct", "litellm") else "-",
                ]
            )
        out += [
            f"### {BY_NAME[name].title}",
            "",
            _table(
                [
                    "row",
                    "streams done",
                    "streams/s",
                    "TTFB p50 ms",
                    "TTFB p99 ms",
                    "added TTFB p50 ms",
                    "stream p50 ms",
                    "added us/chunk",
                    "worst gap ms",
                    "stalls",
                    "errors+unfinished",
                    "proxy CPU us/chunk",
                    "CPU/chunk x LiteLLM",
                ],
                rows,
            ),
            "",
            *_portkey_stream_note(v),
        ]
    return "\n".join(_with_split(out, m["pinning"]))


def _portkey_versions(versions: dict[str, str]) -> str:
    main = versions.get("@portkey-ai/gateway", "?")
    pinned = ", ".join(f"{k} {v}" for k, v in versions.items() if k not in ("@portkey-ai/gateway", "node"))
    return f"{main} ({pinned}; Node {versions.get('node', '?')}; one process, --headless)"


def _portkey_stream_note(v: View) -> list[str]:
    if not v.ok_runs("portkey"):
        return []
    return [
        "Portkey waits 25 ms before it relays the first event of each stream, by design (its stream "
        "transform sleeps 25 ms before the first chunk), so its time to first byte and stream times include "
        "25 ms, and on one connection it completes at most 40 streams a second (16 connections: 640).",
        "",
    ]


def _with_split(lines: list[str], pinning: str) -> list[str]:
    """Every table's heading followed by how the machine was split for it (pinned or not)."""
    out: list[str] = []
    for line in lines:
        out.append(line)
        if line.startswith("### "):
            out += ["", f"*Machine split: {pinning}.*"]
    return out


def _one_client(
    v: View, name: str, lite: Callable[[str, Callable[[dict[str, Any]], float | None]], float | None]
) -> list[str]:
    """One connection: p50 / p99 (for a stream: to its last byte) and what the row adds to direct."""
    d50 = v.metric("direct", name, _percentile_ms("p50"))
    d99 = v.metric("direct", name, _percentile_ms("p99"))
    l50 = lite(name, _percentile_ms("p50"))
    rows = []
    for row in v.rows:
        if not runs_on(row, BY_NAME[name]):
            continue
        p50 = v.metric(row, name, _percentile_ms("p50"))
        p99 = v.metric(row, name, _percentile_ms("p99"))
        rps = v.metric(row, name, lambda d: d["rps"])
        added50 = None if p50 is None or d50 is None else p50 - d50
        added99 = None if p99 is None or d99 is None else p99 - d99
        lite_added = None if l50 is None or d50 is None else l50 - d50
        rows.append(
            [
                LABELS[row],
                _f(p50, 3),
                _f(p99, 3),
                _f(added50, 3) if row != "direct" else "-",
                _f(added99, 3) if row != "direct" else "-",
                _f(rps, 0),
                _ratio(added50, lite_added) if row not in ("direct", "litellm") else "-",
            ]
        )
    return [
        f"### {BY_NAME[name].title}",
        "",
        _table(["row", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms", "req/s", "added p50 x LiteLLM's"], rows),
        "",
    ]


def cache_comparison(v: View) -> dict[str, float | None]:
    """The response cache against forwarding, in the same run (medians over repetitions): for each
    measure the forwarded (gateway row, cache off) and cached (cache row, all hits) figures."""

    def pair(name: str, get: Callable[[dict[str, Any]], float | None]) -> tuple[float | None, float | None]:
        return v.metric("gateway", name, get), v.metric(CACHE_ROW, name, get)

    def added(name: str) -> tuple[float | None, float | None]:
        direct = v.metric("direct", name, _percentile_ms("p50"))
        fwd, hit = pair(name, _percentile_ms("p50"))
        if direct is None:
            return None, None
        return (None if fwd is None else fwd - direct), (None if hit is None else hit - direct)

    measures = {
        "embed_64_rps": pair("embed_64", lambda d: d["rps"]),
        "embed_64_cpu_ms_per_req": pair("embed_64", lambda d: _cpu_per(d, "requests", 1000)),
        "det_latency_1_p50_ms": pair("det_latency_1", _percentile_ms("p50")),
        "det_latency_1_p99_ms": pair("det_latency_1", _percentile_ms("p99")),
        "det_latency_1_added_p50_ms": added("det_latency_1"),
        "sse100_16_streams_per_s": pair("sse100_16", lambda d: d["rps"]),
        "sse100_16_cpu_ms_per_stream": pair("sse100_16", lambda d: _cpu_per(d, "requests", 1000)),
        "sse100_1_ttlb_p50_ms": pair("sse100_1", _percentile_ms("p50")),
        "sse100_1_ttlb_p99_ms": pair("sse100_1", _percentile_ms("p99")),
        "sse100_1_added_ttlb_p50_ms": added("sse100_1"),
    }
    out: dict[str, float | None] = {}
    for key, (fwd, hit) in measures.items():
        out[f"{key}_forwarded"], out[f"{key}_cached"] = fwd, hit
        out[f"{key}_ratio"] = None if fwd is None or hit is None or fwd == 0 else hit / fwd
    return out


def _hit_checks(v: View) -> dict[str, tuple[float, int, bool]]:
    """Per cached scenario, over the repetitions: the cache's hits, wrk's requests, all checks ok."""
    out: dict[str, tuple[float, int, bool]] = {}
    for r in v.ok_runs(CACHE_ROW):
        for name, data in r["scenarios"].items():
            if "cache_check" in data:
                check = data["cache_check"]
                hits, requests, ok = out.get(name, (0.0, 0, True))
                out[name] = (hits + check["hits"], requests + check["requests"], ok and check["ok"])
    return out


def problems(results: dict[str, Any]) -> list[str]:
    """Every invalid cache-scenario run of these results (see ``_problems``)."""
    v = View(results)
    return [
        problem
        for row in v.rows
        for r in v.ok_runs(row)
        for name, data in r["scenarios"].items()
        for problem in _problems(row, name, data)
    ]


def _cache_sections(v: View) -> list[str]:
    """The response cache's targets, then its figures forwarded vs from the cache."""
    c = cache_comparison(v)
    checks: list[tuple[str, str, str, bool | None]] = []
    fwd, hit, ratio = (c[f"embed_64_rps_{k}"] for k in ("forwarded", "cached", "ratio"))
    checks.append(
        (
            "embeddings, 64 clients: req/s of hits vs forwarded (same run)",
            "-" if ratio is None else f"{ratio:.2f}x ({_f(hit, 0)} / {_f(fwd, 0)})",
            ">= 2x",
            None if ratio is None else ratio >= 2,
        )
    )
    fwd, hit = c["det_latency_1_added_p50_ms_forwarded"], c["det_latency_1_added_p50_ms_cached"]
    checks.append(
        (
            "one client, chat at temperature 0: added p50 of a hit vs forwarded",
            f"{_f(hit, 3)} / {_f(fwd, 3)} ms",
            "<= the forwarded's",
            None if fwd is None or hit is None else hit <= fwd,
        )
    )
    hit_checks = _hit_checks(v)
    if hit_checks:
        checks.append(
            (
                "cached runs answered from the cache (`gateway_cache_requests_total` hit / wrk's requests)",
                ", ".join(f"{n} {hits:,.0f} / {requests:,}" for n, (hits, requests, _) in hit_checks.items()),
                f"all (>= {MIN_HIT_SHARE:.0%} of the cache's decisions and of the requests)",
                all(ok for _, _, ok in hit_checks.values()),
            )
        )
    streams = [
        d["stream_check"]
        for r in v.ok_runs(CACHE_ROW)
        for n, d in r["scenarios"].items()
        if n.startswith("sse100") and "stream_check" in d
    ]
    if streams:
        checks.append(
            (
                "a replayed stream ends with `data: [DONE]` (one read whole after each run)",
                f"{sum(s['ok'] for s in streams)} of {len(streams)} replays: "
                + ", ".join(
                    sorted({f"{s['events']} events, [DONE] {'yes' if s['ends_with_done'] else 'no'}" for s in streams})
                ),
                f"{payloads.SSE_LONG_EVENTS} events then [DONE], a hit",
                all(s["ok"] for s in streams),
            )
        )
    out = [
        "### The response cache against the targets",
        "",
        _table(
            ["target", "measured", "goal", "met"],
            [[n, m, g, "-" if ok is None else ("yes" if ok else "**no**")] for n, m, g, ok in checks],
        ),
        "",
    ]
    lines = [
        ("embeddings, 64 clients: req/s", "embed_64_rps", 0),
        ("embeddings, 64 clients: proxy CPU ms/req", "embed_64_cpu_ms_per_req", 3),
        ("one client, chat at temperature 0: p50 ms", "det_latency_1_p50_ms", 3),
        ("one client, chat at temperature 0: p99 ms", "det_latency_1_p99_ms", 3),
        ("one client, chat at temperature 0: added p50 ms (vs direct)", "det_latency_1_added_p50_ms", 3),
        (f"{payloads.SSE_LONG_EVENTS}-event stream, 16 clients: streams/s", "sse100_16_streams_per_s", 0),
        (f"{payloads.SSE_LONG_EVENTS}-event stream, 16 clients: proxy CPU ms/stream", "sse100_16_cpu_ms_per_stream", 3),
        (f"{payloads.SSE_LONG_EVENTS}-event stream, one client: time to last byte p50 ms", "sse100_1_ttlb_p50_ms", 3),
        (f"{payloads.SSE_LONG_EVENTS}-event stream, one client: time to last byte p99 ms", "sse100_1_ttlb_p99_ms", 3),
        (f"{payloads.SSE_LONG_EVENTS}-event stream, one client: added TTLB p50 ms", "sse100_1_added_ttlb_p50_ms", 3),
    ]
    rows = [
        [
            label,
            _f(c[f"{key}_forwarded"], digits),
            _f(c[f"{key}_cached"], digits),
            _ratio(c[f"{key}_cached"], c[f"{key}_forwarded"]),
        ]
        for label, key, digits in lines
        if c[f"{key}_forwarded"] is not None or c[f"{key}_cached"] is not None
    ]
    out += [
        "### The response cache: forwarded (cache off) vs answered from the cache, same run",
        "",
        _table(["measure", "forwarded / live", "from the cache", "cache / forwarded"], rows),
        "",
    ]
    return out


def summary(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Flat per-row numbers (medians over repetitions) for the plot and for quick comparisons."""
    v = View(results)
    out: dict[str, dict[str, float | None]] = {}
    d50 = v.metric("direct", "latency_1", _percentile_ms("p50"))
    d99 = v.metric("direct", "latency_1", _percentile_ms("p99"))
    for row in v.rows:
        numbers: dict[str, float | None] = {}
        for name in ("chat_64", "embed_64", "sse_16", "sse_256", "sse100_16"):
            numbers[f"{name}_rps"] = v.metric(row, name, lambda d: d["rps"])
            numbers[f"{name}_cpu_ms_per_req"] = v.metric(row, name, lambda d: _cpu_per(d, "requests", 1000))
        p50 = v.metric(row, "latency_1", _percentile_ms("p50"))
        p99 = v.metric(row, "latency_1", _percentile_ms("p99"))
        numbers["latency_1_p50_ms"], numbers["latency_1_p99_ms"] = p50, p99
        numbers["added_p50_ms"] = None if p50 is None or d50 is None else p50 - d50
        numbers["added_p99_ms"] = None if p99 is None or d99 is None else p99 - d99
        for name in ("det_latency_1", "sse100_1"):  # the response-cache scenarios (--cache)
            for q in ("p50", "p99"):
                numbers[f"{name}_{q}_ms"] = v.metric(row, name, _percentile_ms(q))
        for name in ("paced_16", "paced_256"):
            numbers[f"{name}_ttfb_p50_ms"] = v.metric(row, name, lambda d: d["ttfb_ms"]["p50"])
            numbers[f"{name}_ttfb_p99_ms"] = v.metric(row, name, lambda d: d["ttfb_ms"]["p99"])
            numbers[f"{name}_streams_per_s"] = v.metric(row, name, lambda d: d["streams_per_s"])
            numbers[f"{name}_cpu_us_per_chunk"] = v.metric(row, name, lambda d: _cpu_per(d, "events", 1e6))
        startups = v.starts(row, "startup_s")
        rest = v.starts(row, "rest_rss_kb")
        hwm = v.starts(row, "hwm_kb")
        numbers["startup_ms"] = statistics.median(startups) * 1000 if startups else None
        numbers["rest_rss_mb"] = rest[0] / 1024 if rest else None
        numbers["peak_rss_mb"] = max(hwm) / 1024 if hwm else None
        numbers["rss_per_stream_kb"] = _per_stream_kb(v, row)
        out[row] = numbers
    return out


def _percentile_ms(q: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda d: _ms(d[f"{q}_us"])


def _completed(get: Callable[[dict[str, Any]], float | None]) -> Callable[[dict[str, Any]], float | None]:
    """wrk reports latency 0 when no request completed: that is no measurement."""
    return lambda d: get(d) if d.get("requests") else None


def _at_most(goal: float) -> Callable[[float], bool]:
    return lambda x: x <= goal


def _at_least(goal: float) -> Callable[[float], bool]:
    return lambda x: x >= goal


def _per_stream_kb(v: View, row: str) -> float | None:
    def get(d: dict[str, Any]) -> float | None:
        if "rss_peak_kb" not in d:
            return None
        return float(d["rss_peak_kb"] - d["rss_before_kb"]) / BY_NAME["paced_256"].connections

    return v.metric(row, "paced_256", get)


def _targets(v: View, lite: Callable[[str, Callable[[dict[str, Any]], float | None]], float | None]) -> list[str]:
    """Issue #19's targets for one gateway worker in its default configuration (the ``gateway`` row),
    checked against this run, then the earlier issues' (kept: no regression)."""
    row = "gateway"
    if not v.ok_runs(row):
        return []
    checks: list[tuple[str, str, str, bool | None, str]] = []

    def check(
        name: str, value: float | None, goal: str, ok: Callable[[float], bool], fmt: str, per_cpu: str = ""
    ) -> None:
        shown = "-" if value is None else fmt.format(value)
        checks.append((name, shown, goal, None if value is None else ok(value), per_cpu))

    def rps(r: str, name: str) -> float | None:
        return v.metric(r, name, lambda d: d["rps"]) if r != "litellm" else lite(name, lambda d: d["rps"])

    def cpu(r: str, name: str) -> float | None:
        get: Callable[[dict[str, Any]], float | None] = lambda d: _cpu_per(d, "requests", 1000)  # noqa: E731
        return v.metric(r, name, get) if r != "litellm" else lite(name, get)

    def times(name: str, other: str) -> float | None:
        if other != "litellm":  # (LiteLLM's rows may come from another run: medians only)
            return v.paired(row, other, name, lambda d: d["rps"])
        mine, theirs = rps(row, name), rps(other, name)
        return None if mine is None or not theirs else mine / theirs

    def per_cpu(name: str, other: str) -> str:
        """The same ratio in requests per proxy CPU-second: what it would be with the CPU to itself."""
        mine, theirs = cpu(row, name), cpu(other, name)
        return "-" if not mine or theirs is None else f"{theirs / mine:.2f}x"

    for name, other, goal in (
        ("chat_64", "floor", 0.8),
        ("chat_64", "litellm", 40),
        ("chat_64", "portkey", 3),
        ("sse_16", "litellm", 40),
        ("sse_16", "portkey", 4),
    ):
        what = "chat req/s at 64 clients" if name == "chat_64" else "canned SSE streams/s at 16 clients"
        check(
            f"{what} vs {LABELS[other]}",
            times(name, other),
            f">= {goal:g}x",
            _at_least(goal),
            "{:.2f}x",
            per_cpu(name, other),
        )
    pinned = "not pinned" not in v.meta.get("pinning", "")
    for q, goal in (("p50", 0.3), ("p99", 1.5)):
        g = v.metric(row, "latency_1", _percentile_ms(q))
        dq = v.metric("direct", "latency_1", _percentile_ms(q))
        check(
            f"added latency, one client, {q}" + ("" if pinned else " (this run was not pinned)"),
            None if g is None or dq is None else g - dq,
            f"<= {goal} ms (pinned)",
            _at_most(goal),
            "{:.3f} ms",
        )
    full = v.metric(row, "chat_64", lambda d: d["rps"])
    on_off = v.paired(row, LEAN_ROW, "chat_64", lambda d: d["rps"])
    cpu_full, cpu_lean = cpu(row, "chat_64"), cpu(LEAN_ROW, "chat_64")
    check(
        "access log + ledger on vs both off: fewer chat req/s at 64 clients",
        None if on_off is None else 100 * (1 - on_off),
        "<= 10 %",
        lambda x: x <= 10,
        "{:.1f} %",
        "-" if not cpu_full or not cpu_lean else f"{100 * (1 - cpu_lean / cpu_full):.1f} %",
    )
    rest = v.starts(row, "rest_rss_kb")
    check("RSS at rest", rest[0] / 1024 if rest else None, "<= 60 MB", lambda x: x <= 60, "{:.1f} MB")
    check("RSS per open stream", _per_stream_kb(v, row), "<= 48 KB", lambda x: x <= 48, "{:.1f} KB")
    # The earlier issues' targets, kept so that a regression shows.
    direct_rps = v.metric("direct", "chat_64", lambda d: d["rps"])
    check(
        "chat req/s at 64 clients vs direct",
        None if full is None or not direct_rps else full / direct_rps,
        "reported",
        lambda x: True,
        "{:.3f}x",
    )
    for name in ("paced_16", "paced_256"):
        g = v.metric(row, name, lambda d: d["ttfb_ms"]["p50"])
        dq = v.metric("direct", name, lambda d: d["ttfb_ms"]["p50"])
        check(
            f"added TTFB p50, {BY_NAME[name].connections} paced streams",
            None if g is None or dq is None else g - dq,
            "<= 1 ms",
            lambda x: x <= 1.0,
            "{:.2f} ms",
        )
    bad = v.metric(
        row, "paced_256", lambda d: d["stalls"] + d["errors"] + d["bad_status"] + d["bad_body"] + d["unfinished"]
    )
    check("256 paced streams: stalls + errors + unfinished", bad, "0", lambda x: x == 0, "{:.0f}")
    g_total = v.metric(row, "paced_256", lambda d: d["total_ms"]["p50"])
    d_total = v.metric("direct", "paced_256", lambda d: d["total_ms"]["p50"])
    check(
        "256 paced streams: stream time p50 vs direct",
        None if g_total is None or not d_total else g_total / d_total,
        "keeps pace (<= 1.05x)",
        lambda x: x <= 1.05,
        "{:.2f}x",
    )
    cpu_chunk = v.metric(row, "paced_256", lambda d: _cpu_per(d, "events", 1e6))
    check("per-chunk relay cost (CPU, 256 streams)", cpu_chunk, "reported", lambda x: True, "{:.1f} us")
    startups = v.starts(row, "startup_s")
    check(
        "start-up to first 200 (median)",
        statistics.median(startups) if startups else None,
        "<= 1 s",
        lambda x: x <= 1.0,
        "{:.3f} s",
    )
    rows = [
        [name, value, goal, "-" if ok is None else ("yes" if ok else "**no**"), cpu_ratio]
        for name, value, goal, ok, cpu_ratio in checks
    ]
    return [
        f"### {LABELS[row]} against the targets (one worker; issue #19's first, then the earlier ones)",
        "",
        _table(["target", "measured", "goal", "met", "the same per proxy CPU-second"], rows),
        "",
        "The last column: the throughput ratios in requests per CPU-second of each proxy (the inverse ratio of "
        "their CPU per request), i.e. what the ratio would be if each had its CPU to itself; on a shared machine "
        "other jobs take part of the proxy's CPU, and req/s follow that share. (Portkey's streams are bounded by "
        "its 25 ms wait before the first event, not only by its CPU.)",
        "",
    ]


def _defaults_cost(v: View) -> list[str]:
    """The default configuration (access log and ledger on) against both off, scenario by scenario."""
    rows = []
    for name in ("chat_64", "embed_64", "sse_16", "sse_256"):
        full = v.metric("gateway", name, lambda d: d["rps"])
        lean = v.metric(LEAN_ROW, name, lambda d: d["rps"])
        if full is None and lean is None:
            continue
        cpu_full = v.metric("gateway", name, lambda d: _cpu_per(d, "requests", 1000))
        cpu_lean = v.metric(LEAN_ROW, name, lambda d: _cpu_per(d, "requests", 1000))
        rows.append(
            [
                BY_NAME[name].title,
                _f(full, 0),
                _f(lean, 0),
                _ratio(full, lean),
                _f(cpu_full, 3),
                _f(cpu_lean, 3),
                _ratio(cpu_full, cpu_lean),
            ]
        )
    p50 = [v.metric(r, "latency_1", _percentile_ms("p50")) for r in ("gateway", LEAN_ROW)]
    if p50[0] is not None or p50[1] is not None:
        rows.append(["One client: chat p50 ms", _f(p50[0], 3), _f(p50[1], 3), _ratio(p50[0], p50[1]), "", "", ""])
    if not rows:
        return []
    return [
        "### What the defaults cost: access log and ledger on vs both off, same run",
        "",
        _table(
            [
                "scenario",
                "defaults req/s",
                "log + ledger off req/s",
                "defaults / off",
                "defaults CPU ms/req",
                "off CPU ms/req",
                "CPU defaults / off",
            ],
            rows,
        ),
        "",
    ]


# ---------------------------------------------------------------------------------------------
# Main


def plot(json_path: Path, png_path: Path) -> bool:
    python = b.ensure_venv(b.TOOLS_VENV, list(b.TOOLS_SPEC), "matplotlib and py-spy")
    if python is None:
        b.log("no plot: matplotlib could not be installed")
        return False
    done = subprocess.run(
        [str(python), str(b.BENCH / "plot.py"), str(json_path), str(png_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        b.log(f"plot failed: {done.stderr[-800:]}")
        return False
    return True


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the finally blocks that stop every process


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark: direct vs the gateway vs Portkey and the LiteLLM proxy.")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of wrk warm-up before each run")
    parser.add_argument("--stream-events", type=int, default=40, help="events per paced stream (default 40)")
    parser.add_argument("--stream-gap-ms", type=float, default=25.0, help="gap between paced events (default 25)")
    parser.add_argument("--stream-seconds", type=float, default=4.0, help="seconds of paced stream starts")
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="repetitions of each row, medians reported (default 1; 3 for the experiment)",
    )
    parser.add_argument(
        "--scenarios",
        default=None,
        help="comma-separated subset of: "
        + ", ".join(s.name for s in SCENARIOS)
        + " (default: all; the response-cache ones only with --cache)",
    )
    parser.add_argument(
        "--cache",
        action="store_true",
        help="add the response-cache rows: the gateway with its cache on (every request a hit) against the "
        "gateway forwarding (cache off), on "
        + ", ".join(s.name for s in SCENARIOS if s.cache)
        + " (those that --scenarios selects)",
    )
    parser.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM row")
    parser.add_argument("--no-portkey", action="store_true", help="skip the Portkey row")
    parser.add_argument(
        "--portkey-version",
        default=b.PORTKEY_VERSION,
        help=f"npm version of @portkey-ai/gateway (default {b.PORTKEY_VERSION}; installed into bench/.portkey)",
    )
    parser.add_argument(
        "--no-lean",
        action="store_true",
        help="skip the row with the gateway's access log and ledger off (what the defaults cost)",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="add a row for the gateway's code at git revision REV (run with this venv), to measure a change "
        "before and after in the same run",
    )
    parser.add_argument(
        "--no-floor", action="store_true", help="skip the floor row (bench/relay_floor.py: no gateway code)"
    )
    parser.add_argument("--litellm-spec", default=b.LITELLM_SPEC, help=f"pip spec (default {b.LITELLM_SPEC})")
    parser.add_argument(
        "--transport-experiment",
        action="store_true",
        help="rows: the gateway with httpx's transport vs httpx-aiohttp's (bench/transport_runner.py)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin the proxy and the load to separate CPUs")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--keep-logs", action="store_true", help="copy the processes' logs to bench/results/logs")
    parser.add_argument("--render", metavar="JSON", help="only print the tables of a saved run")
    args = parser.parse_args(argv)
    if args.scenarios is None:
        if args.transport_experiment:
            args.scenarios = ["latency_1", "chat_64", "sse_16", "paced_256"]
        else:
            args.scenarios = [s.name for s in SCENARIOS if args.cache or not s.cache_only]
    else:
        args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenarios) - set(BY_NAME)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    cache_only = [n for n in args.scenarios if BY_NAME[n].cache_only]
    if cache_only and not args.cache:
        parser.error(f"{', '.join(cache_only)}: response-cache scenarios, run with --cache")
    if args.cache and args.transport_experiment:
        parser.error("--cache and --transport-experiment do not go together")
    if args.cache and not any(BY_NAME[n].cache for n in args.scenarios):
        parser.error(
            "--cache: no response-cache scenario selected (" + ", ".join(s.name for s in SCENARIOS if s.cache) + ")"
        )
    if args.repeat is None:
        args.repeat = 3 if args.transport_experiment else 1
    for name in ("duration", "stream_seconds"):
        if not 0 < getattr(args, name) <= 600:
            parser.error(f"--{name.replace('_', '-')} must be in (0, 600]")
    if not 1 <= args.repeat <= 20 or not 1 <= args.stream_events <= 10_000:
        parser.error("--repeat must be 1..20 and --stream-events 1..10000")
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
        b.log("interrupted: every process the benchmark started has been stopped; no results written")
        return 130
    results["meta"]["total_s"] = round(time.perf_counter() - started, 1)
    b.RESULTS.mkdir(parents=True, exist_ok=True)
    stem = ("transport-" if args.transport_experiment else "bench-") + time.strftime("%Y%m%d-%H%M%S")
    json_path = b.RESULTS / f"{stem}.json"
    results["summary"] = summary(results)
    results["labels"] = {row: LABELS[row] for row in results["summary"]}
    if args.cache:
        results["cache"] = cache_comparison(View(results))
    json_path.write_text(json.dumps(results, indent=1))
    text = render(results)
    (b.RESULTS / f"{stem}.md").write_text(text + "\n")
    print(text)
    b.log(f"results: {json_path.relative_to(b.ROOT)} and .md ({results['meta']['total_s']} s in all)")
    if not args.no_plot:
        png = json_path.with_suffix(".png")
        if plot(json_path, png):
            b.log(f"plot: {png.relative_to(b.ROOT)}")
    failures = problems(results) + [
        f"{LABELS[CACHE_ROW]} failed: {r['error'].splitlines()[0][:300]}"
        for r in results["runs"]
        if r["row"] == CACHE_ROW and "error" in r
    ]
    for problem in failures:
        b.log(f"FAILED: {problem}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
