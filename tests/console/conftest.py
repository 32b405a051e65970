"""A keys-mode gateway with a usage ledger in front of the simulated upstream, with traffic sent
through it, shared by a test module (``console_site``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.app import create_app
from gateway.config import load_settings
from gateway.demo import DemoState, create_demo_upstream
from gateway.server.thread import LocalServer, serve_in_thread
from gateway.usage.reports import summarize
from tests.helpers.gateway import (
    CHAT_MODEL,
    EMBEDDING_MODEL,
    fresh_demo_state,
    gateway_env,
    is_ready,
    key_secret,
    key_table,
    keys_config,
    wait_until,
)

ORG_KEY = "sk-org-upstream-console-test"
SECRET_PROMPT = "the-prompt-text-nobody-may-see-41c7"  # sent in bodies: must never show in the console


@dataclass(frozen=True)
class Site:
    state: DemoState
    gateway: LocalServer
    ledger: Path
    admin: dict[str, str]  # the admin key's Authorization header
    day: str  # the UTC day the traffic landed on (ISO): the console's date range in the tests


MIDNIGHT_MARGIN = timedelta(seconds=120)  # far more than the traffic and a module's tests take


def clear_of_midnight() -> str:
    """The UTC day (ISO) on which traffic sent now lands whole, and that is still "today" for the
    module's tests (the budgets panel's day): if midnight UTC is less than ``MIDNIGHT_MARGIN`` away,
    waits until it has passed."""
    now = datetime.now(UTC)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
    if midnight - now < MIDNIGHT_MARGIN:
        time.sleep((midnight - now).total_seconds() + 0.5)  # at most the margin, once
    return datetime.now(UTC).date().isoformat()


def send_traffic(url: str, ledger: Path | Callable[[], list[dict[str, Any]]]) -> str:
    """Chats by alice and bob, an embedding, and refusals (unknown models: counted, not in the ledger);
    waits until the ledger (a SQLite file, or a function giving its summary by key) holds the requests.
    Returns the UTC day (ISO) they all landed on."""
    day = clear_of_midnight()
    for name, count in (("alice", 3), ("bob", 2)):
        with openai.OpenAI(base_url=url + "/v1", api_key=key_secret(name), max_retries=0, timeout=15) as sdk:
            for i in range(count):
                sdk.chat.completions.create(
                    model=CHAT_MODEL, messages=[{"role": "user", "content": f"{SECRET_PROMPT} {i}"}]
                )
            if name == "bob":
                sdk.embeddings.create(model=EMBEDDING_MODEL, input=SECRET_PROMPT)
            with pytest.raises(openai.NotFoundError):
                sdk.chat.completions.create(
                    model="no-such-model-xyz", messages=[{"role": "user", "content": SECRET_PROMPT}]
                )
    by_key = partial(summarize, ledger, by="key") if isinstance(ledger, Path) else ledger
    assert wait_until(lambda: sum(r["requests"] for r in by_key()) == 6, timeout=10), by_key()
    assert datetime.now(UTC).date().isoformat() == day, "the traffic took longer than MIDNIGHT_MARGIN"
    return day


@pytest.fixture(scope="module")
def console_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("console")
    ledger = tmp / "usage.db"
    tables = key_table("alice", "budget_usd_daily = 5.0\nbudget_usd_monthly = 100.0") + key_table("bob")
    config = keys_config(tmp / "gateway.toml", tables, ledger=ledger, extra="[console]\nlive_interval = 1\n")
    state = fresh_demo_state()
    with serve_in_thread(create_demo_upstream(state)) as upstream:
        env = {**gateway_env(upstream.url), "GATEWAY_UPSTREAM_API_KEY": ORG_KEY}
        env.pop("GATEWAY_USAGE_PATH")  # the config file's ledger
        with serve_in_thread(create_app(load_settings(config, env), config_path=config, env=env)) as gateway:
            with httpx.Client(base_url=gateway.url, timeout=10) as http:
                assert wait_until(lambda: is_ready(http))
            day = send_traffic(gateway.url, ledger)
            yield Site(state, gateway, ledger, {"Authorization": f"Bearer {key_secret('admin')}"}, day)
