"""``python -m blasst_ref.demo``: BLASST against dense attention on a built-in LLM-like input.

The README's first command. On seeded inputs from :func:`blasst_ref.workloads.llm_like`
(attention sinks, a local window, heavy hitters: the peaked heads of real LLMs), for each
host backend it runs dense attention (``thresh=0``) and BLASST at two thresholds, found so
that about 50% and 75% of the tiles are skipped, and prints:

* ``backend``, ``phase``, ``heads`` (the reference runs one kv group only: it is the slow,
  readable numpy spec);
* ``thresh`` and the ``sparsity`` it reached (skipped / visited tiles, from ``return_stats``);
* ``rel.err``: ``||out - dense|| / ||dense||``, ``dense`` the float64 oracle
  (:func:`blasst_ref.dense_attention`; computed in row blocks by
  :func:`blasst_ref.bench.oracle.dense_oracle`, the same function with bounded memory);
* ``ms``: the median time (a warm-up call, which includes Numba's compilation, is excluded)
  and ``vs dense``: the same backend's dense time over it.

Two cases: causal prefill (``B=1, Hq=8, Hkv=2, L=2048, D=64``) and GQA decode (one new
token, ``B=1, Hq=16, Hkv=4, Lk=32768, D=128``), on llm_like inputs with ``peakedness=2``
(``--peakedness`` changes it). ``--small`` shrinks both (for tests); ``--json`` prints one
JSON object per row instead. Timings on a laptop are indicative only;
the measured numbers are in ``docs/BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass

from . import attention
from .bench.backends import cpu_available, cuda_available, to_device
from .bench.machine import machine_info
from .bench.oracle import dense_oracle, rel_l2
from .bench.timing import Variant, measure
from .calibrate import find_threshold


@dataclass(frozen=True)
class DemoCase:
    """One demo problem: q ``(b, hq, lq, d)``, k and v ``(b, hkv, lk, d)``, causal."""

    phase: str
    b: int
    hq: int
    hkv: int
    lq: int
    lk: int
    d: int


#: (prefill, decode) at full and ``--small`` size.
CASES = {
    False: (DemoCase("prefill", 1, 8, 2, 2048, 2048, 64),
            DemoCase("decode", 1, 16, 4, 1, 32768, 128)),
    True: (DemoCase("prefill", 1, 4, 2, 256, 256, 32),
           DemoCase("decode", 1, 4, 2, 1, 2048, 32)),
}

#: Target tile sparsities of the BLASST rows (``auto:S`` in the benchmark's terms).
TARGETS = (0.5, 0.75)

COLUMNS = ("backend", "phase", "heads", "thresh", "sparsity", "rel.err", "ms", "vs dense")

EXPLANATION = """\
What this shows: BLASST keeps FlashAttention's tiles and online softmax, and skips a key tile
(no exp, no V load, no P.V) when every row's best score in it is below thresh times that
row's running maximum. On LLM-like heads most of the probability mass sits in a few sinks,
the local window and some heavy hitters, so many tiles fall under the bar: sparsity is the
share of visited tiles skipped. The error grows with thresh, as each skipped probability is
below thresh relative to the running max (DESIGN.md §3 bounds it), and how much sparsity a
given error buys depends on how peaked the heads are (try --peakedness); the time drops
with sparsity: in prefill the QK product still runs for every tile, so the ideal speedup is
about 2/(2-s) (1.6x at 75%); in decode the skipped V bytes are the saving. The threshold that
gives a sparsity depends on the context length: BLASST calibrates thresh = scale_factor / L
(blasst_ref.calibrate). Compare times only within one run on one machine."""


#: llm_like's ``peakedness`` knob for the demo (mean inverse temperature of the heads). The
#: sparsity a threshold reaches, and the error it costs, depend on how peaked the heads are:
#: flatter heads need a larger threshold for the same sparsity, and pay more error for it
#: (at the time of writing, at llm_like's default 1.0, 75% sparsity cost ~10-30% relative
#: error; at 2.0 well under 1% in prefill). ``--peakedness`` changes it.
DEFAULT_PEAKEDNESS = 2.0


def _inputs(case: DemoCase, seed: int = 0, peakedness: float = DEFAULT_PEAKEDNESS):
    from .workloads import llm_like  # lazily: only the demo and benchmarks need it

    return llm_like(case.b, case.hq, case.hkv, case.lq, case.lk, case.d, seed=seed,
                    peakedness=peakedness)


def host_backends() -> list[str]:
    """``reference`` always; ``cpu`` when the Numba kernels import."""
    return ["reference"] + (["cpu"] if cpu_available()[0] else [])


def run_case(case: DemoCase, *, repeat: int,
             peakedness: float = DEFAULT_PEAKEDNESS) -> tuple[list[dict], list[str]]:
    """Rows for one case on every available backend, and notes for under the table.

    Row keys: backend, phase, heads, B, Hq, Hkv, Lq, Lk, D, causal, peakedness, thresh,
    sparsity, rel_err, ms (median, milliseconds), repeats, speedup_vs_dense."""
    causal = True
    q, k, v = _inputs(case, peakedness=peakedness)
    notes = []
    group = case.hq // case.hkv
    have_cpu = cpu_available()[0]

    # thresholds for ~50% and ~75% sparsity on this input (searched with the fast backend)
    search = "cpu" if have_cpu else "reference"
    threshes = [0.0]
    cache: dict = {}
    for target in TARGETS:
        res = find_threshold(q, k, v, target, causal=causal, backend=search, cache=cache)
        threshes.append(res.thresh)
    threshes = sorted(set(threshes))

    # the reference runs on the first kv group only (same input, 1/Hkv of the work)
    sub = (q[:, :group], k[:, :1], v[:, :1])
    exact_full = dense_oracle(q, k, v, causal=causal)
    exact_sub = exact_full[:, :group]

    plans = []  # (backend, heads label, (q, k, v), exact, variant kwargs)
    if have_cpu:
        plans.append(("cpu", f"{case.hq}/{case.hkv}", (q, k, v), exact_full, {}))
    plans.append(("reference", f"{group}/1 (1 kv group)", sub, exact_sub, {}))
    if case_uses_cuda():
        try:
            dev, sync, to_host = to_device((q, k, v))
            plans.append(("cuda", f"{case.hq}/{case.hkv}", tuple(dev), exact_full,
                          dict(sync=sync, _to_host=to_host)))
        except Exception as exc:  # pragma: no cover - needs a GPU
            notes.append(f"cuda skipped: {exc}")

    rows = []
    for backend, heads, (qq, kk, vv), exact, kw in plans:
        to_host = kw.pop("_to_host", None)
        variants = [
            Variant(
                f"{t!r}",
                lambda t=t: attention(qq, kk, vv, t, causal=causal, backend=backend,
                                      return_stats=True),
                timed_fn=lambda t=t: attention(qq, kk, vv, t, causal=causal, backend=backend),
                **kw,
            )
            for t in threshes
        ]

        def on_warm(variant, res, exact=exact, to_host=to_host):
            out, st = res
            out = to_host(out) if to_host else out
            return st.sparsity, rel_l2(out, exact)

        try:
            timings = measure(variants, repeat, on_warm=on_warm)
        except Exception as exc:  # e.g. a backend that is not written yet
            notes.append(f"{backend} skipped: {type(exc).__name__}: {exc}")
            continue
        dense_ms = timings[repr(0.0)].median_ms
        for t in threshes:
            tm = timings[repr(t)]
            sparsity, err = tm.result
            rows.append(dict(
                backend=backend, phase=case.phase, heads=heads, B=case.b, Hq=case.hq,
                Hkv=case.hkv, Lq=case.lq, Lk=case.lk, D=case.d, causal=causal,
                peakedness=peakedness,
                thresh=t, sparsity=sparsity, rel_err=err, ms=tm.median_ms,
                repeats=len(tm.samples_ms), speedup_vs_dense=dense_ms / tm.median_ms,
            ))
    return rows, notes


_CUDA: bool | None = None


def case_uses_cuda() -> bool:
    """Whether ``numba.cuda.is_available()`` (asked once)."""
    global _CUDA
    if _CUDA is None:
        _CUDA = cuda_available()[0]
    return _CUDA


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of demo rows (columns :data:`COLUMNS`)."""
    body = []
    for r in rows:
        body.append((
            r["backend"], r["phase"], r["heads"],
            "0 (dense)" if r["thresh"] == 0 else f"{r['thresh']:.3g}",
            f"{r['sparsity']:.2f}", f"{r['rel_err']:.1e}",
            f"{r['ms']:.1f}" + (" (1 run)" if r["repeats"] == 1 else ""),
            f"{r['speedup_vs_dense']:.2f}x",
        ))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(COLUMNS)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(COLUMNS, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m blasst_ref.demo",
        description="BLASST sparse attention vs dense on a built-in LLM-like input: sparsity, "
                    "error and speedup per backend.",
    )
    parser.add_argument("--small", action="store_true",
                        help="tiny sizes (seconds; for tests): timings mean nothing there")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per row (JSON lines) instead of the table")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed calls per variant after a warm-up (default 3)")
    parser.add_argument("--peakedness", type=float, default=DEFAULT_PEAKEDNESS,
                        help="llm_like's peakedness knob: how sharp the heads are (default "
                             f"{DEFAULT_PEAKEDNESS}; 1.0 is llm_like's default)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    if not (math.isfinite(args.peakedness) and args.peakedness > 0):
        parser.error(f"--peakedness must be a finite number > 0, got {args.peakedness}")

    t0 = time.perf_counter()
    info = machine_info(gpu=case_uses_cuda())
    rows, notes = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        for case in CASES[args.small]:
            r, n = run_case(case, repeat=args.repeat, peakedness=args.peakedness)
            rows += r
            notes += n
    if args.json:
        for r in rows:
            print(json.dumps(r), flush=True)
        return 0
    print(info.line())
    for case in CASES[args.small]:
        what = (f"causal prefill, B={case.b} Hq={case.hq} Hkv={case.hkv} L={case.lq} D={case.d}"
                if case.phase == "prefill" else
                f"decode (one new token), B={case.b} Hq={case.hq} Hkv={case.hkv} "
                f"Lk={case.lk} D={case.d}")
        print(f"  {case.phase}: {what}; llm_like input, peakedness={args.peakedness:g}")
    print()
    print(format_rows(rows))
    for n in notes:
        print(f"  * {n}")
    if "cpu" not in {r["backend"] for r in rows}:
        print(f"  * cpu backend unavailable: {cpu_available()[1]}")
    print("  * reference: the numpy spec, run on the first kv group only (it is slow).")
    print()
    print(EXPLANATION)
    print(f"\n(ran in {time.perf_counter() - t0:.1f} s, Numba compilation included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
