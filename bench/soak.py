"""Soak: mixed traffic through one gateway process for N minutes; RSS, fds and tasks must stay flat.

    .venv/bin/python bench/soak.py --minutes 3 [--concurrency 32] [--sample-every 5] [--out PATH]

The simulated upstream (``gateway.demo``) runs in this process, on a uvicorn thread; the gateway
runs as a separate process (``.venv/bin/gateway serve``, one worker) with a config written to a
temporary directory (its usage ledger included, so the ledger is exercised). ``--concurrency``
asyncio workers (httpx) then send a fixed mix of requests: non-streamed chat, embeddings, full SSE
streams, streams aborted after their first chunk, requests the gateway refuses itself (unknown
model, wrong endpoint, bad JSON, unknown URL, unhealthy model) and requests the upstream answers
with an error (``n = 2`` and a transcription without a file, forwarded because the gateway's
``shape`` check is off for this run).

Every ``--sample-every`` seconds the gateway's RSS (``VmRSS``) and open fds are read from ``/proc``
and ``gateway_asyncio_tasks``, ``gateway_in_flight_requests``, ``gateway_open_streams`` and
``gateway_upstream_connections`` from ``/metrics``. Traffic pauses twice: at the end of the warm-up
(the first 20 % of the traffic time) and at the end; each pause closes the client, waits until
nothing is in flight, lets things settle and takes an idle sample. Comparing the two idle samples
is exact for fds and tasks (the load's own connections are gone), apart from idle upstream pool
connections, which are subtracted.

Verdict "flat" (exit 0) when, over the measured part (after the warm-up), RSS grows less than
``--rss-tolerance-mb`` (fitted slope x duration, and idle sample to idle sample), and fds (minus
upstream pool connections) and tasks at the final idle sample are at most ``--fd-tolerance`` /
``--task-tolerance`` above the post-warm-up idle sample; exit 1 otherwise, 130 on Ctrl-C.
Every loop is bounded in time and count; only 127.0.0.1; the gateway is stopped by its pid in a
``finally`` block (SIGTERM, bounded wait, SIGKILL).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as b

from gateway.demo import DemoState, create_demo_upstream
from gateway.server.thread import serve_in_thread

HOST = b.HOST
API_KEY = "sk-soak-test"
CHAT_MODEL = "Llama-3.1-8B-Instruct"
EMBED_MODEL = "bge-m3"
STT_MODEL = "whisper-large-v3"
UNHEALTHY_MODEL = "Qwen2.5-Coder-32B-Instruct"  # health "unhealthy" in the demo catalog
WARMUP_SHARE = 0.2
REQUEST_TIMEOUT_S = 30.0  # httpx's per-phase timeout
REQUEST_HARD_LIMIT_S = 60.0  # one request, whole
QUIESCE_MAX_S = 20.0  # waiting for nothing in flight after traffic stops
SETTLE_S = 3.0  # then this long before the idle sample
READY_TIMEOUT_S = 30.0
GATEWAY_STOP_S = 10.0
SHUTDOWN_GRACE_S = 5
MAX_REQUESTS_PER_MINUTE = 300_000  # the default request cap: far above what one worker serves
MAX_SAMPLES = 10_000

# The mix, in requests per 100.
MIX: tuple[tuple[str, int], ...] = (
    ("chat", 30),
    ("embeddings", 15),
    ("stream", 22),
    ("stream_abort", 10),
    ("refused", 15),
    ("upstream_error", 8),
)
# kind -> variant -> the status the gateway must answer
EXPECTED: dict[str, dict[str, int]] = {
    "chat": {"chat": 200},
    "embeddings": {"embeddings": 200},
    "stream": {"stream": 200},
    "stream_abort": {"stream_abort": 200},
    "refused": {
        "unknown_model": 404,
        "wrong_endpoint": 400,
        "bad_json": 400,
        "unknown_url": 404,
        "unhealthy_model": 503,
    },
    "upstream_error": {"n_2": 400, "transcription_without_file": 400},
}


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Samples


@dataclass
class Sample:
    t: float  # seconds since the traffic started (negative: before it)
    phase: str  # idle-start, warmup, load, idle-baseline, idle-final
    rss_kb: int | None
    fds: int | None
    tasks: int | None
    in_flight: int | None
    streams: int | None
    pool_active: int | None
    pool_idle: int | None
    requests: int  # requests completed so far

    @property
    def pool(self) -> int | None:
        if self.pool_active is None or self.pool_idle is None:
            return None
        return self.pool_active + self.pool_idle

    @property
    def fds_net(self) -> int | None:
        """Open fds minus the upstream pool's connections (idle ones come and go)."""
        if self.fds is None:
            return None
        return self.fds - (self.pool or 0)


def read_proc(pid: int) -> tuple[int | None, int | None]:
    rss = b.status_kb(pid, "VmRSS")
    try:
        fds: int | None = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = None
    return rss, fds


GAUGES = {
    "gateway_asyncio_tasks": "tasks",
    "gateway_in_flight_requests": "in_flight",
    "gateway_open_streams": "streams",
}


def parse_metrics(text: str) -> dict[str, int]:
    """The gauges the soak watches, plus the pool's connections by state."""
    out: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in GAUGES:
                out[GAUGES[sample.name]] = int(sample.value)
            elif sample.name == "gateway_upstream_connections":
                out[f"pool_{sample.labels.get('state', '')}"] = int(sample.value)
    return out


def counters(text: str) -> dict[str, dict[str, float]]:
    """The gateway's own request counters, flattened to ``{metric: {"label=value,...": n}}``."""
    wanted = ("gateway_requests_total", "gateway_refusals_total", "gateway_upstream_errors_total")
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted and sample.value:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model")
                bucket = out.setdefault(sample.name, {})
                bucket[labels] = bucket.get(labels, 0.0) + sample.value
    return out


class Probe:
    """Reads the gateway's /proc figures and its /metrics gauges."""

    def __init__(self, pid: int, base_url: str) -> None:
        self.pid = pid
        # No keep-alive: each scrape's connection is closed before the next /proc read.
        self.client = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(10.0),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=0),
            trust_env=False,
        )

    async def metrics_text(self) -> str | None:
        try:
            response = await self.client.get("/metrics")
        except httpx.HTTPError as exc:
            log(f"/metrics failed: {type(exc).__name__}: {exc}")
            return None
        return response.text if response.status_code == 200 else None

    async def sample(self, t: float, phase: str, requests: int) -> Sample:
        rss, fds = read_proc(self.pid)  # first, before the scrape opens a connection
        text = await self.metrics_text()
        gauges = parse_metrics(text) if text is not None else {}
        return Sample(
            t=round(t, 2),
            phase=phase,
            rss_kb=rss,
            fds=fds,
            tasks=gauges.get("tasks"),
            in_flight=gauges.get("in_flight"),
            streams=gauges.get("streams"),
            pool_active=gauges.get("pool_active"),
            pool_idle=gauges.get("pool_idle"),
            requests=requests,
        )

    async def aclose(self) -> None:
        await self.client.aclose()


# ---------------------------------------------------------------------------------------------
# Traffic


@dataclass
class Tally:
    by_kind: Counter[str] = field(default_factory=Counter)
    by_status: Counter[str] = field(default_factory=Counter)  # "kind/variant status"
    errors_by_status: Counter[int] = field(default_factory=Counter)  # non-2xx answers
    exceptions: Counter[str] = field(default_factory=Counter)  # "kind/variant ExceptionName"
    unexpected: Counter[str] = field(default_factory=Counter)  # "kind/variant got N, want M"
    incomplete_streams: int = 0  # full streams that ended without [DONE]
    cancelled: int = 0  # requests cut by Ctrl-C
    started: int = 0
    done: int = 0


class Plan:
    """The next request's kind and variant: a fixed shuffled cycle of the mix, variants in turn."""

    def __init__(self, seed: int = 7) -> None:
        cycle = [kind for kind, weight in MIX for _ in range(weight)]
        random.Random(seed).shuffle(cycle)
        self._cycle = cycle
        self._index = 0
        self._variant: Counter[str] = Counter()

    def next(self) -> tuple[str, str]:
        kind = self._cycle[self._index % len(self._cycle)]
        self._index += 1
        variants = list(EXPECTED[kind])
        variant = variants[self._variant[kind] % len(variants)]
        self._variant[kind] += 1
        return kind, variant


def chat_body(seq: int, *, stream: bool = False, model: str = CHAT_MODEL, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": f"Soak request {seq}: say something short."}],
        "max_tokens": 32,
        **extra,
    }
    if stream:
        body["stream"] = True
    return body


def multipart_without_file(model: str) -> tuple[bytes, str]:
    boundary = "soak-boundary-7d1c"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n--{boundary}--\r\n'
    ).encode()
    return body, f"multipart/form-data; boundary={boundary}"


async def full_stream(client: httpx.AsyncClient, n: int, tally: Tally) -> int:
    async with client.stream("POST", "/v1/chat/completions", json=chat_body(n, stream=True)) as response:
        tail = b""
        async for chunk in response.aiter_raw():
            tail = (tail + chunk)[-64:]
        if response.status_code == 200 and b"data: [DONE]" not in tail:
            tally.incomplete_streams += 1
        return response.status_code


async def aborted_stream(client: httpx.AsyncClient, n: int) -> int:
    async with client.stream("POST", "/v1/chat/completions", json=chat_body(n, stream=True)) as response:
        if response.status_code == 200:
            async for chunk in response.aiter_raw():
                if chunk:
                    break  # leaving the block closes the response (and its connection) mid-stream
        else:
            await response.aread()
        return response.status_code


async def send(client: httpx.AsyncClient, kind: str, variant: str, n: int, tally: Tally) -> int:
    """One request; the status the gateway answered."""
    chat = "/v1/chat/completions"
    if kind == "chat":
        return (await client.post(chat, json=chat_body(n))).status_code
    if kind == "embeddings":
        body = {"model": EMBED_MODEL, "input": [f"soak text {n}", "a second input"]}
        return (await client.post("/v1/embeddings", json=body)).status_code
    if kind == "stream":
        return await full_stream(client, n, tally)
    if kind == "stream_abort":
        return await aborted_stream(client, n)
    if variant == "unknown_model":
        return (await client.post(chat, json=chat_body(n, model="no-such-model-soak"))).status_code
    if variant == "wrong_endpoint":
        return (await client.post(chat, json=chat_body(n, model=EMBED_MODEL))).status_code
    if variant == "bad_json":
        headers = {"content-type": "application/json"}
        return (await client.post(chat, content=b'{"model": "' + CHAT_MODEL.encode(), headers=headers)).status_code
    if variant == "unknown_url":
        return (await client.get("/v1/files")).status_code
    if variant == "unhealthy_model":
        return (await client.post(chat, json=chat_body(n, model=UNHEALTHY_MODEL))).status_code
    if variant == "n_2":
        return (await client.post(chat, json=chat_body(n, n=2))).status_code
    if variant == "transcription_without_file":
        content, content_type = multipart_without_file(STT_MODEL)
        headers = {"content-type": content_type}
        return (await client.post("/v1/audio/transcriptions", content=content, headers=headers)).status_code
    raise AssertionError(f"unknown request {kind}/{variant}")


async def worker(client: httpx.AsyncClient, plan: Plan, tally: Tally, deadline: float, max_requests: int) -> None:
    while time.monotonic() < deadline and tally.started < max_requests:
        kind, variant = plan.next()
        tally.started += 1
        n = tally.started
        name = f"{kind}/{variant}" if variant != kind else kind
        try:
            async with asyncio.timeout(REQUEST_HARD_LIMIT_S):
                status = await send(client, kind, variant, n, tally)
        except (httpx.HTTPError, TimeoutError) as exc:
            tally.exceptions[f"{name} {type(exc).__name__}"] += 1
            continue
        except asyncio.CancelledError:
            tally.cancelled += 1  # Ctrl-C: this request's answer is not counted
            raise
        finally:
            tally.done += 1
            tally.by_kind[kind] += 1
        tally.by_status[f"{name} {status}"] += 1
        if not 200 <= status < 300:
            tally.errors_by_status[status] += 1
        want = EXPECTED[kind][variant]
        if status != want:
            tally.unexpected[f"{name} got {status}, want {want}"] += 1


def load_client(base_url: str, concurrency: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url,
        headers={"authorization": f"Bearer {API_KEY}"},
        timeout=httpx.Timeout(REQUEST_TIMEOUT_S),
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        trust_env=False,  # never through a proxy from the environment
    )


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class Run:
    args: argparse.Namespace
    probe: Probe
    base_url: str
    tally: Tally = field(default_factory=Tally)
    samples: list[Sample] = field(default_factory=list)
    phase: str = "idle-start"
    t0: float = 0.0  # monotonic time the traffic started
    final_counters: dict[str, dict[str, float]] = field(default_factory=dict)
    plan: Plan = field(default_factory=Plan)
    traffic_s: float = 0.0  # seconds of traffic actually sent

    def now(self) -> float:
        return time.monotonic() - self.t0 if self.t0 else 0.0

    async def take(self, phase: str | None = None) -> Sample:
        sample = await self.probe.sample(self.now(), phase or self.phase, self.tally.done)
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(sample)
        return sample

    async def sampler(self) -> None:
        """A sample every --sample-every seconds on a fixed schedule, until cancelled (bounded)."""
        every = self.args.sample_every
        for k in range(1, MAX_SAMPLES):
            await asyncio.sleep(max(0.0, self.t0 + k * every - time.monotonic()))
            if self.phase in ("warmup", "load"):
                sample = await self.take()
                print_row(sample)

    async def traffic(self, seconds: float, max_requests: int) -> None:
        start = time.monotonic()
        deadline = start + seconds
        try:
            async with load_client(self.base_url, self.args.concurrency) as client, asyncio.TaskGroup() as group:
                for _ in range(self.args.concurrency):
                    group.create_task(worker(client, self.plan, self.tally, deadline, max_requests))
        finally:
            self.traffic_s += time.monotonic() - start
        # the client is closed: its connections to the gateway are gone

    async def quiesce(self, phase: str) -> Sample:
        """Wait (bounded) until nothing is in flight, settle, and take an idle sample."""
        self.phase = "quiet"
        deadline = time.monotonic() + QUIESCE_MAX_S
        while time.monotonic() < deadline:
            text = await self.probe.metrics_text()
            gauges = parse_metrics(text) if text else {}
            if gauges.get("in_flight") == 0 and gauges.get("streams") == 0:
                break
            await asyncio.sleep(0.25)
        else:
            log(f"still in flight after {QUIESCE_MAX_S:g} s; sampling anyway")
        await asyncio.sleep(SETTLE_S)
        sample = await self.take(phase)
        print_row(sample)
        return sample

    async def drive(self) -> None:
        args = self.args
        total = args.minutes * 60.0
        warm = total * WARMUP_SHARE
        print_header()
        print_row(await self.take("idle-start"))
        self.t0 = time.monotonic()
        sampler = asyncio.create_task(self.sampler())
        try:
            self.phase = "warmup"
            log(f"warm-up: {warm:.0f} s, {args.concurrency} workers")
            await self.traffic(warm, args.max_requests)
            await self.quiesce("idle-baseline")
            self.phase = "load"
            log(f"measured part: {total - warm:.0f} s")
            await self.traffic(total - warm, args.max_requests)
            await self.quiesce("idle-final")
            text = await self.probe.metrics_text()
            self.final_counters = counters(text) if text else {}
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler


# ---------------------------------------------------------------------------------------------
# Verdict and report


def mb(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.1f}"


def cell(value: int | None) -> str:
    return "-" if value is None else str(value)


HEADER = (
    f"{'t (s)':>7} {'phase':<13} {'RSS MB':>7} {'fds':>5} {'tasks':>6} {'in fl.':>6} {'strm':>5} "
    f"{'pool a/i':>9} {'reqs':>8}"
)


def print_header() -> None:
    print(HEADER, flush=True)


def row(s: Sample) -> str:
    pool = "-" if s.pool is None else f"{s.pool_active}/{s.pool_idle}"
    return (
        f"{s.t:>7.1f} {s.phase:<13} {mb(s.rss_kb):>7} {cell(s.fds):>5} {cell(s.tasks):>6} "
        f"{cell(s.in_flight):>6} {cell(s.streams):>5} {pool:>9} {s.requests:>8}"
    )


def print_row(s: Sample) -> None:
    print(row(s), flush=True)


def slope_per_min(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 3 or len({x for x, _ in points}) < 2:
        return None
    fit = statistics.linear_regression([x for x, _ in points], [y for _, y in points])
    return fit.slope * 60.0


def verdict(samples: list[Sample], args: argparse.Namespace) -> dict[str, Any]:
    measured = [s for s in samples if s.phase == "load"]
    baseline = next((s for s in samples if s.phase == "idle-baseline"), None)
    final = next((s for s in samples if s.phase == "idle-final"), None)
    span_min = (measured[-1].t - measured[0].t) / 60.0 if len(measured) >= 2 else 0.0

    def series(get: Callable[[Sample], int | None], scale: float = 1.0) -> list[tuple[float, float]]:
        return [(s.t, v / scale) for s in measured if (v := get(s)) is not None]

    slopes = {
        "rss_mb": slope_per_min(series(lambda s: s.rss_kb, 1024.0)),
        "fds": slope_per_min(series(lambda s: s.fds)),
        "fds_net": slope_per_min(series(lambda s: s.fds_net)),
        "tasks": slope_per_min(series(lambda s: s.tasks)),
    }
    checks: dict[str, dict[str, Any]] = {}
    rss_fit = None if slopes["rss_mb"] is None else slopes["rss_mb"] * span_min
    checks["rss_fit_growth_mb"] = {
        "value": None if rss_fit is None else round(rss_fit, 2),
        "limit": args.rss_tolerance_mb,
        "ok": rss_fit is not None and rss_fit < args.rss_tolerance_mb,
    }

    def idle_delta(get: Callable[[Sample], int | None], scale: float = 1.0) -> float | None:
        if baseline is None or final is None:
            return None
        before, after = get(baseline), get(final)
        return None if before is None or after is None else (after - before) / scale

    limits: dict[str, tuple[Callable[[Sample], int | None], float, float]] = {
        "rss_idle_delta_mb": (lambda s: s.rss_kb, 1024.0, args.rss_tolerance_mb),
        "fds_net_idle_delta": (lambda s: s.fds_net, 1.0, args.fd_tolerance),
        "tasks_idle_delta": (lambda s: s.tasks, 1.0, args.task_tolerance),
    }
    for name, (get, scale, limit) in limits.items():
        delta = idle_delta(get, scale)
        strict = name.startswith("rss")
        ok = delta is not None and (delta < limit if strict else delta <= limit)
        checks[name] = {"value": None if delta is None else round(delta, 2), "limit": limit, "ok": ok}
    return {
        "flat": all(c["ok"] for c in checks.values()),
        "checks": checks,
        "slopes_per_min": {k: None if v is None else round(v, 3) for k, v in slopes.items()},
        "measured_minutes": round(span_min, 2),
        "measured_samples": len(measured),
    }


def fmt_slope(value: float | None, unit: str) -> str:
    return "n/a" if value is None else f"{value:+.3f} {unit}/min"


def report(result: dict[str, Any]) -> str:
    v = result["verdict"]
    t = result["totals"]
    slopes = v["slopes_per_min"]
    lines = [
        "",
        f"slopes over the measured part ({v['measured_minutes']} min, {v['measured_samples']} samples under load):",
        f"  RSS {fmt_slope(slopes['rss_mb'], 'MB')}, fds {fmt_slope(slopes['fds'], 'fds')} "
        f"(minus pool: {fmt_slope(slopes['fds_net'], 'fds')}), tasks {fmt_slope(slopes['tasks'], 'tasks')}",
        "checks (idle = after the warm-up pause vs after the final pause):",
    ]
    for name, check in v["checks"].items():
        lines.append(f"  {name:<20} {check['value']!s:>8}  limit {check['limit']:<5} {'ok' if check['ok'] else 'FAIL'}")
    rate = t["requests"] / t["traffic_seconds"] if t["traffic_seconds"] else 0.0
    lines += [
        f"requests: {t['requests']} in {t['traffic_seconds']:.0f} s of traffic ({rate:.0f}/s); "
        + ", ".join(f"{k} {n}" for k, n in sorted(t["by_kind"].items())),
        "answers: " + ", ".join(f"{k}: {n}" for k, n in sorted(t["by_status"].items())),
        "errors by status: " + (", ".join(f"{k}: {n}" for k, n in sorted(t["errors_by_status"].items())) or "none"),
        "exceptions: " + (", ".join(f"{k}: {n}" for k, n in sorted(t["exceptions"].items())) or "none"),
        "unexpected answers: " + (", ".join(f"{k}: {n}" for k, n in sorted(t["unexpected"].items())) or "none"),
        f"full streams without [DONE]: {t['incomplete_streams']}; requests cut by Ctrl-C: {t['cancelled']}",
        f"upstream streams: {result['upstream']}",
        f"ledger rows: {result['ledger_rows']}; gateway log: {result['gateway_log']['lines']} lines",
    ]
    for text, count in result["gateway_log"]["top"]:
        lines.append(f"  {count} x {text}")
    if result["interrupted"]:
        lines.append("verdict: none (interrupted; the checks above cover what ran)")
    else:
        lines.append(f"verdict: {'flat' if v['flat'] else 'NOT FLAT'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Processes and files


def gateway_config(workdir: Path, port: int, upstream_url: str) -> Path:
    path = workdir / "gateway.toml"
    path.write_text(
        f"""host = "{HOST}"
port = {port}
log_level = "warning"

[server]
shutdown_grace = {SHUTDOWN_GRACE_S}

[upstream]
url = "{upstream_url}"

[usage]
path = "{workdir / "usage.db"}"

[validation]
shape = "off"  # so that n = 2 and a transcription without a file reach the upstream
"""
    )
    return path


def ledger_rows(path: Path) -> int | None:
    if not path.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return int(db.execute("SELECT count(*) FROM usage").fetchone()[0])
    except sqlite3.Error as exc:
        log(f"could not read the ledger: {exc}")
        return None


def log_summary(path: Path, top: int = 8) -> dict[str, Any]:
    """Line count and the most frequent lines of the gateway's output (numbers blurred)."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return {"lines": 0, "top": []}
    shapes: Counter[str] = Counter()
    for line in text[:200_000]:
        shapes["".join("#" if c.isdigit() else c for c in line)[:160]] += 1
    return {"lines": len(text), "top": shapes.most_common(top)}


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(
        ["git", "-C", str(b.ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(b.ROOT), "status", "--porcelain", "--", "gateway"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg": os.getloadavg(),
        "cpu_pressure": b.cpu_pressure(),
        "commit": commit,
        "gateway_dirty": bool(dirty),
    }


@contextlib.contextmanager
def gateway_process(workdir: Path, upstream_url: str) -> Iterator[tuple[b.Proc, int]]:
    port = b.free_port()
    config = gateway_config(workdir, port, upstream_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    argv = [str(b.PROJECT_BIN / "gateway"), "serve", "--port", str(port), "--config", str(config)]
    proc = b.spawn("gateway", argv, workdir, None, env=env)
    try:
        b.wait_ready(proc, port, "/readyz", READY_TIMEOUT_S)
        yield proc, port
    finally:
        proc.stop(GATEWAY_STOP_S)
        log(f"gateway (pid {proc.pid}) stopped: exit {proc.popen.returncode}")


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _ignore_signals() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def run(args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    """The soak; (the result, whether it was interrupted)."""
    state = DemoState(token_delay=0.01)
    interrupted = False
    soak: Run | None = None
    workdir = Path(tempfile.mkdtemp(prefix="gateway-soak-"))
    log_copy = args.out.with_suffix(".gateway.log")
    meta = machine()  # at the start: the commit and the load the gateway started with
    started = time.monotonic()
    try:
        with (
            serve_in_thread(create_demo_upstream(state), host=HOST) as upstream,
            gateway_process(workdir, upstream.url) as (proc, port),
        ):
            log(f"upstream {upstream.url} (in this process), gateway pid {proc.pid} on port {port}")
            base_url = f"http://{HOST}:{port}"
            soak = Run(args, Probe(proc.pid, base_url), base_url)
            try:
                asyncio.run(_drive(soak))
            except (KeyboardInterrupt, asyncio.CancelledError):
                interrupted = True
            # A signal from here on would leave things half stopped: the rest is bounded anyway.
            _ignore_signals()
            if not proc.alive():
                log(f"the gateway exited during the run ({proc.popen.returncode}):\n{proc.tail()}")
    finally:
        _ignore_signals()
        gateway_log = workdir / "gateway.log"
        summary = log_summary(gateway_log)
        if summary["lines"]:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copyfile(gateway_log, log_copy)
        rows = ledger_rows(workdir / "usage.db")
        shutil.rmtree(workdir, ignore_errors=True)
    assert soak is not None
    tally = soak.tally
    traffic_s = round(soak.traffic_s, 1)
    result: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": meta | {"loadavg_end": os.getloadavg(), "cpu_pressure_end": b.cpu_pressure()},
        "interrupted": interrupted,
        "wall_seconds": round(time.monotonic() - started, 1),
        "samples": [asdict(s) | {"pool": s.pool, "fds_net": s.fds_net} for s in soak.samples],
        "verdict": verdict(soak.samples, args),
        "totals": {
            "requests": tally.done,
            "traffic_seconds": traffic_s,
            "by_kind": dict(tally.by_kind),
            "by_status": dict(tally.by_status),
            "errors_by_status": {str(k): n for k, n in tally.errors_by_status.items()},
            "exceptions": dict(tally.exceptions),
            "unexpected": dict(tally.unexpected),
            "incomplete_streams": tally.incomplete_streams,
            "cancelled": tally.cancelled,
        },
        "gateway_counters": soak.final_counters,
        "upstream": {
            "started": state.streams_started,
            "completed": state.streams_completed,
            "cancelled": state.streams_cancelled,
        },
        "ledger_rows": rows,
        "gateway_log": summary | {"copy": str(log_copy) if summary["lines"] else None},
    }
    return result, interrupted


async def _drive(soak: Run) -> None:
    """The run; SIGTERM cancels it like Ctrl-C does (asyncio.run cancels the main task on SIGINT)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await soak.drive()
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _interrupt)
        await soak.probe.aclose()


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=3.0, help="minutes of traffic (default 3)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent workers (default 32)")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples (default 5)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default bench/results/soak-<time>.json)")
    parser.add_argument(
        "--max-requests", type=int, default=None, help=f"request cap (default {MAX_REQUESTS_PER_MINUTE} per minute)"
    )
    parser.add_argument("--rss-tolerance-mb", type=float, default=5.0, help="allowed RSS growth (default 5 MB)")
    parser.add_argument("--fd-tolerance", type=int, default=2, help="allowed fd growth, idle to idle (default 2)")
    parser.add_argument("--task-tolerance", type=int, default=2, help="allowed task growth, idle to idle (default 2)")
    args = parser.parse_args(argv)
    if not 0 < args.minutes <= 24 * 60:
        parser.error("--minutes must be in (0, 1440]")
    if not 1 <= args.concurrency <= 1024:
        parser.error("--concurrency must be 1..1024")
    if not 0.5 <= args.sample_every <= 600:
        parser.error("--sample-every must be in [0.5, 600]")
    if args.max_requests is None:
        args.max_requests = max(1, int(args.minutes * MAX_REQUESTS_PER_MINUTE))
    if args.max_requests < 1:
        parser.error("--max-requests must be at least 1")
    if args.out is None:
        args.out = b.RESULTS / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result, interrupted = run(args)
    except KeyboardInterrupt:
        log("interrupted while starting or stopping: every process started has been stopped")
        return 130
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(report(result), flush=True)
    log(f"samples: {args.out}")
    if interrupted:
        log("interrupted: partial results (the verdict covers what ran)")
        return 130
    return 0 if result["verdict"]["flat"] else 1


if __name__ == "__main__":
    sys.exit(main())
