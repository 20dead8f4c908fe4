"""``python -m blasst_ref.train``: the sparsity-aware training experiment on the CPU.

Pre-trains a tiny byte-level LM on the Python standard library's sources, fine-tunes one copy
dense and one with BLASST in the forward pass (same steps, same batches), and prints both
models' perplexity against measured tile sparsity at a sweep of thresholds (the frontiers)
and the perplexity gain at the chosen sparsities. See blasst_ref.train.experiment.
"""

from __future__ import annotations

import argparse
import json
import sys

from .experiment import DEFAULT_THRESHOLDS, run_experiment
from .model import TinyLMConfig


def _floats(text: str) -> tuple:
    return tuple(float(x) for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m blasst_ref.train",
        description="Sparsity-aware training: fine-tune a tiny LM dense and with BLASST in the "
                    "forward pass, then compare their perplexity-sparsity frontiers.")
    p.add_argument("--pretrain-steps", type=int, default=300,
                   help="dense pre-training steps of the shared base model (0: from scratch)")
    p.add_argument("--steps", type=int, default=200,
                   help="fine-tuning steps of each model (dense and BLASST)")
    p.add_argument("--batch", type=int, default=16, help="windows per step")
    p.add_argument("--length", type=int, default=256,
                   help="context length: the bos and length - 1 bytes of text")
    p.add_argument("--d-model", type=int, default=128, help="width of the model")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks")
    p.add_argument("--heads", type=int, default=4, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
    p.add_argument("--no-bos", action="store_true",
                   help="no beginning-of-sequence byte before each window (default: byte 0)")
    p.add_argument("--train-sparsity", type=float, default=0.6,
                   help="fine-tune BLASST at the threshold where the base model skips this "
                        "share of tiles")
    p.add_argument("--train-thresh", type=float, default=None,
                   help="fine-tune BLASST at this threshold instead of --train-sparsity's")
    p.add_argument("--thresholds", type=_floats, default=DEFAULT_THRESHOLDS,
                   help="comma-separated thresholds of the evaluation sweep")
    p.add_argument("--block-q", type=int, default=32, help="BLASST's query rows per tile")
    p.add_argument("--block-k", type=int, default=32, help="BLASST's keys per tile")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of pre-training")
    p.add_argument("--finetune-lr", type=float, default=1e-3,
                   help="peak learning rate of fine-tuning")
    p.add_argument("--eval-windows", type=int, default=64,
                   help="validation windows per point of a frontier")
    p.add_argument("--corpus-bytes", type=int, default=None,
                   help="use only about this many bytes of the corpus (quick runs)")
    p.add_argument("--gains-at", type=_floats, default=(0.5, 0.7),
                   help="comma-separated sparsities at which to compare the two frontiers")
    p.add_argument("--seed", type=int, default=0, help="initialisation and batches")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="write the result as JSON to PATH ('-': stdout, instead of the table)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch's CPU threads (default: torch's choice; 1 is often faster on "
                        "a machine other programs share)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.train_sparsity < 1:
        raise SystemExit(f"--train-sparsity must be in [0, 1), got {args.train_sparsity}")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    cfg = TinyLMConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                       n_kv_heads=args.kv_heads, mlp_hidden=3 * args.d_model,
                       max_len=args.length, bos=None if args.no_bos else 0)
    res = run_experiment(config=cfg, pretrain_steps=args.pretrain_steps, steps=args.steps,
                         batch=args.batch, length=args.length, train_sparsity=args.train_sparsity,
                         train_thresh=args.train_thresh, thresholds=args.thresholds,
                         block_q=args.block_q, block_k=args.block_k, lr=args.lr,
                         finetune_lr=args.finetune_lr, seed=args.seed,
                         eval_windows=args.eval_windows, corpus_bytes=args.corpus_bytes,
                         gains_at=args.gains_at, progress=not args.quiet)
    text = json.dumps(res.to_dict(), indent=1)
    if args.json == "-":
        print(text)
        return 0
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(f"fine-tuned with BLASST at thresh {res.train_thresh:.4g} (base model sparsity "
          f"{res.train_sparsity:.1%}); seconds: "
          + ", ".join(f"{k} {v:.0f}" for k, v in res.seconds.items()))
    print(res.format_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
