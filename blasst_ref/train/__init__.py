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

Needs PyTorch (CPU is enough).

::

    from blasst_ref import train
    data = train.stdlib_corpus()
    model = train.TinyLM(train.TinyLMConfig())
    history = train.train(model, data.train, steps=300)
    print(train.evaluate(model, data.val).perplexity)
"""

from .data import Corpus, random_windows, stdlib_corpus
from .loop import Evaluation, evaluate, train
from .model import TinyLM, TinyLMConfig, sdpa_attention

__all__ = ["Corpus", "Evaluation", "TinyLM", "TinyLMConfig", "evaluate", "random_windows",
           "sdpa_attention", "stdlib_corpus", "train"]
