"""The descriptions of the configuration reference: the comments of config/gateway.toml.

``config/gateway.toml`` is the commented example of every setting; the comment above each key is
that setting's description, and the comment above a section introduces it. ``parse_example`` reads
them and ``missing_descriptions`` names the settings of the schema that have none, so a new setting
cannot reach the docs undescribed. ``gateway.config.reference`` renders them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config import Settings
from gateway.config.reference_schema import MissingDescription, schema_settings

# The commented example of every setting, in a checkout of the repository.
EXAMPLE_PATH = Path(__file__).resolve().parents[2] / "config" / "gateway.toml"


@dataclass(slots=True)
class Comment:
    """The comment that describes one key, or several consecutive keys under one comment."""

    lines: list[str]
    keys: list[str] = dataclasses.field(default_factory=list)


@dataclass(slots=True)
class ExampleComments:
    """What config/gateway.toml says: each key's comment, and the comment above each section."""

    by_key: dict[tuple[str | None, str], Comment] = dataclasses.field(default_factory=dict)
    sections: dict[str, list[str]] = dataclasses.field(default_factory=dict)


_SECTION_LINE = re.compile(r"#?\s*\[(\[?)([A-Za-z0-9_.]+)\]?\]")
_KEY_LINE = re.compile(r"([A-Za-z0-9_]+)\s*=\s*(.*)")


def parse_example(text: str, schema: type[Any] = Settings) -> ExampleComments:
    """The comments of a commented TOML example: the block of ``#`` lines right above each key.

    A key right below another key, with no comment of its own, shares that key's comment (``host`` and
    ``port``). A commented-out key (``# api_key = ""``) counts when it names a setting of its section;
    a comment after a key's value on the same line (the ``[[keys]]`` example) describes that key alone.
    """
    fields = _fields_by_section(schema)
    found = ExampleComments()
    section: str | None = None
    pending: list[str] = []
    group: Comment | None = None  # the comment of the key on the line just above, to share
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            pending, group = [], None
            continue
        header = _SECTION_LINE.fullmatch(line)
        if header is not None and header[2] in fields and (not line.startswith("#") or header[1]):
            section = header[2]
            if pending:
                found.sections[section] = pending
            pending, group = [], None
            continue
        key = _KEY_LINE.fullmatch(line.lstrip("#").strip()) if line.startswith("#") else _KEY_LINE.fullmatch(line)
        if key is not None and (not line.startswith("#") or key[1] in fields.get(section, ())):
            name, inline = key[1], _inline_comment(key[2])
            if name not in fields.get(section, ()):
                where = f"[{section}] {name}" if section else name
                raise MissingDescription(f"config/gateway.toml sets {where}, which is not a setting of the schema")
            if pending or inline:
                group = Comment(pending + ([inline] if inline else []))
            elif group is None:
                group = Comment([])
            group.keys.append(name)
            found.by_key[(section, name)] = group
            pending = []
            if inline:
                group = None  # a comment on the key's own line is that key's alone
            continue
        pending.append(_comment_text(raw))
        group = None
    return found


def _fields_by_section(schema: type[Any]) -> dict[str | None, set[str]]:
    out: dict[str | None, set[str]] = {}
    for s in schema_settings(schema):
        out.setdefault(s.section, set()).add(s.key)
    return out


def _comment_text(raw: str) -> str:
    """A comment line without its ``#`` and the one space after it (deeper indentation is kept)."""
    text = raw.strip().removeprefix("#")
    return text.removeprefix(" ").rstrip()


def _inline_comment(value: str) -> str:
    """The comment after a TOML value on the same line, if any (a ``#`` outside quotes)."""
    quote: str | None = None
    for i, char in enumerate(value):
        if quote:
            if char == quote:
                quote = None
        elif char in "\"'":
            quote = char
        elif char == "#":
            return value[i + 1 :].strip()
    return ""


def missing_descriptions(comments: ExampleComments, schema: type[Any] = Settings) -> list[str]:
    """The settings of the schema that the example file does not describe (should be none)."""
    return [s.label for s in schema_settings(schema) if not _has_text(comments.by_key.get((s.section, s.key)))]


def _has_text(comment: Comment | None) -> bool:
    return comment is not None and any(line.strip() for line in comment.lines)
