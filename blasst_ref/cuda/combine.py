"""The split-KV merge (combine) kernel of decode, shared by every decode version.

A decode split kernel (:mod:`.decode_v1`, :mod:`.decode_v2`) leaves, per (batch, kv head,
split) and row, a partial state relative to the split's own running max: float32
``part_m, part_l (B*Hkv*n_splits, R)`` and ``part_acc (B*Hkv*n_splits, R, Dv)``. A split with
no tile to visit (causal, past the horizon), or one whose rows saw nothing, holds
``m = -inf, l = 0, acc = 0``.

The merge kernel: one block per output row
------------------------------------------
* **Grid**: ``B * Hkv * R`` blocks (= ``B * Hq * Lq`` output rows); **block**: 128 threads
  over ``Dv`` (coalesced reads of ``part_acc`` and writes of ``out``).
* Each split's ``(l, acc)`` is relative to its own max ``m_s``; relative to the common max
  ``M`` it weighs ``exp(m_s - M)``: 0 for a split that saw nothing (``m_s = -inf``).
  ``out = sum_s w_s acc_s / sum_s w_s l_s``, stored in ``out``'s dtype (float16 in,
  float32 compute, float16 out). Rows that see no key (causal, ``Lq > Lk``) store zeros.

Its registers (ptxas, sm_90) are in docs/BENCHMARKS.md; its time is part of the decode rows
there (it reads ``n_splits`` partial rows per output row, small next to K and V).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32

from .intrinsics import narrow
from .problem import pow2_ceil
from .rule import max_nan, row_sees_keys

__all__ = ["MERGE_THREADS", "launch_merge", "merge_args", "merge_block", "merge_kernel",
           "partials"]

MERGE_THREADS = 128  #: threads per block of the merge kernel (at most; fewer for a small Dv)


@cuda.jit
def merge_kernel(part_m, part_l, part_acc, causal, lk, n_splits, out):
    """Log-sum-exp merge of the splits of one output row per block into ``out``
    ``(B, Hq, Lq, Dv)``; partials as written by the split kernel."""
    t = cuda.threadIdx.x
    n_hkv = part_m.shape[0] // (out.shape[0] * n_splits)
    R = part_m.shape[1]
    lq = out.shape[2]
    dv = out.shape[3]
    group = out.shape[1] // n_hkv
    row = cuda.blockIdx.x  # (b * Hkv + g) * R + r
    bg = row // R
    r = row % R
    b = bg // n_hkv
    g = bg % n_hkv
    h = g * group + r // lq
    i = r % lq
    w0 = bg * n_splits
    if not row_sees_keys(i, lq, lk, causal):  # zeros (FlashAttention's rule)
        for d in range(t, dv, cuda.blockDim.x):
            out[b, h, i, d] = narrow(out, float32(0.0))
        return
    neg_inf = float32(-math.inf)
    mx = neg_inf
    for s in range(n_splits):
        mx = max_nan(mx, part_m[w0 + s, r])
    shift = float32(0.0) if mx == neg_inf else mx
    total = float32(0.0)
    for s in range(n_splits):
        total += math.exp(part_m[w0 + s, r] - shift) * part_l[w0 + s, r]
    for d in range(t, dv, cuda.blockDim.x):
        o = float32(0.0)
        for s in range(n_splits):
            o += math.exp(part_m[w0 + s, r] - shift) * part_acc[w0 + s, r, d]
        out[b, h, i, d] = narrow(out, o / total)


_PARTIALS: dict = {}


def partials(n_work, rows, dv):
    """``(part_m, part_l, part_acc)``: the float32 partials of the split kernels, allocated
    once per shape and device and reused (every launch runs on the default stream, in
    order): a fresh ``cuda.device_array`` per call costs a ``cudaMalloc``, tens of
    microseconds, as much as a 16k-key decode."""
    key = (getattr(cuda.get_current_device(), "id", 0), n_work, rows, dv)
    bufs = _PARTIALS.get(key)
    if bufs is None:
        if len(_PARTIALS) > 16:
            _PARTIALS.clear()
        bufs = (cuda.device_array((n_work, rows), np.float32),
                cuda.device_array((n_work, rows), np.float32),
                cuda.device_array((n_work, rows, dv), np.float32))
        _PARTIALS[key] = bufs
    return bufs


def merge_block(dv: int) -> int:
    """Threads per block of the merge kernel for head dim ``dv``."""
    return min(MERGE_THREADS, pow2_ceil(dv))


def launch_merge(problem, part_m, part_l, part_acc, out):
    """Merge the partials of ``problem``'s split kernel into ``out`` (4-D, the output
    dtype), through Numba's dispatcher."""
    merge_kernel[problem.batch * problem.kv_heads * problem.rows, merge_block(problem.dv)](
        part_m, part_l, part_acc, problem.causal, problem.kv_len, problem.n_splits, out)


def merge_args(problem) -> tuple:
    """The merge kernel's arguments for ``problem``, as :class:`.numba_internals.Array` /
    Numba scalar types (raw launches, register reports)."""
    from numba.cuda import types

    from .numba_internals import Array

    n_work = problem.batch * problem.kv_heads * problem.n_splits
    ml = Array(np.float32, (n_work, problem.rows))
    acc = Array(np.float32, (n_work, problem.rows, problem.dv))
    out = Array(problem.dtype, (problem.batch, problem.q_heads, problem.q_len, problem.dv))
    return (ml, ml, acc, types.boolean, types.int64, types.int64, out)
