"""The `gateway` command as an operator uses it: real processes, stopped by their pid."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import openai
import orjson
import pytest

from gateway.cli import DEMO_USER, DEMO_USER_RPM, EXIT_STDOUT_CLOSED, DemoLedger, _demo_banner, main
from gateway.config import Settings
from gateway.server.thread import LocalServer
from gateway.usage.ledger import Ledger
from gateway.usage.postgres.reports import summarize_blocking
from gateway.usage.reports import summarize
from gateway.usage.schema import MIGRATIONS, SCHEMA_VERSION, UsageRecord
from tests.helpers.gateway import CHAT_MODEL, chat_body, key_sha256, wait_until
from tests.helpers.postgres import PostgresServer
from tests.helpers.processes import GATEWAY, clean_env, free_port, running, stop, wait_ready
from tests.helpers.upstreams import FaultMode, FaultyUpstream

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0


def test_serve_runs_without_config_file_and_stops_cleanly_on_sigterm(tmp_path: Path, upstream: LocalServer) -> None:
    port = free_port()
    with running(["serve", "--port", str(port)], {"GATEWAY_UPSTREAM_URL": upstream.url}, tmp_path) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        answer = httpx.post(
            url + "/v1/chat/completions",
            json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]},
            timeout=10,
        )
        assert answer.status_code == 200
        code, out = stop(proc, signal.SIGTERM)
    assert code == 0
    assert "Application shutdown complete" in out  # the lifespan closed the upstream client
    assert "Traceback" not in out


def test_serve_reads_gateway_config_and_flags_beat_it(tmp_path: Path, upstream: LocalServer) -> None:
    config = tmp_path / "custom.toml"
    config.write_text(f'port = 1\n[upstream]\nurl = "{upstream.url}"\n')
    port = free_port()
    with running(["serve", "--port", str(port)], {"GATEWAY_CONFIG": str(config)}, tmp_path) as proc:
        wait_ready(f"http://127.0.0.1:{port}", proc)  # the upstream URL came from the file
        code, _ = stop(proc, signal.SIGINT)
    assert code == 0


def test_serve_refuses_to_start_with_an_upstream_key_and_no_auth_mode(tmp_path: Path) -> None:
    port = free_port()
    env = {"GATEWAY_UPSTREAM_API_KEY": "sk-org-secret-value"}
    with running(["serve", "--port", str(port)], env, tmp_path) as proc:
        out, _ = proc.communicate(timeout=START_TIMEOUT)
    assert proc.returncode == 2
    assert 'mode = "open"' in out
    assert "sk-org-secret-value" not in out
    with pytest.raises(httpx.TransportError):  # it never bound the port
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)


def test_serve_names_a_bad_setting(tmp_path: Path) -> None:
    with running(["serve"], {"GATEWAY_CATALOG_TTL": "-1"}, tmp_path) as proc:
        out, _ = proc.communicate(timeout=START_TIMEOUT)
    assert proc.returncode == 2
    assert "GATEWAY_CATALOG_TTL: must be greater than 0" in out


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_a_ledger_the_gateway_cannot_use_stops_it_with_one_line(tmp_path: Path, command: str) -> None:
    """A newer gateway's ledger (a rollback) is refused before serving: one line naming
    the file, exit 1, no traceback (it was a failed lifespan's traceback, and exit 3)."""
    ledger = tmp_path / "usage.db"
    _ledger_of_version(ledger, SCHEMA_VERSION + 1)
    port = free_port()
    with running([command, "--port", str(port)], {"GATEWAY_USAGE_PATH": str(ledger)}, tmp_path) as proc:
        out, _ = proc.communicate(timeout=START_TIMEOUT)
    assert proc.returncode == 1
    assert out == f"gateway: usage ledger: {ledger} is a usage ledger of schema version {SCHEMA_VERSION + 1}, newer " \
        f"than this gateway's ({SCHEMA_VERSION}): use it with the gateway that wrote it\n"  # fmt: skip
    with pytest.raises(httpx.TransportError):  # it never bound the port
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)


def test_demo_prints_examples_and_serves_the_simulated_upstream(tmp_path: Path) -> None:
    port = free_port()
    with running(["demo", "--port", str(port)], {}, tmp_path) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        models = httpx.get(url + "/v1/models", timeout=5).json()
        assert CHAT_MODEL in {m["id"] for m in models["data"]}
        refused = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "bge-m3", "messages": [{"role": "user", "content": "x"}]},
        )
        assert refused.json()["error"]["code"] == "model_endpoint_mismatch"
        # The demo has the response cache on: the banner's embeddings example, sent twice, is a hit.
        embed = {"model": "bge-m3", "input": "Hello"}
        statuses = [httpx.post(url + "/v1/embeddings", json=embed).headers["cache-status"] for _ in range(2)]
        assert statuses[0] == "flexai-gateway; fwd=miss; stored"
        assert statuses[1].startswith("flexai-gateway; hit; ttl=")
        code, out = stop(proc, signal.SIGTERM)
    assert code == 0
    assert f"curl -s {url}/v1/chat/completions" in out
    assert f'base_url="{url}/v1"' in out
    assert """-d '{"model": "bge-m3", "input": "Hello"}' | grep -i '^cache-status'""" in out
    # One start and one shutdown: the gateway's (the simulated upstream's server logs only warnings).
    assert (out.count("Started server process"), out.count("Application shutdown complete")) == (1, 1)


def test_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("GATEWAY_")]:
        monkeypatch.delenv(key)
    good = tmp_path / "good.toml"
    good.write_text("port = 9999\n")
    assert main(["check-config", str(good)]) == 0
    assert "configuration OK" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("[upstream]\nurll = 'x'\n")
    assert main(["check-config", str(bad)]) == 2
    assert "unknown setting [upstream] urll" in capsys.readouterr().err


def test_models_table_and_json(upstream: LocalServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--url", upstream.url]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["MODEL", "CATEGORY", "HEALTH"]
    assert any(line.startswith(CHAT_MODEL) and " text " in line for line in table)
    assert main(["models", "--url", upstream.url, "--category", "audio", "--json"]) == 0
    audio = orjson.loads(capsys.readouterr().out)
    assert {m["model_name"] for m in audio} == {"Kokoro-82M", "whisper-large-v3"}
    assert main(["models", "--url", upstream.url, "--supports", "tool_use", "--supports", "vision"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [r.split()[0] for r in rows] == ["Qwen2.5-VL-7B-Instruct"]


def test_models_reports_an_unreachable_upstream(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--url", f"http://127.0.0.1:{free_port()}"]) == 1
    assert "cannot load the catalog" in capsys.readouterr().err


def test_serve_with_two_workers(tmp_path: Path, upstream: LocalServer) -> None:
    config = tmp_path / "workers.toml"
    config.write_text(f'[upstream]\nurl = "{upstream.url}"\n[usage]\npath = ""\n')
    port = free_port()
    with running(["serve", "--config", str(config), "--port", str(port), "--workers", "2"], {}, tmp_path) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        answers = [
            httpx.post(
                url + "/v1/chat/completions",
                json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]},
                timeout=10,
            ).status_code
            for _ in range(6)
        ]
        assert answers == [200] * 6
        code, out = stop(proc, signal.SIGTERM)
    assert out.count("Started server process") == 2  # two workers, each with its own app
    assert code == 0
    assert "Traceback" not in out


# Graceful shutdown: SIGTERM drains (readiness off, new requests refused) before the process exits.

CHAT_BODY = chat_body("hi")


def drained(url: str) -> None:
    """Wait (bounded) until the gateway reports draining on /readyz."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        answer = httpx.get(url + "/readyz", timeout=2)
        if answer.status_code == 503 and answer.json()["status"] == "draining":
            return
        time.sleep(0.02)
    raise AssertionError("the gateway did not start draining")


def serve_in_front_of(
    faulty: FaultyUpstream, tmp_path: Path, grace: int
) -> tuple[str, AbstractContextManager[subprocess.Popen[str]]]:
    port = free_port()
    env = {"GATEWAY_UPSTREAM_URL": faulty.url, "GATEWAY_SERVER_SHUTDOWN_GRACE": str(grace), "GATEWAY_USAGE_PATH": ""}
    return f"http://127.0.0.1:{port}", running(["serve", "--port", str(port)], env, tmp_path)


def in_flight(pool: ThreadPoolExecutor, url: str, faulty: FaultyUpstream) -> Future[httpx.Response]:
    """A chat request sent from ``pool``, once the upstream has it (bounded wait)."""
    pending = pool.submit(httpx.post, url + "/v1/chat/completions", json=CHAT_BODY, timeout=15)
    deadline = time.monotonic() + START_TIMEOUT
    while faulty.answering < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert faulty.answering == 1
    return pending


def test_sigterm_drains_then_ends_a_stream_still_open_at_the_end_of_the_grace(tmp_path: Path) -> None:
    with FaultyUpstream("stall") as faulty:  # a stream that sends two events, then nothing
        url, process = serve_in_front_of(faulty, tmp_path, grace=2)
        with process as proc:
            wait_ready(url, proc)
            with (
                httpx.Client(base_url=url, timeout=15) as http,
                http.stream("POST", "/v1/chat/completions", json={**CHAT_BODY, "stream": True}) as stream,
            ):
                lines = stream.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))
                proc.send_signal(signal.SIGTERM)
                drained(url)
                # New requests are refused while the open stream carries on.
                refused = httpx.post(url + "/v1/chat/completions", json=CHAT_BODY, timeout=5)
                assert refused.status_code == 503
                assert refused.json()["error"]["code"] == "shutting_down"
                assert refused.headers["retry-after"] == "1"
                assert refused.headers["connection"] == "close"
                rest = list(lines)  # ends when the gateway ends the stream at the end of the grace
            events = [orjson.loads(line.removeprefix("data: ")) for line in rest if line.startswith("data: {")]
            assert events[-1]["error"]["code"] == "shutting_down"
            assert stream.status_code == 200
            code, out = proc.wait(timeout=15), proc.communicate(timeout=5)[0]
    assert code == 0
    assert "Traceback" not in out
    assert "stopping 1 requests still in flight" in out


@pytest.mark.parametrize(
    ("mode", "grace", "status", "code"),
    [
        ("slow", 30, 200, None),  # answers within the grace: the request finishes, whole, long before 30 s
        ("hang", 1, 503, "shutting_down"),  # still waiting for the upstream at the grace's end
    ],
)
def test_sigterm_and_a_request_in_flight(
    tmp_path: Path, mode: FaultMode, grace: int, status: int, code: str | None
) -> None:
    with FaultyUpstream(mode) as faulty, ThreadPoolExecutor(2) as pool:
        faulty.body_kind, faulty.head_delay = "json", 1.0
        url, process = serve_in_front_of(faulty, tmp_path, grace=grace)
        with process as proc:
            wait_ready(url, proc)
            pending = in_flight(pool, url, faulty)
            proc.send_signal(signal.SIGTERM)
            answer = pending.result(timeout=15)
            exit_code, out = proc.wait(timeout=15), proc.communicate(timeout=5)[0]
    assert answer.status_code == status
    if code is None:
        assert answer.json()["choices"][0]["message"]["content"]
    else:
        assert answer.json()["error"]["code"] == code
    assert exit_code == 0
    assert "drained in" in out
    assert "Traceback" not in out


# --------------------------------------------------------------------------- the demo, as a user runs it


class Output:
    """What a process writes to one pipe, read on a thread (so it never blocks on a full pipe)."""

    def __init__(self, stream: IO[str]) -> None:
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._lock:
                self._lines.append(line)

    def text(self) -> str:
        with self._lock:
            return "".join(self._lines)

    def wait_for(self, needle: str, timeout: float = START_TIMEOUT) -> str:
        """All the text so far, once ``needle`` is in it (bounded wait)."""
        if not wait_until(lambda: needle in self.text(), timeout=timeout, interval=0.01):
            raise AssertionError(f"{needle!r} did not appear; got:\n{self.text()}")
        return self.text()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


@dataclass
class Process:
    proc: subprocess.Popen[str]
    out: Output
    err: Output

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=15)
        self.out.join(5)
        self.err.join(5)
        return code


@contextmanager
def gateway_process(args: list[str], env: dict[str, str], cwd: Path) -> Iterator[Process]:
    """`gateway ARGS...` with stdout and stderr read apart; always stopped by its pid."""
    proc = subprocess.Popen(  # noqa: S603 - our own console script
        [GATEWAY, *args], cwd=cwd, env=clean_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    running_process = Process(proc, Output(proc.stdout), Output(proc.stderr))
    try:
        yield running_process
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        running_process.out.join(5)
        running_process.err.join(5)
        proc.stdout.close()
        proc.stderr.close()


BANNER_END = "Press Ctrl-C to stop."


def banner_value(banner: str, pattern: str) -> str:
    found = re.search(pattern, banner)
    assert found is not None, f"{pattern!r} not in the banner:\n{banner}"
    return found.group(1)


def test_demo_banner_appears_once_the_port_answers_and_its_python_example_works(tmp_path: Path) -> None:
    port = free_port()
    with gateway_process(["demo", "--port", str(port)], {}, tmp_path) as demo:
        banner = demo.out.wait_for(BANNER_END)
        # At once, with no retry: the gateway serves before it says so.
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        # The Python example, run exactly as printed (by a shell, from another directory).
        start = banner.index(" -c 'from openai import OpenAI")
        command = banner[banner.rindex("\n", 0, start) + 1 : banner.index(")'\n", start) + 2].strip()
        ran = subprocess.run(  # noqa: S603 - the banner's own example
            ["/bin/sh", "-c", command], cwd="/", env=clean_env(), capture_output=True, text=True, timeout=30
        )
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.strip() == "This is a simulated reply to: Hello"
        assert demo.stop() == 0


def test_demo_that_cannot_bind_says_so_in_one_line_without_a_banner(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ran = _gateway_command(["demo", "--port", str(port)], tmp_path)
    assert ran.returncode == 1
    assert ran.stdout == ""
    (line,) = ran.stderr.splitlines()
    assert line.startswith(f"gateway: cannot listen on 127.0.0.1:{port}: the address is in use")
    assert list(tmp_path.iterdir()) == []


def test_demo_keys_prints_two_keys_that_work_as_the_banner_says(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with gateway_process(["demo", "--keys", "--port", str(port)], {}, tmp_path) as demo:
        banner = demo.out.wait_for(BANNER_END)
        user = banner_value(banner, r"export DEMO_USER_KEY=(\S+)")
        admin = banner_value(banner, r"export DEMO_ADMIN_KEY=(\S+)")
        no_key = httpx.post(url + "/v1/chat/completions", json=CHAT_BODY, timeout=10)
        assert no_key.status_code == 401
        assert no_key.json()["error"]["code"] == "missing_api_key"
        with openai.OpenAI(base_url=url + "/v1", api_key=user, max_retries=0, timeout=10) as sdk:
            reply = sdk.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}])
            assert reply.choices[0].message.content == "This is a simulated reply to: hi"
            with pytest.raises(openai.APIStatusError) as over_budget:  # ten images: $0.03 > $0.01 a day
                sdk.images.generate(model="FLUX.1-schnell", prompt="a fox", n=10)
            assert (over_budget.value.status_code, over_budget.value.code) == (402, "budget_exceeded")
        with httpx.Client(base_url=url, timeout=10) as http:
            statuses = [
                http.post("/v1/chat/completions", json=CHAT_BODY, headers={"authorization": f"Bearer {user}"})
                for _ in range(DEMO_USER_RPM + 1)
            ]
            assert statuses[-1].status_code == 429
            assert statuses[-1].json()["error"]["code"] == "rate_limit_exceeded"
            assert http.get("/admin/usage", headers={"authorization": f"Bearer {user}"}).status_code == 401

            def usage_of_the_user() -> list[dict[str, Any]]:
                answer = http.get("/admin/usage", headers={"authorization": f"Bearer {admin}"})
                assert answer.status_code == 200, answer.text
                return [row for row in answer.json()["data"] if row["key"] == DEMO_USER and row["requests"] >= 1]

            assert wait_until(lambda: bool(usage_of_the_user()), timeout=10)
        assert demo.stop() == 0
    assert list(tmp_path.iterdir()) == []


def test_demo_honours_gateway_config_and_env_and_reloads_keys_as_serve_does(tmp_path: Path) -> None:
    carol, dave = "sk-gw-carol-0123456789", "sk-gw-dave-0123456789"

    def keys_config(*keys: str) -> str:
        tables = "".join(f'[[keys]]\nname = "k{i}"\nkey_sha256 = "{key_sha256(k)}"\n' for i, k in enumerate(keys))
        return f'[auth]\nmode = "keys"\nreload_interval = 0.1\n{tables}'

    config = tmp_path / "team.toml"
    config.write_text(keys_config(carol))
    port = free_port()
    env = {"GATEWAY_CONFIG": str(config), "GATEWAY_PORT": str(port), "GATEWAY_LIMITS_MAX_BODY_BYTES": "300"}
    with gateway_process(["demo"], env, tmp_path) as demo, httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
        banner = demo.out.wait_for(BANNER_END)
        assert f"http://127.0.0.1:{port}" in banner
        assert "Keys mode, with the config's [[keys]]" in banner

        def chat(key: str | None, content: str = "hi") -> int:
            headers = {"authorization": f"Bearer {key}"} if key else {}
            body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": content}]}
            return http.post("/v1/chat/completions", json=body, headers=headers, timeout=10).status_code

        assert chat(None) == 401
        assert chat(carol) == 200
        assert chat(carol, "x" * 400) == 413  # GATEWAY_LIMITS_MAX_BODY_BYTES
        config.write_text(keys_config(carol, dave))
        assert wait_until(lambda: chat(dave) == 200, timeout=10)
        demo.err.wait_for("config reloaded: 2 keys")
        assert demo.stop() == 0
    assert "restart" not in demo.err.text()


def test_demo_keeps_its_ledger_in_a_temporary_directory_removed_at_exit(tmp_path: Path) -> None:
    # As in a checkout: config/gateway.toml is found by itself, and its example says path = "usage.db".
    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "config" / "gateway.toml", tmp_path / "config" / "gateway.toml")
    port = free_port()
    with gateway_process(["demo", "--port", str(port)], {}, tmp_path) as demo:
        banner = demo.out.wait_for(BANNER_END)
        ledger = Path(banner_value(banner, r"Usage ledger: (\S+) \(temporary, removed at exit\)"))
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT_BODY, timeout=10)
        assert answer.status_code == 200
        assert wait_until(lambda: ledger.is_file() and bool(summarize(ledger, by="model")), timeout=10)
        assert demo.stop() == 0
    assert not ledger.parent.exists()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["config", "config/gateway.toml"]


def test_demo_keeps_a_ledger_the_operator_asked_for(tmp_path: Path) -> None:
    kept = tmp_path / "kept.db"
    port = free_port()
    with gateway_process(["demo", "--port", str(port)], {"GATEWAY_USAGE_PATH": str(kept)}, tmp_path) as demo:
        assert f"Usage ledger: {kept};" in demo.out.wait_for(BANNER_END)
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT_BODY, timeout=10)
        assert answer.status_code == 200
        assert demo.stop() == 0
    assert [row["requests"] for row in summarize(kept, by="model")] == [1]


def test_demo_on_a_postgresql_ledger_names_it_not_a_file(tmp_path: Path, postgres: PostgresServer) -> None:
    url = postgres.database()
    port = free_port()
    with gateway_process(["demo", "--port", str(port)], {"GATEWAY_USAGE_DATABASE_URL": url}, tmp_path) as demo:
        banner = demo.out.wait_for(BANNER_END)
        assert "Usage ledger: PostgreSQL ([usage] database_url); read it with:" in banner
        assert ".db" not in banner
        assert url not in banner
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT_BODY, timeout=10)
        assert answer.status_code == 200
        assert wait_until(lambda: bool(summarize_blocking(url, by="model")), timeout=10)
        assert demo.stop() == 0
    assert [row["requests"] for row in summarize_blocking(url, by="model")] == [1]


# --------------------------------------------------------------------------- usage, closed pipes, reloads


def write_ledger(path: Path, keys: Sequence[str]) -> None:
    """A ledger holding one chat request per name in ``keys``."""

    async def write() -> None:
        ledger = Ledger(path)
        await ledger.start()
        for i, key in enumerate(keys):
            ledger.record(
                UsageRecord(
                    ts=time.time(),
                    request_id=f"req-{i}",
                    key_name=key,
                    team=None,
                    model=CHAT_MODEL,
                    endpoint="/v1/chat/completions",
                    status=200,
                    prompt_tokens=3,
                    completion_tokens=4,
                    total_tokens=7,
                    cost_usd=0.001,
                    outcome="completed",
                    cut=False,
                    latency_ms=1.0,
                    ttfb_ms=1.0,
                )
            )
        await ledger.aclose()

    asyncio.run(write())


def keys_mode_config(tmp_path: Path, ledger: Path) -> Path:
    """An operator's keys-mode config: the upstream key lives in the service's environment, not here."""
    config = tmp_path / "team.toml"
    config.write_text(
        f'[auth]\nmode = "keys"\n[[keys]]\nname = "alice"\nkey_sha256 = "{key_sha256("sk-gw-alice")}"\n'
        f"[usage]\npath = {json.dumps(str(ledger))}\n"
    )
    return config


def test_usage_in_keys_mode_reads_the_ledger_without_the_upstream_key(tmp_path: Path) -> None:
    ledger = tmp_path / "usage.db"
    write_ledger(ledger, ["alice", "alice"])
    ran = _gateway_command(["usage", "--config", str(keys_mode_config(tmp_path, ledger))], tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr == ""
    assert ran.stdout.splitlines()[1].split() == ["alice", "2", "0", "6", "8", "0.0020", "-"]


def _ledger_of_version(path: Path, version: int) -> None:
    """A ledger as a gateway of schema ``version`` left it (its migrations up to there, no rows; a
    newer one: this version's tables under a higher number)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for statement in (s for step in MIGRATIONS[:version] for s in step):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {version}")
    finally:
        conn.close()


def _gateway_command(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """A gateway command run to its end (none of this process's GATEWAY_* settings)."""
    return subprocess.run(  # noqa: S603 - our own console script
        [GATEWAY, *args], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=START_TIMEOUT
    )


@pytest.mark.parametrize(
    ("version", "said"),
    [
        (SCHEMA_VERSION - 1, "written by an older gateway: this one reads version"),
        (SCHEMA_VERSION + 1, "newer than this gateway's"),
        (0, "is not a usage ledger"),
    ],
    ids=["older", "newer", "not-a-ledger"],
)
def test_usage_on_a_ledger_it_cannot_read_says_why_in_one_line(tmp_path: Path, version: int, said: str) -> None:
    """Upgrading the package before the gateway has migrated its file, or pointing at the wrong file:
    one line that says what the file is and what to do, exit 1, no traceback."""
    ledger = tmp_path / "usage.db"
    _ledger_of_version(ledger, version)
    config = tmp_path / "plain.toml"
    config.write_text(f"[usage]\npath = {json.dumps(str(ledger))}\n")
    ran = _gateway_command(["usage", "--config", str(config)], tmp_path)
    assert ran.returncode == 1
    assert ran.stdout == ""
    assert ran.stderr.count("\n") == 1, ran.stderr
    assert ran.stderr.startswith(f"gateway: usage ledger: {ledger} ")
    assert said in ran.stderr


def test_usage_piped_into_head_ends_quietly(tmp_path: Path) -> None:
    ledger = tmp_path / "usage.db"
    write_ledger(ledger, [f"key-{i:05d}" for i in range(5000)])  # a table well over a pipe's 64 KiB
    config = tmp_path / "plain.toml"
    config.write_text(f"[usage]\npath = {json.dumps(str(ledger))}\n")
    usage = subprocess.Popen(  # noqa: S603 - our own console script
        [GATEWAY, "usage", "--config", str(config)],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert usage.stdout is not None
    head = subprocess.Popen(["head", "-1"], stdin=usage.stdout, stdout=subprocess.PIPE)  # noqa: S607
    usage.stdout.close()  # head alone reads it now
    first, _ = head.communicate(timeout=START_TIMEOUT)
    _, errors = usage.communicate(timeout=START_TIMEOUT)
    assert first.split() == [b"KEY", b"REQUESTS", b"CACHED", b"PROMPT", b"TOK", b"COMPLETION", b"TOK", b"COST", b"USD",
                             b"SAVED", b"USD"]  # fmt: skip
    assert errors == b""
    assert usage.returncode == EXIT_STDOUT_CLOSED


@pytest.mark.parametrize("args", [["keys", "new", "ci-bot"], ["check-config"]], ids=["keys-new", "check-config"])
def test_a_command_whose_stdout_is_closed_exits_quietly(tmp_path: Path, args: list[str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will ever read: every write fails with EPIPE
    try:
        ran = subprocess.run(  # noqa: S603 - our own console script
            [GATEWAY, *args],
            cwd=tmp_path,
            env=clean_env(),
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=START_TIMEOUT,
        )
    finally:
        os.close(write_end)
    assert ran.stderr == ""
    assert ran.returncode == EXIT_STDOUT_CLOSED


def test_a_reload_names_only_settings_that_changed_not_command_line_flags(
    tmp_path: Path, upstream: LocalServer
) -> None:
    alice, bob, carol = "sk-gw-alice-0123456789", "sk-gw-bob-0123456789", "sk-gw-carol-0123456789"

    def keys_config(*keys: str, extra: str = "") -> str:
        tables = "".join(f'[[keys]]\nname = "k{i}"\nkey_sha256 = "{key_sha256(k)}"\n' for i, k in enumerate(keys))
        return f'[auth]\nmode = "keys"\nreload_interval = 0.1\n{extra}{tables}'

    config = tmp_path / "team.toml"
    config.write_text(keys_config(alice))
    port = free_port()  # a flag: the file says nothing about the port
    env = {"GATEWAY_UPSTREAM_URL": upstream.url, "GATEWAY_UPSTREAM_API_KEY": "sk-org", "GATEWAY_USAGE_PATH": ""}
    with gateway_process(["serve", "--config", str(config), "--port", str(port)], env, tmp_path) as serve:
        url = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: _answers(url), timeout=START_TIMEOUT)  # the reloader watches the file from here
        config.write_text(keys_config(alice, bob))
        first = line_with(serve.err.wait_for("config reloaded: 2 keys"), "config reloaded: 2 keys")
        assert "restart" not in first
        config.write_text(keys_config(alice, bob, carol, extra="[catalog]\nttl = 30.0\n"))
        second = line_with(serve.err.wait_for("config reloaded: 3 keys"), "config reloaded: 3 keys")
        assert "applied only after a restart: [catalog] ttl" in second
        assert "port" not in second
        assert serve.stop() == 0


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def line_with(text: str, needle: str) -> str:
    return next(line for line in text.splitlines() if needle in line)


def test_the_demo_banner_says_how_to_get_the_sdk_when_its_python_lacks_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """After `make demo` (the runtime only), the Python example starts with the one install it needs."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "openai" else real_find_spec(name, *args)
    )
    banner = _demo_banner(Settings(), 8080, None, DemoLedger("", temporary=False))
    python = shlex.quote(sys.executable)
    install = banner.index(f"  {python} -m pip install openai\n")
    assert install < banner.index(f"  {python} -c 'from openai import OpenAI")
