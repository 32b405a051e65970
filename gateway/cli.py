"""The ``gateway`` command: serve, demo, check-config, keys, usage, models."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import importlib.util
import json
import os
import shlex
import signal
import socket
import sys
import tempfile
import tomllib
from collections.abc import Callable, Mapping, Sequence
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from gateway.auth.keys import new_key
from gateway.catalog.entries import ModelEntry, parse_catalog
from gateway.config.settings import KeySettings, Settings, SettingsError, load_settings, resolve_config_path
from gateway.endpoints import CATEGORIES
from gateway.ops.heap import freeze_startup_heap
from gateway.ops.logs import configure as configure_logging
from gateway.usage.ledger import SUMMARY_GROUPS, summarize

if TYPE_CHECKING:
    import uvicorn

DEMO_CLIENT_KEY = "sk-demo"
# What the gateway sends the simulated upstream, which accepts any key.
DEMO_UPSTREAM_KEY = "demo-upstream-key"
# The two keys of `gateway demo --keys`: a user with small limits, and an admin.
DEMO_USER = "demo-user"
DEMO_USER_RPM = 5
DEMO_USER_BUDGET_USD_DAILY = 0.01
DEMO_ADMIN = "demo-admin"
# Exit status when stdout was closed early (`gateway usage | head -1`): 128 + SIGPIPE, what a
# command killed by the signal reports, so `set -o pipefail` scripts see the same as with `cat`.
EXIT_STDOUT_CLOSED = 128 + 13


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.run(args)
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_STDOUT_CLOSED
    except SettingsError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return result


def _discard_stdout() -> None:
    """The reader of stdout has gone: send what is still buffered (and anything printed later,
    such as the interpreter's flush at exit) to /dev/null instead of a second BrokenPipeError."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="Catalog-aware OpenAI-compatible gateway.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="TOML config file (default: $GATEWAY_CONFIG, else config/gateway.toml)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 8080)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1; see README)")
    serve.set_defaults(run=_serve)

    demo = commands.add_parser(
        "demo",
        help="run the gateway in front of a built-in simulated upstream",
        description="The gateway with the settings `serve` would use (--config, GATEWAY_CONFIG, GATEWAY_*), in "
        "front of a simulated upstream on a free loopback port; the auth mode is open unless configured. The "
        "usage ledger is a temporary file removed at exit unless GATEWAY_USAGE_PATH, or [usage] path in a "
        "file named by --config or GATEWAY_CONFIG, sets it.",
    )
    demo.add_argument("--config", help="TOML config file (default: $GATEWAY_CONFIG, else config/gateway.toml)")
    demo.add_argument("--host", help="address to bind (default 127.0.0.1)")
    demo.add_argument("--port", type=int, help="port to bind (default 8080)")
    demo.add_argument(
        "--keys",
        action="store_true",
        help=f"keys mode with two fresh keys, printed once: {DEMO_USER} (rpm {DEMO_USER_RPM}, "
        f"${DEMO_USER_BUDGET_USD_DAILY} a day) and {DEMO_ADMIN} (reads /admin/usage); they replace any [[keys]]",
    )
    demo.set_defaults(run=_demo)

    check = commands.add_parser("check-config", help="validate the settings and exit")
    check.add_argument("path", nargs="?", help="TOML config file (default as for serve)")
    check.set_defaults(run=_check_config)

    keys = commands.add_parser("keys", help="manage gateway keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    new = key_commands.add_parser("new", help="print a fresh random key (once) and its [[keys]] config snippet")
    new.add_argument("name", help="who the key is for, e.g. alice or ci-bot")
    new.add_argument("--team", help="the team it belongs to (optional)")
    new.set_defaults(run=_keys_new)

    usage = commands.add_parser("usage", help="usage and cost from the ledger, as a table")
    usage.add_argument("--config", help="TOML config file (for [usage] path)")
    usage.add_argument("--by", choices=SUMMARY_GROUPS, default="key", help="group by (default: key)")
    usage.add_argument("--key", help="only this key's requests")
    usage.add_argument("--since", type=date.fromisoformat, metavar="YYYY-MM-DD", help="only from this day (UTC)")
    usage.add_argument("--json", action="store_true", help="print JSON instead of a table")
    usage.set_defaults(run=_usage)

    models = commands.add_parser("models", help="show the upstream's model catalog")
    models.add_argument("--config", help="TOML config file (for the upstream URL)")
    models.add_argument("--url", help="base URL serving /api/models (default: the configured upstream)")
    models.add_argument("--category", choices=sorted(CATEGORIES), help="only this category")
    models.add_argument("--supports", action="append", default=[], metavar="TAG", help="only models with TAG")
    models.add_argument("--json", action="store_true", help="print JSON instead of a table")
    models.set_defaults(run=_models)
    return parser


def _settings(config: str | None) -> Settings:
    """The settings of a command that never serves (usage, models): how [auth] mode, the upstream key
    and [[keys]] fit together does not matter to it, so those checks are skipped."""
    return load_settings(resolve_config_path(config, os.environ), os.environ, check_auth=False)


def _serve(args: argparse.Namespace) -> int:
    path = resolve_config_path(args.config, os.environ)
    settings = load_settings(path, os.environ, {"host": args.host, "port": args.port})
    if args.workers < 1:
        raise SettingsError(f"--workers: must be at least 1, got {args.workers}")
    if args.workers > 1 and path is not None:
        # Each worker process builds its own app from the environment: pass the file on by name.
        os.environ["GATEWAY_CONFIG"] = str(path.resolve())
    _run(settings, path, workers=args.workers)
    return 0


def _run(settings: Settings, config_path: Path | None = None, workers: int = 1) -> None:
    import uvicorn

    from gateway.app import create_app

    configure_logging(settings.log_level, settings.log_format)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it under the handler it found: make
    # that handler exit 0, since a requested, completed shutdown is a success.
    signal.signal(signal.SIGTERM, _exit_after_graceful_shutdown)
    app: Any = "gateway.app:create_app_from_env" if workers > 1 else create_app(settings, config_path=config_path)
    freeze_startup_heap()  # (each worker of --workers N does it in create_app_from_env)
    uvicorn.run(app, factory=workers > 1, workers=workers if workers > 1 else None, **uvicorn_options(settings))


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """How `gateway serve` runs uvicorn (also used by bench/ to measure exactly that)."""
    from functools import partial

    from gateway.server.protocol import LimitedHttpToolsProtocol

    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": False,
        "server_header": False,
        "proxy_headers": False,
        "lifespan": "on",
        "timeout_graceful_shutdown": settings.server.shutdown_grace,
        "log_config": None,  # keep the handlers configure_logging installed
        # httptools with the [limits] connection limits (a partial pickles into --workers N processes).
        "http": partial(LimitedHttpToolsProtocol, limits=settings.limits),
        "timeout_keep_alive": settings.limits.keepalive_timeout,
    }


def _exit_after_graceful_shutdown(signum: int, frame: object) -> None:
    sys.exit(0)


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


def _demo(args: argparse.Namespace) -> int:
    """The gateway with the settings `serve` would use, in front of the simulated upstream.

    Only the upstream URL and key are the simulated upstream's; the auth mode is "open" unless
    configured (`--keys`: keys mode with two fresh keys). The ledger is a temporary file, removed
    at exit, unless GATEWAY_USAGE_PATH or `[usage] path` in a file named by --config or
    GATEWAY_CONFIG sets it. The port is bound before anything is printed; the banner appears once
    the gateway serves.
    """
    from gateway.demo import create_demo_upstream
    from gateway.server.thread import bind_socket, serve_in_thread

    named_config = args.config or os.environ.get("GATEWAY_CONFIG")
    config_path = resolve_config_path(args.config, os.environ)
    overrides = {"host": args.host, "port": args.port}
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(serve_in_thread(create_demo_upstream()))
        env = {**os.environ, "GATEWAY_UPSTREAM_URL": upstream.url, "GATEWAY_UPSTREAM_API_KEY": DEMO_UPSTREAM_KEY}
        temporary = not _ledger_configured(config_path if named_config else None, env)
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
        banner = _demo_banner(settings, port, keys, DemoLedger(settings.usage.path, temporary))
        _serve_on_socket(settings, sock, lambda: _print_banner(banner), config_path=reload_path, env=env)
    return 0


def _ledger_configured(named_config: Path | None, env: Mapping[str, str]) -> bool:
    """Whether the operator chose the ledger's path: GATEWAY_USAGE_PATH, or `[usage] path` in a
    config file named by --config or GATEWAY_CONFIG (not the config/gateway.toml found by itself,
    whose example `path` would leave a usage.db in the checkout)."""
    if "GATEWAY_USAGE_PATH" in env:
        return True
    if named_config is None:
        return False
    try:
        data = tomllib.loads(named_config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False  # load_settings reports it
    usage = data.get("usage")
    return isinstance(usage, dict) and "path" in usage


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


def _serve_on_socket(
    settings: Settings,
    sock: socket.socket,
    on_started: Callable[[], None],
    *,
    config_path: Path | None,
    env: Mapping[str, str],
) -> None:
    """Run the gateway as `serve` does, on a socket already bound; ``on_started`` runs once it serves."""
    import uvicorn

    from gateway.app import create_app

    configure_logging(settings.log_level, settings.log_format)
    signal.signal(signal.SIGTERM, _exit_after_graceful_shutdown)  # as in _run
    app = create_app(settings, config_path=config_path, env=env)
    freeze_startup_heap()
    _announcing_server(uvicorn.Config(app, **uvicorn_options(settings)), on_started).run(sockets=[sock])


def _announcing_server(config: uvicorn.Config, on_started: Callable[[], None]) -> uvicorn.Server:
    """A uvicorn server that calls ``on_started`` once its start-up is complete and it serves."""
    import uvicorn

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit:
                on_started()

    return AnnouncingServer(config)


def _print_banner(text: str) -> None:
    try:
        print(text, flush=True)
    except BrokenPipeError:
        _discard_stdout()  # nobody reads stdout (`gateway demo | head`): keep serving


def _display_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _demo_banner(settings: Settings, port: int, keys: DemoKeys | None, ledger: DemoLedger) -> str:
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
            f"  export DEMO_ADMIN_KEY={keys.admin}  # {DEMO_ADMIN}: may read /admin/usage"
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
    if keys is not None:
        lines += _keys_examples(base, json_type, hello, ledger)
    lines += ["", *_sdk_example(base, sdk_env, sdk_key), ""]
    if ledger.path:
        removed = " (temporary, removed at exit)" if ledger.temporary else ""
        reader = f"GATEWAY_USAGE_PATH={shlex.quote(ledger.path)} {_gateway_command()} usage"
        lines.append(f"Usage ledger: {ledger.path}{removed}; read it with: {reader}")
    else:
        lines.append("Usage ledger: off ([usage] path is empty)")
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
    if ledger.path:
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


def _keys_new(args: argparse.Namespace) -> int:
    key, digest = new_key()
    team = f"\nteam = {_toml_string(args.team)}" if args.team else ""
    print(
        f"""# The key for {args.name} (shown once: the gateway stores only its SHA-256):
#   {key}
# Add this to the config file, with [auth] mode = "keys":

[[keys]]
name = {_toml_string(args.name)}
key_sha256 = "{digest}"{team}
# models = ["Qwen*"]          # optional globs on model_name
# categories = ["text"]       # optional
# rpm = 60                    # optional requests per minute
# tpm = 100000                # optional tokens per minute
# budget_usd_daily = 5.0      # optional, USD per UTC day
# budget_usd_monthly = 50.0   # optional, USD per UTC month
# admin = true                # optional: may read /admin/usage (and /metrics in keys mode)
# disabled = true             # optional: refuse the key (401) without deleting it
# expires = 2027-01-01        # optional TOML date or date-time (UTC when no offset)"""
    )
    return 0


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _check_config(args: argparse.Namespace) -> int:
    path = resolve_config_path(args.path, os.environ)
    settings = load_settings(path, os.environ)
    source = str(path) if path else "built-in defaults"
    print(
        f"configuration OK ({source}): upstream {settings.upstream.url}, auth mode {settings.auth_mode}, "
        f"listening on {settings.host}:{settings.port}"
    )
    return 0


def _models(args: argparse.Namespace) -> int:
    base = (args.url or _settings(args.config).upstream.url).rstrip("/")
    try:
        response = httpx.get(base + "/api/models", timeout=10.0, trust_env=False)
        response.raise_for_status()
        parsed = parse_catalog(orjson.loads(response.content))
    except (httpx.HTTPError, ValueError) as exc:
        print(f"gateway: cannot load the catalog from {base}/api/models: {exc}", file=sys.stderr)
        return 1
    wanted = {t.lower() for t in args.supports}
    entries = [
        e for e in parsed.entries if (args.category is None or e.category == args.category) and wanted <= e.supports
    ]
    if args.json:
        print(orjson.dumps([dict(e.raw) for e in entries], option=orjson.OPT_INDENT_2).decode())
    else:
        print(_table(entries))
    for reason in parsed.skipped:
        print(f"skipped: {reason}", file=sys.stderr)
    return 0


def _usage(args: argparse.Namespace) -> int:
    path = _settings(args.config).usage.path
    if not path or not Path(path).is_file():
        print(f"gateway: no usage ledger at {path!r} ([usage] path)", file=sys.stderr)
        return 1
    rows = summarize(path, by=args.by, key=args.key, since=args.since)
    if args.json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return 0
    header = (args.by.upper(), "REQUESTS", "PROMPT TOK", "COMPLETION TOK", "COST USD")
    print(
        _format_table(
            header,
            [
                (
                    str(r[args.by] if r[args.by] is not None else "-"),
                    str(r["requests"]),
                    str(r["prompt_tokens"]),
                    str(r["completion_tokens"]),
                    "-" if r["cost_usd"] is None else f"{r['cost_usd']:.4f}",
                )
                for r in rows
            ],
        )
    )
    return 0


def _table(entries: list[ModelEntry]) -> str:
    header = ("MODEL", "CATEGORY", "HEALTH", "CONTEXT", "IN $/MTOK", "OUT $/MTOK", "SUPPORTS")
    rows = [
        (
            e.model_name,
            e.category,
            e.health_status or "-",
            str(e.context_window or "-"),
            _price(e.input_per_mtok),
            _price(e.output_per_mtok),
            ",".join(sorted(e.supports)),
        )
        for e in entries
    ]
    return _format_table(header, rows)


def _format_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]
    )


def _price(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    sys.exit(main())
