"""Training a small causal language model, with any attention in the loop (docs/DESIGN.md §11).

The machinery of the sparsity-aware training experiment: train one model with dense
attention and another with BLASST in the forward pass, then measure both at a sweep of
thresholds. Nothing here knows about BLASST: attention is a function the caller passes.

* :mod:`.model`: :class:`TinyLM`, a byte-level decoder-only transformer (RMSNorm, RoPE,
  grouped-query attention, SwiGLU) whose attention is a pluggable function
  ``attn(q, k, v, layer) -> out`` on ``(B, H, L, D)`` tensors; :func:`sdpa_attention` is
  PyTorch's dense causal attention.
* :mod:`.data`: :func:`stdlib_corpus`, the bytes of the Python standard library's own
  sources (always installed: no download), split into train and validation parts;
  :func:`random_windows` draws training batches.
* :mod:`.loop`: :func:`train` (AdamW, warm-up and cosine decay, progress bar) and
  :func:`evaluate` (mean next-byte loss in nats and its perplexity on fixed windows).
* :mod:`.experiment`: the experiment itself, :func:`run_experiment` (pre-train, fine-tune
  dense and with BLASST, measure both frontiers; ``python -m blasst_ref.train``), and its
  parts: :func:`blasst_attention` (BLASST as a differentiable attention function),
  :func:`frontier` (perplexity against tile sparsity at a sweep of thresholds),
  :func:`perplexity_at`, :func:`kept_mass` (the attention mass in the tiles kept),
  :func:`threshold_for_sparsity`.

Needs PyTorch (CPU is enough).

::

    from blasst_ref import train
    data = train.stdlib_corpus()
    model = train.TinyLM(train.TinyLMConfig())
    history = train.train(model, data.train, steps=300)
    print(train.evaluate(model, data.val).perplexity)
"""

from .data import Corpus, random_windows, stdlib_corpus
from .experiment import (DEFAULT_THRESHOLDS, ExperimentResult, FrontierPoint, TileCounter,
                         blasst_attention, frontier, kept_mass, perplexity_at, run_experiment,
                         threshold_for_sparsity)
from .loop import Evaluation, evaluate, train
from .model import TinyLM, TinyLMConfig, sdpa_attention

__all__ = ["Corpus", "DEFAULT_THRESHOLDS", "Evaluation", "ExperimentResult", "FrontierPoint",
           "TileCounter", "TinyLM", "TinyLMConfig", "blasst_attention", "evaluate", "frontier",
           "kept_mass", "perplexity_at", "random_windows", "run_experiment", "sdpa_attention",
           "stdlib_corpus", "threshold_for_sparsity", "train"]
