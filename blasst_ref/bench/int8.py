"""``python -m blasst_ref.bench int8``: the u8 x s8 ``QMatMul`` kernel against float32.

Two kinds of cases, timed in one interleaved run each (:mod:`.timing`):

* ``matmul M=N=K`` -- one layer ``relu(a @ W + b)``: ``float32`` is what the compiled float
  graph runs (numpy's BLAS into the output, then the fused epilogue:
  :func:`blasst_ref.graph.kernels.matmul_epilogue`), ``float32-packed`` is the blocked Numba
  kernel on packed panels (:func:`~blasst_ref.graph.kernels.matmul_packed`), ``int8`` is
  :func:`blasst_ref.graph.int8_kernels.qmatmul` (u8 activations, packed s8 weights, the
  same bias and ReLU, float32 out).
* ``dlrm-bottom`` / ``dlrm-top`` at a batch -- the whole MLP graph compiled in float32
  against the same graph after :func:`blasst_ref.graph.quantize.quantize_graph`, compiled
  (every layer a ``QMatMul``, requantising to u8 between layers).

Peer (when ``onnx`` and ``onnxruntime`` import; ``--no-onnx`` skips it): ONNX Runtime on
the same shapes, ``ort-f32`` on the float graph and ``ort-int8`` on the QDQ graph that
:func:`~blasst_ref.graph.quantize.quantize_graph` writes (exported with
:func:`blasst_ref.graph.onnx_export.to_onnx`; ORT's graph optimiser fuses the QDQ pattern
into its int8 kernels itself -- ``QLinearMatMul`` / ``MatMulIntegerToFloat`` -- with every
optimisation on, one intra-op thread per Numba thread, its default spinning), timed in a
measurement of their own after ours (pools that spin disturb each other's next block). For the
``matmul`` rows that graph is ``relu(x @ W + b)`` (``models.mlp([K, N], M)``) with a float
input, so ORT's int8 time includes quantizing ``x`` -- ours takes u8 input.

Rates: ``GOP/s = 2 M N K / time``. The VNNI peak of the cores used is
``cores x GHz x (multiply-adds per vpdpbusd) x (vpdpbusd per cycle) x 2``: 64 multiply-adds
per zmm instruction (16 lanes x 4 bytes), 32 per ymm; one zmm ``vpdpbusd`` per cycle on AMD
Zen 4, two on Intel server cores with two 512-bit FMA units (Ice Lake-SP, Sapphire Rapids).
GHz is the nominal/maximum clock the OS reports; override with ``--ghz`` and
``--vnni-per-cycle``. It is an upper bound: turbo and AVX-512 clocks differ.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from . import machine as machine_mod
from .timing import Variant, measure

PRESETS = {
    "matmul-dlrm": [("matmul", 1024), ("matmul", 4096), ("dlrm-bottom", 128),
                    ("dlrm-bottom", 512), ("dlrm-top", 128), ("dlrm-top", 512)],
    "quick": [("matmul", 512), ("dlrm-bottom", 128)],
}


def cpu_ghz() -> float | None:
    """The CPU's maximum (else current) clock in GHz, as the OS reports it."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            return int(f.read()) / 1e6
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":")[1]) / 1e3
    except (OSError, ValueError):
        pass
    return None


def default_vnni_per_cycle(cpu_model: str) -> int:
    """zmm ``vpdpbusd`` issued per cycle per core: 2 on Intel Xeon, 1 otherwise (Zen 4)."""
    return 2 if "xeon" in cpu_model.lower() else 1


def vnni_peak_gops(cores: int, ghz: float, per_cycle: int) -> float:
    """Peak int8 GOP/s (a multiply-add is 2 ops) of ``cores`` at ``ghz``."""
    from ..graph import int8_kernels as Q8

    return cores * ghz * Q8.vnni_peak_macs_per_cycle() * per_cycle * 2


def ort_available() -> bool:
    """Whether the ONNX Runtime peer can run here (``onnx`` to export, ``onnxruntime``)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _ort_session(graph, threads: int):
    """ONNX Runtime on ``graph`` (exported by :func:`~blasst_ref.graph.onnx_export.to_onnx`):
    CPU provider, all graph optimisations, ``threads`` intra-op threads, ORT's default
    spinning (the benchmark times each variant in back-to-back blocks)."""
    import onnxruntime as ort

    from ..graph.onnx_export import to_onnx

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(to_onnx(graph).SerializeToString(), sess_options=opts,
                                providers=["CPUExecutionProvider"])


def _ort_variants(g, qg, feeds, threads: int) -> list:
    """``ort-f32`` (float graph ``g``) and ``ort-int8`` (its QDQ form ``qg``) variants."""
    sf, sq = _ort_session(g, threads), _ort_session(qg, threads)
    return [Variant("ort-f32", lambda: sf.run(None, feeds)[0]),
            Variant("ort-int8", lambda: sq.run(None, feeds)[0])]


#: Seconds of quiet before and after the ORT variants' own measurement, and before every
#: block of back-to-back calls (``--quiet``).
ORT_QUIET_S = 0.3
#: Seconds of untimed back-to-back calls after each such pause.
REWARM_S = 0.05


def _settled(variants: list, quiet_s: float) -> list:
    """The variants, each sleeping ``quiet_s`` before its first call after another
    variant's and then calling itself for :data:`REWARM_S` -- all inside the first call
    of a block, which :func:`~.timing.measure` runs untimed (its ``rewarm`` calls): the
    pause and the extra warm-up are never in a sample. Why: OpenBLAS's 16 threads
    spin for ~0.1 s after a call and Numba's OpenMP threads for a while too; on the
    16-core Xeon a block that starts while the other pool still spins shares every core
    with it (a 5 ms matmul block measured 8 ms per call right after numpy's BLAS)."""
    if quiet_s <= 0:
        return variants
    state = {"last": None}

    def wrap(v):
        f = v.timed_fn or v.fn

        def timed():
            if state["last"] != v.name:
                time.sleep(quiet_s)
                state["last"] = v.name
                # then wake this variant's pool for real: calls for >= REWARM_S (a VM's
                # idle vCPUs and a sleeping pool take more than one short call to wake)
                t_end = time.perf_counter() + REWARM_S
                while time.perf_counter() < t_end:
                    f()
            return f()
        return Variant(v.name, v.fn, timed_fn=timed, max_repeat=v.max_repeat,
                       warm_is_timed=v.warm_is_timed, sync=v.sync)
    return [wrap(v) for v in variants]


def _measure(variants, repeat, progress, blocks, quiet_s, **kw):
    """:func:`~.timing.measure`, with a pause before each block when ``blocks`` > 0."""
    return measure(_settled(variants, quiet_s) if blocks else variants, repeat,
                   progress=progress, blocks=blocks, **kw)


def _measure_apart(variants, repeat, progress, blocks, quiet_s):
    """Time the ORT variants in a measurement of their own, after ours, with a pause on
    either side: ORT's 16 pool threads spin after a run (its default, which is its best
    in back-to-back calls) and Numba's OpenMP threads spin too -- timed in one rotation
    with ours, each pool's spinning landed on the other's next block (a 1 ms int8
    1024^3 call measured 8 ms right after an ORT block on the Xeon)."""
    time.sleep(ORT_QUIET_S)
    t = _measure(variants, repeat, progress, blocks, quiet_s)
    time.sleep(ORT_QUIET_S)
    return t


def _ort_matmul_variants(size: int, threads: int) -> list:
    """The ORT variants of a ``matmul`` row: ``relu(x @ W + b)`` at ``M = N = K = size``."""
    from .. import graph as bg
    from ..graph.quantize import quantize_graph

    g = bg.models.mlp([size, size], size, final_activation="relu")
    qg = quantize_graph(g, [bg.models.example_inputs(g, seed=s) for s in range(2)])
    return _ort_variants(g, qg, bg.models.example_inputs(g, seed=99), threads)


def _matmul_case(size: int, repeat: int, progress, blocks: int = 0,
                 onnx_threads: int = 0, quiet_s: float = 0.0) -> dict:
    from ..graph import int8_kernels as Q8
    from ..graph import kernels as K
    from ..graph.quantize import activation_params, weight_params

    rng = np.random.default_rng(0)
    m = n = k = size
    a = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32) * 0.1
    out = np.empty((m, n), np.float32)
    out_i8 = np.empty((m, n), np.float32)
    pw = K.pack_weight(w)
    a_scale, a_zp = activation_params(a.min(), a.max())
    a_u8 = np.clip(np.rint(a / a_scale) + a_zp, 0, 255).astype(np.uint8)
    w_s8, w_scale = weight_params(w)
    pq = Q8.pack_int8_weight(w_s8, w_scale)

    def float32():
        np.matmul(a, w, out=out)
        return K.matmul_epilogue(out, b, K.ACT_RELU, None, out, parallel=False)

    variants = [
        Variant("float32", float32),
        Variant("float32-packed", lambda: K.matmul_packed(a, pw, b, K.ACT_RELU, None, out)),
        Variant("int8", lambda: Q8.qmatmul(a_u8, a_scale, a_zp, pq, b, K.ACT_RELU, None,
                                           out=out_i8)),
    ]
    t = _measure(variants, repeat, progress, blocks, quiet_s,
                 on_warm=lambda v, r: None if r is None else np.array(r, copy=True))
    if onnx_threads:
        t.update(_measure_apart(_ort_matmul_variants(size, onnx_threads), repeat, progress,
                                blocks, quiet_s))
    ref = np.maximum(a.astype(np.float64) @ w + b, 0)
    err = float(np.linalg.norm(t["int8"].result - ref) / np.linalg.norm(ref))
    return {"case": f"matmul {m}x{k}x{n}", "macs": m * n * k,
            "ms": {v: x.median_ms for v, x in t.items()}, "int8_rel_err": err}


def _mlp_case(model: str, batch: int, repeat: int, progress, blocks: int = 0,
              onnx_threads: int = 0, quiet_s: float = 0.0) -> dict:
    from .. import graph as bg
    from ..graph.quantize import quantize_graph

    g = {"dlrm-bottom": bg.models.dlrm_bottom_mlp,
         "dlrm-top": bg.models.dlrm_top_mlp}[model](batch)
    samples = [bg.models.example_inputs(g, seed=s) for s in range(4)]
    feeds = bg.models.example_inputs(g, seed=99)
    qg = quantize_graph(g, samples)
    cf = bg.compile(g, matmul_kernel="blas")
    cp = bg.compile(g, matmul_kernel="packed")
    cq = bg.compile(qg)
    assert "QMatMul" in cq.graph.count_ops()
    variants = [Variant("float32", lambda: cf(**feeds)),
                Variant("float32-packed", lambda: cp(**feeds)),
                Variant("int8", lambda: cq(**feeds))]
    t = _measure(variants, repeat, progress, blocks, quiet_s)
    if onnx_threads:
        t.update(_measure_apart(_ort_variants(g, qg, feeds, onnx_threads), repeat, progress,
                                blocks, quiet_s))
    ref = t["float32"].result["y"].astype(np.float64)
    err = float(np.linalg.norm(t["int8"].result["y"] - ref) / np.linalg.norm(ref))
    if onnx_threads:
        ort_err = float(np.linalg.norm(t["ort-int8"].result - ref) / np.linalg.norm(ref))
    macs = sum(int(np.prod(g.tensors[nd.inputs[0]].shape)) * g.tensors[nd.inputs[1]].shape[1]
               for nd in g.nodes if nd.op == "MatMul")
    row = {"case": f"{model} b={batch}", "macs": macs,
           "ms": {v: x.median_ms for v, x in t.items()}, "int8_rel_err": err}
    if onnx_threads:
        row["ort_int8_rel_err"] = ort_err
    return row


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``int8`` subcommand to ``python -m blasst_ref.bench``."""
    p = subparsers.add_parser(
        "int8", help="time the u8 x s8 QMatMul kernel and int8 MLP graphs against float32",
        description=__doc__.split("\n\n")[0].split(": ", 1)[-1],
        epilog="examples:\n  python -m blasst_ref.bench int8 --preset matmul-dlrm\n"
               "  python -m blasst_ref.bench int8 --size 1024 2048\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="fixed cases: matmul-dlrm (1024^3 and 4096^3 layers, DLRM MLPs at "
                        "batch 128 and 512: the tables of docs/BENCHMARKS.md), quick")
    p.add_argument("--size", type=int, nargs="+", default=None, help="M = N = K of matmuls")
    p.add_argument("--mlp", nargs="+", default=[], metavar="MODEL:BATCH",
                   help="e.g. dlrm-top:512")
    p.add_argument("--repeat", type=int, default=5,
                   help="timed calls per variant after a warm-up (default 5)")
    p.add_argument("--ghz", type=float, default=None, help="clock for the peak (default: OS)")
    p.add_argument("--vnni-per-cycle", type=int, default=None,
                   help="zmm vpdpbusd per cycle per core (default: 2 Intel Xeon, 1 else)")
    p.add_argument("--blocks", type=int, default=2,
                   help="time each variant in this many blocks of back-to-back calls "
                        "(0: interleave call by call; see bench graph --help)")
    p.add_argument("--quiet", type=float, default=0.25, metavar="SECONDS",
                   help="with --blocks: sleep this long before each block (untimed: the "
                        "block's first re-warm call), so that the previous variant's "
                        "spinning pool (OpenBLAS, OpenMP, ORT) is idle; 0 disables")
    p.add_argument("--no-onnx", action="store_true",
                   help="skip the ONNX Runtime peer even if onnx + onnxruntime import")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per row (JSON lines) instead of the table")
    p.set_defaults(func=run, parser=p)
    return p


def run(args) -> int:
    import numba
    from tqdm import tqdm

    from ..graph import int8_kernels as Q8

    cases = list(PRESETS[args.preset]) if args.preset else []
    cases += [("matmul", s) for s in (args.size or [])]
    for item in args.mlp:
        model, _, batch = item.partition(":")
        if model not in ("dlrm-bottom", "dlrm-top") or not batch.isdigit():
            args.parser.error(f"--mlp takes dlrm-bottom:BATCH or dlrm-top:BATCH, got {item!r}")
        cases.append((model, int(batch)))
    if not cases:
        cases = PRESETS["quick"]
    info = machine_mod.machine_info()
    cores = numba.get_num_threads()
    ghz = args.ghz or cpu_ghz()
    per_cycle = args.vnni_per_cycle or default_vnni_per_cycle(info.cpu_model)
    backend = Q8.int8_backend()
    peak = vnni_peak_gops(cores, ghz, per_cycle) if ghz and backend != "portable" else None
    print(info.line())
    print(f"int8 backend {backend}; peak for {cores} cores = {cores} x {ghz or float('nan'):.2f}"
          f" GHz x {Q8.vnni_peak_macs_per_cycle()} MAC x {per_cycle}/cycle x 2 = "
          f"{peak or float('nan'):.0f} GOP/s")
    onnx_threads = cores if not args.no_onnx and ort_available() else 0
    if onnx_threads:
        import onnxruntime

        print(f"peer: ONNX Runtime {onnxruntime.__version__}, {onnx_threads} intra-op threads "
              "(ort-f32: float graph, ort-int8: its QDQ graph)")
    ort_head = f" {'ort-f32 ms':>10} {'ort-int8 ms':>11} {'vs ort-i8':>9}" if onnx_threads \
        else ""
    print(f"{'case':<24} {'float32 ms':>11} {'packed ms':>10} {'int8 ms':>9} {'vs f32':>8} "
          f"{'vs packed':>8} {'int8 GOP/s':>11} {'of peak':>8} {'rel err':>8}{ort_head}")
    rows = []
    n_var = 5 if onnx_threads else 3
    for kind, size in cases:
        with tqdm(total=n_var * (args.repeat + 1), desc=f"{kind} {size}", file=sys.stderr,
                  leave=False) as bar:
            row = (_matmul_case(size, args.repeat, bar.update, args.blocks, onnx_threads,
                                args.quiet)
                   if kind == "matmul"
                   else _mlp_case(kind, size, args.repeat, bar.update, args.blocks,
                                  onnx_threads, args.quiet))
        ms = row["ms"]
        gops = 2 * row["macs"] / (ms["int8"] * 1e-3) / 1e9
        row.update(speedup=ms["float32"] / ms["int8"],
                   speedup_vs_packed=ms["float32-packed"] / ms["int8"], int8_gops=gops,
                   fraction_of_peak=gops / peak if peak else None)
        rows.append(row)
        frac = f"{row['fraction_of_peak']:8.1%}" if peak else f"{'-':>8}"
        ort_cols = ""
        if onnx_threads:
            row["speedup_vs_ort_int8"] = ms["ort-int8"] / ms["int8"]
            ort_cols = (f" {ms['ort-f32']:10.3f} {ms['ort-int8']:11.3f} "
                        f"{row['speedup_vs_ort_int8']:8.2f}x")
        print(f"{row['case']:<24} {ms['float32']:11.3f} {ms['float32-packed']:10.3f} "
              f"{ms['int8']:9.3f} {row['speedup']:7.2f}x {row['speedup_vs_packed']:7.2f}x "
              f"{gops:11.0f} {frac} {row['int8_rel_err']:8.1e}{ort_cols}", flush=True)
    if args.json:
        for row in rows:
            print(json.dumps({**row, "machine": info.as_dict(), "backend": backend,
                              "peak_gops": peak}))
    return 0
