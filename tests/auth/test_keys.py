"""Keys mode end to end: 401s, per-key policy (403, hidden models), RPM/TPM 429s, reloads."""

from __future__ import annotations

import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import httpx
import openai
import pytest

from gateway.auth.keys import KeyRing, new_key
from gateway.cli import main
from gateway.config import KeySettings, SettingsError, load_settings
from gateway.demo import DemoState
from gateway.server.thread import LocalServer
from tests.helpers.gateway import CHAT_MODEL, CHAT_PATH, StartGateway, chat_body, key_sha256, wait_until

ORG_KEY = "sk-org-upstream-secret"
ENV = {"GATEWAY_UPSTREAM_API_KEY": ORG_KEY}
BODY = chat_body("hi")
WAIT = 10.0


KEYS = {
    "alice": "sk-gw-alice-0123456789",
    "bob": "sk-gw-bob-0123456789",
    "limited": "sk-gw-limited-0123456789",
    "tokens": "sk-gw-tokens-0123456789",
    "off": "sk-gw-off-0123456789",
    "old": "sk-gw-old-0123456789",
    "admin": "sk-gw-admin-0123456789",
}


def config_text(extra: str = "") -> str:
    return f"""
[auth]
mode = "keys"
reload_interval = 0.1

[[keys]]
name = "alice"
key_sha256 = "{key_sha256(KEYS["alice"])}"
team = "research"

[[keys]]
name = "bob"
key_sha256 = "{key_sha256(KEYS["bob"])}"
models = ["Qwen*"]
categories = ["text", "multimodal"]

[[keys]]
name = "limited"
key_sha256 = "{key_sha256(KEYS["limited"])}"
rpm = 3

[[keys]]
name = "tokens"
key_sha256 = "{key_sha256(KEYS["tokens"])}"
tpm = 50

[[keys]]
name = "off"
key_sha256 = "{key_sha256(KEYS["off"])}"
disabled = true

[[keys]]
name = "old"
key_sha256 = "{key_sha256(KEYS["old"])}"
expires = 2020-01-01

[[keys]]
name = "admin"
key_sha256 = "{key_sha256(KEYS["admin"])}"
admin = true
{extra}"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(config_text())
    return path


@pytest.fixture
def keyed(start_gateway: StartGateway, config: Path) -> LocalServer:
    return start_gateway(ENV, config=config)


@pytest.fixture
def sdk_for(keyed: LocalServer) -> Iterator[Callable[[str], openai.OpenAI]]:
    clients: list[openai.OpenAI] = []

    def make(key: str) -> openai.OpenAI:
        client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=key, max_retries=0, timeout=WAIT)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def post(
    server: LocalServer, key: str | None, body: Mapping[str, object] = BODY, path: str = CHAT_PATH
) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}".strip()} if key is not None else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=WAIT)


def test_valid_key_and_the_organisation_key_goes_upstream(
    sdk_for: Callable[[str], openai.OpenAI], demo_state: DemoState
) -> None:
    reply = sdk_for(KEYS["alice"]).chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "x"}]
    )
    assert reply.choices[0].message.content
    forwarded = [r for r in demo_state.requests if r.path == CHAT_PATH]
    assert [r.headers["authorization"] for r in forwarded] == [f"Bearer {ORG_KEY}"]


@pytest.mark.parametrize("key", [None, "sk-gw-wrong", KEYS["off"], KEYS["old"], ""])
def test_missing_wrong_disabled_or_expired_keys_get_401(
    keyed: LocalServer, demo_state: DemoState, key: str | None
) -> None:
    answer = post(keyed, key)
    assert answer.status_code == 401
    error = answer.json()["error"]
    assert error["type"] == "authentication_error"
    assert error["code"] in ("invalid_api_key", "missing_api_key")
    for name in KEYS:  # no hint about which keys exist
        assert name not in error["message"]
    assert not [r for r in demo_state.requests if r.path == CHAT_PATH]


def test_sdk_raises_authentication_error(sdk_for: Callable[[str], openai.OpenAI]) -> None:
    with pytest.raises(openai.AuthenticationError):
        sdk_for("sk-gw-nope").models.list()


def test_policy_refuses_other_models_and_categories_with_403(
    sdk_for: Callable[[str], openai.OpenAI], demo_state: DemoState
) -> None:
    bob = sdk_for(KEYS["bob"])
    with pytest.raises(openai.PermissionDeniedError) as caught:
        bob.chat.completions.create(model="Llama-3.1-8B-Instruct", messages=[{"role": "user", "content": "x"}])
    assert caught.value.code == "model_not_allowed"
    with pytest.raises(openai.PermissionDeniedError):
        bob.embeddings.create(model="bge-m3", input="x")  # category embedding is not allowed
    assert bob.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "x"}]).choices
    assert [r.path for r in demo_state.requests if r.method == "POST"] == [CHAT_PATH]


def test_models_list_hides_what_the_key_may_not_use(sdk_for: Callable[[str], openai.OpenAI]) -> None:
    bob_sees = {m.id for m in sdk_for(KEYS["bob"]).models.list()}
    assert bob_sees == {CHAT_MODEL, "Qwen2.5-VL-7B-Instruct"}
    assert len({m.id for m in sdk_for(KEYS["alice"]).models.list()}) > len(bob_sees)
    with pytest.raises(openai.NotFoundError):
        sdk_for(KEYS["bob"]).models.retrieve("bge-m3")


def test_rpm_limit_answers_429_with_openai_headers(keyed: LocalServer, demo_state: DemoState) -> None:
    answers = [post(keyed, KEYS["limited"]) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["2", "1", "0", "0"]
    assert all(a.headers["x-ratelimit-limit-requests"] == "3" for a in answers)
    refused = answers[-1]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    assert len([r for r in demo_state.requests if r.path == CHAT_PATH]) == 3
    assert post(keyed, KEYS["alice"]).status_code == 200  # other keys are not affected


def test_sdk_raises_rate_limit_error(sdk_for: Callable[[str], openai.OpenAI]) -> None:
    limited = sdk_for(KEYS["limited"])
    for _ in range(3):
        limited.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.RateLimitError):
        limited.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "x"}])


def test_tpm_limit_reserves_the_requested_tokens(keyed: LocalServer) -> None:
    first = post(keyed, KEYS["tokens"], {**BODY, "max_tokens": 60})  # reserves more than the 50 allowed
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-tokens"] == "50"
    assert first.headers["x-ratelimit-remaining-tokens"] == "0"


def test_local_routes_need_a_key_but_health_and_catalog_do_not(keyed: LocalServer) -> None:
    assert httpx.get(keyed.url + "/v1/models", timeout=WAIT).status_code == 401
    assert httpx.get(keyed.url + "/healthz", timeout=WAIT).status_code == 200
    assert httpx.get(keyed.url + "/api/models", timeout=WAIT).status_code == 200
    assert post(keyed, None, path="/v1/validate/chat/completions").status_code == 401


def test_reload_applies_new_keys_and_refuses_a_bad_file(keyed: LocalServer, config: Path) -> None:
    carol = "sk-gw-carol-0123456789"
    assert post(keyed, carol).status_code == 401
    config.write_text(config_text(f'\n[[keys]]\nname = "carol"\nkey_sha256 = "{key_sha256(carol)}"\n'))
    assert wait_until(lambda: post(keyed, carol).status_code == 200, timeout=WAIT)
    # A broken file is refused: the running keys keep serving (carol included).
    config.write_text(config_text('\n[[keys]]\nname = "alice"\nkey_sha256 = "nothex"\n'))
    time.sleep(0.5)  # several reload intervals
    assert post(keyed, carol).status_code == 200
    assert post(keyed, KEYS["alice"]).status_code == 200


def test_keys_new_prints_a_key_whose_digest_is_in_the_snippet(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "new", "ci-bot", "--team", 'qa "nightly"']) == 0
    out = capsys.readouterr().out
    key = next(line.split()[-1] for line in out.splitlines() if line.strip().startswith("# ") and "sk-gw-" in line)
    table = tomllib.loads(out)["keys"][0]
    assert table == {"name": "ci-bot", "key_sha256": key_sha256(key), "team": 'qa "nightly"'}


def test_key_settings_are_validated(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    cases = {
        'name = "a"\nkey_sha256 = "abc"': "64 hex digits",
        f'key_sha256 = "{key_sha256("x")}"': "name is required",
        f'name = "a"\nkey_sha256 = "{key_sha256("x")}"\ncategories = ["hologram"]': "unknown categories",
        f'name = "a"\nkey_sha256 = "{key_sha256("x")}"\nrpm = 0': "must be at least 1",
        f'name = "a"\nkey_sha256 = "{key_sha256("x")}"\nexpires = "soon"': "date",
    }
    for table, message in cases.items():
        path.write_text(f'[auth]\nmode = "keys"\n[[keys]]\n{table}\n')
        with pytest.raises(SettingsError, match=message):
            load_settings(path, ENV)
    path.write_text(f'[[keys]]\nname = "a"\nkey_sha256 = "{key_sha256("x")}"\n')
    with pytest.raises(SettingsError, match='set mode = "keys"'):
        load_settings(path, ENV)


def test_key_ring_never_holds_the_plain_key() -> None:
    key, hexdigest = new_key()
    ring = KeyRing([KeySettings(name="n", key_sha256=hexdigest)])
    assert ring.authenticate([(b"authorization", f"Bearer {key}".encode())]).name == "n"
    assert key.encode() not in repr(vars(ring)).encode()
