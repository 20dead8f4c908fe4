"""Strip outputs, execution counts and run metadata from the tutorial notebooks, in place.

The notebooks are committed without outputs so that diffs show only what a person wrote
(the policy is in ``tutorials/README.md``; ``tests/test_tutorials.py`` checks it)::

    python tutorials/strip_outputs.py              # every tutorials/*.ipynb
    python tutorials/strip_outputs.py tutorials/02_*.ipynb   # some of them
"""

from __future__ import annotations

import pathlib
import sys

import nbformat

HERE = pathlib.Path(__file__).resolve().parent

# metadata keys Jupyter writes while running a notebook: they change on every run
_VOLATILE_CELL_METADATA = ("execution", "collapsed", "scrolled")


def strip(path: pathlib.Path) -> bool:
    """Strip one notebook in place; returns whether anything changed."""
    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    for cell in nb.cells:
        for key in _VOLATILE_CELL_METADATA:
            cell.metadata.pop(key, None)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nb.metadata.pop("widgets", None)
    after = nbformat.writes(nb)
    if after != before:
        path.write_text(after + ("" if after.endswith("\n") else "\n"))
    return after != before


def main(argv: list[str]) -> int:
    paths = [pathlib.Path(a) for a in argv] or sorted(HERE.glob("*.ipynb"))
    for p in paths:
        if strip(p):
            print(f"stripped {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
