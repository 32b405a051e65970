"""Fixtures of the routing tests: a gateway with ``[[aliases]]`` (and more TOML) in front of the
simulated upstream, started from a config file as an operator would."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.server.thread import LocalServer
from tests.helpers.gateway import StartGateway

RoutedGateway = Callable[..., LocalServer]


def alias_table(name: str, models: list[str], strategy: str = "ordered", fallback: bool | None = None) -> str:
    """One ``[[aliases]]`` table."""
    listed = ", ".join(f'"{m}"' for m in models)
    extra = "" if fallback is None else f"fallback = {str(fallback).lower()}\n"
    return f'[[aliases]]\nname = "{name}"\nmodels = [{listed}]\nstrategy = "{strategy}"\n{extra}\n'


@pytest.fixture
def routed_gateway(start_gateway: StartGateway, tmp_path: Path) -> RoutedGateway:
    """Start a gateway whose config file holds ``toml`` (aliases, [routing], ...), with extra env."""

    def start(toml: str, env: dict[str, str] | None = None, upstream_url: str | None = None) -> LocalServer:
        config = tmp_path / "gateway.toml"
        config.write_text(toml)
        return start_gateway(env, upstream_url=upstream_url, config=config)

    return start
