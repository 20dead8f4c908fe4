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

While it works it prints a line per stage on stderr (``--quiet``: none), and says whether
Numba is compiling the CPU kernels (the first run: about a minute on 2 cores) or loading
them from its on-disk cache (later runs).

Its thresholds are not those of ``python -m blasst_ref.calibrate``, which runs llm_like's
default ``peakedness=1``: peakedness multiplies every logit, so a threshold ``t`` at
peakedness ``p`` makes exactly the decisions of ``t ** (1 / p)`` at peakedness 1 (the
demo's 50% prefill threshold, ~5.6e-7, is the square of calibrate's ~7.5e-4 at L=2048).
The table's notes print that conversion (:func:`peakedness_one_equivalent`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
below thresh relative to the running max (docs/DESIGN.md §3.4 bounds it), and how much
sparsity a given error buys depends on how peaked the heads are (try --peakedness); the time
drops with sparsity: in prefill the QK product still runs for every tile, so the ideal
speedup is about 2/(2-s) (1.6x at 75%); in decode the skipped V bytes are the saving. The
threshold that gives a sparsity depends on the context length: BLASST calibrates
thresh = scale_factor / L (blasst_ref.calibrate). Compare times only within one run on one
machine."""


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


def peakedness_one_equivalent(thresh: float, peakedness: float) -> float:
    """The threshold that makes, on llm_like inputs of ``peakedness=1``, the decisions that
    ``thresh`` makes at ``peakedness``: ``thresh ** (1 / peakedness)``.

    Why: llm_like multiplies every scaled score of a head by ``peakedness`` (its logit model,
    noise included), so the skip test ``exp(p * d) < t`` on the score gap ``d`` holds exactly
    when ``exp(d) < t ** (1 / p)``."""
    return thresh ** (1.0 / peakedness)


class Progress:
    """Stage lines on a stream (stderr) while the demo works, each stamped with the seconds
    since the start; ``enabled=False`` prints nothing."""

    def __init__(self, stream=None, enabled: bool = True):
        self.stream = stream
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.t0:6.1f} s] {message}",
                  file=self.stream or sys.stderr, flush=True)


def cpu_kernels_cached(dirs=None) -> bool:
    """Whether Numba has compiled the CPU kernels on an earlier run: its cache index files
    of the prefill and decode kernels (``prefill.*.nbi``, ``decode.*.nbi``) sit in ``dirs``,
    by default ``blasst_ref/cpu/__pycache__`` and ``NUMBA_CACHE_DIR``. Sources that changed
    since make Numba compile again; this only looks for the files."""
    if dirs is None:
        from numba import config

        from . import cpu

        dirs = [os.path.join(os.path.dirname(cpu.__file__), "__pycache__")]
        if config.CACHE_DIR:
            dirs.append(config.CACHE_DIR)
    for d in dirs:
        for _root, _dirs, files in os.walk(d):
            if any(f.startswith(("prefill.", "decode.")) and f.endswith(".nbi") for f in files):
                return True
    return False


def host_backends() -> list[str]:
    """``reference`` always; ``cpu`` when the Numba kernels import."""
    return ["reference"] + (["cpu"] if cpu_available()[0] else [])


def run_case(case: DemoCase, *, repeat: int, peakedness: float = DEFAULT_PEAKEDNESS,
             say=None) -> tuple[list[dict], list[str]]:
    """Rows for one case on every available backend, and notes for under the table.

    Row keys: backend, phase, heads, B, Hq, Hkv, Lq, Lk, D, causal, peakedness, thresh,
    sparsity, rel_err, ms (median, milliseconds), repeats, speedup_vs_dense.
    ``say(message)`` is called at the start of each stage (a :class:`Progress`)."""
    say = say or (lambda message: None)
    causal = True
    say(f"{case.phase}: llm_like inputs, q {case.b}x{case.hq}x{case.lq}x{case.d}, "
        f"k and v {case.b}x{case.hkv}x{case.lk}x{case.d}")
    q, k, v = _inputs(case, peakedness=peakedness)
    notes = []
    group = case.hq // case.hkv
    have_cpu = cpu_available()[0]

    # thresholds for ~50% and ~75% sparsity on this input (searched with the fast backend)
    search = "cpu" if have_cpu else "reference"
    say(f"{case.phase}: searching the thresholds that skip "
        + " and ".join(f"{t:.0%}" for t in TARGETS) + f" of the tiles ({search} backend)")
    threshes = [0.0]
    cache: dict = {}
    for target in TARGETS:
        res = find_threshold(q, k, v, target, causal=causal, backend=search, cache=cache)
        threshes.append(res.thresh)
    threshes = sorted(set(threshes))

    # the reference runs on the first kv group only (same input, 1/Hkv of the work)
    sub = (q[:, :group], k[:, :1], v[:, :1])
    say(f"{case.phase}: dense attention in float64 (the oracle of rel.err)")
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

        say(f"{case.phase}: timing {backend}, heads {heads}: {len(threshes)} thresholds, "
            f"a warm-up and {repeat} timed call{'s' if repeat > 1 else ''} each"
            + (" (the numpy spec: slow)" if backend == "reference" else ""))
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


def threshold_note(rows: list[dict], peakedness: float) -> str:
    """The note that relates the demo's thresholds to ``python -m blasst_ref.calibrate``'s
    (llm_like's default ``peakedness=1``), for the first sparse prefill row."""
    sparse = [r for r in rows if r["thresh"] > 0]
    row = next((r for r in sparse if r["phase"] == "prefill"), sparse[0] if sparse else None)
    if row is None:
        return "  * no threshold > 0 was found on these inputs"
    t, L = row["thresh"], row["Lk"]
    if peakedness == 1.0:
        return (f"  * thresholds: llm_like at peakedness 1, the workload of `python -m "
                f"blasst_ref.calibrate`,\n    whose scale factor is thresh * L ({row['phase']}, "
                f"L={L}: {t:.3g} * {L} = {t * L:.3g}).")
    t1 = peakedness_one_equivalent(t, peakedness)
    return (f"  * thresholds: these are for peakedness {peakedness:g}; `python -m "
            f"blasst_ref.calibrate` runs llm_like's\n    default, peakedness 1. Peakedness p "
            f"multiplies every logit, so a threshold t at p skips\n    exactly what t ** (1/p) "
            f"skips at peakedness 1: the {row['phase']} row's {t:.3g} (L={L}) is\n    "
            f"{t1:.3g} there ({t1 / t:.0f}x larger). `calibrate --peakedness {peakedness:g}` "
            f"calibrates this workload.")


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
                             f"{DEFAULT_PEAKEDNESS}; 1.0 is llm_like's default and "
                             "calibrate's workload)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress lines on stderr while it works")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    if not (math.isfinite(args.peakedness) and args.peakedness > 0):
        parser.error(f"--peakedness must be a finite number > 0, got {args.peakedness}")

    t0 = time.perf_counter()
    say = Progress(sys.stderr, enabled=not args.quiet)
    say("BLASST vs dense attention: " + " and ".join(c.phase for c in CASES[args.small])
        + f" on llm_like inputs, backends: {', '.join(host_backends())}")
    say("reading the machine: CPU, libraries, thread counts")
    info = machine_info(gpu=case_uses_cuda())
    if cpu_available()[0]:
        if cpu_kernels_cached():
            say("the CPU kernels load from Numba's on-disk cache (compiled on an earlier run)")
        else:
            say("first run: Numba compiles the CPU kernels as they are first called (about "
                "a minute on 2 cores, once; later runs load them from Numba's cache)")
    rows, notes = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        for case in CASES[args.small]:
            r, n = run_case(case, repeat=args.repeat, peakedness=args.peakedness, say=say)
            rows += r
            notes += n
    say("done")
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
    print(threshold_note(rows, args.peakedness))
    print()
    print(EXPLANATION)
    print(f"\n(ran in {time.perf_counter() - t0:.1f} s, Numba's compilation or cache load "
          "included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
