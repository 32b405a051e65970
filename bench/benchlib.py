"""Shared machinery of the benchmark: processes, /proc statistics, the upstream stand-ins, wrk.

Everything listens on 127.0.0.1 only. Every process started here is a ``Proc`` that the caller
stops in a ``finally`` block (``contextlib.ExitStack``), by its pid (its own process group for
proxies that may fork). Stdlib only: it runs under the project's virtual environment.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import payloads

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
# The gateway package of an older commit, for the --baseline row (gitignored with results/).
BASELINE = RESULTS / "baseline"
PROJECT_BIN = ROOT / ".venv" / "bin"
LITELLM_VENV = BENCH / ".venv-litellm"
TOOLS_VENV = BENCH / ".venv-tools"
LITELLM_SPEC = "litellm[proxy]==1.106.2"
# The Portkey AI gateway (Node), installed with npm into this gitignored folder, never into the repo.
PORTKEY_DIR = BENCH / ".portkey"
PORTKEY_VERSION = "1.15.2"
# Portkey 1.15.x streams fail ("TypeError: immutable", Portkey-AI/gateway#1389 and #1550) with the
# newest @hono/node-server 1.x that its caret range picks; these are the versions of its own lockfile.
PORTKEY_OVERRIDES = {"@hono/node-server": "1.13.5", "@hono/node-ws": "1.2.0"}
TOOLS_SPEC = ("matplotlib", "py-spy")
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Installation


def ensure_system_tools() -> None:
    """nginx and wrk from the distribution's packages (installed with apt-get when root)."""
    missing = [tool for tool in ("nginx", "wrk", "taskset") if _which(tool) is None]
    if not missing:
        return
    packages = sorted({"nginx": "nginx", "wrk": "wrk", "taskset": "util-linux"}[t] for t in missing)
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SystemExit(f"bench: missing {', '.join(missing)}; install: apt-get install -y {' '.join(packages)}")
    log(f"installing {' '.join(packages)} with apt-get (a system nginx service may be set up too)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(["apt-get", "install", "-y", "-q", *packages], env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", *packages], env=env, check=True)
    still = [tool for tool in ("nginx", "wrk", "taskset") if _which(tool) is None]
    if still:
        raise SystemExit(f"bench: still missing after apt-get: {', '.join(still)}")


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")


def ensure_venv(venv: Path, packages: Sequence[str], what: str) -> Path | None:
    """A virtual environment with ``packages``; its python, or None (with a message) on failure."""
    python = venv / "bin" / "python"
    stamp = venv / ".bench-installed"
    wanted = "\n".join(packages)
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    log(f"installing {what} into {venv.relative_to(ROOT)}: {' '.join(packages)} (first run only)")
    log_path = venv.parent / f"{venv.name}.install.log"
    with open(log_path, "w") as out:
        base = getattr(sys, "_base_executable", sys.executable)
        steps = [
            [base, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *packages],
        ]
        for step in steps:
            if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, check=False).returncode != 0:
                log(f"could not install {what} (see {log_path.relative_to(ROOT)})")
                return None
    stamp.write_text(wanted)
    return python


def ensure_portkey(version: str, folder: Path = PORTKEY_DIR) -> Path | None:
    """``@portkey-ai/gateway@version`` installed with npm into ``folder`` (a generated package.json
    pinning it, with ``PORTKEY_OVERRIDES`` as npm overrides); its start-up script, or None (with a
    message) when node or npm is missing or the install fails. Lifecycle scripts are not run (the
    package ships built; its postinstall is a patch-package step for its own development)."""
    script = folder / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
    manifest = {
        "name": "bench-portkey",
        "private": True,
        "version": "0.0.0",
        "description": "generated by bench/benchlib.py: the Portkey row's install (not part of the project)",
        "dependencies": {"@portkey-ai/gateway": version},
        "overrides": PORTKEY_OVERRIDES,
    }
    wanted = json.dumps(manifest, indent=1, sort_keys=True)
    stamp = folder / ".bench-installed"
    if script.exists() and stamp.exists() and stamp.read_text() == wanted:
        return script
    npm, node = _which("npm"), _which("node")
    if npm is None or node is None:
        log("Portkey row skipped: node and npm are needed (e.g. apt-get install -y nodejs npm)")
        return None
    log(f"installing @portkey-ai/gateway@{version} into {folder.relative_to(ROOT)} with npm (first run only)")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / "package.json").write_text(wanted + "\n")
    log_path = folder.parent / f"{folder.name}.install.log"
    argv = [npm, "install", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"]
    with open(log_path, "w") as out:
        try:
            done = subprocess.run(argv, cwd=folder, stdout=out, stderr=subprocess.STDOUT, timeout=600, check=False)
        except subprocess.TimeoutExpired:
            log(f"could not install Portkey in 10 minutes (see {log_path.relative_to(ROOT)})")
            return None
    if done.returncode != 0 or not script.exists():
        log(f"could not install Portkey (see {log_path.relative_to(ROOT)})")
        return None
    stamp.write_text(wanted)
    return script


def portkey_versions(folder: Path = PORTKEY_DIR) -> dict[str, str]:
    """The installed versions of Portkey and of the pinned packages (for the results)."""
    out = {}
    for name in ("@portkey-ai/gateway", *PORTKEY_OVERRIDES):
        with contextlib.suppress(OSError, ValueError, KeyError):
            out[name] = json.loads((folder / "node_modules" / name / "package.json").read_text())["version"]
    node = _which("node")
    if node:
        with contextlib.suppress(OSError):
            done = subprocess.run([node, "--version"], capture_output=True, text=True, check=False)
            out["node"] = done.stdout.strip()
    return out


# ---------------------------------------------------------------------------------------------
# CPUs, ports, processes


@dataclass(frozen=True)
class Cpus:
    """Where things run: the proxy under test alone on ``proxy``, everything else on ``load``."""

    proxy: tuple[int, ...] | None
    load: tuple[int, ...] | None

    @staticmethod
    def plan(pin: bool) -> Cpus:
        available = sorted(os.sched_getaffinity(0))
        if not pin or len(available) < 2:
            return Cpus(None, None)
        return Cpus((available[-1],), tuple(available[:-1]))

    def describe(self) -> str:
        if self.proxy is None:
            return f"not pinned (every process on any of the {len(os.sched_getaffinity(0))} CPUs)"
        return (
            f"pinned: the proxy alone on CPU {_fmt(self.proxy)}, the load generator and the upstreams on CPU "
            f"{_fmt(self.load or ())} (other jobs on the machine are not kept off either)"
        )


def _fmt(cpus: Sequence[int]) -> str:
    return ",".join(str(c) for c in cpus)


def pinned(argv: Sequence[str], cpus: tuple[int, ...] | None) -> list[str]:
    return ["taskset", "-c", _fmt(cpus), *argv] if cpus else list(argv)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    started: float = field(default_factory=time.perf_counter)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM its process group (it is the group leader), then SIGKILL after ``timeout``."""
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"{self.name} (pid {self.pid}) did not stop in {timeout:g}s: SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait(5)


def spawn(
    name: str, argv: Sequence[str], logdir: Path, cpus: tuple[int, ...] | None, env: dict[str, str] | None = None
) -> Proc:
    log_path = logdir / f"{name}.log"
    out = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
    try:
        popen = subprocess.Popen(
            pinned(argv, cpus),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=logdir,
            start_new_session=True,  # its own process group: stopped as one, by its pid
        )
    finally:
        out.close()
    return Proc(name, popen, log_path)


@contextlib.contextmanager
def running(proc: Proc) -> Iterator[Proc]:
    try:
        yield proc
    finally:
        proc.stop()


# ---------------------------------------------------------------------------------------------
# /proc statistics of a process and its descendants


def tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, []))
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of these processes (children that exited are not counted)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def rss_kb(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE_KB
        except OSError:
            continue
    return total


def status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def loaded_extensions(pids: Sequence[int]) -> dict[str, bool]:
    """Whether uvloop's and httptools' compiled modules are mapped into any of these processes.

    uvicorn's "auto" loop and HTTP implementations import them only when it is going to use them.
    """
    maps = ""
    for pid in pids:
        with contextlib.suppress(OSError):
            maps += Path(f"/proc/{pid}/maps").read_text()
    return {"uvloop": "/uvloop/loop." in maps, "httptools": "/httptools/parser/" in maps}


def wait_idle(pids: Sequence[int], max_wait: float = 30.0, window: float = 0.25, busy: float = 0.1) -> float:
    """Wait (bounded) until these processes use under ``busy`` of a CPU for two windows in a row.

    After a warm-up, a slow proxy can still be working on requests whose clients are gone; the
    measured run must not inherit that work. Returns the seconds waited.
    """
    start = time.perf_counter()
    calm = 0
    while calm < 2 and time.perf_counter() - start < max_wait:
        before = cpu_seconds(pids)
        time.sleep(window)
        calm = calm + 1 if (cpu_seconds(pids) - before) / window < busy else 0
    return time.perf_counter() - start


def cpu_pressure() -> str:
    """The kernel's CPU pressure (PSI) line: how often runnable tasks waited for a CPU (noise)."""
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return "n/a"


class Sampler:
    """Samples the RSS of a process tree every ``interval`` seconds in a thread; bounded by stop()."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self._pid = pid
        self._interval = interval
        self._pids = tree(pid)
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        refresh = 0
        while not self._stop.wait(self._interval):
            refresh += 1
            if refresh % 50 == 0:
                self._pids = tree(self._pid)
            value = rss_kb(self._pids)
            with self._lock:
                self._peak = max(self._peak, value)

    def take_peak(self) -> int:
        """The peak since the previous call."""
        with self._lock:
            peak, self._peak = self._peak, rss_kb(self._pids)
        return max(peak, self._peak)

    def pids(self) -> list[int]:
        return list(self._pids)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


# ---------------------------------------------------------------------------------------------
# HTTP readiness


def http_get_status(url_host: str, port: int, path: str, timeout: float = 1.0) -> int | None:
    conn = http.client.HTTPConnection(url_host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return None
    finally:
        conn.close()


def http_post(port: int, path: str, body: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One POST with the benchmark's headers (as wrk sends them): status, headers (lower-case
    names), the whole body (a stream is read to its end)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {payloads.API_KEY}"}
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        conn.close()


def cache_requests(port: int, endpoint: str | None = None) -> dict[str, float]:
    """The gateway's ``gateway_cache_requests_total`` from its /metrics, summed by ``result`` (hit,
    collapsed, miss, refresh, bypass) over every endpoint or the one given; {} with the cache off."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10.0)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        text = response.read().decode(errors="replace")
        if response.status != 200:
            raise RuntimeError(f"GET /metrics answered {response.status}")
    finally:
        conn.close()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("gateway_cache_requests_total{"):
            continue
        labels_text, _, value = line.removeprefix("gateway_cache_requests_total{").rpartition("} ")
        labels = dict(
            (name.strip(), raw.strip().strip('"'))
            for name, _, raw in (item.partition("=") for item in labels_text.split(","))
        )
        if endpoint is None or labels.get("endpoint") == endpoint:
            result = labels.get("result", "?")
            counts[result] = counts.get(result, 0.0) + float(value)
    return counts


def wait_ready(proc: Proc, port: int, path: str, timeout: float) -> float:
    """Seconds from the process's spawn to its first 200 on ``path``; polls every 5 ms, bounded."""
    deadline = time.perf_counter() + timeout
    status = None
    while time.perf_counter() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        status = http_get_status(HOST, port, path, timeout=2.0)
        if status == 200:
            return time.perf_counter() - proc.started
        time.sleep(0.005)
    raise RuntimeError(f"{proc.name} not ready on {path} within {timeout:g}s (last: {status}):\n{proc.tail()}")


# ---------------------------------------------------------------------------------------------
# The upstream stand-ins


def nginx_conf(workdir: Path, json_port: int, sse_port: int, long_sse_port: int | None = None) -> Path:
    """Two servers: ``json_port`` answers chat with JSON, ``sse_port`` with a canned SSE body
    (20 events); with ``long_sse_port``, a third answers chat with a canned 100-event SSE body.

    The canned bodies are files (nginx caps a ``return`` string at 4 KB), served from the page cache
    with an open-file cache. The static module refuses POST with 405; ``error_page 405 =200 $uri``
    turns that into an internal GET of the same file answered 200.
    """
    www = workdir / "www"
    www.mkdir(exist_ok=True)
    # nginx started by root runs its worker as nobody: it must be able to read the canned files.
    for path in (workdir, www):
        path.chmod(0o755)
    files = {
        "catalog.json": payloads.catalog_bytes(),
        "chat.json": payloads.chat_response(),
        "embeddings.json": payloads.embeddings_response(),
        "chat.sse": payloads.sse_body(),
        "chat-long.sse": payloads.sse_body(payloads.SSE_LONG_EVENTS),
    }
    for name, data in files.items():
        (www / name).write_bytes(data)
    temp = workdir / "nginx-tmp"
    temp.mkdir(exist_ok=True)

    def location(path: str, file: str, content_type: str) -> str:
        return f"location = {path} {{ default_type {content_type}; alias {www / file}; error_page 405 =200 $uri; }}"

    common = "\n        ".join(
        [
            location("/api/models", "catalog.json", "application/json"),
            location("/v1/embeddings", "embeddings.json", "application/json"),
            "location = / { default_type text/plain; return 200 'ok\\n'; }",
            'location / { default_type application/json; return 404 \'{"error":"not found"}\'; }',
        ]
    )
    # Like the short stream, with ``Cache-Control: no-cache`` (FlexAI's streams carry it); the
    # gateway's response cache still stores it (gateway/cache/control.py: only no-store/private).
    long_sse = (
        f"""    server {{
        listen {HOST}:{long_sse_port} backlog=4096;
        add_header Cache-Control no-cache;
        {location("/v1/chat/completions", "chat-long.sse", "text/event-stream")}
        {common}
    }}
"""
        if long_sse_port
        else ""
    )
    conf = f"""
daemon off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    server_tokens off;
    sendfile on;
    tcp_nopush off;
    tcp_nodelay on;
    etag off;
    open_file_cache max=64 inactive=1h;
    open_file_cache_valid 1h;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    client_body_buffer_size 64k;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server {{
        listen {HOST}:{json_port} backlog=4096;
        {location("/v1/chat/completions", "chat.json", "application/json")}
        {common}
    }}
    server {{
        listen {HOST}:{sse_port} backlog=4096;
        add_header Cache-Control no-cache;
        {location("/v1/chat/completions", "chat.sse", "text/event-stream")}
        {common}
    }}
{long_sse}}}
"""
    path = workdir / "nginx.conf"
    path.write_text(conf)
    return path


@dataclass(frozen=True)
class Nginx:
    """The nginx stand-in and its three servers (see ``nginx_conf``)."""

    proc: Proc
    json_port: int
    sse_port: int  # the canned 20-event stream
    long_sse_port: int  # the canned 100-event stream


def start_nginx_servers(workdir: Path, cpus: Cpus) -> Nginx:
    json_port, sse_port, long_sse_port = free_port(), free_port(), free_port()
    conf = nginx_conf(workdir, json_port, sse_port, long_sse_port)
    nginx = _which("nginx") or "nginx"
    test = subprocess.run([nginx, "-t", "-q", "-p", str(workdir), "-c", str(conf)], capture_output=True, check=False)
    if test.returncode != 0:
        raise RuntimeError(f"nginx rejected its config: {test.stderr.decode(errors='replace')}")
    proc = spawn("nginx", [nginx, "-p", str(workdir), "-c", str(conf)], workdir, cpus.load)
    try:
        for port in (json_port, sse_port, long_sse_port):
            wait_ready(proc, port, "/api/models", 10.0)
    except BaseException:
        proc.stop()
        raise
    return Nginx(proc, json_port, sse_port, long_sse_port)


def start_nginx(workdir: Path, cpus: Cpus) -> tuple[Proc, int, int]:
    """nginx, its JSON port and its (20-event) SSE port; ``start_nginx_servers`` for all three."""
    started = start_nginx_servers(workdir, cpus)
    return started.proc, started.json_port, started.sse_port


def start_paced(workdir: Path, cpus: Cpus, events: int, gap_ms: float) -> tuple[Proc, int]:
    port = free_port()
    argv = [
        sys.executable,
        str(BENCH / "paced_upstream.py"),
        "--port",
        str(port),
        "--events",
        str(events),
        "--gap-ms",
        str(gap_ms),
    ]
    proc = spawn("paced-upstream", argv, workdir, cpus.load)
    try:
        wait_ready(proc, port, "/api/models", 10.0)
    except BaseException:
        proc.stop()
        raise
    return proc, port


# ---------------------------------------------------------------------------------------------
# The proxies under test


# How the gateway is configured: "defaults" = what a user runs (log level info, the access log on,
# the SQLite ledger on); "lean" = the same with the access log and the ledger off (what the
# defaults cost); "quiet" = log_level "warning" (no access log lines, ledger on), the setting the
# runs before 2026-12-05 (issue #19) used.
GATEWAY_PROFILES = ("defaults", "lean", "quiet")


def gateway_config(
    workdir: Path, name: str, upstream: str, port: int, cache: bool = False, profile: str = "defaults"
) -> Path:
    """The gateway's TOML for one start: its defaults as ``profile`` says (see GATEWAY_PROFILES), a
    fresh ledger of its own (unless ``lean``), a catalog TTL of a day; ``cache`` turns the response
    cache on (its defaults: docs/cache.md). The access log goes to the process's output, which the
    benchmark sends to a file in the run's directory."""
    if profile not in GATEWAY_PROFILES:
        raise ValueError(f"unknown gateway profile {profile!r}")
    path = workdir / f"{name}.toml"
    ledger = workdir / f"{name}-usage.db"
    cache_table = "\n[cache]\nenabled = true\n" if cache else ""
    top = {
        "defaults": "# log_level, log_format and access_log: the defaults (info, auto = json to a file, on)",
        "lean": "# the defaults with the access log and the ledger off\naccess_log = false",
        "quiet": 'log_level = "warning"  # no access log lines',
    }[profile]
    usage = (
        'path = ""  # the ledger off'
        if profile == "lean"
        else "# Each proxy start its own fresh ledger in the run's directory (the default path is one file in the\n"
        "# home directory, which would grow across runs and rows and make them incomparable).\n"
        f'path = "{ledger}"'
    )
    path.write_text(
        f"""host = "{HOST}"
port = {port}
{top}

[upstream]
url = "{upstream}"

[usage]
{usage}

[catalog]
ttl = 86400.0
{cache_table}"""
    )
    return path


def gateway_env(seed: int, package: Path | None) -> dict[str, str]:
    """The environment of a gateway process under comparison: no GATEWAY_* overrides, the hash seed
    ``seed``, and ``package`` (an extracted ``gateway``, ``extract_baseline``) first on PYTHONPATH
    (None: the working tree, as installed in the project's venv)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_") and k != "PYTHONPATH"}
    env["PYTHONHASHSEED"] = str(seed)
    if package is not None:
        env["PYTHONPATH"] = str(package)
    return env


def extract_baseline(rev: str, dest: Path = BASELINE) -> str:
    """Put the ``gateway`` package of git revision ``rev`` in ``dest`` (replacing what was there);
    returns the commit's short hash and subject, for the results. ``git archive`` only: the work
    tree, the index and HEAD are untouched."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "gateway"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    described = subprocess.run(
        ["git", "-C", str(ROOT), "log", "-1", "--format=%h %s", rev], capture_output=True, text=True, check=True
    )
    return described.stdout.strip()[:120]


def gateway_argv(kind: str, config: Path, port: int) -> list[str]:
    """``gateway`` (and ``gateway-lean`` and ``gateway-cache``: the same with the access log and the
    ledger off, or with the response cache on, in its config) = the installed CLI; ``baseline`` = the
    same CLI from the code in BASELINE (see ``start_proxy``); ``floor`` = bench/relay_floor.py (a
    bare relay, no gateway code); ``runner-httpx`` / ``runner-aiohttp`` = bench/transport_runner.py."""
    if kind in ("gateway", "gateway-lean", "gateway-cache"):
        return [str(PROJECT_BIN / "gateway"), "serve", "--config", str(config), "--port", str(port)]
    if kind == "baseline":
        return [str(PROJECT_BIN / "python"), "-m", "gateway.cli", "serve", "--config", str(config), "--port", str(port)]
    if kind == "floor":
        return [
            str(PROJECT_BIN / "python"),
            str(BENCH / "relay_floor.py"),
            "--config",
            str(config),
            "--port",
            str(port),
        ]
    transport = kind.removeprefix("runner-")
    return [
        str(PROJECT_BIN / "python"),
        str(BENCH / "transport_runner.py"),
        "--config",
        str(config),
        "--port",
        str(port),
        "--transport",
        transport,
    ]


def litellm_config(workdir: Path, api_base: str) -> Path:
    path = workdir / "litellm.yaml"
    models = ""
    for name in (payloads.CHAT_MODEL, payloads.EMBED_MODEL):
        models += f"""  - model_name: {name}
    litellm_params:
      model: openai/{name}
      api_base: {api_base}
      api_key: {payloads.API_KEY}
"""
    path.write_text(
        f"""model_list:
{models}
litellm_settings:
  drop_params: true
  callbacks: []
  success_callback: []
  failure_callback: []
  turn_off_message_logging: true
  request_timeout: 600
  set_verbose: false
general_settings:
  master_key: {payloads.API_KEY}
"""
    )
    return path


def litellm_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LITELLM_", "DATABASE_", "OPENAI_"))}
    env.update(
        {
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the cost map from the internet
            "LITELLM_LOG": "ERROR",
            "LITELLM_MODE": "PRODUCTION",
            "LITELLM_TELEMETRY": "False",
            "NO_DOCS": "True",
            "PATH": f"{LITELLM_VENV / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
        }
    )
    return env


def portkey_headers(upstream_base: str) -> dict[str, str]:
    """What routes a request through Portkey to ``upstream_base``: its OpenAI provider, at a custom host
    (the client's Authorization header goes upstream as the OpenAI key)."""
    return {"x-portkey-provider": "openai", "x-portkey-custom-host": upstream_base + "/v1"}


@dataclass
class Started:
    proc: Proc
    port: int
    startup_s: float
    rest_rss_kb: int
    extensions: dict[str, bool]
    # Request headers this proxy needs on every request (Portkey's routing headers), besides wrk's own.
    headers: dict[str, str] = field(default_factory=dict)


# The gateway rows and the configuration each runs with (GATEWAY_PROFILES).
GATEWAY_KIND_PROFILES = {"gateway": "defaults", "gateway-lean": "lean", "gateway-cache": "defaults"}


def start_proxy(kind: str, workdir: Path, upstream_base: str, cpus: Cpus, phase: str, timeout: float) -> Started:
    """Start a proxy in front of ``upstream_base`` and wait for its first 200 on its readiness path."""
    port = free_port()
    headers: dict[str, str] = {}
    if kind == "portkey":
        # One Node process (one event loop: Portkey's own way to run), no UI and no log streaming.
        script = PORTKEY_DIR / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
        argv = [_which("node") or "node", str(script), f"--port={port}", "--headless"]
        env = {**os.environ, "NODE_ENV": "production"}
        proc = spawn(f"portkey-{phase}", argv, workdir, cpus.proxy, env=env)
        ready_path = "/"
        headers = portkey_headers(upstream_base)
    elif kind == "litellm":
        config = litellm_config(workdir, upstream_base + "/v1")
        argv = [
            str(LITELLM_VENV / "bin" / "litellm"),
            "--config",
            str(config),
            "--host",
            HOST,
            "--port",
            str(port),
            "--num_workers",
            "1",
        ]
        proc = spawn(f"litellm-{phase}", argv, workdir, cpus.proxy, env=litellm_env())
        ready_path = "/health/readiness"
    else:
        profile = GATEWAY_KIND_PROFILES.get(kind, "defaults")
        config = gateway_config(
            workdir, f"{kind}-{phase}", upstream_base, port, cache=kind == "gateway-cache", profile=profile
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        if kind == "baseline":  # its gateway package comes before the installed (editable) one
            env["PYTHONPATH"] = str(BASELINE)
        proc = spawn(f"{kind}-{phase}", gateway_argv(kind, config, port), workdir, cpus.proxy, env=env)
        ready_path = "/readyz"
    try:
        startup = wait_ready(proc, port, ready_path, timeout)
        time.sleep(0.5)  # let start-up garbage settle before reading the resting RSS
        pids = tree(proc.pid)
        return Started(proc, port, startup, rss_kb(pids), loaded_extensions(pids), headers)
    except BaseException:
        proc.stop()
        raise


# ---------------------------------------------------------------------------------------------
# Load generators


def wrk_script(workdir: Path, name: str, body: bytes, headers: dict[str, str] | None = None) -> Path:
    """A wrk Lua script: POST ``body`` with JSON and Authorization headers (and ``headers``), print
    JSON when done."""
    text = body.decode()
    assert "]]" not in text
    extra = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in (headers or {}).items())
    assert '"' not in "".join(f"{k}{v}" for k, v in (headers or {}).items())
    path = workdir / f"{name}.lua"
    path.write_text(
        f"""wrk.method = "POST"
wrk.body = [[{text}]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {payloads.API_KEY}"
{extra}
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {{"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,'
    .. '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
"""
    )
    return path


def run_wrk(
    url: str, script: Path, connections: int, seconds: float, cpus: Cpus, timeout_s: float = 30.0
) -> dict[str, Any]:
    threads = max(1, min(connections, len(cpus.load) if cpus.load else os.cpu_count() or 1))
    seconds = max(1, round(seconds))  # wrk takes whole seconds only
    argv = pinned(
        [
            _which("wrk") or "wrk",
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{seconds:g}s",
            "--timeout",
            f"{timeout_s:g}s",
            "-s",
            str(script),
            url,
        ],
        cpus.load,
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + timeout_s + 30, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            data: dict[str, Any] = json.loads(line.removeprefix("BENCHJSON "))
            data["errors"] = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
            secs = data["duration_us"] / 1e6
            data["rps"] = data["requests"] / secs if secs > 0 else 0.0
            return data
    raise RuntimeError(f"wrk printed no result (rc {done.returncode}): {(done.stderr + done.stdout).strip()[:500]}")


def run_streams(
    url: str,
    body: bytes,
    concurrency: int,
    seconds: float,
    stagger: float,
    cpus: Cpus,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    extra = [arg for k, v in (headers or {}).items() for arg in ("--header", f"{k}: {v}")]
    argv = pinned(
        [
            sys.executable,
            str(BENCH / "streams.py"),
            "--url",
            url,
            "--body",
            body.decode(),
            "--concurrency",
            str(concurrency),
            "--key",
            payloads.API_KEY,
            "--seconds",
            f"{seconds:g}",
            "--stagger",
            f"{stagger:g}",
            *extra,
        ],
        cpus.load,
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 90, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"streams.py failed (rc {done.returncode}): {done.stderr[-800:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# The names the gateway gives its background threads (gateway.threads; a pool's threads get "_0").
WRITER_THREADS = ("log-writer", "ledger-idle_0", "ledger_0", "rollups_0")


def move_writer_threads(pid: int, cpus: tuple[int, ...]) -> list[str]:
    """Let the gateway ``pid``'s writer threads (``WRITER_THREADS``) run on ``cpus`` only, as the
    kernel would place them on an idle core of an unpinned machine; the event loop stays where it
    is. Returns the names of the threads moved (those started by now)."""
    moved = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task")):
        with contextlib.suppress(OSError):
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            if name in WRITER_THREADS:
                os.sched_setaffinity(int(tid), cpus)
                moved.append(name)
    return moved
