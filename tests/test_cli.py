"""The `gateway` command as an operator uses it: real processes, stopped by their pid."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import httpx
import orjson
import pytest

from gateway.cli import main
from gateway.localserver import LocalServer
from tests.conftest import CHAT_MODEL
from tests.helpers_upstreams import FaultMode, FaultyUpstream

GATEWAY = str(Path(sys.executable).parent / "gateway")
START_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def running(args: list[str], env: dict[str, str], cwd: Path) -> Iterator[subprocess.Popen[str]]:
    """Start a gateway process; always stop it by its pid."""
    proc = subprocess.Popen(  # noqa: S603 - our own console script
        [GATEWAY, *args],
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} | env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def wait_ready(url: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the gateway exited during start-up"
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("the gateway did not become ready in time")


def stop(proc: subprocess.Popen[str], sig: signal.Signals) -> tuple[int, str]:
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=15)
    return proc.returncode, out


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
        code, out = stop(proc, signal.SIGTERM)
    assert code == 0
    assert f"curl -s {url}/v1/chat/completions" in out
    assert f'base_url="{url}/v1"' in out


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

CHAT_BODY = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]}


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
