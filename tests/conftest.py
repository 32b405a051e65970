"""Shared fixtures: the simulated upstream and the gateway as real servers on 127.0.0.1.

Each server runs under uvicorn in its own thread (gateway.server.thread), so the tests talk to them
over real sockets with the official openai SDK (sync client) or httpx, as users do. Helpers that
are not fixtures live in tests/helpers/; test modules import them from there, never from here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import openai
import pytest

from gateway.app import create_app
from gateway.config import load_settings
from gateway.demo import DemoState, create_demo_upstream
from gateway.server.thread import LocalServer, serve_in_thread
from tests.helpers.clocks import FakeClock
from tests.helpers.gateway import StartGateway, fresh_demo_state, gateway_env
from tests.helpers.postgres import PostgresServer, postgres_server
from tests.helpers.redis import RedisServer, redis_server


@pytest.fixture(autouse=True)
def _state_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test writes the default ledger in the real home: the default location ($XDG_STATE_HOME)
    is a temporary directory, for this process and the gateway processes tests start."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state-home")))


@pytest.fixture
def demo_state() -> DemoState:
    """The simulated upstream's state: its catalog, counters and recorded requests."""
    return fresh_demo_state()


@pytest.fixture
def upstream(demo_state: DemoState) -> Iterator[LocalServer]:
    with serve_in_thread(create_demo_upstream(demo_state)) as server:
        yield server


@pytest.fixture
def start_gateway(upstream: LocalServer) -> Iterator[StartGateway]:
    """Start a gateway in front of the simulated upstream, with extra GATEWAY_* settings."""
    with ExitStack() as stack:

        def start(
            env: dict[str, str] | None = None, upstream_url: str | None = None, config: Path | None = None
        ) -> LocalServer:
            full_env = gateway_env(upstream_url or upstream.url, env)
            app = create_app(load_settings(config, full_env), config_path=config, env=full_env)
            return stack.enter_context(serve_in_thread(app))

        yield start


@pytest.fixture
def gateway(start_gateway: StartGateway) -> LocalServer:
    """A gateway with default settings (pass-through auth)."""
    return start_gateway()


@pytest.fixture
def client(gateway: LocalServer) -> Iterator[openai.OpenAI]:
    """The official SDK pointed at the gateway, as a developer would use it."""
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-client", max_retries=0, timeout=15) as sdk:
        yield sdk


@pytest.fixture
def http(gateway: LocalServer) -> Iterator[httpx.Client]:
    """Plain HTTP to the gateway, for what the SDK does not cover."""
    with httpx.Client(base_url=gateway.url, timeout=15) as c:
        yield c


@pytest.fixture(scope="session")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server per test session (per worker); tests keep apart by key prefix."""
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server per test session (per worker); each test makes its own database."""
    with postgres_server() as server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock at T0 (tests.helpers.clocks), moved by hand or by the virtual-time loop."""
    return FakeClock()
