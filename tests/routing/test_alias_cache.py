"""The response cache and aliases (docs/cache.md): the key has the model that serves, not the name the
client sent, so a request through an alias and the same request naming that model share one entry,
in either order; the partitions still keep callers apart, and an alias served by another model
does not share the entry."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from gateway.demo import DemoState
from tests.helpers.gateway import (
    CHAT_MODEL,
    CHAT_PATH,
    STT_MODEL,
    StartGateway,
    key_secret,
    key_table,
    keys_config,
    requests_on,
)
from tests.routing.conftest import alias_table

LLAMA = "Llama-3.1-8B-Instruct"
WAIT = 15.0


def sdk(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=WAIT)


def chat(client: openai.OpenAI, model: str, content: str) -> Any:
    messages: Any = [{"role": "user", "content": content}]
    return client.chat.completions.with_raw_response.create(model=model, messages=messages, temperature=0)


@pytest.fixture
def cached_with_aliases(start_gateway: StartGateway, tmp_path: Path) -> str:
    """A keys-mode gateway (key partition) with the cache on and two aliases: ``chat-default`` served
    by CHAT_MODEL, ``chat-small`` by LLAMA."""
    tables = alias_table("chat-default", [CHAT_MODEL]) + alias_table("chat-small", [LLAMA])
    config = keys_config(tmp_path / "gateway.toml", key_table("alice") + key_table("bob"),
                         extra='[cache]\nenabled = true\npartition = "key"\n' + tables)  # fmt: skip
    return start_gateway({"GATEWAY_UPSTREAM_API_KEY": "sk-org"}, config=config).url


def test_an_alias_request_then_the_same_request_to_its_model_is_a_hit(
    cached_with_aliases: str, demo_state: DemoState
) -> None:
    with sdk(cached_with_aliases, key_secret("alice")) as alice:
        through_alias = chat(alice, "chat-default", "alias first")
        direct = chat(alice, CHAT_MODEL, "alias first")
    assert through_alias.headers["cache-status"] == "flexai-gateway; fwd=miss; stored"
    assert direct.headers["cache-status"].startswith("flexai-gateway; hit; ttl=")
    assert direct.parse().id == through_alias.parse().id  # the stored answer
    assert direct.parse().model == through_alias.parse().model == CHAT_MODEL
    assert direct.headers["x-gateway-model"] == CHAT_MODEL
    assert len(requests_on(demo_state, CHAT_PATH)) == 1


def test_a_request_to_a_model_then_the_same_through_its_alias_is_a_hit_naming_the_model(
    cached_with_aliases: str, demo_state: DemoState
) -> None:
    with sdk(cached_with_aliases, key_secret("alice")) as alice:
        direct = chat(alice, CHAT_MODEL, "model first")
        through_alias = chat(alice, "chat-default", "model first")
    assert direct.headers["cache-status"] == "flexai-gateway; fwd=miss; stored"
    assert through_alias.headers["cache-status"].startswith("flexai-gateway; hit; ttl=")
    assert through_alias.parse().id == direct.parse().id
    # The replay names what a live answer through the alias names: the model that served.
    assert through_alias.parse().model == CHAT_MODEL
    assert through_alias.headers["x-gateway-model"] == CHAT_MODEL
    assert len(requests_on(demo_state, CHAT_PATH)) == 1


def test_partitions_and_the_serving_model_still_separate_entries(
    cached_with_aliases: str, demo_state: DemoState
) -> None:
    with sdk(cached_with_aliases, key_secret("alice")) as alice, sdk(cached_with_aliases, key_secret("bob")) as bob:
        stored = chat(alice, CHAT_MODEL, "kept apart")
        other_key = chat(bob, "chat-default", "kept apart")  # another key's partition
        other_model = chat(alice, "chat-small", "kept apart")  # an alias served by another model
        again = chat(alice, "chat-small", "kept apart")
    assert stored.headers["cache-status"].endswith("stored")
    assert "hit" not in other_key.headers["cache-status"]
    assert "hit" not in other_model.headers["cache-status"]
    assert other_model.headers["x-gateway-model"] == other_model.parse().model == LLAMA
    assert again.headers["cache-status"].startswith("flexai-gateway; hit")
    assert again.parse().model == LLAMA
    sent = [orjson.loads(r.body)["model"] for r in requests_on(demo_state, CHAT_PATH)]
    assert sent == [CHAT_MODEL, CHAT_MODEL, LLAMA]


def test_a_transcription_through_an_alias_shares_the_entry_of_its_model(
    start_gateway: StartGateway, tmp_path: Path, demo_state: DemoState
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[cache]\nenabled = true\n" + alias_table("stt", [STT_MODEL]))
    url = start_gateway(config=config).url
    audio = ("a.wav", os.urandom(4_000), "audio/wav")
    opt_in = {"cache-control": "max-age=60"}  # transcriptions are cached when the client opts in
    with sdk(url, "sk-client") as client:
        create = client.audio.transcriptions.with_raw_response.create
        through_alias = create(model="stt", file=audio, extra_headers=opt_in)
        direct = create(model=STT_MODEL, file=audio, extra_headers=opt_in)
        other_file = create(model=STT_MODEL, file=("a.wav", os.urandom(4_000), "audio/wav"), extra_headers=opt_in)
    assert through_alias.headers["cache-status"] == "flexai-gateway; fwd=miss; stored"
    assert direct.headers["cache-status"].startswith("flexai-gateway; hit; ttl=")
    assert "hit" not in other_file.headers["cache-status"]  # the data still counts
    assert direct.headers["x-gateway-model"] == STT_MODEL
    assert len(requests_on(demo_state, "/v1/audio/transcriptions")) == 2
