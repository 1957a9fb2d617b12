"""Links to the docs resolve: every `docs/<file>.md#<section>` (or `README.md#...`) that code
names in a comment or docstring, and every relative link between the Markdown files, points at
a file in the repository and, when it names one, at a heading of that file."""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

from .conftest import ROOT

# in code: a path from the repository's root
CODE_LINK = re.compile(r"(?<![\w/.-])((?:docs|plugins)/[\w/.-]+?\.md|README\.md)(#[\w-]+)?")
# in Markdown: [text](relative/path.md#section) or [text](#section)
MD_LINK = re.compile(r"\]\((?!\w+://)([^)\s#]*)(#[^)\s]+)?\)")


def tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", *patterns],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return [ROOT / line for line in out.splitlines()]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@cache
def anchors(doc: Path) -> frozenset[str]:
    found, fenced = set(), False
    for line in doc.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.*)", line)):
            found.add(slug(m[1]))
    return frozenset(found)


def broken(target: Path, anchor: str | None) -> str | None:
    if not target.is_file():
        return "no such file"
    if anchor and anchor[1:] not in anchors(target):
        return f"no heading {anchor} in it"
    return None


def code_files() -> list[Path]:
    return tracked("flynn_host/*.py", "plugins/*.py", "cli/*.py")


def test_slug() -> None:
    assert slug("Host API (port 1113)") == "host-api-port-1113"
    assert slug("`discoverd` — service discovery") == "discoverd--service-discovery"
    assert slug("flynn_host_components(config)") == "flynn_host_componentsconfig"


def test_code_links_to_the_docs_resolve() -> None:
    links, wrong = 0, []
    for path in code_files():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for m in CODE_LINK.finditer(line):
                links += 1
                if why := broken(ROOT / m[1], m[2]):
                    wrong.append(f"{path.relative_to(ROOT)}:{n}: {m[0]}: {why}")
    assert links > 10, "the pattern finds no links: is it still right?"
    assert not wrong, "links to the docs that lead nowhere:\n" + "\n".join(wrong)


@pytest.mark.parametrize("doc", tracked("*.md"), ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_links_resolve(doc: Path) -> None:
    wrong = []
    fenced = False
    for n, line in enumerate(doc.read_text().splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
        if fenced:
            continue
        for m in MD_LINK.finditer(line):
            target = (doc.parent / m[1]).resolve() if m[1] else doc
            if not target.is_relative_to(ROOT):
                continue  # outside the repository (the project's shared docs): not ours to check
            if target.is_dir() or (m[1] and not m[1].endswith(".md")):
                if not target.exists():
                    wrong.append(f"{n}: {m[0]}: no such file or directory")
                continue
            if why := broken(target, m[2]):
                wrong.append(f"{n}: {m[0]}: {why}")
    assert not wrong, f"{doc.relative_to(ROOT)}: links that lead nowhere:\n" + "\n".join(wrong)


def test_code_cites_the_docs_not_the_reference_outside_the_repository() -> None:
    """The project's Flynn reference (cited as "facts" and a section number) is not in the
    repository: code links to the repository's docs instead, adding there what a reader needs."""
    citation = "facts " + "\N{SECTION SIGN}"  # not spelt out: this file would cite it
    cites = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in tracked("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if citation in line
    ]
    assert not cites, f"link to a document in the repository instead: {cites}"
