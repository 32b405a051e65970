"""The ``gateway`` command: serve, demo, check-config, keys, usage, models.

The demo command is ``gateway.cli_demo``; running uvicorn (for serve and demo) is ``gateway.cli_serve``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

import orjson

from gateway.auth.keys import new_key
from gateway.cli_demo import DEMO_ADMIN, DEMO_USER, DEMO_USER_BUDGET_USD_DAILY, DEMO_USER_RPM, DemoLedger, demo_banner
from gateway.cli_demo import demo as demo_command
from gateway.cli_models import format_table, models_command
from gateway.cli_serve import discard_stdout, run, uvicorn_options
from gateway.config import POSTGRES_INSTALL, Settings, SettingsError, load_settings, resolve_config_path
from gateway.endpoints import CATEGORIES
from gateway.usage.reports import SUMMARY_GROUPS, summarize
from gateway.usage.schema import LedgerError

# Names read from here by tests and bench/ (they live in gateway.cli_demo and gateway.cli_serve).
__all__ = ["DEMO_USER", "DEMO_USER_RPM", "EXIT_STDOUT_CLOSED", "DemoLedger", "_demo_banner", "main", "uvicorn_options"]
_demo_banner = demo_banner

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
        discard_stdout()
        return EXIT_STDOUT_CLOSED
    except SettingsError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    except LedgerError as exc:  # the usage ledger's file cannot be used ([usage] path)
        print(f"gateway: usage ledger: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return result


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
    demo.set_defaults(run=demo_command)

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
    usage.add_argument("--config", help="TOML config file (for [usage] path or database_url)")
    usage.add_argument("--by", choices=SUMMARY_GROUPS, default="key", help="group by (default: key)")
    usage.add_argument("--key", help="only this key's requests")
    usage.add_argument("--since", type=date.fromisoformat, metavar="YYYY-MM-DD", help="only from this day (UTC)")
    usage.add_argument("--json", action="store_true", help="print JSON instead of a table")
    usage.set_defaults(run=_usage)

    models = commands.add_parser("models", help="show the upstream's model catalog and the config's aliases")
    models.add_argument("--config", help="TOML config file (the upstream URL and [[aliases]])")
    models.add_argument("--url", help="base URL serving /api/models (default: the configured upstream)")
    models.add_argument("--category", choices=sorted(CATEGORIES), help="only this category")
    models.add_argument("--supports", action="append", default=[], metavar="TAG", help="only models with TAG")
    models.add_argument("--json", action="store_true", help="print JSON instead of a table")
    models.set_defaults(run=models_command)
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
    run(settings, path, workers=args.workers)
    return 0


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
# admin = true                # optional: may read /admin/usage, open /console (and /metrics in keys mode)
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


def _usage(args: argparse.Namespace) -> int:
    usage = _settings(args.config).usage
    if usage.database_url:
        rows = _postgres_summary(usage.database_url, args)
        if rows is None:
            return 1
    elif not usage.path or not Path(usage.path).is_file():
        print(f"gateway: no usage ledger at {usage.path!r} ([usage] path)", file=sys.stderr)
        return 1
    else:
        rows = summarize(usage.path, by=args.by, key=args.key, since=args.since)  # LedgerError: main()
    if args.json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return 0
    header = (args.by.upper(), "REQUESTS", "CACHED", "PROMPT TOK", "COMPLETION TOK", "COST USD", "SAVED USD")
    print(
        format_table(
            header,
            [
                (
                    str(r[args.by] if r[args.by] is not None else "-"),
                    str(r["requests"]),
                    str(r["cached"]),
                    str(r["prompt_tokens"]),
                    str(r["completion_tokens"]),
                    "-" if r["cost_usd"] is None else f"{r['cost_usd']:.4f}",
                    "-" if r["saved_usd"] is None else f"{r['saved_usd']:.4f}",
                )
                for r in rows
            ],
        )
    )
    return 0


def _postgres_summary(url: str, args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """The summary from the ledger on PostgreSQL ([usage] database_url); None when it cannot be read."""
    try:
        import psycopg

        from gateway.usage.postgres.reports import summarize_blocking
    except ImportError as exc:
        raise SettingsError(f"[usage] database_url: psycopg is not installed ({exc}): {POSTGRES_INSTALL}") from exc
    try:
        return summarize_blocking(url, by=args.by, key=args.key, since=args.since)
    except psycopg.Error as exc:  # its messages name the host and user, never the password
        print(f"gateway: cannot read the usage ledger on PostgreSQL: {str(exc).strip()}", file=sys.stderr)
        return None


if __name__ == "__main__":
    sys.exit(main())
