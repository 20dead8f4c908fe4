"""BLASST backward on the CPU: FlashAttention-2's backward over the kept tiles (docs/DESIGN.md §11).

The algorithm is :func:`blasst_ref.reference_backward.attention_backward_reference` tile by
tile: for every tile the forward computed (tile map code 1), recompute ``S = Q K^T`` and
``P = exp(S - lse)`` from the saved log-sum-exp, then ``dP = dO V^T``,
``dS = P * (dP - D)`` with ``D = rowsum(dO * O)``, and accumulate ``dV += P^T dO``,
``dK += dS^T Q``, ``dQ += dS K`` (``Q`` pre-scaled, so ``scale`` rides along). Skipped and
never-visited tiles are not touched at all: unlike the forward, where ``Q K^T`` must run to
take the decision, a skipped tile costs the backward nothing.

The five tile products are BLAS calls (``np.dot``) on contiguous tiles; ``K`` and ``V`` are
packed once into transposed, zero-padded tiles (``prefill.pack_k_tiles``), so that ``S`` and
``dP`` are plain products and a partial last tile needs no special case (its padding columns
get ``P = dS = 0``).

Two ways to spread the work over the cores
-------------------------------------------
``dQ`` sums over key tiles, ``dK``/``dV`` over query tiles (and over the query heads of a kv
group). A CPU has no float atomics in Numba, so one of the two sums must be owned:

* **fused** (:func:`query_tiles_kernel` with private copies): a ``prange`` over query
  tiles, as the forward; each thread owns its ``dQ`` rows and adds its ``dK``/``dV``
  contributions into a private copy of ``dK``/``dV``; the copies are summed at the end.
  Five products per tile, one ``exp``; memory ``threads x size(dK + dV)``.
* **two-pass** (:func:`key_tiles_kernel`, then :func:`query_tiles_kernel` without copies;
  the layout of FlashAttention-2's and Triton's kernels without atomics): a ``prange`` over
  key tiles owns ``dK``/``dV``, then a ``prange`` over query tiles owns ``dQ``. Each pass
  recomputes ``S``, ``P`` and ``dP``: seven products and two ``exp`` per tile, no extra
  memory.

:func:`blasst_ref.cpu.blasst_attention_backward` picks fused while the private copies are small (see
``FUSED_MAX_COPY_BYTES``); docs/BENCHMARKS.md has both measured.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .. import tiling
from ..numba_utils import FASTMATH, exp
from ..rule import COMPUTED
from .prefill import pack_k_tiles

__all__ = ["FUSED_MAX_COPY_BYTES", "key_tiles_kernel", "query_tiles_kernel", "row_deltas"]

#: The fused kernel keeps one private copy of dK and dV per thread; above this many bytes
#: for all copies together the two-pass kernels run instead (no extra memory).
FUSED_MAX_COPY_BYTES = 256 << 20


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def row_deltas(dout, out, delta):
    """``delta[b, h, i] = sum_d dout[b, h, i, d] * out[b, h, i, d]`` (``D`` of the module
    docstring: the row term of the softmax Jacobian, ``sum_j P_ij dP_ij``)."""
    n_b, n_h, lq, dv = out.shape
    for w in prange(n_b * n_h):
        b = w // n_h
        h = w % n_h
        for i in range(lq):
            acc = delta.dtype.type(0.0)
            for d in range(dv):
                acc += dout[b, h, i, d] * out[b, h, i, d]
            delta[b, h, i] = acc


@njit(inline="always", fastmath=FASTMATH)
def _load_q_tile(q, dout, lse, delta, b, h, i0, nr, scale, q_s, do_t, lse_t, delta_t):
    """Copy one query tile's operands into contiguous buffers (``Q`` pre-scaled)."""
    dt = q.dtype.type
    for r in range(nr):
        for d in range(q.shape[3]):
            q_s[r, d] = q[b, h, i0 + r, d] * dt(scale)
        for d in range(dout.shape[3]):
            do_t[r, d] = dout[b, h, i0 + r, d]
        lse_t[r] = lse[b, h, i0 + r]
        delta_t[r] = delta[b, h, i0 + r]


@njit(inline="always", fastmath=FASTMATH)
def _probs_and_dscores(q_s, do_t, k_t, v_t, lse_t, delta_t, causal, first_key, nc, s, dp):
    """One kept tile: ``s <- P = exp(Q K^T - lse)`` and ``dp <- dS = P * (dO V^T - D)``.

    ``k_t``/``v_t`` are packed tiles ``(D, block_k)``; ``first_key`` is the tile's first key
    minus the first row's last visible key (``j0 - i0 - offset``): row ``r`` sees the tile's
    keys ``j < r - first_key + 1``. Masked and padding columns get ``P = dS = 0``."""
    dt = s.dtype.type
    np.dot(q_s, k_t, s)
    np.dot(do_t, v_t, dp)
    block_k = s.shape[1]
    for r in range(s.shape[0]):
        lim = nc
        if causal:
            lim = min(nc, max(0, r - first_key + 1))
        s_row = s[r]
        dp_row = dp[r]
        m = lse_t[r]
        dl = delta_t[r]
        for j in range(lim):
            p = exp(s_row[j] - m)
            s_row[j] = p
            dp_row[j] = p * (dp_row[j] - dl)
        for j in range(lim, block_k):
            s_row[j] = dt(0.0)
            dp_row[j] = dt(0.0)


@njit(inline="always")
def _dscores_times_k(ds, k, k_tiles_t, b, g, kt, j0, nc, out):
    """``out = dS K_tile``: a plain (NN) product on the row-major keys for a full tile (~25%
    faster in OpenBLAS than the transposed packed tile), the packed tile for a partial one
    (whose padding columns of ``dS`` are zero)."""
    if nc == ds.shape[1]:
        np.dot(ds, k[b, g, j0:j0 + nc], out)
    else:
        np.dot(ds, k_tiles_t[b, g, kt].T, out)


@njit(inline="always", fastmath=FASTMATH)
def _add_rows(dst, src, n):
    """``dst[:n] += src[:n]`` (2-D, row by row)."""
    for j in range(n):
        d_row = dst[j]
        s_row = src[j]
        for d in range(d_row.shape[0]):
            d_row[d] += s_row[d]


@njit(inline="always")
def _zigzag(z, n):
    """The ``z``-th of ``0, n-1, 1, n-2, ...``: under causal masking tile ``t``'s work grows
    (or shrinks) with ``t``, and pairs of light and heavy tiles balance the threads."""
    return z // 2 if z % 2 == 0 else n - 1 - z // 2


@njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True)
def query_tiles_kernel(q, k, k_tiles_t, v_tiles_t, dout, delta, lse, tile_map, causal, scale,
                       block_q, block_k, n_chunks, dq, dk_part, dv_part):
    """A ``prange`` over query tiles, each owning its rows of ``dQ``; with ``dk_part`` and
    ``dv_part`` also ``dK``/``dV`` into per-chunk private copies (*fused*), with ``None``
    not (the second pass of *two-pass*: Numba compiles that branch out).

    Args:
        q: ``(B, Hq, Lq, Dqk)``; k: ``(B, Hkv, Lk, Dqk)``; dout: ``(B, Hq, Lq, Dv)``;
            C-contiguous, one float dtype.
        k_tiles_t, v_tiles_t: ``pack_k_tiles(k, block_k)``, ``pack_k_tiles(v, block_k)``.
        delta, lse: ``(B, Hq, Lq)``: :func:`row_deltas` and the forward's log-sum-exp.
        tile_map: int8 decisions, ``(B, Hm, n_q_tiles, n_k_tiles)`` where query head ``h``
            reads map row ``h // (Hq // Hm)`` (``Hm = Hq`` in prefill, ``Hkv`` in decode).
        block_q: query rows per tile (``tiling.backward_block_q``); block_k: keys per tile.
        n_chunks: the query tiles are cut into this many contiguous chunks of work (one per
            thread), in an order that balances causal work (see :func:`_zigzag`).
        dq: ``(B, Hq, Lq, Dqk)``, written completely.
        dk_part, dv_part: ``(n_chunks, B, Hkv, Lk, D)``, zero on entry: chunk ``c`` adds
            into ``[c]`` and the caller sums them; or both ``None``.
    """
    dt = q.dtype.type
    n_b, n_hq, lq, dqk = q.shape
    n_hkv, n_kt, dv = v_tiles_t.shape[1], v_tiles_t.shape[2], v_tiles_t.shape[3]
    lk = k.shape[2]
    group = n_hq // n_hkv
    per = n_hq // tile_map.shape[1]
    offset = lk - lq
    n_qt = (lq + block_q - 1) // block_q
    n_work = n_b * n_hq * n_qt

    for c in prange(n_chunks):
        # flat buffers, viewed as (rows, cols) of the current tile: always C-contiguous
        q_buf = np.empty(block_q * dqk, q.dtype)
        do_buf = np.empty(block_q * dv, q.dtype)
        dq_buf = np.empty(block_q * dqk, q.dtype)
        tq_buf = np.empty(block_q * dqk, q.dtype)
        s_buf = np.empty(block_q * block_k, q.dtype)
        dp_buf = np.empty(block_q * block_k, q.dtype)
        lse_t = np.empty(block_q, q.dtype)
        delta_t = np.empty(block_q, q.dtype)
        tk = np.empty((block_k, dqk), q.dtype)
        tv = np.empty((block_k, dv), q.dtype)
        for w in range(c * n_work // n_chunks, (c + 1) * n_work // n_chunks):
            bh = w % (n_b * n_hq)  # (batch, head) fastest: every chunk sees every head
            b = bh // n_hq
            h = bh % n_hq
            qt = _zigzag(w // (n_b * n_hq), n_qt)
            g = h // group
            i0 = qt * block_q
            nr = min(lq, i0 + block_q) - i0
            q_s = q_buf[:nr * dqk].reshape((nr, dqk))
            do_t = do_buf[:nr * dv].reshape((nr, dv))
            dq_t = dq_buf[:nr * dqk].reshape((nr, dqk))
            tq = tq_buf[:nr * dqk].reshape((nr, dqk))
            s = s_buf[:nr * block_k].reshape((nr, block_k))
            dp = dp_buf[:nr * block_k].reshape((nr, block_k))
            _load_q_tile(q, dout, lse, delta, b, h, i0, nr, scale, q_s, do_t, lse_t, delta_t)
            dq_t[:] = dt(0.0)
            for kt in range(n_kt):
                if tile_map[b, h // per, qt, kt] != COMPUTED:
                    continue  # skipped or never visited: contributes exactly zero
                j0 = kt * block_k
                nc = min(lk, j0 + block_k) - j0
                _probs_and_dscores(q_s, do_t, k_tiles_t[b, g, kt], v_tiles_t[b, g, kt], lse_t,
                                   delta_t, causal, j0 - i0 - offset, nc, s, dp)
                if dk_part is not None:  # pruned at compile time for the two-pass kernel
                    np.dot(s.T, do_t, tv)  # P^T dO
                    _add_rows(dv_part[c, b, g, j0:], tv, nc)
                    np.dot(dp.T, q_s, tk)  # dS^T Q (Q pre-scaled)
                    _add_rows(dk_part[c, b, g, j0:], tk, nc)
                _dscores_times_k(dp, k, k_tiles_t, b, g, kt, j0, nc, tq)  # dS K
                _add_rows(dq_t, tq, nr)
            for r in range(nr):
                for d in range(dqk):
                    dq[b, h, i0 + r, d] = dq_t[r, d] * dt(scale)


@njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True)
def key_tiles_kernel(q, k, k_tiles_t, v_tiles_t, dout, delta, lse, tile_map, causal, scale,
                     block_q, block_k, dk, dv):
    """Pass 1 of two: a ``prange`` over key tiles; each owns its rows of ``dK`` and ``dV``
    ``(B, Hkv, Lk, D)`` (written completely) and visits the kept tiles of its column, for
    every query head of its kv group. Other arguments as :func:`query_tiles_kernel`."""
    dt = q.dtype.type
    n_b, n_hq, lq, dqk = q.shape
    n_hkv, n_kt, d_v = v_tiles_t.shape[1], v_tiles_t.shape[2], v_tiles_t.shape[3]
    lk = k.shape[2]
    group = n_hq // n_hkv
    per = n_hq // tile_map.shape[1]
    offset = lk - lq
    n_qt = (lq + block_q - 1) // block_q

    for w in prange(n_b * n_hkv * n_kt):
        bg = w % (n_b * n_hkv)
        b = bg // n_hkv
        g = bg % n_hkv
        kt = _zigzag(w // (n_b * n_hkv), n_kt)
        j0 = kt * block_k
        nc = min(lk, j0 + block_k) - j0
        dk_t = np.zeros((block_k, dqk), q.dtype)
        dv_t = np.zeros((block_k, d_v), q.dtype)
        tk = np.empty((block_k, dqk), q.dtype)
        tv = np.empty((block_k, d_v), q.dtype)
        q_buf = np.empty(block_q * dqk, q.dtype)
        do_buf = np.empty(block_q * d_v, q.dtype)
        lse_t = np.empty(block_q, q.dtype)
        delta_t = np.empty(block_q, q.dtype)
        s_buf = np.empty(block_q * block_k, q.dtype)
        dp_buf = np.empty(block_q * block_k, q.dtype)
        for h in range(g * group, (g + 1) * group):
            for qt in range(n_qt):
                if tile_map[b, h // per, qt, kt] != COMPUTED:
                    continue
                i0 = qt * block_q
                nr = min(lq, i0 + block_q) - i0
                q_s = q_buf[:nr * dqk].reshape((nr, dqk))
                do_t = do_buf[:nr * d_v].reshape((nr, d_v))
                _load_q_tile(q, dout, lse, delta, b, h, i0, nr, scale, q_s, do_t, lse_t, delta_t)
                s = s_buf[:nr * block_k].reshape((nr, block_k))
                dp = dp_buf[:nr * block_k].reshape((nr, block_k))
                _probs_and_dscores(q_s, do_t, k_tiles_t[b, g, kt], v_tiles_t[b, g, kt], lse_t,
                                   delta_t, causal, j0 - i0 - offset, nc, s, dp)
                np.dot(s.T, do_t, tv)
                _add_rows(dv_t, tv, block_k)
                np.dot(dp.T, q_s, tk)
                _add_rows(dk_t, tk, block_k)
        for j in range(nc):
            for d in range(dqk):
                dk[b, g, j0 + j, d] = dk_t[j, d]
            for d in range(d_v):
                dv[b, g, j0 + j, d] = dv_t[j, d]
