"""blasst_ref: BLASST sparse attention — reference, Numba CPU/CUDA kernels, teaching package.

Public API (docs/DESIGN.md §3)::

    out = blasst_ref.attention(q, k, v, thresh, causal=True)          # (B, Hq, Lq, Dv)
    out, stats = blasst_ref.attention(q, k, v, thresh, return_stats=True)
    ref = blasst_ref.dense_attention(q, k, v, causal=True)            # float64 oracle
    thresh = blasst_ref.threshold_for(context_len, scale_factor)      # scale_factor / L
    cal = blasst_ref.calibrate(samples, phase="prefill")              # thresh * L law (§5)
    q, k, v = blasst_ref.workloads.llm_like(1, 8, 2, 4096, 4096, 64)  # LLM-like inputs (§6)
    out, saved = blasst_ref.attention_forward(q, k, v, thresh, causal=True)   # gradients (§11)
    dq, dk, dv = blasst_ref.attention_backward(dout, q, k, v, out, saved)
"""

from . import workloads
from .api import AttentionStats, attention, threshold_for
from .backward import (SavedForBackward, attention_backward, attention_forward,
                       dense_attention_backward)
from .calibrate import Calibration, calibrate
from .reference import blasst_attention_reference, dense_attention

__all__ = [
    "AttentionStats",
    "Calibration",
    "calibrate",
    "workloads",
    "attention",
    "attention_backward",
    "attention_forward",
    "dense_attention_backward",
    "SavedForBackward",
    "blasst_attention_reference",
    "dense_attention",
    "threshold_for",
]

__version__ = "0.1.0"
