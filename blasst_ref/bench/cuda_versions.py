"""``python -m blasst_ref.bench cuda_versions``: the CUDA kernel versions, measured two ways.

* ``registers``: registers, spills and stack of every kernel of every version
  (``blasst_ref.cuda.launch.VERSIONS``) for the shapes of docs/BENCHMARKS.md, from PTX for
  ``sm_90`` and ``ptxas -v``. Needs the CUDA toolkit's ``ptxas`` and Numba's NVVM, **no
  GPU** (and not the simulator). A new kernel version is no worse than the one it replaces
  only if these do not grow (or the table says why).
* ``compare``: time two source trees side by side on a GPU: the bench's ``attention``
  subcommand runs in a subprocess per tree and round, trees alternating (ABBA...), and the
  table gives each row's median time per tree and their ratio. For a refactor that must
  not change the kernels' speed::

      git worktree add /tmp/baseline main
      python -m blasst_ref.bench cuda_versions compare --baseline /tmp/baseline -- \\
          --backend cuda --phase decode --B 8 --Hq 32 --Hkv 8 --D 128 --L 16384 65536 \\
          --dtype float16 --thresh 0 auto:0.73 --repeat 7

  Everything after ``--`` goes to ``python -m blasst_ref.bench attention`` unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys

#: the shapes of the CUDA tables of docs/BENCHMARKS.md: (q shape, kv shape, block_q, block_k)
SHAPES = {
    "prefill": lambda d: ((1, 32, 4096, d), (1, 32, 4096, d), 128, 64),
    "decode": lambda d: ((8, 32, 1, d), (8, 8, 16384, d), 128, 64),
}


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``cuda_versions`` subcommand to ``python -m blasst_ref.bench``."""
    p = subparsers.add_parser(
        "cuda_versions", help="registers / spills of every CUDA kernel version (ptxas), and "
                              "GPU timings of two source trees side by side",
        description=__doc__.split("\n\n")[0].split(": ", 1)[-1],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("registers", help="ptxas counts, sm_90, no GPU needed")
    r.add_argument("--D", type=int, nargs="+", default=[64, 128], help="head dims")
    r.add_argument("--dtype", nargs="+", default=["float16", "float32"],
                   choices=["float16", "float32"])
    r.add_argument("--versions", nargs="+", default=None, help="default: every version")
    r.add_argument("--arch", default="sm_90")
    r.add_argument("--json", action="store_true", help="one JSON object per kernel")
    c = sub.add_parser("compare", help="time two source trees side by side (GPU)")
    c.add_argument("--baseline", required=True, help="a checkout of the baseline (its root)")
    c.add_argument("--rounds", type=int, default=2, help="runs per tree (default 2)")
    c.add_argument("bench_args", nargs=argparse.REMAINDER,
                   help="-- then the arguments of `python -m blasst_ref.bench attention`")
    p.set_defaults(func=run, parser=p)
    return p


def run(args) -> int:
    if args.mode == "registers":
        return _registers(args)
    return _compare(args)


# ---------------------------------------------------------------------------------------
# registers
# ---------------------------------------------------------------------------------------

def ptxas_counts(ptx: str, arch: str = "sm_90", max_registers: int | None = None) -> dict:
    """``{"registers", "spill_stores", "spill_loads", "stack"}`` of the first entry
    function of ``ptx`` (bytes for the last three), from ``ptxas -v``."""
    exe = shutil.which("ptxas")
    if exe is None:
        raise RuntimeError("ptxas (the CUDA toolkit's PTX assembler) is not on PATH")
    cmd = [exe, f"-arch={arch}", "-v", "-", "-o", os.devnull]
    if max_registers:
        cmd.insert(1, f"-maxrregcount={max_registers}")
    res = subprocess.run(cmd, input=ptx, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"ptxas failed: {res.stderr.strip()[-2000:]}")
    entry = res.stderr.split("Compiling entry function", 1)[-1]
    regs = re.search(r"Used (\d+) registers", entry)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", entry)
    stack = re.search(r"(\d+) bytes stack frame", entry)
    return {"registers": int(regs.group(1)),
            "spill_stores": int(spill.group(1)) if spill else 0,
            "spill_loads": int(spill.group(2)) if spill else 0,
            "stack": int(stack.group(1)) if stack else 0}


def _registers(args) -> int:
    import numba
    import numpy as np

    from numba import config

    if config.ENABLE_CUDASIM:
        print("registers: unset NUMBA_ENABLE_CUDASIM (PTX needs Numba's CUDA target)",
              file=sys.stderr)
        return 2
    from ..cuda import numba_internals
    from ..cuda.launch import VERSIONS
    from ..cuda.problem import Problem

    digits = args.arch.removeprefix("sm_")  # sm_90 -> compute capability (9, 0)
    cc = (int(digits[:-1]), int(digits[-1]))
    rows, seen = [], set()
    for entry in VERSIONS:
        if args.versions and entry.name not in args.versions:
            continue
        for dtype in args.dtype:
            for d in args.D:
                qs, ks, bq, bk = SHAPES[entry.phase](d)
                problem = Problem.of(qs, ks, ks, np.dtype(dtype), True, bq, bk)
                plan = entry.plan_on_gpu(problem)
                if plan is None:
                    rows.append(dict(version=entry.name, kernel="-", dtype=dtype, D=d,
                                     note="does not take this shape"))
                    continue
                for label, disp, argtypes in entry.kernels(plan, problem):
                    key = (label, dtype, d)
                    if key in seen:  # the merge kernel serves every decode version
                        continue
                    seen.add(key)
                    cap = numba_internals.max_registers(disp)
                    ptx = numba_internals.ptx(disp, argtypes, cc)
                    counts = ptxas_counts(ptx, args.arch, cap)
                    rows.append(dict(version=entry.name, kernel=label, dtype=dtype, D=d,
                                     max_registers=cap, **counts))
                    if args.json:
                        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        return 0
    print(f"ptxas -v, {args.arch}; numba {numba.__version__}; shapes: prefill B=1 H=32 "
          f"L=4096, decode B=8 Hq=32 Hkv=8 Lk=16384 Lq=1; 128 x 64 tiles")
    print(f"{'version':<11} {'kernel':<16} {'dtype':<8} {'D':>4} {'cap':>4} {'regs':>5} "
          f"{'spill st/ld (B)':>16} {'stack (B)':>9}")
    for r in rows:
        if "note" in r:
            print(f"{r['version']:<11} {'':<16} {r['dtype']:<8} {r['D']:>4}  {r['note']}")
            continue
        print(f"{r['version']:<11} {r['kernel']:<16} {r['dtype']:<8} {r['D']:>4} "
              f"{r['max_registers'] or '-':>4} {r['registers']:>5} "
              f"{str(r['spill_stores']) + ' / ' + str(r['spill_loads']):>16} {r['stack']:>9}")
    return 0


# ---------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------

def _tree_root() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parents[2]


def _bench_rows(tree: pathlib.Path, bench_args: list[str]) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-m", "blasst_ref.bench", "attention", *bench_args, "--json",
           "--quiet"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(tree))
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} in {tree} failed:\n{res.stderr[-3000:]}")
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def _package_of(tree: pathlib.Path) -> str:
    """Where ``import blasst_ref`` resolves with ``tree`` first on the path."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    res = subprocess.run([sys.executable, "-c", "import blasst_ref; print(blasst_ref.__file__)"],
                         env=env, capture_output=True, text=True, cwd=str(tree))
    return res.stdout.strip() or res.stderr.strip()[-300:]


def _compare(args) -> int:
    bench_args = [a for a in args.bench_args if a != "--"]
    trees = {"baseline": pathlib.Path(args.baseline).resolve(), "this tree": _tree_root()}
    for name, tree in trees.items():
        where = _package_of(tree)
        print(f"{name}: {where}")
        if not where.startswith(str(tree)):
            print(f"compare: {name} imports blasst_ref from {where}, not from {tree}",
                  file=sys.stderr)
            return 2
    times: dict = {}
    order = list(trees)
    for rnd in range(args.rounds):
        for name in (order if rnd % 2 == 0 else order[::-1]):
            print(f"round {rnd + 1}/{args.rounds}: {name} ({trees[name]})", file=sys.stderr)
            for row in _bench_rows(trees[name], bench_args):
                key = (row["case"], row["backend"], row["thresh_spec"])
                slot = times.setdefault(key, {"sparsity": row["sparsity"],
                                              "machine": row["machine"]})
                slot.setdefault(name, []).append(row["ms"])
    machine = next(iter(times.values()))["machine"] if times else "?"
    print(machine)
    print(f"{'case':<44} {'backend':<12} {'thresh':<10} {'sparsity':>8} "
          f"{'baseline ms':>12} {'this tree ms':>13} {'ratio':>6}")
    for (case, backend, spec), slot in times.items():
        base, new = slot.get("baseline"), slot.get("this tree")
        if not base or not new:
            continue
        b, n = statistics.median(base), statistics.median(new)
        print(f"{case:<44} {backend:<12} {str(spec):<10} {slot['sparsity']:>8.3f} "
              f"{b:>12.3f} {n:>13.3f} {n / b:>6.3f}")
    print("ratio: this tree / baseline, medians over rounds of the bench's per-call medians")
    return 0
