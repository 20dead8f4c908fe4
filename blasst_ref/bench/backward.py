"""backward: time the BLASST backward (dense and sparse) against PyTorch's SDPA backward.

What is timed, on one input (``workloads.llm_like``, so that thresholds skip tiles):

* ``torch SDPA bwd``: ``torch.autograd.grad`` of ``scaled_dot_product_attention`` (its
  autograd graph built once, untimed), the backward a PyTorch user would otherwise run;
  on a GPU with the flash backend forced.
* ``blasst <backend> bwd``: :func:`blasst_ref.attention_backward` from a saved forward, at
  each threshold (``auto:S`` searches the threshold giving tile sparsity ``S``); on the CPU
  both work layouts of :mod:`blasst_ref.cpu.backward` (``fused``, ``two-pass``).
* ``fwd+bwd`` rows: a whole training step's attention, ours and torch's.

Columns: sparsity of the forward's tiles; median time; GFLOP/s counted as dense backward
FLOPs (``2.5x`` the forward's: five tile products instead of two) over the *visible* keys, so
a sparse row's figure is an "effective" rate; ratios against torch and against our own dense
backward (same work layout); ``grad diff``: the largest relative L2 difference of ``dq``,
``dk``, ``dv`` from torch's gradients (dense rows: rounding) or from our dense gradients
(sparse rows: what skipping changes in the gradient).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from .. import attention_backward, attention_forward, workloads
from ..calibrate.search import find_threshold
from .attention_cases import parse_thresh
from .flops import attention_flops
from .machine import machine_info
from .timing import Variant, calls_needed, measure

METHODS = ("fused", "two_pass")


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _grad_diff(got, want) -> float:
    return max(_rel(g, w) for g, w in zip(got, want))


def _host(x):
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return x.copy_to_host() if hasattr(x, "copy_to_host") else np.asarray(x)


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``backward`` subcommand to ``python -m blasst_ref.bench``."""
    p = subparsers.add_parser(
        "backward",
        help="time the BLASST backward (dense and sparse) against PyTorch's SDPA backward",
        description=__doc__.split("\n\n")[0].split(": ", 1)[-1],
        epilog="examples:\n"
               "  python -m blasst_ref.bench backward\n"
               "  python -m blasst_ref.bench backward --no-causal --thresh 0 auto:0.5 auto:0.75\n"
               "  python -m blasst_ref.bench backward --device cuda --dtype float16\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: numpy arrays, the cpu backend; cuda: torch CUDA tensors")
    p.add_argument("--B", type=int, default=1, help="batch (default 1)")
    p.add_argument("--H", type=int, default=8, help="query heads (default 8)")
    p.add_argument("--Hkv", type=int, default=None, help="kv heads (default H)")
    p.add_argument("--L", type=int, default=4096, help="Lq = Lk (default 4096)")
    p.add_argument("--D", type=int, default=64, help="head dim (default 64)")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True,
                   help="causal mask (default: on)")
    p.add_argument("--thresh", nargs="+", type=parse_thresh, metavar="T",
                   default=[parse_thresh("0"), parse_thresh("auto:0.75")],
                   help="thresholds, or auto:S for the one giving tile sparsity S "
                        "(default: 0 auto:0.75)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="default float32 on the CPU, float16 on a GPU")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="CPU work layouts to time (default both)")
    p.add_argument("--block-q", type=int, default=None)
    p.add_argument("--block-k", type=int, default=None)
    p.add_argument("--repeat", type=int, default=5, help="timed calls per variant (default 5)")
    p.add_argument("--blocks", type=int, default=2,
                   help="time each variant in this many blocks of back-to-back calls (its "
                        "steady state; torch's and Numba's thread pools disturb each other "
                        "when they alternate call by call on few cores); 0: interleave calls")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run, parser=p)
    return p


def _torch_step(torch, tq, tk, tv, tdo, causal, gqa, backend=None):
    """``(bwd, fwd_bwd, grads)``: torch's backward alone (its graph built once, untimed) and
    a whole forward + backward, as zero-argument callables, and its gradients. ``backend``:
    an ``SDPBackend`` to force (the GPU's flash), or None."""
    from contextlib import nullcontext

    F = torch.nn.functional
    kw = {"is_causal": causal, **({"enable_gqa": True} if gqa else {})}

    def forced():
        if backend is None:
            return nullcontext()
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel(backend)

    leaves = tuple(t.detach().requires_grad_(True) for t in (tq, tk, tv))
    with forced():  # the graph records the forced kernel's backward
        out = F.scaled_dot_product_attention(*leaves, **kw)

    def bwd():
        return torch.autograd.grad(out, leaves, tdo, retain_graph=True)

    def fwd_bwd():
        with forced():
            o = F.scaled_dot_product_attention(*leaves, **kw)
        return torch.autograd.grad(o, leaves, tdo)

    return bwd, fwd_bwd, bwd()


def _inputs(args, hkv, dtype, torch):
    """``(ours, theirs, sync)``: our arrays ``(q, k, v, dout)`` (numpy, or torch CUDA
    tensors), the same data as torch tensors for the peer (None without torch), and the GPU
    sync."""
    q, k, v = workloads.llm_like(args.B, args.H, hkv, args.L, args.L, args.D, seed=args.seed,
                                 dtype="float32")
    dout = np.random.default_rng(args.seed + 1).standard_normal(q.shape).astype(np.float32)
    if args.device == "cuda":
        tensors = tuple(torch.from_numpy(x).to("cuda", getattr(torch, dtype))
                        for x in (q, k, v, dout))
        return tensors, tensors, torch.cuda.synchronize
    arrays = tuple(x.astype(dtype, copy=False) for x in (q, k, v, dout))
    theirs = None if torch is None else tuple(torch.from_numpy(x) for x in arrays)
    return arrays, theirs, None


def _variant_name(kind, thresh=None, method=None, backend="cpu"):
    if kind == "torch":
        return "torch SDPA bwd"
    if kind == "torch-step":
        return "torch SDPA fwd+bwd"
    if kind == "step":
        return f"blasst fwd+bwd @ {thresh:.3g}"
    layout = f" {method.replace('_', '-')}" if method else ""
    return f"blasst {backend}{layout} bwd @ {thresh:.3g}"


def run(args) -> int:
    from tqdm.auto import tqdm

    gpu = args.device == "cuda"
    try:
        import torch
    except ImportError:
        if gpu:
            args.parser.error("--device cuda needs torch with CUDA (the inputs are torch tensors)")
        torch = None
    hkv = args.Hkv or args.H
    if hkv <= 0 or args.H % hkv:
        args.parser.error(f"--Hkv {hkv} must divide --H {args.H}")
    dtype = args.dtype or ("float16" if gpu else "float32")
    blocks = {"block_q": args.block_q, "block_k": args.block_k}
    info = machine_info(gpu=gpu)
    ours, theirs, sync = _inputs(args, hkv, dtype, torch)
    oq, ok_, ov, odo = ours

    # thresholds: auto:S searched on the float32 host input with the CPU backend
    host = [_host(x).astype(np.float32) for x in ours[:3]]
    threshes = {0.0}
    for spec in args.thresh:
        threshes.add(spec.value if spec.target is None else find_threshold(
            *host, spec.target, causal=args.causal, **blocks).thresh)
    threshes = sorted(threshes)

    variants, meta = [], {}

    def add(name, fn, **m):
        variants.append(Variant(name, fn, sync=sync))
        meta[name] = m

    t_grads = None
    if theirs is not None:
        flash = None
        if gpu:
            from torch.nn.attention import SDPBackend

            flash = SDPBackend.FLASH_ATTENTION
        t_bwd, t_step, t_grads = _torch_step(torch, *theirs, args.causal, hkv != args.H, flash)
        t_grads = [_host(g) for g in t_grads]
        add(_variant_name("torch"), t_bwd, thresh=None, sparsity=None, kind="bwd")
    layouts = [None] if gpu else list(args.methods)
    sparsity = {}
    for thresh in threshes:
        out, saved = attention_forward(oq, ok_, ov, thresh, causal=args.causal, **blocks)
        sparsity[thresh] = saved.sparsity
        for method in layouts:
            if method is None:
                def fn(out=out, saved=saved):
                    return attention_backward(odo, oq, ok_, ov, out, saved)
            else:
                from .. import cpu

                def fn(out=out, saved=saved, method=method):
                    return cpu.blasst_attention_backward(
                        odo, oq, ok_, ov, out, saved.lse, saved.tile_map, saved.causal,
                        saved.scale, saved.block_q, saved.block_k, method=method)
            backend = "cuda" if gpu else "cpu"
            add(_variant_name("ours", thresh, method, backend), fn, thresh=thresh,
                sparsity=saved.sparsity, kind="bwd",
                dense=_variant_name("ours", 0.0, method, backend))
    if theirs is not None:
        add(_variant_name("torch-step"), t_step, thresh=None, sparsity=None, kind="step")
    for thresh in threshes:
        def step(thresh=thresh):
            out, saved = attention_forward(oq, ok_, ov, thresh, causal=args.causal, **blocks)
            return attention_backward(odo, oq, ok_, ov, out, saved)

        add(_variant_name("step", thresh), step, thresh=thresh, sparsity=sparsity[thresh],
            kind="step", dense=_variant_name("step", 0.0))

    bar = tqdm(total=calls_needed(variants, args.repeat), disable=args.quiet,
               desc="backward", unit="call")
    timings = measure(variants, args.repeat, progress=bar.update, pause_s=0.0 if gpu else 0.2,
                      on_warm=lambda v, r: [_host(g) for g in r], blocks=args.blocks)
    bar.close()

    flops = 2.5 * attention_flops(args.B, args.H, args.L, args.L, args.D, args.D, args.causal)
    rows = []
    for v in variants:
        t, m = timings[v.name], meta[v.name]
        peer = _variant_name("torch" if m["kind"] == "bwd" else "torch-step")
        dense = m.get("dense")
        if m["thresh"] is None:
            diff = 0.0
        elif m["thresh"] == 0.0:
            diff = None if t_grads is None else _grad_diff(t.result, t_grads)
        else:
            diff = _grad_diff(t.result, timings[dense].result)
        rows.append({
            "variant": v.name, "thresh": m["thresh"], "sparsity": m["sparsity"],
            "median_ms": t.median_ms,
            "gflops": flops / t.median_ms / 1e6 if m["kind"] == "bwd" else None,
            "vs_torch": timings[peer].median_ms / t.median_ms if peer in timings else None,
            "vs_own_dense": timings[dense].median_ms / t.median_ms if dense else None,
            "grad_diff": diff,
        })

    head = (f"backward: B={args.B} Hq={args.H} Hkv={hkv} L={args.L} D={args.D} "
            f"{'causal' if args.causal else 'no mask'} {dtype}, llm_like seed {args.seed}; "
            f"grad diff: dense rows vs torch, sparse rows vs our dense")
    if args.json:
        print(json.dumps({"machine": info.as_dict(), "case": head}))
        for r in rows:
            print(json.dumps(r))
        return 0
    print(info.line())
    print(head)
    cols = (f"{'variant':34s} {'sparsity':>8s} {'ms':>9s} {'GFLOP/s':>8s} {'x torch':>8s} "
            f"{'x dense':>8s} {'grad diff':>9s}")
    print(cols)
    print("-" * len(cols))

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    for r in rows:
        print(f"{r['variant']:34s} {fmt(r['sparsity'], '.2f'):>8s} {r['median_ms']:9.1f} "
              f"{fmt(r['gflops'], '.1f'):>8s} {fmt(r['vs_torch'], '.2f'):>8s} "
              f"{fmt(r['vs_own_dense'], '.2f'):>8s} {fmt(r['grad_diff'], '.1e'):>9s}")
    return 0
