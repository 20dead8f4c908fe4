"""BLASST backward on the GPU, version 1: plain SIMT kernels, any shape (docs/DESIGN.md §11).

What it computes is :func:`blasst_ref.reference_backward.attention_backward_reference`: for
every tile the forward computed (tile map code 1), ``P = exp(scale * Q K^T - lse)``,
``dP = dO V^T``, ``dS = P * (dP - D)`` with ``D = rowsum(dO * O)``, and
``dV += P^T dO``, ``dK += scale * dS^T Q``, ``dQ += scale * dS K``; skipped and never-visited
tiles are not touched. What this version does differently from the CPU kernels: nothing is
tiled into shared memory; every thread owns one row of one output and the data it shares
with the other threads of its block comes through L1 as *broadcast* loads (all lanes of a
warp read the same address).

Four kernels, no atomics, no barriers:

* ``row_lse`` (:func:`row_lse`): the forward kernels do not write each row's log-sum-exp,
  so this kernel computes it from the forward's tile map: for each row, an online
  log-sum-exp over the scaled scores of the keys it kept (one extra ``Q K^T`` over the kept
  tiles, no ``V``). Block per query tile, one thread per query row.
* ``row_delta``: ``D = rowsum(dO * O)``, one thread per row.
* ``dq``: block per ``(query tile, query head, batch)``, one thread per query row: it walks
  the kept key tiles of its row; every key ``k_j``, ``v_j`` it reads is the same address for
  all threads of the block (broadcast), and it keeps ``q_i``, ``dO_i`` and the ``dQ`` row in
  thread-local arrays.
* ``dkdv``: block per ``(key tile, kv head, batch)``, one thread per key: it walks every
  query head of its kv group and the query tiles whose tile with its key tile was kept
  (GQA/MQA: the sum over the group's heads is a loop, not an atomic), reading each ``q_i``,
  ``dO_i`` as a broadcast, and keeps ``k_j``, ``v_j`` and the ``dK``, ``dV`` rows local.

The local arrays have ``2 (Dqk + Dv)`` floats per thread: beyond the register file they live
in local memory (L1-cached). This is a correctness-first version (and the simulator's path);
expect it far below a tensor-core FlashAttention backward. Measured: not yet on a GPU (see
docs/BENCHMARKS.md for the command).

Inputs are CUDA arrays of one dtype, float32 or float16 (or a torch bfloat16 tensor, read as
its bits); computation is float32; gradients come back in the inputs' dtype and library.
Kernels are compiled per ``(Dqk, Dv)`` (thread-local array sizes must be compile-time
constants in Numba) and cached.
"""

from __future__ import annotations

import math

import numpy as np
from numba import config, cuda, float32

from .. import tiling
from . import _as_numba, _check_contiguous, _new_like_library
from .intrinsics import narrow, widen
from .rule import COMPUTED as _COMPUTED  # the tile code (blasst_ref.rule)

__all__ = ["attention_backward", "own_tile_map", "row_lse"]

_SIMULATOR = bool(config.ENABLE_CUDASIM)
#: Threads per block (one per row / key; a thread loops when a tile has more).
_MAX_THREADS = 128


def _threads(n: int) -> int:
    """Threads for ``n`` rows or keys: whole warps on a GPU (the simulator runs every
    thread as a Python thread: no padding there)."""
    if _SIMULATOR:
        return max(1, min(n, _MAX_THREADS))
    return min(_MAX_THREADS, -(-n // 32) * 32)


_KERNELS: dict = {}


def _kernels(dqk: int, dv: int):
    """The compiled kernels for head dims ``(Dqk, Dv)`` (built once, then cached)."""
    if (dqk, dv) not in _KERNELS:
        _KERNELS[(dqk, dv)] = _make_kernels(dqk, dv)
    return _KERNELS[(dqk, dv)]


@cuda.jit(device=True, inline=True)
def _kept_keys(tile_map, b, map_row, qt, kt, i, block_k, lk, offset, causal):
    """``(j0, j1)``: the keys ``j0 <= j < j1`` of key tile ``kt`` that query row ``i`` (of
    query tile ``qt``) kept -- none (``j1 <= j0``) when the forward skipped the tile or never
    visited it, else the tile's keys the causal mask shows row ``i``."""
    j0 = kt * block_k
    if tile_map[b, map_row, qt, kt] != _COMPUTED:
        return j0, j0
    j1 = min(lk, j0 + block_k)
    if causal:
        j1 = min(j1, i + offset + 1)
    return j0, j1


@cuda.jit(device=True, inline=True)
def _query_tile(q, k, tile_map, block_q):
    """Where a block of the ``(query tile, query head, batch)`` grid works: ``(qt, h, b,
    kv head, tile-map row, first row, end row, Lk, causal offset)``. In decode the map has a
    row per kv group (``Hq // map rows`` query heads share it)."""
    n_hq, lq = q.shape[1], q.shape[2]
    n_hkv, lk = k.shape[1], k.shape[2]
    qt, h, b = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
    i0 = qt * block_q
    return (qt, h, b, h // (n_hq // n_hkv), h // (n_hq // tile_map.shape[1]), i0,
            min(lq, i0 + block_q), lk, lk - lq)


def _make_kernels(dqk: int, dv: int):
    """Build the four kernels for one ``(Dqk, Dv)`` (see the module docstring)."""

    @cuda.jit
    def row_lse_kernel(q, k, tile_map, causal, scale, block_q, block_k, lse):
        """lse (B, Hq, Lq) float32 <- log-sum-exp of each row's kept scaled scores."""
        qi = cuda.local.array(dqk, float32)
        qt, h, b, g, map_row, i0, i1, lk, offset = _query_tile(q, k, tile_map, block_q)
        f_scale = float32(scale)
        for i in range(i0 + cuda.threadIdx.x, i1, cuda.blockDim.x):
            for d in range(dqk):
                qi[d] = widen(q[b, h, i, d]) * f_scale
            m = float32(-math.inf)
            s_sum = float32(0.0)
            for kt in range(tile_map.shape[3]):
                j0, j1 = _kept_keys(tile_map, b, map_row, qt, kt, i, block_k, lk, offset,
                                    causal)
                for j in range(j0, j1):
                    s = float32(0.0)
                    for d in range(dqk):
                        s += qi[d] * widen(k[b, g, j, d])
                    if s > m:  # online log-sum-exp: rescale the sum to the new max
                        s_sum = s_sum * math.exp(m - s) + float32(1.0)
                        m = s
                    else:
                        s_sum += math.exp(s - m)
            sees = not (causal and i + offset < 0)
            lse[b, h, i] = m + math.log(s_sum) if sees else float32(-math.inf)

    @cuda.jit
    def row_delta_kernel(dout, out, delta):
        """delta (B, Hq, Lq) float32 <- rowsum(dout * out)."""
        n_hq, lq = out.shape[1], out.shape[2]
        w = cuda.grid(1)
        if w >= out.shape[0] * n_hq * lq:
            return
        b = w // (n_hq * lq)
        h = (w // lq) % n_hq
        i = w % lq
        acc = float32(0.0)
        for d in range(dv):
            acc += widen(dout[b, h, i, d]) * widen(out[b, h, i, d])
        delta[b, h, i] = acc

    @cuda.jit
    def dq_kernel(q, k, v, dout, delta, lse, tile_map, causal, scale, block_q, block_k, dq):
        """dq (B, Hq, Lq, Dqk) <- scale * sum over kept keys of dS_ij k_j."""
        qi = cuda.local.array(dqk, float32)
        doi = cuda.local.array(dv, float32)
        acc = cuda.local.array(dqk, float32)
        qt, h, b, g, map_row, i0, i1, lk, offset = _query_tile(q, k, tile_map, block_q)
        f_scale = float32(scale)
        for i in range(i0 + cuda.threadIdx.x, i1, cuda.blockDim.x):
            for d in range(dqk):
                qi[d] = widen(q[b, h, i, d]) * f_scale
                acc[d] = float32(0.0)
            for d in range(dv):
                doi[d] = widen(dout[b, h, i, d])
            m = lse[b, h, i]
            dl = delta[b, h, i]
            for kt in range(tile_map.shape[3]):
                j0, j1 = _kept_keys(tile_map, b, map_row, qt, kt, i, block_k, lk, offset,
                                    causal)
                for j in range(j0, j1):
                    s = float32(0.0)
                    for d in range(dqk):
                        s += qi[d] * widen(k[b, g, j, d])
                    dp = float32(0.0)
                    for d in range(dv):
                        dp += doi[d] * widen(v[b, g, j, d])
                    ds = math.exp(s - m) * (dp - dl)
                    for d in range(dqk):
                        acc[d] += ds * widen(k[b, g, j, d])
            for d in range(dqk):
                dq[b, h, i, d] = narrow(dq, acc[d] * f_scale)

    @cuda.jit
    def dkdv_kernel(q, k, v, dout, delta, lse, tile_map, causal, scale, block_q, block_k,
                    dk, dv_out):
        """dk, dv (B, Hkv, Lk, D) <- sums over the kv group's kept query rows."""
        kj = cuda.local.array(dqk, float32)
        vj = cuda.local.array(dv, float32)
        acc_k = cuda.local.array(dqk, float32)
        acc_v = cuda.local.array(dv, float32)
        n_hq, lq = q.shape[1], q.shape[2]
        n_hkv, lk = k.shape[1], k.shape[2]
        kt, g, b = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
        group = n_hq // n_hkv
        per = n_hq // tile_map.shape[1]
        n_qt = tile_map.shape[2]
        offset = lk - lq
        f_scale = float32(scale)
        j0 = kt * block_k
        j1 = min(lk, j0 + block_k)
        for j in range(j0 + cuda.threadIdx.x, j1, cuda.blockDim.x):
            for d in range(dqk):
                kj[d] = widen(k[b, g, j, d])
                acc_k[d] = float32(0.0)
            for d in range(dv):
                vj[d] = widen(v[b, g, j, d])
                acc_v[d] = float32(0.0)
            for h in range(g * group, (g + 1) * group):
                for qt in range(n_qt):
                    if tile_map[b, h // per, qt, kt] != _COMPUTED:
                        continue
                    i0 = qt * block_q
                    if causal:  # row i sees key j iff i >= j - offset
                        i0 = max(i0, j - offset)
                    for i in range(i0, min(lq, qt * block_q + block_q)):
                        s = float32(0.0)
                        for d in range(dqk):
                            s += widen(q[b, h, i, d]) * kj[d]
                        dp = float32(0.0)
                        for d in range(dv):
                            dp += widen(dout[b, h, i, d]) * vj[d]
                        p = math.exp(s * f_scale - lse[b, h, i])
                        ds = p * (dp - delta[b, h, i])
                        for d in range(dv):
                            acc_v[d] += p * widen(dout[b, h, i, d])
                        for d in range(dqk):
                            acc_k[d] += ds * widen(q[b, h, i, d])
            for d in range(dqk):
                dk[b, g, j, d] = narrow(dk, acc_k[d] * f_scale)
            for d in range(dv):
                dv_out[b, g, j, d] = narrow(dv_out, acc_v[d])

    return row_lse_kernel, row_delta_kernel, dq_kernel, dkdv_kernel


def _as_4d(x):
    arr = _as_numba(x)
    return arr.reshape((1,) + arr.shape) if arr.ndim == 3 else arr


def _shape(x):
    return tuple(x.shape)


def own_tile_map(q, tile_map):
    """A copy of a forward's tile map, on the device, in ``q``'s library.

    The fast host path of the CUDA forward returns a tile-map buffer that the next call of
    the same shape overwrites (:func:`blasst_ref.cuda.attention`); a model's layers share
    shapes, and their backward runs after every forward, so the saved map must be a copy."""
    src = _as_numba(tile_map)
    dst = _new_like_library(q, tuple(src.shape), np.int8)
    _as_numba(dst).copy_to_device(src)
    return dst


def row_lse(q, k, tile_map, causal, scale, block_q, block_k):
    """Each query row's log-sum-exp over the scaled scores of the keys it kept.

    Args:
        q: ``(B, Hq, Lq, Dqk)``, k: ``(B, Hkv, Lk, Dqk)`` (or 3-D), CUDA arrays.
        tile_map: the forward's int8 decisions, a CUDA array (prefill
            ``(B, Hq, n_q_tiles, n_k_tiles)``, decode ``(B, Hkv, 1, n_k_tiles)``).
        causal, scale, block_q, block_k: the forward's.

    Returns:
        float32 ``(B, Hq, Lq)`` (``(Hq, Lq)`` for 3-D ``q``) of ``q``'s library; ``-inf``
        for a row that sees no key.
    """
    q4, k4 = _as_4d(q), _as_4d(k)
    n_b, n_hq, lq, dqk = q4.shape
    rows = tiling.backward_block_q(lq, block_q)
    lse = _new_like_library(q, _shape(q)[:-1], np.float32)
    lse4 = _as_numba(lse).reshape((n_b, n_hq, lq))
    kern = _kernels(dqk, _as_4d(k).shape[3])[0]
    grid = (tiling.num_tiles(lq, rows), n_hq, n_b)
    kern[grid, _threads(rows)](q4, k4, _as_numba(tile_map), bool(causal), float(scale),
                               rows, block_k, lse4)
    return lse


def attention_backward(dout, q, k, v, out, lse, tile_map, causal, scale, block_q, block_k):
    """Gradients of BLASST attention on the GPU (validated by
    :func:`blasst_ref.attention_backward`).

    Args:
        dout, out: ``(B, Hq, Lq, Dv)``; q: ``(B, Hq, Lq, Dqk)``; k: ``(B, Hkv, Lk, Dqk)``;
            v: ``(B, Hkv, Lk, Dv)`` (or all 3-D): C-contiguous CUDA arrays of one dtype.
        lse: float32 ``(B, Hq, Lq)``, :func:`row_lse` (or any forward's log-sum-exp).
        tile_map: the forward's int8 decisions, a CUDA array.
        causal, scale, block_q, block_k: the forward's.

    Returns:
        ``(dq, dk, dv)``, new arrays of ``q``'s library and dtype, shaped like ``q, k, v``.
    """
    for name, x in (("dout", dout), ("q", q), ("k", k), ("v", v), ("out", out)):
        _check_contiguous(name, x)
    q4, k4, v4, do4, o4 = (_as_4d(x) for x in (q, k, v, dout, out))
    n_b, n_hq, lq, dqk = q4.shape
    n_hkv, lk, dv = k4.shape[1], k4.shape[2], v4.shape[3]
    rows = tiling.backward_block_q(lq, block_q)
    n_qt, n_kt = tiling.num_tiles(lq, rows), tiling.num_tiles(lk, block_k)
    _, delta_kernel, dq_kernel, dkdv_kernel = _kernels(dqk, dv)
    dtype = q.dtype if hasattr(q, "dtype") else q4.dtype

    delta = _as_numba(_new_like_library(q, (n_b, n_hq, lq), np.float32))
    n_rows = n_b * n_hq * lq
    delta_kernel[-(-n_rows // 128), 128](do4, o4, delta)
    grads = tuple(_new_like_library(q, _shape(x), dtype) for x in (q, k, v))
    dq4, dk4, dv4 = (_as_4d(g) for g in grads)
    lse4 = _as_numba(lse).reshape((n_b, n_hq, lq))
    tm = _as_numba(tile_map)
    args = (q4, k4, v4, do4, delta, lse4, tm, bool(causal), float(scale), rows, block_k)
    dq_kernel[(n_qt, n_hq, n_b), _threads(rows)](*args, dq4)
    dkdv_kernel[(n_kt, n_hkv, n_b), _threads(block_k)](*args, dk4, dv4)
    return grads
