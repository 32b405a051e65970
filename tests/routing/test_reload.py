"""``[[aliases]]`` and ``[routing]`` are reloaded with the keys (docs/routing.md, docs/usage.md): a
changed file is applied without a restart, a bad one is refused and the running aliases keep
serving, and neither is reported as needing a restart."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.demo import DemoState
from tests.helpers.gateway import CHAT_MODEL, StartGateway, key_secret, key_table, wait_until
from tests.routing.conftest import alias_table

LLAMA = "Llama-3.1-8B-Instruct"
WAIT = 15.0
HI: Any = [{"role": "user", "content": "Hi"}]


def config_text(tables: str) -> str:
    return f'[auth]\nmode = "keys"\nreload_interval = 0.1\n{tables}\n{key_table("alice")}'


def serving_model(url: str, model: str) -> str | None:
    """The model that served a chat request to ``model`` (None: refused)."""
    client = openai.OpenAI(base_url=url + "/v1", api_key=key_secret("alice"), max_retries=0, timeout=WAIT)
    with client:
        try:
            raw = client.chat.completions.with_raw_response.create(model=model, messages=HI)
        except openai.APIStatusError:
            return None
    return raw.headers["x-gateway-model"]


def alias_ids(url: str) -> set[str]:
    listed = httpx.get(url + "/v1/models", headers={"authorization": f"Bearer {key_secret('alice')}"}, timeout=WAIT)
    return {m["id"] for m in listed.json()["data"] if m.get("alias")}


def test_a_reload_applies_new_aliases_and_routing_and_refuses_a_bad_file(
    start_gateway: StartGateway, tmp_path: Path, demo_state: DemoState, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.auth.reload")
    config = tmp_path / "gateway.toml"
    config.write_text(config_text(alias_table("chat", [CHAT_MODEL])))
    url = start_gateway({"GATEWAY_UPSTREAM_API_KEY": "sk-org"}, config=config).url
    demo_state.faults[CHAT_MODEL] = "503"
    assert serving_model(url, "chat") is None  # no fallback yet: the 503 is relayed
    assert alias_ids(url) == {"chat"}

    # The alias now lists a second model, a new alias appears, [routing] turns fallback on.
    config.write_text(
        config_text(
            '[routing]\nfallback = true\nstrategy = "ordered"\n'
            + alias_table("chat", [CHAT_MODEL, LLAMA])
            + alias_table("small", [LLAMA])
        )
    )
    assert wait_until(lambda: alias_ids(url) == {"chat", "small"}, WAIT)
    assert serving_model(url, "chat") == LLAMA  # the alias's new model, after CHAT_MODEL's 503
    assert serving_model(url, "small") == LLAMA
    assert serving_model(url, CHAT_MODEL) is not None  # [routing] fallback = true for model names too
    reloaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("config reloaded")]
    assert reloaded
    assert all("restart" not in line for line in reloaded), reloaded

    # An alias that lists itself is refused with the whole file: the running aliases keep serving.
    config.write_text(config_text(alias_table("chat", ["chat"])))
    assert wait_until(lambda: any("reload refused" in r.getMessage() for r in caplog.records), WAIT)
    assert alias_ids(url) == {"chat", "small"}
    assert serving_model(url, "small") == LLAMA

    # Removing an alias takes its name away.
    config.write_text(config_text(alias_table("chat", [LLAMA])))
    assert wait_until(lambda: alias_ids(url) == {"chat"}, WAIT)
    assert serving_model(url, "small") is None
    demo_state.faults.clear()
    assert serving_model(url, "chat") == LLAMA
