"""A leading underscore means private: nothing outside a module reaches for its ``_names``.

Walks, with :mod:`ast`, every module of the package, every test, the code cells of every
tutorial and the Python blocks of the README, and resolves each name that refers into
``blasst_ref``: imports (``from blasst_ref.graph.kernels import _check_out``), attribute
chains on imported names (``Q8._quantize_run``), and ``getattr``/``setattr``/
``monkeypatch.setattr`` with a literal attribute name. The first private component of such
a dotted name (``_x``, not ``__x__``) belongs to the namespace just before it: only code
inside that namespace may use it. So ``blasst_ref.cpu.prefill`` may import
``blasst_ref.cpu._online`` (a private module of its own package), ``blasst_ref.graph`` may
not; shared helpers get a public home or a public name instead.

Tests may use the private names of the modules they test (:data:`TESTS`), nothing else.
"""

from __future__ import annotations

import ast
import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "blasst_ref"

#: test file -> the namespaces it tests, whose private names it may use (white-box tests).
TESTS = {
    "test_cpu_kernels.py": ("blasst_ref.cpu",),
    "test_cuda_api.py": ("blasst_ref.cuda",),
    "test_cuda_decode.py": ("blasst_ref.cuda",),
    "test_cuda_prefill.py": ("blasst_ref.cuda",),
    "test_bench_demo.py": ("blasst_ref.bench", "blasst_ref.demo"),
    "test_calibrate.py": ("blasst_ref.calibrate",),
    "test_graph_compile.py": ("blasst_ref.graph.compiler", "blasst_ref.graph.passes"),
    "test_graph_int8.py": ("blasst_ref.graph.quantize",),
    "test_graph_int8_kernels.py": ("blasst_ref.graph.int8_kernels",),
    "test_graph_kernels.py": ("blasst_ref.graph.kernels",),
    "test_graph_memory.py": ("blasst_ref.graph.memory",),
    "test_graph_models.py": ("blasst_ref.graph.models",),
    "test_graph_onnx.py": ("blasst_ref.graph.onnx_export",),
    "test_reference.py": ("blasst_ref.reference",),
    "test_workloads.py": ("blasst_ref.workloads",),
}

#: Uses that wait for the skip-rule and ``cuda/`` reorganisation (``blasst_ref/rule.py``,
#: one module per CUDA kernel version with readable dumps of the generated source), which
#: gives these a public home. Each entry must still occur (the test says when one is gone),
#: so the list can only shrink.
PENDING = {
    ("tests/test_cuda_prefill.py", "blasst_ref.reference._log_thresh"),
    ("tutorials/04_cpu_kernels.ipynb", "blasst_ref.cpu._online.rows_agree_to_skip"),
    ("tutorials/05_cuda_kernels.ipynb", "blasst_ref.cuda.prefill._make_prefill_kernel"),
    ("tutorials/05_cuda_kernels.ipynb", "blasst_ref.cuda.decode._merge_kernel"),
    ("tutorials/05_cuda_kernels.ipynb", "blasst_ref.cuda.decode._split_kernel"),
}


def _is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _notebook_code(path: pathlib.Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    # IPython magics and shell escapes are not Python
    return "\n".join("" if ln.lstrip().startswith(("%", "!")) else ln
                     for ln in code.splitlines())


def _readme_code(path: pathlib.Path) -> str:
    return "\n".join(re.findall(r"```python\n(.*?)```", path.read_text(), re.S))


def sources():
    """``(label, home, is_test, source)`` for every file the rule covers."""
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        yield str(path.relative_to(ROOT)), _module_name(path), False, path.read_text()
    for path in sorted((ROOT / "tests").rglob("*.py")):
        yield str(path.relative_to(ROOT)), _module_name(path), True, path.read_text()
    for path in sorted((ROOT / "tutorials").glob("*.ipynb")):
        yield str(path.relative_to(ROOT)), str(path.relative_to(ROOT)), False, \
            _notebook_code(path)
    yield "README.md", "README.md", False, _readme_code(ROOT / "README.md")


class _Uses(ast.NodeVisitor):
    """Every dotted name under ``blasst_ref`` that a source refers to, with its line.

    ``package`` is the package relative imports start from (``a.b`` for ``a/b/c.py`` and
    for ``a/b/__init__.py``)."""

    def __init__(self, package: str = ""):
        self.package = package
        self.bound: dict[str, str] = {}  # local name -> dotted name it was imported as
        self.uses: list[tuple[int, str]] = []

    def _absolute(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        parts = self.package.split(".")
        base = parts[: len(parts) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def visit_Import(self, node):
        for alias in node.names:
            if alias.name.split(".")[0] == PACKAGE:
                self.uses.append((node.lineno, alias.name))
                if alias.asname:
                    self.bound[alias.asname] = alias.name
                else:
                    self.bound[PACKAGE] = PACKAGE

    def visit_ImportFrom(self, node):
        module = self._absolute(node)
        if module.split(".")[0] != PACKAGE:
            return
        for alias in node.names:
            full = f"{module}.{alias.name}"
            self.uses.append((node.lineno, full))
            self.bound[alias.asname or alias.name] = full

    def _dotted(self, node) -> str | None:
        """``a.b.c`` as the dotted name it refers to, if ``a`` is an imported name."""
        if isinstance(node, ast.Name):
            return self.bound.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self._dotted(node.value)
            return None if base is None else f"{base}.{node.attr}"
        return None

    def visit_Attribute(self, node):
        full = self._dotted(node)
        if full is not None:
            self.uses.append((node.lineno, full))
        else:
            self.generic_visit(node)

    def visit_Call(self, node):
        # getattr(m, "_x"), setattr(m, "_x", v), monkeypatch.setattr(m, "_x", v) and
        # monkeypatch.setattr("blasst_ref.m._x", v)
        name = node.func.attr if isinstance(node.func, ast.Attribute) else \
            getattr(node.func, "id", None)
        args = node.args
        if name in ("getattr", "setattr", "delattr", "hasattr") and len(args) >= 2 and \
                isinstance(args[1], ast.Constant) and isinstance(args[1].value, str):
            base = self._dotted(args[0])
            if base is not None:
                self.uses.append((node.lineno, f"{base}.{args[1].value}"))
        if name in ("setattr", "delattr") and args and isinstance(args[0], ast.Constant) and \
                isinstance(args[0].value, str) and args[0].value.startswith(PACKAGE + "."):
            self.uses.append((node.lineno, args[0].value))
        self.generic_visit(node)


def _inside(name: str, namespace: str) -> bool:
    return name == namespace or name.startswith(namespace + ".")


def _outside_uses(source: str, label: str, package: str, home: str,
                  tested=None) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of the private names that ``source`` (whose own dotted name
    is ``home``) uses from outside the namespace that owns them. A test passes ``tested``,
    the namespaces it tests: it may use their private names, and only theirs."""
    visitor = _Uses(package)
    visitor.visit(ast.parse(source, label))
    out = []
    for line, full in visitor.uses:
        parts = full.split(".")
        first = next((i for i, p in enumerate(parts) if _is_private(p)), None)
        if first is None:
            continue
        owner = ".".join(parts[:first])
        if tested is None:
            ok = _inside(home, owner)
        else:
            ok = any(_inside(owner, t) or _inside(t, owner) for t in tested)
        if not ok:
            out.append((line, full))
    return out


def private_uses():
    """``(label, line, dotted name)`` of every use of a private name from outside the
    namespace that owns it."""
    found = []
    for label, home, is_test, source in sources():
        package = home if label.endswith("__init__.py") else home.rpartition(".")[0]
        tested = TESTS.get(pathlib.Path(label).name, ()) if is_test else None
        found += [(label, line, full)
                  for line, full in _outside_uses(source, label, package, home, tested)]
    return found


def test_no_private_name_is_used_outside_its_namespace():
    found = private_uses()
    new = sorted({(label, line, full) for label, line, full in found
                  if (label, full) not in PENDING})
    assert not new, "private names used outside the namespace that owns them (give them a " \
        "public home or a public name):\n" + "\n".join(f"  {label}:{line}: {full}"
                                                        for label, line, full in new)
    gone = PENDING - {(label, full) for label, _, full in found}
    assert not gone, f"no longer used, delete from PENDING: {sorted(gone)}"


@pytest.mark.parametrize("source, home, bad", [
    ("from blasst_ref.graph.kernels import _check_out", "blasst_ref.graph.int8_kernels",
     True),
    ("from .kernels import _activate", "blasst_ref.graph.int8_kernels", True),
    ("from . import int8_kernels as Q8\nQ8._quantize_run(x)", "blasst_ref.graph.compiler",
     True),
    ("from ..cpu._math import exp", "blasst_ref.graph.kernels", True),
    ("import blasst_ref as br\nbr.cpu._blas(1)", "README.md", True),
    ("from blasst_ref.bench import attention\ngetattr(attention, '_to_device')", "README.md",
     True),
    ("from ._online import fold_row", "blasst_ref.cpu.prefill", False),
    ("from blasst_ref.cuda import _launch", "blasst_ref.cuda.decode", False),
    ("from blasst_ref.graph.kernels import check_out", "blasst_ref.graph.int8_kernels",
     False),
    ("import numpy as np\nnp._NoValue", "README.md", False),
    ("from blasst_ref.cuda import prefill\nprefill._make_prefill_kernel", "blasst_ref.cuda",
     True),
])
def test_the_walk_finds_private_uses(source, home, bad):
    """The checker itself: it flags what the rule forbids and passes what it allows."""
    flagged = _outside_uses(source, "<test>", home.rpartition(".")[0], home)
    assert bool(flagged) == bad, (source, flagged)


@pytest.mark.parametrize("source, tested, bad", [
    ("from blasst_ref.bench import int8 as B\nB._measure()", ("blasst_ref.bench",), False),
    ("from blasst_ref.cpu._online import fold_row", ("blasst_ref.cpu",), False),
    ("from blasst_ref.reference import _log_thresh", ("blasst_ref.cuda",), True),
    ("import blasst_ref.graph.kernels as K\nK._check_out", (), True),
    ("def f(monkeypatch):\n    monkeypatch.setattr('blasst_ref.tiling._X', 1)", (), True),
])
def test_tests_use_only_the_private_names_of_what_they_test(source, tested, bad):
    flagged = _outside_uses(source, "<test>", "tests", "tests.test_x", tested)
    assert bool(flagged) == bad, (source, flagged)
