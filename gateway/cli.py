"""The ``gateway`` command: serve, demo, check-config, models."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import orjson

from gateway.entries import CATEGORIES, ModelEntry, parse_catalog
from gateway.heap import freeze_startup_heap
from gateway.keys import new_key
from gateway.ledger import SUMMARY_GROUPS, summarize
from gateway.logs import configure as configure_logging
from gateway.settings import Settings, SettingsError, load_settings, resolve_config_path

DEMO_CLIENT_KEY = "sk-demo"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.run(args)
    except SettingsError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
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

    demo = commands.add_parser("demo", help="run the gateway in front of a built-in simulated upstream")
    demo.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    demo.add_argument("--port", type=int, default=8080, help="port to bind (default 8080)")
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


def _settings(config: str | None, **overrides: Any) -> Settings:
    return load_settings(resolve_config_path(config, os.environ), os.environ, overrides)


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
    }


def _exit_after_graceful_shutdown(signum: int, frame: object) -> None:
    sys.exit(0)


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo import create_demo_upstream
    from gateway.localserver import serve_in_thread

    with serve_in_thread(create_demo_upstream()) as upstream:
        settings = dataclasses.replace(
            load_settings(None, {}),
            host=args.host,
            port=args.port,
            upstream=dataclasses.replace(Settings().upstream, url=upstream.url, api_key="demo-upstream-key"),
            auth=dataclasses.replace(Settings().auth, mode="open"),
            usage=dataclasses.replace(Settings().usage, path=""),  # a demo leaves no ledger file behind
        )
        print(_demo_banner(settings), flush=True)
        _run(settings)
    return 0


def _demo_banner(settings: Settings) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    base = f"http://{host}:{settings.port}"
    return f"""
Demo mode: the gateway on {base} in front of a simulated FlexAI upstream (no network, any key works).

  curl -s {base}/v1/models | python3 -m json.tool
  curl -s {base}/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "Qwen2.5-32B-Instruct-FP8", "messages": [{{"role": "user", "content": "Hello"}}]}}'
  curl -sN {base}/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "Qwen2.5-32B-Instruct-FP8", "stream": true,
            "messages": [{{"role": "user", "content": "Hi"}}]}}'
  # refused by the gateway itself (an embedding model on the chat endpoint):
  curl -s {base}/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "bge-m3", "messages": [{{"role": "user", "content": "Hi"}}]}}'

  python3 -c 'from openai import OpenAI
c = OpenAI(base_url="{base}/v1", api_key="{DEMO_CLIENT_KEY}")
print(c.chat.completions.create(model="Qwen2.5-32B-Instruct-FP8",
      messages=[{{"role": "user", "content": "Hello"}}]).choices[0].message.content)'

Press Ctrl-C to stop.
"""


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
# budget_usd_daily = 5.0      # optional
# budget_usd_monthly = 50.0   # optional"""
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
