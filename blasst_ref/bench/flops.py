"""The cost model of attention: FLOPs and bytes that a benchmark's rates divide by
(docs/DESIGN.md §4.4).

Every figure is the *dense* count: a BLASST row is measured against the same number, so its
GFLOP/s or GB/s is the dense-equivalent rate (skipped work counts as done), and its ratio to
the dense row is its speedup.

* :func:`visible_pairs`: the (query row, key) pairs attention computes, causal or not;
* :func:`attention_flops`: ``2 * B * Hq * visible_pairs * (Dqk + Dv)``;
* :func:`dense_kv_bytes`: the K and V bytes dense decode reads (its figure of merit);
* :func:`ideal_prefill_speedup`: ``2 / (2 - s)`` at tile sparsity ``s``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["attention_flops", "dense_kv_bytes", "dtype_itemsize", "ideal_prefill_speedup",
           "visible_pairs"]


def visible_pairs(lq: int, lk: int, causal: bool) -> int:
    """Number of (query row, key) pairs that attention computes, i.e. ``sum_i visible_i``.

    Without a mask every row sees every key: ``Lq * Lk``.

    With bottom-right causal masking row ``i`` (``0 <= i < Lq``) sees keys
    ``j <= i + (Lk - Lq)``, i.e. ``n_i = max(0, i + Lk - Lq + 1)`` keys (never more than
    ``Lk``, since ``i <= Lq - 1``). The rows with ``n_i > 0`` are ``i >= max(0, Lq - Lk)``
    and their counts run ``t0, t0 + 1, ..., Lk`` with ``t0 = max(0, Lq - Lk) + Lk - Lq + 1``,
    an arithmetic series::

        pairs = (t0 + Lk) * (Lk - t0 + 1) / 2

    which is ``Lq * (2 Lk - Lq + 1) / 2`` when ``Lq <= Lk`` (``L (L + 1) / 2`` for square
    prefill, ``Lk`` for one decode row) and ``Lk (Lk + 1) / 2`` when ``Lq > Lk``.
    """
    if lq <= 0 or lk <= 0:
        return 0
    if not causal:
        return lq * lk
    t0 = max(0, lq - lk) + lk - lq + 1
    return (t0 + lk) * (lk - t0 + 1) // 2


def attention_flops(b: int, hq: int, lq: int, lk: int, dqk: int, dv: int, causal: bool) -> int:
    """Dense attention FLOPs, docs/DESIGN.md §4: ``4 * B * Hq * Lq * Lk_visible * (Dqk + Dv) / 2``.

    Each visible (row, key) pair costs one ``Dqk``-long dot product for the score
    (``2 * Dqk`` FLOPs: a multiply and an add per element) and one ``Dv``-long
    multiply-add into the output (``2 * Dv``). With ``Lq * Lk_visible`` = :func:`visible_pairs`
    counted exactly (the causal triangle, including its diagonal) this is::

        flops = 2 * B * Hq * visible_pairs(Lq, Lk, causal) * (Dqk + Dv)

    which for ``Dqk == Dv == D`` and no mask is the familiar ``4 * B * H * Lq * Lk * D``.
    Softmax (exp, max, sum) is not counted, as in FlashAttention's papers. It is the dense
    count: BLASST rows are measured against the same number, so their GFLOP/s is the
    dense-equivalent throughput (skipped work counts as done).
    """
    return 2 * b * hq * visible_pairs(lq, lk, causal) * (dqk + dv)


def dense_kv_bytes(b: int, hkv: int, lk: int, dqk: int, dv: int, dtype: str) -> int:
    """Bytes of K and V that dense attention reads once: ``B * Hkv * Lk * (Dqk + Dv) *
    itemsize``. Decode is memory-bound, so ``kv_bytes / time`` (the ``GB/s`` column of decode
    tables) is its figure of merit; a skipped tile does not read its V rows, so a sparse
    row's figure is dense-equivalent, like GFLOP/s."""
    return b * hkv * lk * (dqk + dv) * dtype_itemsize(dtype)


def dtype_itemsize(name: str) -> int:
    """Bytes per element of a ``--dtype`` name (``bfloat16`` is not a numpy dtype)."""
    return 2 if name == "bfloat16" else np.dtype(name).itemsize


def ideal_prefill_speedup(sparsity: float) -> float:
    """docs/DESIGN.md §4: the QK product always runs, exp and P.V are skipped: ``2 / (2 - s)``."""
    return 2.0 / (2.0 - sparsity)
