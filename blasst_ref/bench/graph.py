"""``python -m blasst_ref.bench graph``: the compiled graph against the op-by-op interpreter.

For each model graph of :mod:`blasst_ref.graph.models` (DLRM's bottom and top MLPs, a BERT
encoder layer, an LLM block), and for a real model -- ``minilm``: sentence-transformers'
all-MiniLM-L6-v2 exported with ``torch.onnx.export`` and imported with
:func:`blasst_ref.graph.from_onnx` (:mod:`blasst_ref.graph.bert_onnx`; random token ids, no
padding) -- this times, on the same inputs, in one interleaved run (:mod:`.timing`):

* ``interpret`` -- :func:`blasst_ref.graph.interpret`: one numpy call per op, a new array
  per intermediate (primitive-by-primitive execution, the baseline of oneDNN Graph
  Compiler's paper);
* ``compiled`` -- :func:`blasst_ref.graph.compile` with every pass: fused kernels on packed
  weights, attention through BLASST, one arena;
* ``compiled-nofuse`` -- the same executor with fusion off (kernels per op, still packed
  weights and a planned arena): how much of the gain is fusion;
* ``onnxruntime`` -- ONNX Runtime on the same graph (float32, every graph optimisation, as
  many intra-op threads as Numba has), when ``onnxruntime`` is installed (``pip install
  'blasst_ref[onnx]'``); for ``minilm``, on the very file that was imported.

It also prints the memory plan: the arena's peak against the naive sum of intermediates.
``--preset dlrm-bert`` runs DLRM's bottom and top MLPs at batch 32, 128 and 512 and a BERT
layer at L=384, batch 1 and 8: the tables of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from . import machine as machine_mod
from .timing import Variant, measure

#: model name -> (builder in :mod:`blasst_ref.graph.models`, its arguments) at a batch and
#: sequence length.
MODELS = {
    "dlrm-bottom": lambda b, seq: ("dlrm_bottom_mlp", dict(batch=b)),
    "dlrm-top": lambda b, seq: ("dlrm_top_mlp", dict(batch=b)),
    "bert": lambda b, seq: ("bert_layer", dict(batch=b, seq=seq)),
    "llm": lambda b, seq: ("llm_block", dict(batch=b, seq=seq, hidden=1024, heads=16,
                                             kv_heads=4)),
    "minilm": None,  # imported from ONNX: see build_case
}
#: models that take a sequence length
SEQUENCE_MODELS = ("bert", "llm", "minilm")

PRESETS = {
    "dlrm-bert": [("dlrm-bottom", b, None) for b in (32, 128, 512)]
    + [("dlrm-top", b, None) for b in (32, 128, 512)]
    + [("bert", b, 384) for b in (1, 8)],
    "quick": [("dlrm-bottom", 32, None), ("dlrm-top", 32, None), ("bert", 1, 64)],
    "minilm": [("minilm", b, s) for b in (1, 8) for s in (128, 384)],
}


def build(model: str, batch: int, seq: int | None):
    from ..graph import models

    fn_name, kwargs = MODELS[model](batch, seq)
    return getattr(models, fn_name)(**kwargs)


def build_case(model: str, batch: int, seq: int | None, onnx: bool):
    """``(graph, feeds, ort_session or None)`` of one case; ORT runs with as many intra-op
    threads as Numba has."""
    import numba

    from .. import graph as bg
    from ..graph import models
    from ..graph.onnx_export import onnxruntime_model_session, onnxruntime_session

    threads = numba.get_num_threads()
    if model == "minilm":
        from ..graph import bert_onnx

        path = bert_onnx.minilm_onnx()
        g = bg.from_onnx(path, input_shapes=bert_onnx.input_shapes(batch, seq))
        feeds = bert_onnx.random_tokens(batch, seq, seed=1)
        return g, feeds, onnxruntime_model_session(path, threads) if onnx else None
    g = build(model, batch, seq)
    return g, models.example_inputs(g, seed=1), \
        onnxruntime_session(g, threads)[0] if onnx else None


def run_case(model: str, batch: int, seq: int | None, *, repeat: int, onnx: bool,
             thresh: float, progress=None, blocks: int = 0) -> dict:
    """Time one model graph; returns a row of the table (times in ms, ratios, bytes)."""
    from .. import graph as bg

    g, feeds, sess = build_case(model, batch, seq, onnx)
    cg = bg.compile(g, attention_thresh=thresh, matmul_kernel="packed")
    cb = bg.compile(g, attention_thresh=thresh, matmul_kernel="blas")
    nofuse = bg.compile(g, fuse=False, attention_thresh=thresh)
    # the interpreter of a real model takes seconds a call at batch 8: a few calls suffice
    slow = 3 if model == "minilm" else None
    variants = [
        Variant("interpret", lambda: bg.interpret(g, **feeds), max_repeat=slow),
        Variant("compiled-packed", lambda: cg(**feeds)),
        Variant("compiled-blas", lambda: cb(**feeds)),
        Variant("compiled-nofuse", lambda: nofuse(**feeds)),
    ]
    if sess is not None:
        variants.append(Variant("onnxruntime", lambda: sess.run(None, feeds)))
    timings = measure(variants, repeat, progress=progress, blocks=blocks)
    want = timings["interpret"].result
    got = timings["compiled-packed"].result
    err = max(float(np.linalg.norm(got[k].astype(np.float64) - want[k])
                    / max(np.linalg.norm(want[k].astype(np.float64)), 1e-30)) for k in want)
    base = timings["interpret"].median_ms
    row = {
        "model": model, "batch": batch, "seq": seq, "thresh": thresh,
        "ms": {k: t.median_ms for k, t in timings.items()},
        "speedup_vs_interpret": {k: base / t.median_ms for k, t in timings.items()},
        "rel_err_vs_interpret": err,
        "arena_bytes": cg.memory.peak_bytes, "naive_bytes": cg.memory.naive_bytes,
        "kernels": len(cg.graph.nodes), "ops": len(g.nodes),
        "interpreter_bytes": interpreter_bytes(g),
    }
    return row


def interpreter_bytes(g) -> int:
    """Bytes of every intermediate the interpreter allocates (each op's output, views and
    graph outputs not counted): the unfused, unplanned baseline of the arena."""
    from ..graph import ops

    outs = set(g.outputs.values())
    return sum(g.tensors[o].nbytes for n in g.nodes if not ops.get(n.op).view
               for o in n.outputs if o not in outs)


def _fmt_row(row: dict, names: list[str]) -> str:
    shape = f"b={row['batch']}" + (f" L={row['seq']}" if row["seq"] else "")
    cells = [f"{row['model']:<12} {shape:<12} {row['ops']:>3}->{row['kernels']:<3}"]
    for n in names:
        ms = row["ms"].get(n)
        cells.append(f"{ms:9.3f} ({row['speedup_vs_interpret'][n]:4.2f}x)" if ms else
                     f"{'-':>17}")
    mem = row["arena_bytes"] / max(row["naive_bytes"], 1)
    cells.append(f"{row['arena_bytes'] / 2**20:7.2f}/{row['naive_bytes'] / 2**20:7.2f}/"
                 f"{row['interpreter_bytes'] / 2**20:7.2f} MiB ({mem:4.0%}, "
                 f"{row['arena_bytes'] / max(row['interpreter_bytes'], 1):4.0%})")
    cells.append(f"{row['rel_err_vs_interpret']:.1e}")
    return " ".join(cells)


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``graph`` subcommand to ``python -m blasst_ref.bench``."""
    p = subparsers.add_parser(
        "graph", help="time compiled graphs against the op-by-op interpreter (and ORT)",
        description=__doc__.split("\n\n")[0].split(": ", 1)[-1],
        epilog="examples:\n"
               "  python -m blasst_ref.bench graph --preset dlrm-bert\n"
               "  python -m blasst_ref.bench graph --model bert --batch 1 --seq 128\n"
               "  python -m blasst_ref.bench graph --model minilm --batch 8 --seq 128\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="fixed cases: dlrm-bert and minilm (the tables of "
                        "docs/BENCHMARKS.md; minilm: batch 1 and 8 x sequence 128 and 384), "
                        "quick (seconds)")
    p.add_argument("--model", choices=sorted(MODELS), nargs="+", default=None,
                   help="graphs to time instead of a preset: those of blasst_ref.graph.models, "
                        "or minilm (all-MiniLM-L6-v2 imported from ONNX)")
    p.add_argument("--batch", type=int, nargs="+", default=[32],
                   help="batch sizes, each timed with each --model (default 32)")
    p.add_argument("--seq", type=int, default=384,
                   help="sequence length (bert, llm, minilm)")
    p.add_argument("--thresh", type=float, default=0.0,
                   help="BLASST threshold of the fused attention (default 0: exact)")
    p.add_argument("--repeat", type=int, default=10,
                   help="timed calls per variant after a warm-up (default 10)")
    p.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime even if installed")
    p.add_argument("--blocks", type=int, default=2,
                   help="time each variant in this many blocks of back-to-back calls "
                        "(A B C, C B A; 0: interleave call by call). Numba's and OpenBLAS's "
                        "thread pools disturb each other when variants alternate call by "
                        "call on few cores (default 2)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON lines too")
    p.set_defaults(func=run, parser=p)
    return p


def run(args) -> int:
    if args.preset:
        cases = PRESETS[args.preset]
    else:
        models = args.model or ["dlrm-bottom"]
        cases = [(m, b, args.seq if m in SEQUENCE_MODELS else None)
                 for m in models for b in args.batch]
    onnx = False
    if not args.no_onnx:
        try:
            import onnxruntime  # noqa: F401

            onnx = True
        except ImportError:
            pass
    from tqdm import tqdm

    info = machine_mod.machine_info()
    print(info.line())
    names = ["interpret", "compiled-packed", "compiled-blas", "compiled-nofuse"] + \
        (["onnxruntime"] if onnx else [])
    print(f"{'model':<12} {'shape':<12} ops->k  "
          + " ".join(f"{n + ' ms':>17}" for n in names)
          + "   arena/naive/interpreter (arena vs naive, vs interpreter)   err")
    rows = []
    for model, batch, seq in cases:
        n_var = len(names)
        with tqdm(total=n_var * (args.repeat + 1),
                  desc=f"{model} b={batch}", file=sys.stderr, leave=False) as bar:
            row = run_case(model, batch, seq, repeat=args.repeat, onnx=onnx,
                           thresh=args.thresh, progress=bar.update, blocks=args.blocks)
        rows.append(row)
        print(_fmt_row(row, names), flush=True)
    if args.json:
        for row in rows:
            print(json.dumps({**row, "machine": info.as_dict()}))
    return 0
