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
from .attention import attention_flops, find_threshold, parse_thresh
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run, parser=p)
    return p


def _torch_step(torch, tq, tk, tv, tdo, causal, gqa):
    """``(bwd, fwd_bwd, grads)``: torch's backward alone (graph built once) and a whole
    forward + backward, as zero-argument callables, and its gradients."""
    F = torch.nn.functional
    kw = {"is_causal": causal}
    if gqa:
        kw["enable_gqa"] = True
    leaves = tuple(t.detach().requires_grad_(True) for t in (tq, tk, tv))
    out = F.scaled_dot_product_attention(*leaves, **kw)

    def bwd():
        return torch.autograd.grad(out, leaves, tdo, retain_graph=True)

    def fwd_bwd():
        o = F.scaled_dot_product_attention(*leaves, **kw)
        return torch.autograd.grad(o, leaves, tdo)

    return bwd, fwd_bwd, bwd()


def run(args) -> int:
    import torch

    from tqdm.auto import tqdm

    hkv = args.Hkv or args.H
    gpu = args.device == "cuda"
    dtype = args.dtype or ("float16" if gpu else "float32")
    q, k, v = workloads.llm_like(args.B, args.H, hkv, args.L, args.L, args.D, seed=args.seed,
                                 dtype="float32")
    dout = np.random.default_rng(args.seed + 1).standard_normal(q.shape).astype(np.float32)
    blocks = {"block_q": args.block_q, "block_k": args.block_k}
    info = machine_info(gpu=gpu)

    # thresholds: auto:S searched on the float32 host input with the CPU backend
    threshes = []
    for spec in args.thresh:
        if spec.target is None:
            threshes.append(spec.value)
        else:
            threshes.append(find_threshold(q, k, v, spec.target, causal=args.causal,
                                           **blocks).thresh)
    threshes = sorted(set([0.0] + threshes))

    if gpu:
        tdt = getattr(torch, dtype)
        tq, tk, tv, tdo = (torch.from_numpy(x).to("cuda", tdt) for x in (q, k, v, dout))
        sync = torch.cuda.synchronize
        backends = [("cuda", None)]
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # the graph records flash's backward
            t_bwd, t_step_any, t_grads = _torch_step(torch, tq, tk, tv, tdo, args.causal,
                                                     hkv != args.H)

        def t_step():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return t_step_any()

        ours_in = (tq, tk, tv, tdo)
    else:
        from .. import cpu

        if dtype != "float32":
            q, k, v, dout = (x.astype(dtype) for x in (q, k, v, dout))
        tq, tk, tv, tdo = (torch.from_numpy(x) for x in (q, k, v, dout))
        sync = None
        backends = [("cpu", m) for m in args.methods]
        t_bwd, t_step, t_grads = _torch_step(torch, tq, tk, tv, tdo, args.causal, hkv != args.H)
        ours_in = (q, k, v, dout)
    t_grads = [_host(g) for g in t_grads]

    variants, meta = [], {}
    variants.append(Variant("torch SDPA bwd", t_bwd, sync=sync))
    meta["torch SDPA bwd"] = {"thresh": None, "sparsity": None, "kind": "bwd", "peer": None}
    saved_of = {}
    for thresh in threshes:
        oq, ok_, ov, odo = ours_in
        out, saved = attention_forward(oq, ok_, ov, thresh, causal=args.causal, **blocks)
        saved_of[thresh] = (out, saved)
        for backend, method in backends:
            name = f"blasst {backend}{' ' + method.replace('_', '-') if method else ''} bwd" \
                   f" @ {thresh:.3g}"
            if method is None:
                fn = (lambda out=out, saved=saved:
                      attention_backward(odo, oq, ok_, ov, out, saved))
            else:
                fn = (lambda out=out, saved=saved, method=method:
                      cpu.blasst_attention_backward(
                          odo, oq, ok_, ov, out, saved.lse, saved.tile_map, saved.causal,
                          saved.scale, saved.block_q, saved.block_k, method=method))
            variants.append(Variant(name, fn, sync=sync))
            meta[name] = {"thresh": thresh, "sparsity": saved.sparsity, "kind": "bwd",
                          "method": method, "dense": f"blasst {backend}"
                          f"{' ' + method.replace('_', '-') if method else ''} bwd @ 0"}
    variants.append(Variant("torch SDPA fwd+bwd", t_step, sync=sync))
    meta["torch SDPA fwd+bwd"] = {"thresh": None, "sparsity": None, "kind": "step"}
    for thresh in threshes:
        oq, ok_, ov, odo = ours_in

        def step(thresh=thresh):
            out, saved = attention_forward(oq, ok_, ov, thresh, causal=args.causal, **blocks)
            return attention_backward(odo, oq, ok_, ov, out, saved)

        name = f"blasst fwd+bwd @ {thresh:.3g}"
        variants.append(Variant(name, step, sync=sync))
        meta[name] = {"thresh": thresh, "sparsity": saved_of[thresh][1].sparsity,
                      "kind": "step", "dense": "blasst fwd+bwd @ 0"}

    bar = tqdm(total=calls_needed(variants, args.repeat), disable=args.quiet,
               desc="backward", unit="call")
    timings = measure(variants, args.repeat, progress=bar.update, pause_s=0.0 if gpu else 0.2,
                      on_warm=lambda v, r: [_host(g) for g in r])
    bar.close()

    flops = 2.5 * attention_flops(args.B, args.H, args.L, args.L, args.D, args.D, args.causal)
    rows = []
    for v in variants:
        t, m = timings[v.name], meta[v.name]
        peer = "torch SDPA bwd" if m["kind"] == "bwd" else "torch SDPA fwd+bwd"
        dense = m.get("dense")
        grads = t.result
        if m["thresh"] in (None, 0.0):
            diff = _grad_diff(grads, t_grads)
        else:
            diff = _grad_diff(grads, timings[dense].result)
        rows.append({
            "variant": v.name, "thresh": m["thresh"], "sparsity": m["sparsity"],
            "median_ms": t.median_ms,
            "gflops": flops / t.median_ms / 1e6 if m["kind"] == "bwd" else None,
            "vs_torch": timings[peer].median_ms / t.median_ms,
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
    cols = f"{'variant':34s} {'sparsity':>8s} {'ms':>9s} {'GFLOP/s':>8s} {'x torch':>8s} " \
           f"{'x dense':>8s} {'grad diff':>9s}"
    print(cols)
    print("-" * len(cols))
    for r in rows:
        sp = "-" if r["sparsity"] is None else f"{r['sparsity']:.2f}"
        gf = "-" if r["gflops"] is None else f"{r['gflops']:.1f}"
        xd = "-" if r["vs_own_dense"] is None else f"{r['vs_own_dense']:.2f}"
        print(f"{r['variant']:34s} {sp:>8s} {r['median_ms']:9.1f} {gf:>8s} "
              f"{r['vs_torch']:8.2f} {xd:>8s} {r['grad_diff']:9.1e}")
    return 0
