"""docs/DESIGN.md is the design every docstring, command and notebook points at.

Every section reference (``§3``, ``§3.4``, ``docs/DESIGN.md §7.2``) in the package, the
README, the tutorials, the docs and the tests must name a section that docs/DESIGN.md has;
every mention of the design document must say where it is (``docs/DESIGN.md``: a user has
no other copy); and every link into it (``docs/DESIGN.md#anchor``) must land on a heading.
"""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "DESIGN.md"

#: a section reference: "§3", "§3.4" (in "§3-§4" both count)
SECTION_REF = re.compile(r"§(\d+(?:\.\d+)?)")
#: a heading of docs/DESIGN.md that defines a section: "## §3 ..." or "### §3.4 ..."
SECTION_HEADING = re.compile(r"^#{2,3} §(\d+(?:\.\d+)?) ", re.M)
#: a mention of the design document that does not say where it is (a Markdown link target
#: "](DESIGN.md#..." inside docs/ is relative to docs/ and fine)
BARE_MENTION = re.compile(r"(?<!docs/)(?<!\]\()\bDESIGN\b")
#: a link into the document: "docs/DESIGN.md#anchor", or "DESIGN.md#anchor" inside docs/
ANCHOR_LINK = re.compile(r"(?:docs/|\]\()DESIGN\.md#([\w-]+)")


def citing_files():
    """Every file a user reads, and the tests (which are documentation too)."""
    yield from sorted((ROOT / "blasst_ref").rglob("*.py"))
    yield ROOT / "README.md"
    yield ROOT / "pyproject.toml"
    yield from sorted((ROOT / "tutorials").glob("*.ipynb"))
    yield from sorted((ROOT / "tutorials").glob("*.md"))
    yield from sorted((ROOT / "tutorials").glob("*.py"))
    yield from sorted((ROOT / "docs").glob("*.md"))
    # the tests, but for this file: its examples of bad references are meant to be bad
    yield from (p for p in sorted((ROOT / "tests").glob("*.py"))
                if p.name != pathlib.Path(__file__).name)


def sections(markdown: str) -> set[str]:
    """The section numbers docs/DESIGN.md defines, e.g. ``{"3", "3.4", ...}``."""
    return set(SECTION_HEADING.findall(markdown))


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation (``§``, ``:``,
    ``()``, backticks, commas) dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    return {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", markdown, re.M)}


def _lines(path: pathlib.Path):
    for i, line in enumerate(path.read_text().splitlines(), 1):
        yield i, line


def test_the_design_document_has_its_sections():
    found = sections(DESIGN.read_text())
    # the sections the package cites most: attention, its skip rule, bound and decode;
    # kernels; calibration; workloads; the graph executor; tutorials; tests
    for s in ("3", "3.3", "3.4", "3.5", "4", "5", "6", "7", "7.3", "7.4", "8", "9", "10", "11"):
        assert s in found, s


def test_every_section_reference_exists():
    known = sections(DESIGN.read_text())
    missing = [f"{p.relative_to(ROOT)}:{i}: §{ref}   {line.strip()[:90]}"
               for p in citing_files() for i, line in _lines(p)
               for ref in SECTION_REF.findall(line) if ref not in known]
    assert not missing, "references to sections docs/DESIGN.md does not have:\n" + \
        "\n".join(missing)


def test_every_mention_says_docs_design():
    bare = [f"{p.relative_to(ROOT)}:{i}: {line.strip()[:100]}"
            for p in citing_files() if p != DESIGN for i, line in _lines(p)
            if BARE_MENTION.search(line)]
    assert not bare, "the design document is docs/DESIGN.md; say so (a user has no other " \
        "DESIGN.md):\n" + "\n".join(bare)


def test_every_link_into_the_design_lands_on_a_heading():
    design = DESIGN.read_text()
    known = anchors(design)
    links = [(p, i, a) for p in citing_files() for i, line in _lines(p)
             for a in ANCHOR_LINK.findall(line)]
    assert sum(p == DESIGN for p, _, _ in links) > 10  # its table of contents counts too
    broken = [f"{p.relative_to(ROOT)}:{i}: #{a}" for p, i, a in links if a not in known]
    assert not broken, "links to anchors docs/DESIGN.md does not have:\n" + "\n".join(broken)


@pytest.mark.parametrize("text, refs", [
    ("see docs/DESIGN.md §3.4 and §7", ["3.4", "7"]), ("§3-§4", ["3", "4"]),
    ("the §11 backward", ["11"]), ("no section", []),
])
def test_section_references_are_found(text, refs):
    assert SECTION_REF.findall(text) == refs


@pytest.mark.parametrize("text, bare", [
    ("(DESIGN.md §3)", True), ("DESIGN §5", True), ("shared/DESIGN.md", True),
    ("(docs/DESIGN.md §3)", False), ("[§4](DESIGN.md#4-the-kernels)", False),
    ("DESIGNER", False),
])
def test_bare_mentions_are_found(text, bare):
    assert bool(BARE_MENTION.search(text)) == bare


def test_github_anchors():
    assert github_anchor("§3.4 Why skipping is safe: the error bound") == \
        "34-why-skipping-is-safe-the-error-bound"
    assert github_anchor("§3 attention(): what it computes") == "3-attention-what-it-computes"
    assert github_anchor("§1 What blasst_ref is") == "1-what-blasst_ref-is"
