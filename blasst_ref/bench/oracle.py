"""A memory-bounded float64 dense oracle and the relative L2 error, for benchmarks and demo.

:func:`blasst_ref.dense_attention` materialises the whole ``(B, Hq, Lq, Lk)`` score tensor in
float64 (4 GiB at ``H=8, L=8192``) and multiplies with ``einsum``; that is the right oracle
for tests, but too big and too slow for benchmark sizes. :func:`dense_oracle` computes the
same function — exact softmax attention in float64, bottom-right causal, zero rows for rows
that see no key — one block of query rows at a time with BLAS matmuls, so memory stays at
``block_rows x Lk`` floats. ``tests/test_bench_demo.py`` checks it against
``dense_attention``.
"""

from __future__ import annotations

import math

import numpy as np

from .. import tiling


def dense_oracle(q, k, v, *, causal: bool, scale: float | None = None,
                 block_rows: int = 512) -> np.ndarray:
    """Exact softmax attention in float64, in blocks of query rows.

    Args:
        q: ``(B, Hq, Lq, Dqk)``; k: ``(B, Hkv, Lk, Dqk)``; v: ``(B, Hkv, Lk, Dv)``,
            ``Hq % Hkv == 0`` (query head ``h`` reads kv head ``h // (Hq // Hkv)``).
        causal: bottom-right aligned, row ``i`` sees keys ``j <= i + Lk - Lq``.
        scale: default ``1 / sqrt(Dqk)``.
        block_rows: query rows per block (memory: ``block_rows * Lk`` float64 per head).

    Returns:
        float64 ``(B, Hq, Lq, Dv)``, equal to ``dense_attention(q, k, v, causal=causal)``
        up to float64 rounding.
    """
    b_, hq, lq, dqk = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    scale = 1.0 / math.sqrt(dqk) if scale is None else float(scale)
    offset = tiling.causal_offset(lq, lk)
    out = np.zeros((b_, hq, lq, dv), np.float64)
    for b in range(b_):
        for g in range(hkv):
            kg = k[b, g].astype(np.float64)
            vg = v[b, g].astype(np.float64)
            for h in range(g * group, (g + 1) * group):
                for i0 in range(0, lq, block_rows):
                    i1 = min(lq, i0 + block_rows)
                    # Under causality the block's last row sees keys < i1 + offset: the keys
                    # beyond are masked for every row of the block, so they are not computed.
                    n_keys = min(lk, i1 + offset) if causal else lk
                    if n_keys <= 0:
                        continue  # no row of the block sees a key: zeros (FlashAttention)
                    qb = q[b, h, i0:i1].astype(np.float64) * scale
                    with np.errstate(invalid="ignore", over="ignore"):
                        s = qb @ kg[:n_keys].T
                    if causal:
                        rows = np.arange(i0, i1)[:, None]
                        s[np.arange(n_keys)[None, :] > rows + offset] = -np.inf
                    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
                        m = s.max(axis=1, keepdims=True)
                        sees = np.isfinite(m[:, 0]) | np.isnan(m[:, 0])
                        m = np.where(np.isneginf(m), 0.0, m)
                        p = np.exp(s - m)
                        o = (p @ vg[:n_keys]) / p.sum(axis=1, keepdims=True)
                    out[b, h, i0:i1] = np.where(sees[:, None], o, 0.0)
    return out


def rel_l2(x, ref) -> float:
    """Relative L2 error ``||x - ref|| / ||ref||`` (computed in float64; NaN if ``ref`` is 0)."""
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    den = float(np.linalg.norm(ref))
    num = float(np.linalg.norm(x - ref))
    return num / den if den > 0 else (0.0 if num == 0 else float("nan"))
