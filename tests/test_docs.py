"""Every relative link in the README and docs/ points at a file that exists (and a heading, for #anchors)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = sorted([REPO / "README.md", REPO / "bench" / "README.md", *(REPO / "docs").glob("*.md")])

_LINK = re.compile(r"\]\(([^)\s]+)\)")
_HEADING = re.compile(r"(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_NAME = re.compile(r"`(gateway(?:\.\w+)+)`")


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    out: list[str] = []
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            out.append(line)
    return out


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown page."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    for line in _prose(text):
        heading = _HEADING.fullmatch(line)
        if heading is None:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading[2].lower()).replace(" ", "-")
        seen = counts.get(slug, 0)
        counts[slug] = seen + 1
        found.add(slug if seen == 0 else f"{slug}-{seen}")
    return found


def links(text: str) -> list[str]:
    return [m[1] for line in _prose(text) for m in _LINK.finditer(line)]


def test_the_anchor_rules_match_githubs() -> None:
    text = "# Title\n## `[[keys]]`\n### Who may read `/metrics`\n## Results: one run\n## Title\n```\n# not\n```\n"
    assert anchors(text) == {"title", "keys", "who-may-read-metrics", "results-one-run", "title-1"}


def test_the_docs_index_links_every_docs_page() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for page in (REPO / "docs").glob("*.md"):
        assert f"(docs/{page.name})" in readme, f"README.md's docs index does not link docs/{page.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    broken: list[str] = []
    for target in links(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text(encoding="utf-8")):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{page.relative_to(REPO)}: broken links:\n" + "\n".join(broken)


def _resolves(dotted: str) -> bool:
    """Whether ``gateway.a.b.C.f`` names a module, or an attribute chain of one."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            if not hasattr(target, name):
                return False
            target = getattr(target, name)
        return True
    return False


def test_the_code_named_in_the_architecture_page_exists() -> None:
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    names = sorted(set(_CODE_NAME.findall(text)))
    assert len(names) > 20
    missing = [name for name in names if not _resolves(name)]
    assert not missing, "docs/architecture.md names code that no longer exists: " + ", ".join(missing)
