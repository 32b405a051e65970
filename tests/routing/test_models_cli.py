"""``gateway models`` lists the config's aliases after the catalog's models, marked as aliases (as
``/v1/models`` does), with the filters applied to their models."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from gateway.cli import main
from gateway.server.thread import LocalServer
from tests.helpers.gateway import CHAT_MODEL, STT_MODEL
from tests.routing.conftest import alias_table


@pytest.fixture
def config(tmp_path: Path, upstream: LocalServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in [k for k in os.environ if k.startswith("GATEWAY_")]:
        monkeypatch.delenv(name)
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'[upstream]\nurl = "{upstream.url}"\n[routing]\nfallback = true\n'
        + alias_table("chat-default", [CHAT_MODEL, "No-Such-Model"], strategy="cheapest")
        + alias_table("stt", [STT_MODEL], fallback=False)
    )
    return path


def test_the_table_lists_the_aliases_after_the_models(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    models, aliases = out.split("\n\n")
    assert models.splitlines()[0].split()[:3] == ["MODEL", "CATEGORY", "HEALTH"]
    assert any(line.startswith(CHAT_MODEL + " ") for line in models.splitlines())
    assert "chat-default" not in models
    lines = aliases.splitlines()
    assert lines[0].split() == ["ALIAS", "STRATEGY", "FALLBACK", "MODELS"]
    assert lines[1].split() == ["chat-default", "cheapest", "yes", f"{CHAT_MODEL},", "No-Such-Model", "(not", "in",
                                "the", "catalog)"]  # fmt: skip
    assert lines[2].split() == ["stt", "ordered", "no", STT_MODEL]


def test_json_marks_aliases_and_the_filters_apply_to_their_models(
    config: Path, upstream: LocalServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "--config", str(config), "--category", "audio", "--json"]) == 0
    listed = orjson.loads(capsys.readouterr().out)
    assert {m["model_name"] for m in listed if not m.get("alias")} == {"Kokoro-82M", STT_MODEL}
    assert [m for m in listed if m.get("alias")] == [
        {
            "model_name": "stt",
            "alias": True,
            "models": [STT_MODEL],
            "not_in_catalog": [],
            "strategy": "ordered",
            "fallback": False,
        }
    ]
    assert main(["models", "--config", str(config), "--json"]) == 0
    (chat,) = [m for m in orjson.loads(capsys.readouterr().out) if m["model_name"] == "chat-default"]
    assert chat == {"model_name": "chat-default", "alias": True, "models": [CHAT_MODEL],
                    "not_in_catalog": ["No-Such-Model"], "strategy": "cheapest", "fallback": True}  # fmt: skip
    # --url alone reads no config file: the catalog only.
    assert main(["models", "--url", upstream.url, "--json"]) == 0
    assert not [m for m in orjson.loads(capsys.readouterr().out) if m.get("alias")]
