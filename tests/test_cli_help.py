"""Every command-line option of the package's programs says what it does in ``--help``.

A newcomer reads ``--help`` before anything else; an option listed with no text sends them to
the source. The check reads the help as printed (argparse's layout: an option's text on its
line after two or more spaces, or on the lines below it), so it sees what a user sees.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

#: ``python -m`` programs and the arguments that print one help page.
PROGRAMS = [
    ("blasst_ref.calibrate", []),
    ("blasst_ref.demo", []),
    ("blasst_ref.bench", ["attention"]),
    ("blasst_ref.bench", ["graph"]),
    ("blasst_ref.bench", ["int8"]),
    ("blasst_ref.train", []),
]

_OPTION_LINE = re.compile(r"^  (-\S.*)$")


def options_without_help(help_text: str) -> list[str]:
    """The options of an argparse help page that have no help text."""
    lines = help_text.splitlines()
    missing = []
    for i, line in enumerate(lines):
        m = _OPTION_LINE.match(line)
        if not m:
            continue
        invocation, *same_line = re.split(r"\s{2,}", m.group(1), maxsplit=1)
        if same_line and same_line[0].strip():
            continue
        below = lines[i + 1] if i + 1 < len(lines) else ""
        if below.startswith(" " * 4) and below.strip():  # the text goes on below, indented
            continue
        missing.append(invocation)
    return missing


@pytest.mark.parametrize("module, args", PROGRAMS, ids=[" ".join([m, *a]) for m, a in PROGRAMS])
def test_every_option_has_help(module, args):
    r = subprocess.run([sys.executable, "-m", module, *args, "--help"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "options:" in r.stdout or "optional arguments:" in r.stdout
    missing = [o for o in options_without_help(r.stdout) if not o.startswith("-h")]
    assert not missing, f"python -m {module} {' '.join(args)}: no help text for {missing}"


def test_the_parser_of_help_pages():
    page = """usage: x

options:
  -h, --help            show this help message and exit
  --phase {prefill,decode}
                        prefill or decode
  --batch BATCH         batch size
  --head-dim HEAD_DIM
  --seed SEED
  --dtype {float32,float16}
"""
    assert options_without_help(page) == ["--head-dim HEAD_DIM", "--seed SEED",
                                          "--dtype {float32,float16}"]
