"""docs/configuration.md is rendered from the settings schema and config/gateway.toml's comments."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Settings
from gateway.config.reference import main, render
from gateway.config.reference_comments import EXAMPLE_PATH, missing_descriptions, parse_example
from gateway.config.reference_schema import MissingDescription, schema_settings

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "configuration.md"


def _table(hint: Any) -> Any:
    """The dataclass of a section or of a list of tables (``tuple[Table, ...]``), else None."""
    if typing.get_origin(hint) is tuple and dataclasses.is_dataclass(typing.get_args(hint)[0]):
        hint = typing.get_args(hint)[0]
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def _schema_fields(cls: Any = Settings, section: str | None = None) -> set[tuple[str | None, str]]:
    """Every (section, key) of the schema, walked here independently of the generator; tables
    within a section (``[[cache.rules]]``) are sections of their own."""
    out: set[tuple[str | None, str]] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        table = _table(hints[f.name])
        if table is None:
            out.add((section, f.name))
        else:
            out.update(_schema_fields(table, f"{section}.{f.name}" if section else f.name))
    return out


def test_the_committed_reference_is_the_rendered_one() -> None:
    assert DOCS.read_text(encoding="utf-8") == render(), (
        "docs/configuration.md is stale: run `make docs` (python -m gateway.config.reference > docs/configuration.md)"
    )


def test_every_setting_of_the_schema_is_described_in_the_example_file() -> None:
    comments = parse_example(EXAMPLE_PATH.read_text(encoding="utf-8"))
    assert missing_descriptions(comments) == [], "write a comment above each of these keys in config/gateway.toml"
    assert {(s.section, s.key) for s in schema_settings()} == _schema_fields()
    text = DOCS.read_text(encoding="utf-8")
    for s in schema_settings():
        assert f"| `{s.key}` |" in text, s.label
        if s.env is not None:
            assert f"`{s.env}`" in text, s.label


def test_env_names_bounds_and_defaults_come_from_the_schema() -> None:
    by_label = {s.label: s for s in schema_settings()}
    ttl = by_label["[catalog] ttl"]
    assert (ttl.env, ttl.type, ttl.default, ttl.bounds) == ("GATEWAY_CATALOG_TTL", "number", "`60.0`", "`> 0`")
    assert by_label["port"].env == "GATEWAY_PORT"
    assert by_label["[tracing] sample_ratio"].bounds == "`>= 0`, `<= 1`"
    assert by_label["[catalog] routable_health"].default == '`["healthy", "degraded"]`'
    assert by_label["[auth] mode"].default == "unset"
    assert by_label["[[keys]] rpm"].env is None


def test_a_setting_without_a_comment_fails() -> None:
    text = EXAMPLE_PATH.read_text(encoding="utf-8").replace(
        "# Seconds one catalog fetch may take.\nfetch_timeout", "\nfetch_timeout"
    )
    assert missing_descriptions(parse_example(text)) == ["[catalog] fetch_timeout"]
    with pytest.raises(MissingDescription, match=r"\[catalog\] fetch_timeout"):
        render(text)


def test_a_key_the_schema_does_not_have_fails() -> None:
    text = EXAMPLE_PATH.read_text(encoding="utf-8") + "\n[catalog]\n# Gone.\nold_setting = 1\n"
    with pytest.raises(MissingDescription, match="old_setting"):
        parse_example(text)


def test_comments_are_shared_by_consecutive_keys_and_inline_comments_are_kept() -> None:
    example = (
        "# Where to listen.\nhost = 'x'\nport = 1\n\n"
        '[auth]\n# How.\n#   "a": one\n#        more\n#   "b": two\n# mode = "open"\n'
        '# [[keys]]\n# name = "alice"   # required # really\n# team = "t"   # optional\n'
    )
    comments = parse_example(example)
    assert comments.by_key[(None, "host")] is comments.by_key[(None, "port")]
    assert comments.by_key[("keys", "name")].lines == ["required # really"]
    assert comments.by_key[("keys", "team")].lines == ["optional"]
    assert comments.by_key[("auth", "mode")].lines == ["How.", '  "a": one', "       more", '  "b": two']


def test_the_module_entry_point_prints_the_reference(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert capsys.readouterr().out == render()
    assert main(["--help"]) == 2


def test_python_dash_m_runs_main() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway.config.reference"], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout == DOCS.read_text(encoding="utf-8")
