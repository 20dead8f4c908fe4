"""``python -m blasst_ref.bench attention``: time BLASST attention against dense and PyTorch.

What one run does, for every *case* (a problem size, causal or not, prefill or decode):

1. builds a seeded LLM-like input (:func:`blasst_ref.workloads.llm_like`: attention sinks,
   a local window, heavy hitters) or, with ``--workload random``, Gaussian q/k/v;
2. resolves the thresholds: a number is used as is; ``auto:0.75`` searches the threshold
   that skips about 75% of the tiles *of this input* (:func:`blasst_ref.calibrate.find_threshold`),
   because sparsity, not the threshold, is the axis that speedups are read against;
3. computes the exact float64 result once (:func:`blasst_ref.bench.oracle.dense_oracle`);
4. times every (backend, threshold) variant — one warm-up call that includes JIT compilation
   and is excluded, then the median of ``--repeat`` interleaved calls
   (:mod:`blasst_ref.bench.timing`) — and prints one table per case.

Backends (``--backend``):

* ``reference``: the numpy spec, tile by tile. Slow: timed once, no repeats.
* ``cpu``: ``blasst_ref.attention(..., backend="cpu")``, the Numba kernels.
* ``cpu-noskip``: the same kernel with the skip test compiled out
  (``blasst_ref.cpu.blasst_attention(..., skip_test=False)``); thresh=0 only. The target
  (docs/DESIGN.md §4): ``cpu`` at thresh=0 costs at most 3% more than this.
* ``torch``: ``torch.nn.functional.scaled_dot_product_attention`` on the same arrays
  (thresh=0 only; it has no threshold). Optional: used only where ``import torch`` works.
* ``cuda``: ``blasst_ref.attention(..., backend="cuda")`` on device copies of the input
  (timed with a device synchronisation), where ``numba.cuda.is_available()``.
* ``torch-flash``, ``torch-cudnn``: PyTorch SDPA on the GPU, on the *same* device tensors,
  pinned to its FlashAttention or cuDNN backend (``torch.nn.attention.sdpa_kernel``);
  float16/bfloat16 only (those backends take no float32). Added automatically next to
  ``cuda`` when torch has CUDA. A backend that refuses the input (dtype, GQA) is reported in
  the notes and left out, never silently replaced.

GPU variants are timed as the mean of ``n`` back-to-back calls followed by one
synchronisation (``n`` chosen so that a sample lasts a few milliseconds), the way GPU
kernels are usually timed: a single call plus a synchronisation would add the
launch-and-wait round trip to kernels that take 0.1 ms. The median is over such samples.

``--dtype``: ``float32`` (default), ``float16``, ``float64`` (CPU only) and ``bfloat16``
(GPU rows only, on torch bfloat16 tensors: numpy has no bfloat16; the inputs are rounded to
bfloat16 once and every row, the oracle included, sees those values; ``auto:S`` thresholds
are searched with the cuda backend).

Columns: ``ms`` the median wall time; ``GFLOP/s`` the *dense* FLOP count
(:func:`.flops.attention_flops`) over that time, so a sparse row's figure is the
dense-equivalent throughput; ``sparsity`` skipped / visited tiles (``return_stats``); ``rel.err``
``||out - exact|| / ||exact||``; ``vs dense`` the backend's own thresh=0 time over this
row's time; ``vs torch`` PyTorch's time over this row's time.

Modules: this one is the command line; :mod:`.attention_cases` (cases, thresholds, presets,
inputs), :mod:`.attention_runner` (one case: run, table, plot), :mod:`.backends`,
:mod:`.torch_peers` (PyTorch SDPA), :mod:`.flops` (the FLOP and byte counts).
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from dataclasses import replace

from .. import tiling
from . import machine as machine_mod
from .attention_cases import PHASE_DEFAULTS, PRESETS, Case, parse_thresh, thresh_specs
from .attention_runner import format_table, run_case, write_plot
from .backends import BACKENDS, backend_available
from .torch_peers import TORCH_GPU, torch_cuda_available


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 1")
    return n


def _tolerance(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < x < 0.5:
        raise argparse.ArgumentTypeError(f"{text!r}: must be in (0, 0.5)")
    return x


def _knob(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE, e.g. peakedness=2")
    try:
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: VALUE must be a number") from None


SIZE_ARGS = ("B", "Hq", "Hkv", "L", "Lq", "D", "Dv", "thresh", "causal", "phase", "workload")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``attention`` subcommand to ``python -m blasst_ref.bench``."""
    p = subparsers.add_parser(
        "attention",
        help="time BLASST attention (dense and sparse) against PyTorch SDPA",
        description=__doc__.split("\n\n")[0].split(": ", 1)[-1],
        epilog="examples:\n"
               "  python -m blasst_ref.bench attention --preset cpu\n"
               "  python -m blasst_ref.bench attention --L 2048 4096 "
               "--thresh 0 auto:0.5 auto:0.75\n"
               "  python -m blasst_ref.bench attention --phase decode --L 16384 --thresh 0 1e-3 "
               "--json\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="fixed cases: 'cpu' runs the CPU tables of docs/BENCHMARKS.md, "
                        "'cpu-dense' (dense vs PyTorch SDPA), 'cpu-prefill' and 'cpu-decode' "
                        "(speedup over our dense vs sparsity) are its parts; 'smoke' checks "
                        "that everything runs")
    p.add_argument("--backend", nargs="+", choices=BACKENDS, default=None,
                   help="backends to time (default: cpu cpu-noskip, and torch if installed)")
    p.add_argument("--phase", choices=("prefill", "decode"), default=None,
                   help="prefill: Lq = Lk = L; decode: Lq = --Lq (<= 16), Lk = L "
                        "(default prefill)")
    p.add_argument("--L", nargs="+", type=_positive_int, metavar="L",
                   help="sequence length(s); one case each (default 4096 prefill, 32768 decode)")
    p.add_argument("--Lq", type=_positive_int,
                   help="query length (prefill default L; decode default 1, at most 16)")
    p.add_argument("--B", type=_positive_int, help="batch (default 1)")
    p.add_argument("--Hq", "--H", dest="Hq", type=_positive_int,
                   help="query heads (default 8 prefill, 32 decode)")
    p.add_argument("--Hkv", type=_positive_int,
                   help="kv heads, dividing Hq (default Hq prefill, 8 decode)")
    p.add_argument("--D", type=_positive_int, help="head dim Dqk (default 64 prefill, 128 decode)")
    p.add_argument("--Dv", type=_positive_int, help="value dim (default D)")
    p.add_argument("--thresh", nargs="+", type=parse_thresh, metavar="T",
                   help="thresholds in [0, 1), or auto:S to search the threshold reaching tile "
                        "sparsity S on the input (default: 0 auto:0.75); 0 is always run")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None,
                   help="bottom-right causal mask (default: on)")
    p.add_argument("--workload", choices=("llm", "random"), default=None,
                   help="llm: blasst_ref.workloads.llm_like (default); random: Gaussian")
    p.add_argument("--knob", action="append", type=_knob, metavar="NAME=VALUE",
                   help="an llm_like knob (repeatable), e.g. --knob peakedness=2; see "
                        "blasst_ref.workloads.llm_like for the knobs")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16", "float64"),
                   default="float32",
                   help="input dtype (float64: CPU only; bfloat16: GPU only, torch tensors)")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs (default 0)")
    p.add_argument("--block-q", type=_positive_int, default=None, help="prefill tile rows")
    p.add_argument("--block-k", type=_positive_int, default=None, help="tile keys")
    p.add_argument("--decode-seed", nargs="+", choices=("sink", "none"), default=["sink"],
                   help="decode's split-KV skip test: sink (each chunk also against the sink "
                        "tile's max, the default), none (its own running max only), or both "
                        "(one table each; auto: thresholds searched per seed)")
    p.add_argument("--repeat", type=_positive_int, default=5,
                   help="timed calls per variant after the warm-up (median reported; default 5)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="threads for numba and torch (default: their own defaults)")
    p.add_argument("--tol", type=_tolerance, default=0.02,
                   help="accepted |sparsity - S| for auto:S (default 0.02)")
    p.add_argument("--no-error", action="store_true",
                   help="skip the float64 exact result and the rel.err column (faster)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per row (JSON lines) instead of tables")
    p.add_argument("--plot", metavar="FILE", help="write a PNG (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bars on stderr")
    p.set_defaults(func=run, parser=p)
    return p


def build_cases(args, parser) -> list[Case]:
    """Cases from ``--preset`` or from the size options; argparse errors for bad input."""
    knobs = tuple(args.knob or ())
    if knobs:
        import inspect

        from ..workloads import llm_like

        known = [n for n, prm in inspect.signature(llm_like).parameters.items()
                 if prm.kind is inspect.Parameter.KEYWORD_ONLY
                 and n not in ("v_dim", "seed", "dtype")]
        for name, _ in knobs:
            if name not in known:
                parser.error(f"--knob {name}: llm_like has no such knob; knobs: {', '.join(known)}")
        if args.workload == "random":
            parser.error("--knob applies to --workload llm only")
    if args.preset:
        given = [f"--{a}" for a in SIZE_ARGS if getattr(args, a) is not None]
        if given:
            parser.error(f"--preset {args.preset} fixes the sizes; drop {', '.join(given)} "
                         f"(or drop --preset)")
        return [replace(c, dtype=args.dtype, seed=args.seed, knobs=knobs)
                for c in PRESETS[args.preset]]
    phase = args.phase or "prefill"
    d = PHASE_DEFAULTS[phase]
    b = args.B or d["B"]
    hq = args.Hq or d["Hq"]
    hkv = args.Hkv or d["Hkv"] or hq
    if hkv > hq or hq % hkv:
        parser.error(f"--Hq {hq} must be a multiple of --Hkv {hkv} "
                     f"(MHA: equal, GQA/MQA: Hq % Hkv == 0)")
    dqk = args.D or d["D"]
    dv = args.Dv or dqk
    causal = True if args.causal is None else args.causal
    specs = tuple(args.thresh) if args.thresh else thresh_specs("0", "auto:0.75")
    cases = []
    for L in args.L or d["L"]:
        lq = args.Lq or d["Lq"] or L
        if phase == "decode" and not tiling.is_decode(lq):
            parser.error(f"--phase decode needs --Lq <= {tiling.DECODE_MAX_Q_LEN}, got {lq}")
        if phase == "prefill" and tiling.is_decode(lq):
            parser.error(f"a query length of {lq} <= {tiling.DECODE_MAX_Q_LEN} takes the split-KV "
                         f"decode path: use --phase decode (or a larger --L/--Lq)")
        title = f"{phase} L={L}" + ("" if causal else " no mask")
        cases.append(Case(title, b, hq, hkv, lq, L, dqk, dv, causal, specs,
                          workload=args.workload or "llm", seed=args.seed, dtype=args.dtype,
                          knobs=knobs))
    return cases


def _json_safe(row: dict) -> dict:
    """NaN/inf are not JSON: write them as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()}


def run(args) -> int:
    """Entry point of the subcommand (``args`` from :func:`register`'s parser)."""
    parser = args.parser
    cases = build_cases(args, parser)
    if args.backend:
        backends = list(dict.fromkeys(args.backend))
        for name in backends:
            ok, why = backend_available(name)
            if not ok:
                parser.error(f"--backend {name} is not available here: {why}")
    else:
        backends = [b for b in ("cpu", "cpu-noskip", "torch") if backend_available(b)[0]]
        if not backends:
            parser.error("no default backend is available (blasst_ref.cpu does not import); "
                         "pass --backend reference")
    if any(c.dtype == "float64" for c in cases) and "cuda" in backends:
        parser.error("--dtype float64 is not supported by the cuda backend")
    if "cuda" in backends and torch_cuda_available()[0]:
        # the GPU peers (PyTorch SDPA on its flash and cuDNN backends), on the same tensors
        backends += [b_ for b_ in TORCH_GPU if b_ not in backends]
    if any(c.dtype == "bfloat16" for c in cases):
        host = [b_ for b_ in backends if b_ in ("reference", "cpu", "cpu-noskip", "torch")]
        if host:
            parser.error(f"--dtype bfloat16 runs on the GPU only (torch rows; numpy has no "
                         f"bfloat16): drop --backend {' '.join(host)}")
    if args.threads:
        import numba

        if args.threads > numba.config.NUMBA_NUM_THREADS:
            parser.error(f"--threads {args.threads} exceeds numba's maximum "
                         f"{numba.config.NUMBA_NUM_THREADS} (NUMBA_NUM_THREADS)")
        numba.set_num_threads(args.threads)
        if "torch" in backends:
            import torch

            torch.set_num_threads(args.threads)

    info = machine_mod.machine_info(gpu="cuda" in backends)
    line = info.line()
    if not args.json:
        print(line, flush=True)
    results = []
    seeds = list(dict.fromkeys(args.decode_seed))
    runs = [(c if len(seeds) == 1 or c.phase != "decode"
             else replace(c, title=f"{c.title}, decode_seed={s}"), s)
            for c in cases for s in (seeds if c.phase == "decode" else seeds[:1])]
    for case, seed in runs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RuntimeWarning)  # inf/NaN in inputs
            res = run_case(case, backends, repeat=args.repeat, block_q=args.block_q,
                           block_k=args.block_k, tol=args.tol, with_error=not args.no_error,
                           machine_line=line, quiet=args.quiet, decode_seed=seed)
        results.append(res)
        if args.json:
            for row in res.rows:
                print(json.dumps(_json_safe(row)), flush=True)
        else:
            print()
            print(format_table(res), flush=True)
    if args.plot:
        write_plot(results, args.plot, line)
        if not args.json:
            print(f"\nplot written to {args.plot}")
    return 0
