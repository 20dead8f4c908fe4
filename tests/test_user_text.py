"""What users read never speaks of our issue tracker.

The package's strings and docstrings, the README, the tutorials and the docs name presets,
targets and sections after what they measure (``--preset cpu-prefill``, "target: >= 1.5x"),
never by issue number (``--preset issue5``, "issue #2: <= 3%"): a user has no tracker to
look them up in.
"""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

#: "issue #2", "issue2", "Issues 4", and a bare "#4" (an issue reference; a colour such as
#: "#3b6fb6" or "#999999" is not one: it goes on with more hex digits).
ISSUE_REFERENCE = re.compile(r"\bissues?\s*#?\s*\d|(?<![\w&#/])#\d{1,3}(?![\w])", re.I)


def user_facing_files():
    yield from sorted((ROOT / "blasst_ref").rglob("*.py"))
    yield ROOT / "README.md"
    yield from sorted((ROOT / "tutorials").glob("*.ipynb"))
    yield from sorted((ROOT / "tutorials").glob("*.md"))
    yield from sorted((ROOT / "docs").glob("*.md"))


def issue_references(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` of every line of ``text`` that refers to an issue by number."""
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1)
            if ISSUE_REFERENCE.search(line)]


def test_no_issue_numbers_in_user_facing_text():
    found = [f"{path.relative_to(ROOT)}:{i}: {line[:120]}"
             for path in user_facing_files() for i, line in issue_references(path.read_text())]
    assert not found, "user-facing text refers to issues by number; name the preset, target " \
        "or section after what it measures:\n" + "\n".join(found)


@pytest.mark.parametrize("text, bad", [
    ("(issue #2: <= 3%)", True), ("--preset issue5", True), ("Issue #4's targets", True),
    ("issues #2 (CPU attention), #4 (CUDA)", True), ("see #12", True),
    ("(target: <= 3%)", False), ("--preset cpu-prefill", False),
    ('color="#3b6fb6"', False), ('"#999999"', False), ("# 1. folding", False),
    ("the issue slots", False), ("&#39;", False),
])
def test_the_pattern(text, bad):
    assert bool(issue_references(text)) == bad
