"""Shared helpers for the gateway tests: model names, settings, error-shape checks, shared servers,
keys-mode configs and small utilities (fixtures live in the conftest.py files)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from gateway.app import create_app
from gateway.config import Settings, load_settings
from gateway.demo import DemoState, RecordedRequest, create_demo_upstream
from gateway.server.thread import LocalServer, serve_in_thread

StartGateway = Callable[..., LocalServer]

# Models of gateway.demo.default_catalog(), one per case worth testing.
CHAT_MODEL = "Qwen2.5-32B-Instruct-FP8"  # text, healthy, tool_use
DEGRADED_MODEL = "DeepSeek-R1-Distill-Qwen-32B"  # reasoning, health "degraded"
UNHEALTHY_MODEL = "Qwen2.5-Coder-32B-Instruct"  # code, health "unhealthy"
MAINTENANCE_MODEL = "Mistral-7B-Instruct-v0.3"  # text, health "maintenance"
NO_HEALTH_MODEL = "Phi-3.5-mini-instruct"  # text, no health_status at all
EMBEDDING_MODEL = "bge-m3"
IMAGE_MODEL = "FLUX.1-schnell"
TTS_MODEL = "Kokoro-82M"
TTS_VOICE = "af_bella"
STT_MODEL = "whisper-large-v3"
VIDEO_MODEL = "Wan2.1-T2V-1.3B"

CATALOG_PATH = "/api/models"
STATUS_PATH = "/api/status"
ERROR_KEYS = frozenset({"message", "type", "param", "code"})
# Text that would betray a leaked stack trace or internal detail in an error body.
TRACE_MARKERS = ("Traceback", 'File "', "site-packages", "/gateway/", "Exception:")

CHAT_PATH = "/v1/chat/completions"


def chat_body(content: str = "Hello", model: str = CHAT_MODEL) -> dict[str, Any]:
    """A minimal chat request: one user message."""
    return {"model": model, "messages": [{"role": "user", "content": content}]}


CHAT_BODY: dict[str, Any] = chat_body()


def gateway_env(upstream_url: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """A gateway's GATEWAY_* environment in front of ``upstream_url``: no usage ledger file and no
    background reads of /api/status unless a test asks for them (GATEWAY_USAGE_PATH,
    GATEWAY_CATALOG_STATUS_INTERVAL: many upstream stand-ins count every request), then ``env``."""
    return {
        "GATEWAY_UPSTREAM_URL": upstream_url,
        "GATEWAY_USAGE_PATH": "",
        "GATEWAY_CATALOG_STATUS_INTERVAL": "0",
        **(env or {}),
    }


def gateway_settings(upstream_url: str, env: dict[str, str] | None = None, config: Path | None = None) -> Settings:
    return load_settings(config, gateway_env(upstream_url, env))


def error_object(raw: bytes, *, echoed: str = "") -> dict[str, Any]:
    """``raw`` is an OpenAI error envelope: exactly message/type/param/code under "error", a
    non-empty message, a string type, and no stack trace text (unless the client sent that text
    itself, ``echoed``, and the message quotes it). Returns the inner object."""
    text = raw.decode("utf-8")
    for marker in TRACE_MARKERS:
        assert marker not in text or marker in echoed, f"error body leaks {marker!r}: {text}"
    data = orjson.loads(raw)
    assert isinstance(data, dict), text
    assert set(data) == {"error"}, text
    error = data["error"]
    assert isinstance(error, dict), text
    assert set(error) == ERROR_KEYS, text
    assert isinstance(error["message"], str), text
    assert error["message"], text
    assert isinstance(error["type"], str), text
    assert error["param"] is None or isinstance(error["param"], str), text
    return error


def assert_error_envelope(raw: bytes, *, code: str | None, error_type: str | None = None) -> dict[str, Any]:
    """``raw`` is the gateway's OpenAI error envelope (``error_object``) with the expected code (and
    type). Returns the inner object."""
    error = error_object(raw)
    text = raw.decode("utf-8")
    assert error["code"] == code, text
    if error_type is not None:
        assert error["type"] == error_type, text
    return error


def assert_gateway_error(
    response: httpx.Response, status: int, code: str | None, error_type: str | None = None
) -> dict[str, Any]:
    """An error the gateway answered itself: status, JSON content type, the exact envelope."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    return assert_error_envelope(response.content, code=code, error_type=error_type)


def sdk_error(exc: openai.APIStatusError, status: int, code: str) -> dict[str, Any]:
    """The SDK exception carries the gateway's status, code and envelope (``exc.body`` is the inner
    object); the raw response body has the exact envelope too."""
    assert exc.status_code == status
    assert exc.code == code
    body = exc.body
    assert isinstance(body, dict)
    assert set(body) == ERROR_KEYS
    assert_error_envelope(exc.response.content, code=code)
    message = body["message"]
    assert isinstance(message, str)
    assert message in str(exc)
    return body


def forwarded(state: DemoState) -> list[str]:
    """``METHOD path`` of every request the upstream received, except the gateway's catalog and
    status reads."""
    return [f"{r.method} {r.path}" for r in state.requests if r.path not in (CATALOG_PATH, STATUS_PATH)]


def requests_on(state: DemoState, path: str) -> list[RecordedRequest]:
    return [r for r in state.requests if r.path == path]


def assert_upstream_untouched(state: DemoState, path: str | None = None) -> None:
    """The upstream received nothing but catalog loads (on ``path``, when given)."""
    if path is None:
        assert forwarded(state) == []
    else:
        assert requests_on(state, path) == []


def wait_until(condition: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Poll ``condition`` at most ``timeout`` seconds (and a bounded number of times)."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 1):
        if condition():
            return True
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    return condition()


def is_ready(http: httpx.Client) -> bool:
    return http.get("/readyz").status_code == 200


def normal_chat(http: httpx.Client, **headers: str) -> httpx.Response:
    """A plain, valid chat call; asserts the gateway served it."""
    response = http.post(
        "/v1/chat/completions", json=CHAT_BODY, headers={"authorization": "Bearer sk-client", **headers}
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"].startswith("This is a simulated reply")
    return response


# --------------------------------------------------------------------------- shared servers


def fresh_demo_state() -> DemoState:
    """The simulated upstream's state as conftest makes it (fast pacing, instant video jobs)."""
    return DemoState(token_delay=0.002, video_seconds=0.0)


def reset_demo_state(state: DemoState) -> DemoState:
    """Reset a served ``state`` in place (the running upstream keeps the same object)."""
    fresh = fresh_demo_state()
    for f in dataclasses.fields(DemoState):
        setattr(state, f.name, getattr(fresh, f.name))
    return state


@contextlib.contextmanager
def shared_servers(env: dict[str, str] | None = None) -> Iterator[tuple[DemoState, LocalServer, LocalServer]]:
    """A simulated upstream and a gateway in front of it, for a whole test module (starting two
    servers per test costs more than the tests). Yields (state, upstream, gateway)."""
    state = fresh_demo_state()
    # As conftest's gateways: no usage ledger file (GATEWAY_USAGE_PATH="").
    with (
        serve_in_thread(create_demo_upstream(state)) as upstream,
        serve_in_thread(create_app(gateway_settings(upstream.url, env))) as gateway,
    ):
        with httpx.Client(base_url=gateway.url, timeout=10) as http:
            assert wait_until(lambda: is_ready(http)), "the gateway never loaded the catalog"
        yield state, upstream, gateway


Servers = tuple[DemoState, LocalServer, LocalServer]


def module_server_fixtures(env: dict[str, str] | None = None) -> tuple[Any, Any, Any, Any]:
    """Fixtures that override conftest's ``demo_state``, ``upstream`` and ``gateway`` with one
    simulated upstream and one gateway (extra ``env`` settings) shared by a whole module, the
    upstream's state reset before each test. Assign them at module level:
    ``_servers, demo_state, upstream, gateway = module_server_fixtures({...})``."""

    @pytest.fixture(scope="module")
    def _servers() -> Iterator[Servers]:
        with shared_servers(env) as servers:
            yield servers

    @pytest.fixture
    def demo_state(_servers: Servers) -> DemoState:
        return reset_demo_state(_servers[0])

    @pytest.fixture
    def upstream(_servers: Servers, demo_state: DemoState) -> LocalServer:
        return _servers[1]

    @pytest.fixture
    def gateway(_servers: Servers, demo_state: DemoState) -> LocalServer:
        return _servers[2]

    return _servers, demo_state, upstream, gateway


# --------------------------------------------------------------------------- keys mode


def key_sha256(secret: str) -> str:
    """What a ``[[keys]]`` table holds of a key: its SHA-256, hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


def key_secret(name: str) -> str:
    """The gateway key of ``name`` in configs made by ``keys_config``."""
    return f"sk-gw-{name}-000000"


def key_table(name: str, extra: str = "") -> str:
    """A ``[[keys]]`` table for ``name`` (its secret is ``key_secret(name)``), with extra TOML lines."""
    return (
        f'[[keys]]\nname = "{name}"\nkey_sha256 = "{key_sha256(key_secret(name))}"\nteam = "team-{name[0]}"\n{extra}\n'
    )


def keys_config(path: Path, tables: str, *, ledger: Path | None = None, extra: str = "") -> Path:
    """Write a keys-mode config (an ``admin`` key included, no reload polling) to ``path``."""
    usage = f'[usage]\npath = "{ledger}"\nflush_interval = 0.05\n' if ledger is not None else ""
    path.write_text(
        f'[auth]\nmode = "keys"\nreload_interval = 0\n{usage}{extra}\n{key_table("admin", "admin = true")}{tables}'
    )
    return path
