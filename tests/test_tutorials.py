"""The tutorial notebooks (docs/DESIGN.md §8): each one runs top to bottom, and is committed clean.

Every ``tutorials/NN_*.ipynb`` is executed here in a fresh Jupyter kernel with
``BLASST_TUTORIAL_SIZE=small`` (unless the environment already sets it), so the README's test
command is also the tutorials' CI. A cell that raises fails the test with the cell and its
traceback; a notebook's own ``assert`` cells (its checks against ``dense_attention``) count.
Without a GPU the CUDA notebook runs on Numba's simulator (``NUMBA_ENABLE_CUDASIM``, set in
``conftest.py`` and inherited by the kernel).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

TUTORIALS = pathlib.Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT_S = 900


def _ids(paths):
    return [p.stem for p in paths]


def test_the_series_is_there():
    # a glob that finds nothing would make the tests below vanish, not fail
    assert len(NOTEBOOKS) == 8, [p.name for p in NOTEBOOKS]
    numbers = [p.name[:2] for p in NOTEBOOKS]
    assert numbers == [f"{i:02d}" for i in range(1, 9)], numbers


@pytest.mark.parametrize("front_end", ["notebook", "lab"])
def test_the_documented_front_ends_are_installed(front_end):
    """``jupyter notebook tutorials/`` (tutorials/README.md) works after the README's install:
    the ``dev`` extra brings the ``tutorials`` extra's front ends. The ``jupyter`` command is
    looked up as a shell with this environment activated would: its scripts folder first."""
    scripts = pathlib.Path(sys.executable).parent
    env = dict(os.environ, PATH=os.pathsep.join([str(scripts), os.environ.get("PATH", "")]))
    r = subprocess.run(["jupyter", front_end, "--version"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, f"jupyter {front_end} --version failed: {r.stderr.strip()}"
    assert r.stdout.strip()[:1].isdigit(), r.stdout  # a version number, e.g. 7.4.2


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_committed_clean(path):
    """Outputs are stripped (``python tutorials/strip_outputs.py``): diffs stay readable."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} hold outputs; run tutorials/strip_outputs.py"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_starts_with_goals_and_ends_with_next_steps(path):
    nb = nbformat.read(path, as_version=4)
    first, last = nb.cells[0], nb.cells[-1]
    assert first.cell_type == "markdown" and "you will learn" in first.source.lower()
    assert last.cell_type == "markdown" and "where to go next" in last.source.lower()


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs(path, monkeypatch, tmp_path):
    monkeypatch.setenv("BLASST_TUTORIAL_SIZE", os.environ.get("BLASST_TUTORIAL_SIZE", "small"))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
        resources={"metadata": {"path": str(TUTORIALS)}},  # cwd of the kernel
    )
    client.execute()  # raises CellExecutionError naming the cell on the first failure
    errors = [o for c in nb.cells if c.cell_type == "code"
              for o in c.outputs if o.output_type == "error"]
    assert not errors
