"""The settings the configuration reference lists, read from the settings schema.

Every setting's section, key, type, default, bounds and environment variable come from the schema
(``gateway.config.Settings`` and its section dataclasses: ``dataclasses.fields()``, their type hints
and the ``gt``/``ge``/``le`` metadata), as the reference's tables show them. Their descriptions are
``gateway.config.reference_comments``'s; ``gateway.config.reference`` renders both.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from gateway.config import ENV_PREFIX, Settings


class MissingDescription(ValueError):
    """A setting of the schema has no comment in config/gateway.toml (or the file names an unknown key)."""


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting of the schema, as the reference shows it."""

    section: str | None  # None: a top-level key
    table_list: bool  # a field of a [[section]] table (no environment variable)
    key: str
    type: str
    default: str
    bounds: str
    env: str | None

    @property
    def label(self) -> str:
        if self.section is None:
            return self.key
        return f"[[{self.section}]] {self.key}" if self.table_list else f"[{self.section}] {self.key}"


def schema_settings(schema: type[Any] = Settings) -> list[Setting]:
    """Every setting of ``schema``: top-level keys first, then each section in the schema's order."""
    top: list[Setting] = []
    nested: list[Setting] = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            nested.extend(_section(hint, f.name, table_list=False))
        elif (item := _table_item(hint)) is not None:
            nested.extend(_section(item, f.name, table_list=True))
        else:
            top.append(_setting(f, hint, None, table_list=False))
    return top + nested


def _section(cls: type[Any], name: str, *, table_list: bool) -> Iterator[Setting]:
    """A section's settings, then those of the ``[[section.tables]]`` it holds."""
    hints = typing.get_type_hints(cls)
    tables: list[tuple[str, type[Any]]] = []
    for f in dataclasses.fields(cls):
        item = _table_item(hints[f.name])
        if item is not None:
            tables.append((f"{name}.{f.name}", item))
        else:
            yield _setting(f, hints[f.name], name, table_list=table_list)
    for table, item in tables:
        yield from _section(item, table, table_list=True)


def _table_item(hint: Any) -> type[Any] | None:
    """The dataclass of a ``tuple[SomeTable, ...]`` hint (a list of ``[[tables]]``), else None."""
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(item, type) and dataclasses.is_dataclass(item):
            return item
    return None


def _setting(f: dataclasses.Field[Any], hint: Any, section: str | None, *, table_list: bool) -> Setting:
    if f.default is not dataclasses.MISSING:
        default: Any = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:  # pragma: no cover - every setting has a default
        raise MissingDescription(f"{f.name}: the schema gives no default")
    env = None if table_list else ENV_PREFIX + (f"{section}_{f.name}" if section else f.name).upper()
    return Setting(section, table_list, f.name, _type(hint), _toml(default), _bounds(f.metadata), env)


def _type(hint: Any) -> str:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        (inner,) = [a for a in args if a is not type(None)]
        return f"{_type(inner)}, or unset"
    if origin is Literal:
        return "one of " + ", ".join(f"`{json.dumps(a)}`" for a in args)
    if origin is tuple:
        return "list of strings"
    names: Mapping[Any, str] = {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        datetime: "date or date-time",
    }
    return names[hint]


def _toml(value: Any) -> str:
    """A default as it would be written in the TOML file."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f"`{json.dumps(value)}`"
    if isinstance(value, tuple):
        return "`[" + ", ".join(json.dumps(v) for v in value) + "]`"
    return f"`{value!r}`"


def _bounds(metadata: Mapping[str, Any]) -> str:
    parts = [
        f"`{symbol} {metadata[name]}`"
        for name, symbol in (("gt", ">"), ("ge", ">="), ("le", "<="))
        if metadata.get(name) is not None
    ]
    return ", ".join(parts)
