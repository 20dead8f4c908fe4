"""blasst_ref: BLASST sparse attention — reference, Numba CPU/CUDA kernels, teaching package.

Public API (DESIGN.md §3)::

    out = blasst_ref.attention(q, k, v, thresh, causal=True)          # (B, Hq, Lq, Dv)
    out, stats = blasst_ref.attention(q, k, v, thresh, return_stats=True)
    ref = blasst_ref.dense_attention(q, k, v, causal=True)            # float64 oracle
    thresh = blasst_ref.threshold_for(context_len, scale_factor)      # scale_factor / L
"""

from .api import AttentionStats, attention, threshold_for
from .reference import blasst_attention_reference, dense_attention

__all__ = [
    "AttentionStats",
    "attention",
    "blasst_attention_reference",
    "dense_attention",
    "threshold_for",
]

__version__ = "0.1.0"
