"""Numba parallel CPU kernels for BLASST attention (prefill and split-KV decode).

The kernels are plain ``@njit(parallel=True)`` functions in :mod:`.prefill` and
:mod:`.decode`; this module only allocates their outputs, picks the phase with
:mod:`blasst_ref.tiling` and keeps BLAS single-threaded while they run (each of our threads
calls BLAS on small tiles; a multi-threaded BLAS underneath would oversubscribe the cores).

The kernels are compiled with ``cache=True`` (CI and first calls skip the compile). Numba's
cache checks the kernel's own file only: after editing ``_online.py`` or
:mod:`blasst_ref.numba_utils`, whose functions are inlined into the kernels, delete
``blasst_ref/cpu/__pycache__``.
"""

from __future__ import annotations

import math

import numpy as np

from .. import tiling
from ..numba_utils import blas_single_threaded
from ._online import fold_row
from .decode import decode_merge_kernel, decode_split_kernel
from .prefill import pack_k_tiles, prefill_kernel

__all__ = [
    "blasst_attention", "decode_merge_kernel", "decode_split_kernel", "fold_row",
    "pack_k_tiles", "prefill_kernel",
]

def blasst_attention(q, k, v, thresh, causal, scale, block_q, block_k, *, skip_test=True,
                     out=None):
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
    log_thresh = -math.inf if thresh == 0 else math.log(thresh)
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
                                skip_test, part_m, part_l, part_acc, tile_map)
            decode_merge_kernel(part_m, part_l, part_acc, causal, lk, out)
        else:
            tile_map = np.zeros((n_b, n_hq, tiling.num_tiles(lq, block_q), n_kt), np.int8)
            prefill_kernel(q, pack_k_tiles(k, block_k), v, log_thresh, causal, scale, block_q,
                           block_k, skip_test, out, tile_map)
    return out, tile_map
