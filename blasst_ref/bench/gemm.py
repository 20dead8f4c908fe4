"""``python -m blasst_ref.bench gemm``: float32 GEMM + post-ops, three ways, against sgemm.

For each shape ``(M, K, N)`` of the model graphs (MiniLM and BERT layers, DLRM MLPs) and its
post-ops (bias and GELU, or bias and ReLU, or bias and residual), in one run of blocks of
back-to-back calls (:mod:`.timing`):

* ``sgemm`` -- ``np.matmul(a, W, out=o)``: one OpenBLAS call, all cores, *no* post-ops: the
  floor that the others are measured against (``% sgemm`` = its time / theirs);
* ``blas+epilogue`` -- the same call, then the post-ops in one serial Numba pass
  (:func:`~blasst_ref.graph.kernels.matmul_epilogue`): the compiler's ``"blas"`` mode;
* ``packed`` -- :func:`~blasst_ref.graph.kernels.matmul_packed`: row-block x panel tasks
  on Numba threads, one single-threaded OpenBLAS call per task, post-ops before the store;
* ``fma`` -- :func:`~blasst_ref.graph.f32_gemm.gemm`: Numba threads and an FMA
  micro-kernel written from Numba (no BLAS), post-ops before the store.

GFLOP/s = ``2 M N K / time``.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from . import machine as machine_mod
from .timing import Variant, measure

#: name -> (M, K, N, act, residual): the matmuls of the model graphs
SHAPES = {
    "minilm-b1-qkv": (128, 384, 384, "none", False),
    "minilm-b1-ffn1": (128, 384, 1536, "gelu", False),
    "minilm-b1-ffn2": (128, 1536, 384, "none", True),
    "minilm-b8-qkv": (3072, 384, 384, "none", False),
    "minilm-b8-ffn1": (3072, 384, 1536, "gelu", False),
    "minilm-b8-ffn2": (3072, 1536, 384, "none", True),
    "bert-b1-qkv": (384, 768, 768, "none", False),
    "bert-b1-ffn1": (384, 768, 3072, "gelu", False),
    "bert-b1-ffn2": (384, 3072, 768, "none", True),
    "dlrm-bottom-512-l1": (512, 13, 512, "relu", False),
    "dlrm-bottom-512-l2": (512, 512, 256, "relu", False),
    "dlrm-top-512-l1": (512, 479, 1024, "relu", False),
    "dlrm-top-512-l2": (512, 1024, 1024, "relu", False),
    "dlrm-top-128-l2": (128, 1024, 1024, "relu", False),
}
PRESETS = {"all": list(SHAPES), "quick": ["minilm-b1-ffn1", "dlrm-top-128-l2"]}


def run_case(name: str, *, repeat: int, blocks: int, progress=None) -> dict:
    from ..graph import f32_gemm as F
    from ..graph import kernels as K

    m, k, n, act_name, has_res = SHAPES[name]
    act = K.ACT_NAMES.index(act_name)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    res = rng.standard_normal((m, n)).astype(np.float32) if has_res else None
    outs = {v: np.empty((m, n), np.float32) for v in ("sgemm", "blas", "packed", "fma")}
    pw = K.pack_weight(w)

    def blas_epilogue():
        o = outs["blas"]
        np.matmul(a, w, out=o)
        return K.matmul_epilogue(o, bias, act, res, o, parallel=False)

    variants = [Variant("sgemm", lambda: np.matmul(a, w, out=outs["sgemm"])),
                Variant("blas+epilogue", blas_epilogue),
                Variant("packed", lambda: K.matmul_packed(a, pw, bias, act, res,
                                                          outs["packed"]))]
    if F.available():
        fw = F.pack(w)
        variants.append(Variant("fma", lambda: F.gemm(a, fw, bias, act, res, outs["fma"])))
    t = measure(variants, repeat, progress=progress, blocks=blocks)
    want = t["blas+epilogue"].result.astype(np.float64)
    errs = {v.name: float(np.linalg.norm(t[v.name].result - want) / np.linalg.norm(want))
            for v in variants[2:]}
    floor = t["sgemm"].median_ms
    return {"shape": name, "m": m, "k": k, "n": n, "post_ops": act_name + ("+res" if has_res
                                                                           else ""),
            "ms": {v: x.median_ms for v, x in t.items()},
            "gflops": {v: 2e-6 * m * n * k / x.median_ms for v, x in t.items()},
            "vs_sgemm": {v: floor / x.median_ms for v, x in t.items()},
            "rel_err": errs}


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "gemm", help="float32 matmul + post-ops: BLAS, packed blocks, the FMA micro-kernel",
        description=__doc__.split("\n\n")[0].split(": ", 1)[-1],
        epilog="example:\n  python -m blasst_ref.bench gemm --preset all\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="all")
    p.add_argument("--shape", choices=sorted(SHAPES), nargs="+", default=None)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--blocks", type=int, default=2,
                   help="blocks of back-to-back calls per variant (0: interleave calls)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON lines too")
    p.set_defaults(func=run, parser=p)
    return p


def run(args) -> int:
    from tqdm import tqdm

    from ..graph import f32_gemm as F

    info = machine_mod.machine_info()
    print(info.line())
    print(f"FMA micro-kernel: {F.backend()}")
    names = ["sgemm", "blas+epilogue", "packed"] + (["fma"] if F.available() else [])
    print(f"{'shape':<20} {'M':>5} {'K':>5} {'N':>5} {'post-ops':<9} "
          + " ".join(f"{n + ' ms (% sgemm)':>24}" for n in names))
    rows = []
    for name in args.shape or PRESETS[args.preset]:
        with tqdm(total=len(names) * (args.repeat + 1), desc=name, file=sys.stderr,
                  leave=False) as bar:
            row = run_case(name, repeat=args.repeat, blocks=args.blocks, progress=bar.update)
        rows.append(row)
        cells = [f"{row['ms'][n]:9.3f} ({100 * row['vs_sgemm'][n]:5.0f}%)" for n in names]
        print(f"{name:<20} {row['m']:>5} {row['k']:>5} {row['n']:>5} {row['post_ops']:<9} "
              + " ".join(f"{c:>24}" for c in cells), flush=True)
    if args.json:
        for row in rows:
            print(json.dumps({**row, "machine": info.as_dict()}))
    return 0
