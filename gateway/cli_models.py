"""``gateway models``: the upstream's catalog as a table or JSON, and the config's ``[[aliases]]``.

The catalog is read from ``<url>/api/models`` (the configured upstream unless ``--url``). The
aliases come from the config file (``--config``, ``GATEWAY_CONFIG`` or the default path), listed
after the models and marked as aliases, as ``GET /v1/models`` does: in the table, a second table
(``ALIAS``, ``STRATEGY``, ``FALLBACK``, ``MODELS``); in JSON, objects with ``"alias": true``, their
``models`` (those of the catalog that pass the filters, in the alias's order), ``not_in_catalog``,
``strategy`` and the effective ``fallback``. With ``--category``/``--supports``, an alias is shown
when one of its models passes them. ``--url`` without ``--config`` reads no config file.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import httpx
import orjson

from gateway.catalog.entries import ModelEntry, parse_catalog
from gateway.config import AliasSettings, Settings, load_settings, resolve_config_path


def models_command(args: argparse.Namespace) -> int:
    settings = _settings(args.config) if args.config or not args.url else None
    base = (args.url or (settings.upstream.url if settings is not None else "")).rstrip("/")
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
    filtered = args.category is not None or bool(wanted)
    aliases = _aliases(settings, {e.model_name for e in parsed.entries}, {e.model_name for e in entries}, filtered)
    if args.json:
        print(orjson.dumps([dict(e.raw) for e in entries] + aliases, option=orjson.OPT_INDENT_2).decode())
    else:
        print(_table(entries))
        if aliases:
            print()
            print(_alias_table(aliases))
    for reason in parsed.skipped:
        print(f"skipped: {reason}", file=sys.stderr)
    return 0


def _settings(config: str | None) -> Settings:
    return load_settings(resolve_config_path(config, os.environ), os.environ, check_auth=False)


def _aliases(settings: Settings | None, catalog: set[str], shown: set[str], filtered: bool) -> list[dict[str, Any]]:
    """The aliases as JSON objects: each with its models shown (the filters'), the ones the
    catalog lacks, its strategy and effective fallback; with filters, only aliases with a model shown."""
    if settings is None:
        return []
    out = []
    for alias in settings.aliases:
        models = [m for m in alias.models if m in shown]
        if filtered and not models:
            continue
        out.append(_alias_object(alias, models, [m for m in alias.models if m not in catalog], settings))
    return out


def _alias_object(alias: AliasSettings, models: list[str], missing: list[str], settings: Settings) -> dict[str, Any]:
    return {
        "model_name": alias.name,
        "alias": True,
        "models": models,
        "not_in_catalog": missing,
        "strategy": alias.strategy,
        "fallback": settings.routing.fallback if alias.fallback is None else alias.fallback,
    }


def _alias_table(aliases: list[dict[str, Any]]) -> str:
    header = ("ALIAS", "STRATEGY", "FALLBACK", "MODELS")
    rows = [
        (
            a["model_name"],
            a["strategy"],
            "yes" if a["fallback"] else "no",
            ", ".join([*a["models"], *(f"{m} (not in the catalog)" for m in a["not_in_catalog"])]) or "-",
        )
        for a in aliases
    ]
    return format_table(header, rows)


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
    return format_table(header, rows)


def format_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    """Left-aligned columns, two spaces apart, no trailing spaces."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]
    )


def _price(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
