"""Settings: TOML < environment < command line; every bad value named by its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import SettingsError, load_settings, resolve_config_path

REPO = Path(__file__).resolve().parents[2]


def test_defaults_without_any_file() -> None:
    s = load_settings(None, {})
    assert (s.host, s.port, s.upstream.url) == ("127.0.0.1", 8080, "https://tokens.flex.ai")
    assert s.auth_mode == "passthrough"
    assert s.catalog.ttl == 60.0
    assert s.catalog.routable_health == ("healthy", "degraded")
    assert s.limits.max_body_bytes == 32 * 1024 * 1024


def test_the_shipped_example_config_is_valid_and_matches_the_defaults() -> None:
    # config/gateway.toml documents every setting with its default value (paths resolved alike).
    assert load_settings(REPO / "config" / "gateway.toml", {}) == load_settings(None, {})


def test_toml_then_env_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text('port = 9000\n[catalog]\nttl = 30\n[upstream]\nurl = "http://127.0.0.1:1234/"\n')
    s = load_settings(path, {"GATEWAY_CATALOG_TTL": "12.5", "GATEWAY_HOST": "0.0.0.0"}, {"port": 9100})
    assert s.catalog.ttl == 12.5  # env beats the file
    assert s.host == "0.0.0.0"
    assert s.port == 9100  # the command line beats both
    assert s.upstream.url == "http://127.0.0.1:1234/"
    assert load_settings(path, {}).port == 9000


def test_env_lists_are_comma_separated() -> None:
    s = load_settings(None, {"GATEWAY_CATALOG_ROUTABLE_HEALTH": "Healthy, degraded ,unknown"})
    assert s.catalog.routable_health == ("healthy", "degraded", "unknown")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GATEWAY_CATALOG_TTL": "abc"}, "GATEWAY_CATALOG_TTL: must be a number"),
        ({"GATEWAY_CATALOG_TTL": "0"}, "GATEWAY_CATALOG_TTL: must be greater than 0"),
        ({"GATEWAY_CATALOG_TTL": "nan"}, "GATEWAY_CATALOG_TTL: must be a finite number"),
        ({"GATEWAY_PORT": "80.5"}, "GATEWAY_PORT: must be an integer"),
        ({"GATEWAY_PORT": "70000"}, "port: must be at most 65535"),
        ({"GATEWAY_LOG_LEVEL": "loud"}, "GATEWAY_LOG_LEVEL: must be one of"),
        ({"GATEWAY_UPSTREAM_URL": "ftp://x"}, "[upstream] url: must be an http(s) URL"),
        ({"GATEWAY_UPSTREAM_URL": "not a url"}, "[upstream] url"),
        ({"GATEWAY_AUTH_MODE": "sometimes"}, "GATEWAY_AUTH_MODE: must be one of"),
        ({"GATEWAY_CATALOG_ROUTABLE_HEALTH": ""}, "routable_health: must name at least one"),
        ({"GATEWAY_USAGE_DATABASE_URL": "mysql://u:pw@db/x"}, "[usage] database_url: must be a postgresql:// URL"),
        ({"GATEWAY_USAGE_CLAIM_AFTER": "0"}, "GATEWAY_USAGE_CLAIM_AFTER: must be greater than 0"),
    ],
)
def test_bad_env_values_name_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(None, env)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[catalog]\ntll = 5\n", "unknown setting [catalog] tll"),
        ("[catalogue]\nttl = 5\n", "unknown setting catalogue"),
        ("[catalog]\nttl = 'soon'\n", "[catalog] ttl: must be a number"),
        ("[catalog]\nttl = true\n", "[catalog] ttl: must be a number"),
        ("port = 8080.0\n", "port: must be an integer"),
        ("catalog = 3\n", "[catalog] must be a table"),
        ("[catalog]\nroutable_health = 'healthy'\n", "must be a list of strings"),
        ("port = \n", "cannot read config file"),
    ],
)
def test_bad_toml_values_name_the_key(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(SettingsError) as caught:
        load_settings(path, {})
    assert message in str(caught.value)


def test_upstream_key_without_a_client_auth_mode_refuses_to_start() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(None, {"GATEWAY_UPSTREAM_API_KEY": "sk-org-secret"})
    assert 'mode = "open"' in str(caught.value)
    assert "sk-org-secret" not in str(caught.value)  # never echo the secret


def test_auth_mode_combinations() -> None:
    key = {"GATEWAY_UPSTREAM_API_KEY": "sk-org"}
    assert load_settings(None, {**key, "GATEWAY_AUTH_MODE": "open"}).auth_mode == "open"
    with pytest.raises(SettingsError, match="passthrough"):
        load_settings(None, {**key, "GATEWAY_AUTH_MODE": "passthrough"})
    with pytest.raises(SettingsError, match="none is set"):
        load_settings(None, {"GATEWAY_AUTH_MODE": "open"})
    with pytest.raises(SettingsError, match="needs at least one"):
        load_settings(None, {**key, "GATEWAY_AUTH_MODE": "keys"})


def test_the_api_key_is_not_in_the_settings_repr() -> None:
    s = load_settings(None, {"GATEWAY_UPSTREAM_API_KEY": "sk-org-secret", "GATEWAY_AUTH_MODE": "open"})
    assert "sk-org-secret" not in repr(s)


def test_the_ledger_database_url_is_neither_in_the_repr_nor_in_its_error() -> None:
    s = load_settings(None, {"GATEWAY_USAGE_DATABASE_URL": "postgresql://gw:pg-secret@db/gw"})
    assert s.usage.database_url == "postgresql://gw:pg-secret@db/gw"
    assert "pg-secret" not in repr(s)
    with pytest.raises(SettingsError) as caught:
        load_settings(None, {"GATEWAY_USAGE_DATABASE_URL": "postgres ql://gw:pg-secret@db/gw"})
    assert "pg-secret" not in str(caught.value)


def test_config_path_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path(None, {}) is None  # no file anywhere: built-in defaults
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "gateway.toml").write_text("port = 1\n")
    assert resolve_config_path(None, {}) == Path("config/gateway.toml")
    other = tmp_path / "other.toml"
    other.write_text("")
    assert resolve_config_path(None, {"GATEWAY_CONFIG": str(other)}) == other
    assert resolve_config_path(str(other), {"GATEWAY_CONFIG": "/nope"}) == other
    with pytest.raises(SettingsError, match="does not exist"):
        resolve_config_path("/nope/gateway.toml", {})
