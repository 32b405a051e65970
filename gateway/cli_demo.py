"""The ``gateway demo`` command: the gateway in front of the simulated upstream, and its banner.

The settings are those ``serve`` would use; only the upstream (``gateway.demo``, on a free loopback
port) is simulated. ``--keys`` switches to keys mode with two fresh keys, shown once in the banner.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import importlib.util
import os
import shlex
import sys
import tempfile
import tomllib
from collections.abc import Mapping
from pathlib import Path

from gateway.auth.keys import new_key
from gateway.cli_serve import discard_stdout, serve_on_socket
from gateway.config import KeySettings, Settings, load_settings, resolve_config_path

DEMO_CLIENT_KEY = "sk-demo"
# What the gateway sends the simulated upstream, which accepts any key.
DEMO_UPSTREAM_KEY = "demo-upstream-key"
# The two keys of `gateway demo --keys`: a user with small limits, and an admin.
DEMO_USER = "demo-user"
DEMO_USER_RPM = 5
DEMO_USER_BUDGET_USD_DAILY = 0.01
DEMO_ADMIN = "demo-admin"


@dataclasses.dataclass(frozen=True, slots=True)
class DemoKeys:
    """The two keys `gateway demo --keys` made; they are shown once, in the banner."""

    user: str
    admin: str


@dataclasses.dataclass(frozen=True, slots=True)
class DemoLedger:
    """Where a demo keeps its usage ledger ("" when it keeps none), and whether it is removed at exit."""

    path: str
    temporary: bool
    postgres: bool = False  # [usage] database_url: the ledger is PostgreSQL (the path is not used)

    @property
    def kept(self) -> bool:
        return bool(self.path) or self.postgres


def demo(args: argparse.Namespace) -> int:
    """The gateway with the settings `serve` would use, in front of the simulated upstream.

    Only the upstream URL and key are the simulated upstream's; the auth mode is "open" unless
    configured (`--keys`: keys mode with two fresh keys). The ledger is a temporary file, removed
    at exit, unless GATEWAY_USAGE_PATH or `[usage] path` in a file named by --config or
    GATEWAY_CONFIG sets it. The response cache is on unless GATEWAY_CACHE_ENABLED or `[cache]
    enabled` in such a file says otherwise. The port is bound before anything is printed; the
    banner appears once the gateway serves.
    """
    from gateway.demo import create_demo_upstream
    from gateway.server.thread import bind_socket, serve_in_thread

    named_config = args.config or os.environ.get("GATEWAY_CONFIG")
    config_path = resolve_config_path(args.config, os.environ)
    overrides = {"host": args.host, "port": args.port}
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(serve_in_thread(create_demo_upstream()))
        env = {**os.environ, "GATEWAY_UPSTREAM_URL": upstream.url, "GATEWAY_UPSTREAM_API_KEY": DEMO_UPSTREAM_KEY}
        operator_config = config_path if named_config else None
        temporary = not _set_by_operator(operator_config, env, "usage", "path")
        if not _set_by_operator(operator_config, env, "cache", "enabled"):
            env["GATEWAY_CACHE_ENABLED"] = "true"  # so that a newcomer sees the response cache work
        if temporary:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="gateway-demo-"))
            env["GATEWAY_USAGE_PATH"] = str(Path(directory) / "usage.db")
        chosen = load_settings(config_path, env, overrides, check_auth=False)
        keys: DemoKeys | None = None
        reload_path = config_path
        if args.keys:
            settings, keys = _with_demo_keys(chosen)
            reload_path = None  # the keys live in this process, not in a file
        else:
            if chosen.auth.mode is None:
                env["GATEWAY_AUTH_MODE"] = "open"
            elif chosen.auth.mode == "passthrough":
                env["GATEWAY_UPSTREAM_API_KEY"] = ""  # each client's key goes upstream (which takes any)
            settings = load_settings(config_path, env, overrides)
        try:
            sock = bind_socket(settings.host, settings.port)
        except OSError as exc:
            print(f"gateway: cannot listen on {settings.host}:{settings.port}: {_bind_error(exc)}", file=sys.stderr)
            return 1
        stack.callback(sock.close)
        port: int = sock.getsockname()[1]
        on_postgres = bool(settings.usage.database_url)  # then no SQLite file is written
        ledger = DemoLedger("" if on_postgres else settings.usage.path, temporary and not on_postgres, on_postgres)
        banner = demo_banner(settings, port, keys, ledger)
        serve_on_socket(settings, sock, lambda: _print_banner(banner), config_path=reload_path, env=env)
    return 0


def _set_by_operator(named_config: Path | None, env: Mapping[str, str], section: str, key: str) -> bool:
    """Whether the operator chose ``[section] key``: its GATEWAY_ variable, or the key in a config
    file named by --config or GATEWAY_CONFIG (not the config/gateway.toml found by itself, whose
    example `[usage] path` would leave a usage.db in the checkout)."""
    if f"GATEWAY_{section}_{key}".upper() in env:
        return True
    if named_config is None:
        return False
    try:
        data = tomllib.loads(named_config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False  # load_settings reports it
    table = data.get(section)
    return isinstance(table, dict) and key in table


def _with_demo_keys(settings: Settings) -> tuple[Settings, DemoKeys]:
    """Keys mode with two fresh keys (replacing any [[keys]]): a user with small limits, an admin."""
    user, user_digest = new_key()
    admin, admin_digest = new_key()
    keys = (
        KeySettings(
            name=DEMO_USER, key_sha256=user_digest, rpm=DEMO_USER_RPM, budget_usd_daily=DEMO_USER_BUDGET_USD_DAILY
        ),
        KeySettings(name=DEMO_ADMIN, key_sha256=admin_digest, admin=True),
    )
    auth = dataclasses.replace(settings.auth, mode="keys")
    return dataclasses.replace(settings, auth=auth, keys=keys), DemoKeys(user=user, admin=admin)


def _bind_error(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "the address is in use (another process listens there; choose another port with --port)"
    return exc.strerror or str(exc)


def _print_banner(text: str) -> None:
    try:
        print(text, flush=True)
    except BrokenPipeError:
        discard_stdout()  # nobody reads stdout (`gateway demo | head`): keep serving


def _display_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def demo_banner(settings: Settings, port: int, keys: DemoKeys | None, ledger: DemoLedger) -> str:
    base = f"http://{_display_host(settings.host)}:{port}"
    chat = "Qwen2.5-32B-Instruct-FP8"
    hello = f'{{"model": "{chat}", "messages": [{{"role": "user", "content": "Hello"}}]}}'
    json_type = "-H 'Content-Type: application/json'"
    auth = ""
    sdk_env = ""
    sdk_key = f', api_key="{DEMO_CLIENT_KEY}"'
    if keys is not None:
        auth = ' -H "Authorization: Bearer $DEMO_USER_KEY"'
        sdk_key = f', api_key="{keys.user}"'
        limits = f"{DEMO_USER_RPM} requests a minute, ${DEMO_USER_BUDGET_USD_DAILY} a day"
        who = (
            "Keys mode, with two fresh gateway keys, shown only now (they last as long as this demo):\n\n"
            f"  export DEMO_USER_KEY={keys.user}   # {DEMO_USER}: {limits}\n"
            f"  export DEMO_ADMIN_KEY={keys.admin}  # {DEMO_ADMIN}: may read /admin/usage and open /console"
        )
    elif settings.auth_mode == "keys":
        auth = ' -H "Authorization: Bearer $KEY"'
        sdk_env, sdk_key = "OPENAI_API_KEY=$KEY ", ""
        who = "Keys mode, with the config's [[keys]]: first `export KEY=<one of those keys>`."
    elif settings.auth_mode == "open":
        who = "Auth mode open: any client key (or none) works; the gateway sends the upstream its own."
    else:
        who = "Auth mode passthrough: each client's key goes to the simulated upstream, which accepts any."
    lines = [
        f"\nDemo mode: the gateway on {base} in front of a simulated FlexAI upstream (no network).",
        who,
        "",
        f"  curl -s {base}/v1/models{auth} | python3 -m json.tool",
        f"  curl -s {base}/v1/chat/completions{auth} {json_type} \\\n       -d '{hello}'",
        f"  curl -sN {base}/v1/chat/completions{auth} {json_type} \\\n"
        f"""       -d '{{"model": "{chat}", "stream": true, "messages": [{{"role": "user", "content": "Hi"}}]}}'""",
        "  # refused by the gateway itself (an embedding model on the chat endpoint):",
        f"  curl -s {base}/v1/chat/completions{auth} {json_type} \\\n"
        """       -d '{"model": "bge-m3", "messages": [{"role": "user", "content": "Hi"}]}'""",
    ]
    if settings.cache.enabled:
        lines += [
            "  # the response cache: run it twice, the second answer says `cache-status: ...; hit`:",
            f"  curl -si {base}/v1/embeddings{auth} {json_type} \\\n"
            """       -d '{"model": "bge-m3", "input": "Hello"}' | grep -i '^cache-status'""",
        ]
    if keys is not None:
        lines += _keys_examples(base, json_type, hello, ledger)
    lines += ["", *_sdk_example(base, sdk_env, sdk_key), ""]
    if ledger.postgres:  # never the URL itself: it may hold a password
        reader = f"{_gateway_command()} usage (with the same GATEWAY_USAGE_DATABASE_URL or --config)"
        lines.append(f"Usage ledger: PostgreSQL ([usage] database_url); read it with: {reader}")
    elif ledger.path:
        removed = " (temporary, removed at exit)" if ledger.temporary else ""
        reader = f"GATEWAY_USAGE_PATH={shlex.quote(ledger.path)} {_gateway_command()} usage"
        lines.append(f"Usage ledger: {ledger.path}{removed}; read it with: {reader}")
    else:
        lines.append("Usage ledger: off ([usage] path is empty)")
    if settings.console.enabled:
        signin = "sign in with $DEMO_ADMIN_KEY" if keys is not None else "an admin key signs in"
        where = signin if settings.auth_mode == "keys" else "from this host only"
        lines.append(f"Console (usage and cost, catalog, live health, refusals): {base}/console ({where})")
    if settings.auth_mode != "keys":
        lines.append(
            "Team features (gateway keys, rate limits, budgets, /admin/usage): `gateway demo --keys`"
            " (from a checkout: make demo DEMO_ARGS=--keys)."
        )
    lines += [
        "Settings as for `gateway serve` (--config, GATEWAY_CONFIG, GATEWAY_* variables); the upstream is simulated.",
        "Press Ctrl-C to stop.",
        "",
    ]
    return "\n".join(lines)


def _keys_examples(base: str, json_type: str, hello: str, ledger: DemoLedger) -> list[str]:
    user = '-H "Authorization: Bearer $DEMO_USER_KEY"'
    lines = [
        "  # no key: 401 missing_api_key",
        f"  curl -s {base}/v1/chat/completions {json_type} -d '{hello}'",
        f"  # ten images cost $0.03, more than the day's ${DEMO_USER_BUDGET_USD_DAILY}: 402 budget_exceeded",
        f"  curl -s {base}/v1/images/generations {user} {json_type} \\\n"
        """       -d '{"model": "FLUX.1-schnell", "prompt": "a fox", "n": 10}'""",
        f"  # more than {DEMO_USER_RPM} requests in a minute: 200s, then 429 rate_limit_exceeded",
        f"  for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{{http_code}} ' {base}/v1/chat/completions \\\n"
        f"       {user} {json_type} -d '{hello}'; done; echo",
    ]
    if ledger.kept:
        lines += [
            "  # usage and cost per key, with the admin key (written to the ledger within a second):",
            f'  curl -s {base}/admin/usage -H "Authorization: Bearer $DEMO_ADMIN_KEY" | python3 -m json.tool',
        ]
    return lines


def _gateway_command() -> str:
    """This `gateway` command, by its path when it is not the one on PATH (a venv's, say)."""
    beside = Path(sys.executable).parent / "gateway"
    return shlex.quote(str(beside)) if beside.is_file() else "gateway"


def _sdk_example(base: str, env_prefix: str, key_argument: str) -> list[str]:
    """The Python example, with an interpreter that can import the openai package (or how to get it)."""
    python = shlex.quote(sys.executable or "python3")
    lines = []
    if importlib.util.find_spec("openai") is None:
        lines += ["  # the OpenAI SDK is not installed for this Python; first:", f"  {python} -m pip install openai"]
    lines += [
        f"""  {env_prefix}{python} -c 'from openai import OpenAI
c = OpenAI(base_url="{base}/v1"{key_argument})
print(c.chat.completions.create(model="Qwen2.5-32B-Instruct-FP8",
      messages=[{{"role": "user", "content": "Hello"}}]).choices[0].message.content)'"""
    ]
    return lines
