"""Numba parallel CPU kernels for BLASST attention (prefill and split-KV decode).

The kernels are plain ``@njit(parallel=True)`` functions in :mod:`.prefill` and
:mod:`.decode`; this module only allocates their outputs, picks the phase with
:mod:`blasst_ref.tiling` and keeps BLAS single-threaded while they run (each of our threads
calls BLAS on small tiles; a multi-threaded BLAS underneath would oversubscribe the cores).

The kernels are compiled with ``cache=True`` (CI and first calls skip the compile). Numba's
cache checks the kernel's own file only: after editing :mod:`.online`,
:mod:`blasst_ref.rule` or :mod:`blasst_ref.numba_utils`, whose functions are inlined into the
kernels, delete
``blasst_ref/cpu/__pycache__``.
"""

from __future__ import annotations

import numba
import numpy as np

from .. import rule, tiling
from ..numba_utils import blas_single_threaded
from . import backward
from .online import fold_row
from .decode import decode_merge_kernel, decode_split_kernel
from .prefill import pack_k_tiles, prefill_kernel

__all__ = [
    "blasst_attention", "blasst_attention_backward", "decode_merge_kernel",
    "decode_split_kernel", "fold_row", "pack_k_tiles", "prefill_kernel",
]

def blasst_attention(q, k, v, thresh, causal, scale, block_q, block_k, *, skip_test=True,
                     out=None, lse=None, decode_seed="sink"):
    """BLASST attention on the CPU.

    Args:
        q: ``(B, Hq, Lq, Dqk)``, k: ``(B, Hkv, Lk, Dqk)``, v: ``(B, Hkv, Lk, Dv)``:
            C-contiguous, all float32 or all float64 (``blasst_ref.attention`` converts
            float16 and validates shapes).
        thresh: in ``[0, 1)``. causal: bottom-right aligned mask. scale: score scale.
        block_q, block_k: tile sizes (``block_q`` unused in decode, ``Lq <= 16``).
        skip_test: False runs a kernel compiled without the skip test (a benchmark
            baseline: with it, nothing is ever skipped).
        out: optional ``(B, Hq, Lq, Dv)`` array to write into (tests poison it first).
        lse: optional C-contiguous ``(B, Hq, Lq)`` array of ``q``'s dtype, written with each
            row's log-sum-exp over its kept scaled scores (``-inf`` for a row that sees no
            key): what the backward needs besides the tile map.
        decode_seed: ``"sink"`` (default) or ``"none"``: the split-KV skip test of decode
            (docs/DESIGN.md §3.5); prefill ignores it.

    Returns:
        ``(out, tile_map)``; ``tile_map`` as ``AttentionStats.tile_map``.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not (isinstance(x, np.ndarray) and x.ndim == 4 and x.flags.c_contiguous):
            raise TypeError(f"{name} must be a C-contiguous 4-D numpy array")
        if x.dtype != q.dtype or x.dtype not in (np.float32, np.float64):
            raise TypeError(f"{name}: the CPU kernels take float32 or float64 (one dtype), got {x.dtype}")
    n_b, n_hq, lq, _ = q.shape
    n_hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    if out is None:
        out = np.empty((n_b, n_hq, lq, dv), q.dtype)
    elif out.shape != (n_b, n_hq, lq, dv) or out.dtype != q.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {q.dtype} array of shape {(n_b, n_hq, lq, dv)}")
    if lse is not None and (lse.shape != (n_b, n_hq, lq) or lse.dtype != q.dtype
                            or not lse.flags.c_contiguous):
        raise ValueError(f"lse must be a C-contiguous {q.dtype} array of shape {(n_b, n_hq, lq)}")
    log_thresh = rule.log_threshold(thresh)
    seeded = rule.decode_seeded(decode_seed)
    causal = bool(causal)
    skip_test = True if skip_test else None  # None: a kernel compiled without the test
    n_kt = tiling.num_tiles(lk, block_k)

    with blas_single_threaded():
        if tiling.is_decode(lq):
            split_tiles = tiling.decode_split_tiles(lk, block_k)
            n_splits = tiling.decode_num_splits(lk, block_k)
            n_rows = (n_hq // n_hkv) * lq
            part_m = np.empty((n_b, n_hkv, n_splits, n_rows), q.dtype)
            part_l = np.empty((n_b, n_hkv, n_splits, n_rows), q.dtype)
            part_acc = np.empty((n_b, n_hkv, n_splits, n_rows, dv), q.dtype)
            tile_map = np.zeros((n_b, n_hkv, 1, n_kt), np.int8)
            decode_split_kernel(q, k, v, log_thresh, causal, scale, block_k, split_tiles,
                                skip_test, part_m, part_l, part_acc, tile_map, seeded)
            decode_merge_kernel(part_m, part_l, part_acc, causal, lk, out, lse)
        else:
            tile_map = np.zeros((n_b, n_hq, tiling.num_tiles(lq, block_q), n_kt), np.int8)
            prefill_kernel(q, pack_k_tiles(k, block_k), v, log_thresh, causal, scale, block_q,
                           block_k, skip_test, out, tile_map, lse)
    return out, tile_map


def blasst_attention_backward(dout, q, k, v, out, lse, tile_map, causal, scale, block_q,
                              block_k, *, method=None, grads=None):
    """Gradients of BLASST attention on the CPU (:mod:`.backward`).

    Args:
        dout, out: ``(B, Hq, Lq, Dv)``; q: ``(B, Hq, Lq, Dqk)``; k: ``(B, Hkv, Lk, Dqk)``;
            v: ``(B, Hkv, Lk, Dv)``: C-contiguous, all float32 or all float64.
        lse: ``(B, Hq, Lq)`` of that dtype, the forward's per-row log-sum-exp.
        tile_map: the forward's int8 decisions (prefill ``(B, Hq, n_q_tiles, n_k_tiles)``,
            decode ``(B, Hkv, 1, n_k_tiles)``).
        causal, scale, block_q, block_k: as in the forward.
        method: ``"fused"`` or ``"two_pass"`` (see :mod:`.backward`); default: fused while
            its private copies of dK/dV fit in ``backward.FUSED_MAX_COPY_BYTES``.
        grads: optional ``(dq, dk, dv)`` C-contiguous arrays to write into (tests poison
            them first); by default new arrays.

    Returns:
        ``(dq, dk, dv)`` of the inputs' dtype and shapes.
    """
    arrays = (("dout", dout), ("q", q), ("k", k), ("v", v), ("out", out), ("lse", lse))
    for name, x in arrays:
        if not (isinstance(x, np.ndarray) and x.flags.c_contiguous):
            raise TypeError(f"{name} must be a C-contiguous numpy array")
        if x.dtype != q.dtype or x.dtype not in (np.float32, np.float64):
            raise TypeError(f"{name}: the CPU kernels take float32 or float64 (one dtype), got {x.dtype}")
    n_b, n_hq, lq, dqk = q.shape
    n_hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    rows = tiling.backward_block_q(lq, block_q)
    n_chunks = max(1, min(numba.get_num_threads(), n_b * n_hq * tiling.num_tiles(lq, rows)))
    copy_bytes = n_chunks * n_b * n_hkv * lk * (dqk + dv) * q.dtype.itemsize
    if method is None:
        method = "fused" if copy_bytes <= backward.FUSED_MAX_COPY_BYTES else "two_pass"
    if method not in ("fused", "two_pass"):
        raise ValueError(f"method must be 'fused', 'two_pass' or None, got {method!r}")

    if grads is None:
        grads = (np.empty_like(q), np.empty_like(k), np.empty_like(v))
    for name, g, x in zip(("dq", "dk", "dv"), grads, (q, k, v)):
        if not (isinstance(g, np.ndarray) and g.shape == x.shape and g.dtype == x.dtype
                and g.flags.c_contiguous):
            raise ValueError(f"{name} must be a C-contiguous {x.dtype} array of shape {x.shape}")
    dq, dk, dv_ = grads
    delta = np.empty((n_b, n_hq, lq), q.dtype)
    backward.row_deltas(dout, out, delta)
    causal = bool(causal)
    with blas_single_threaded():
        k_t, v_t = pack_k_tiles(k, block_k), pack_k_tiles(v, block_k)
        args = (q, k, k_t, v_t, dout, delta, lse, tile_map, causal, scale, rows, block_k)
        if method == "fused":
            dk_part = np.zeros((n_chunks, n_b, n_hkv, lk, dqk), q.dtype)
            dv_part = np.zeros((n_chunks, n_b, n_hkv, lk, dv), q.dtype)
            backward.query_tiles_kernel(*args, n_chunks, dq, dk_part, dv_part)
            np.sum(dk_part, axis=0, out=dk)
            np.sum(dv_part, axis=0, out=dv_)
        else:
            backward.key_tiles_kernel(*args, dk, dv_)
            backward.query_tiles_kernel(*args, n_chunks, dq, None, None)
    return dq, dk, dv_
