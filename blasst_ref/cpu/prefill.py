"""BLASST prefill on the CPU: one Numba ``prange`` over (batch, query head, query tile).

The algorithm is ``reference._prefill`` line for line; what differs is how each step is made
fast on a CPU core:

* the two tile products, ``S = Q K^T`` (``block_q x Dqk`` by ``Dqk x block_k``) and
  ``O += P V`` (``block_q x block_k`` by ``block_k x Dv``), are BLAS calls through ``np.dot``
  on contiguous tiles; K is packed once per call into transposed tiles
  (:func:`pack_k_tiles`). At the default 128 x 64 tiles Q, one K tile, one V tile and S fit
  in a core's L2;
* the softmax loop is vectorised (``numba_utils.exp`` is a polynomial LLVM can vectorise);
* the skip test costs ``block_q`` compares per tile, against ``block_q * block_k`` exps and
  ``2 * block_q * block_k * (Dqk + Dv)`` FLOPs that a skip saves (everything but ``Q K^T``:
  hence the ideal speedup ``2 / (2 - s)`` at sparsity ``s``);
* the old accumulator is only rescaled when a row's max actually grows (``alpha != 1``),
  which after the first few tiles is rare.

``skip_test=None`` compiles a kernel without the skip test (its type is None, and Numba
prunes the branch): the baseline for "the skip test costs nothing at ``thresh = 0``".
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..numba_utils import FASTMATH
from ..rule import COMPUTED, SKIPPED
from .online import (fold_row, last_visible_key, max_nan, row_sees_keys, rows_agree_to_skip,
                     visited_k_tiles)


@njit(inline="always", fastmath=FASTMATH)
def _has_nan(x):
    """Whether the 2-D array ``x`` holds a NaN. It counts them all, with no early exit, so
    that the loop vectorises: it runs on every tile about to be skipped."""
    n = 0
    for r in range(x.shape[0]):
        row = x[r]
        for j in range(row.shape[0]):
            n += row[j] != row[j]
    return n > 0


@njit(inline="always", fastmath=FASTMATH)
def _rows_max(s, nr, nc, out):
    """``out[r] = max(s[r, :nc])``, four rows at a time.

    LLVM does not vectorise a float max reduction without 'nnan' (and we keep NaN
    semantics), so each row is a chain of dependent scalar max operations: four independent
    chains keep twice as many instructions in flight (measured: 0.31 -> 0.16 ns/score)."""
    r = 0
    while r + 4 <= nr:
        s0, s1, s2, s3 = s[r], s[r + 1], s[r + 2], s[r + 3]
        m0 = m1 = m2 = m3 = s.dtype.type(-np.inf)
        for j in range(nc):
            m0 = max(m0, s0[j])
            m1 = max(m1, s1[j])
            m2 = max(m2, s2[j])
            m3 = max(m3, s3[j])
        out[r], out[r + 1], out[r + 2], out[r + 3] = m0, m1, m2, m3
        r += 4
    for rr in range(r, nr):
        row = s[rr]
        mx = s.dtype.type(-np.inf)
        for j in range(nc):
            mx = max(mx, row[j])
        out[rr] = mx


@njit(parallel=True, cache=True)
def pack_k_tiles(k, block_k):
    """Keys ``(B, Hkv, Lk, D)`` -> ``(B, Hkv, n_k_tiles, D, block_k)``, each tile transposed
    and the last one zero-padded.

    OpenBLAS multiplies ``Q (rows x D) @ K_tile^T`` about 35% faster when ``K_tile^T`` is
    stored as a plain row-major ``D x block_k`` matrix than when it is passed as the
    transposed view of ``K_tile``; one pass over K buys that for every query tile."""
    n_b, n_h, lk, d_k = k.shape
    n_kt = (lk + block_k - 1) // block_k
    out = np.zeros((n_b, n_h, n_kt, d_k, block_k), k.dtype)
    for w in prange(n_b * n_h * n_kt):
        b = w // (n_h * n_kt)
        h = (w // n_kt) % n_h
        kt = w % n_kt
        j0 = kt * block_k
        for j in range(min(lk, j0 + block_k) - j0):
            k_row = k[b, h, j0 + j]
            for d in range(d_k):
                out[b, h, kt, d, j] = k_row[d]
    return out


@njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True)
def prefill_kernel(q, k_tiles_t, v, log_thresh, causal, scale, block_q, block_k, skip_test, out, tile_map,
                   lse=None):
    """BLASST prefill, in place.

    Args:
        q: ``(B, Hq, Lq, Dqk)``, v: ``(B, Hkv, Lk, Dv)``, C-contiguous float32 (or float64).
        k_tiles_t: the keys packed by :func:`pack_k_tiles`, ``(B, Hkv, n_k_tiles, Dqk,
            block_k)``: each tile transposed, so that ``Q K^T`` is a plain (NN) product.
        log_thresh: ``log(thresh)``, ``-inf`` for ``thresh = 0``.
        causal: bottom-right aligned mask. scale: score scale.
        block_q, block_k: tile sizes.
        skip_test: ``True``, or ``None`` to compile the skip test out (Numba prunes
            ``if skip_test is not None`` for a None-typed argument).
        out: ``(B, Hq, Lq, Dv)`` written completely.
        tile_map: int8 ``(B, Hq, n_q_tiles, n_k_tiles)``, zero on entry; visited tiles get
            1 (computed) or 2 (skipped).
        lse: optional ``(B, Hq, Lq)``, written with each row's log-sum-exp ``m + log(l)``
            over its kept scores (``-inf`` for a row that sees no key), for the backward.
    """
    dt = q.dtype.type
    n_b, n_hq, lq, dqk = q.shape
    n_hkv, lk, dv = v.shape[1], v.shape[2], v.shape[3]
    group = n_hq // n_hkv
    n_qt = (lq + block_q - 1) // block_q
    neg_inf = dt(-np.inf)

    for w in prange(n_b * n_hq * n_qt):
        # prange hands each thread one contiguous range of w, so the order of the work
        # decides the balance. Heads differ in how much they skip, so (batch, head) varies
        # fastest: every thread gets every head. Query tiles go zig-zag (0, n-1, 1, n-2, ...):
        # under causal masking tile qt costs ~qt + 1, and pairs of light and heavy tiles
        # balance the threads.
        bh = w % (n_b * n_hq)
        b = bh // n_hq
        h = bh % n_hq
        z = w // (n_b * n_hq)
        qt = z // 2 if z % 2 == 0 else n_qt - 1 - z // 2
        kvh = h // group
        i0 = qt * block_q
        i1 = min(lq, i0 + block_q)
        nr = i1 - i0

        q_tile = np.empty((nr, dqk), q.dtype)  # pre-scaled: one multiply per element, once
        for r in range(nr):
            for d in range(dqk):
                q_tile[r, d] = q[b, h, i0 + r, d] * dt(scale)
        m = np.full(nr, neg_inf, q.dtype)
        l = np.zeros(nr, q.dtype)
        acc = np.zeros((nr, dv), q.dtype)
        tile_max = np.empty(nr, q.dtype)
        s_buf = np.empty(nr * block_k, q.dtype)
        p_buf = np.empty(nr * block_k, q.dtype)  # compact P of a partial last tile
        pv = np.empty((nr, dv), q.dtype)

        k_tiles = visited_k_tiles(i1, lq, lk, block_k, causal)  # past the horizon: masked

        for kt in range(k_tiles):
            j0 = kt * block_k
            j1 = min(lk, j0 + block_k)
            nc = j1 - j0
            s = s_buf.reshape((nr, block_k))  # columns >= nc (last tile) are padding
            np.dot(q_tile, k_tiles_t[b, kvh, kt], s)

            # Only tiles that cross the diagonal need a per-row key limit.
            partial = j1 - 1 > last_visible_key(i0, lq, lk, causal)
            if partial:
                # Few tiles cross the diagonal: a scalar max that keeps NaN is cheap here,
                # and it looks at visible scores only (a NaN that the mask hides must not
                # block a skip, as in the reference).
                for r in range(nr):
                    lim = min(nc, max(0, last_visible_key(i0 + r, lq, lk, causal) - j0 + 1))
                    mx = neg_inf
                    row = s[r]
                    for j in range(lim):
                        mx = max_nan(row[j], mx)
                    tile_max[r] = mx
            else:
                _rows_max(s, nr, nc, tile_max)

            if skip_test is not None:  # pruned at compile time when None
                skip = rows_agree_to_skip(tile_max, m, nr, log_thresh)
                # _rows_max ignores NaN (a NaN-aware max does not vectorise); a NaN score
                # must keep its tile, so check for one on this (cheap) path only. Every
                # score of a full tile is visible (padding columns are zeros).
                if skip and (partial or not _has_nan(s)):
                    tile_map[b, h, qt, kt] = SKIPPED
                    continue
            tile_map[b, h, qt, kt] = COMPUTED

            for r in range(nr):
                lim = nc
                if partial:
                    lim = min(nc, max(0, last_visible_key(i0 + r, lq, lk, causal) - j0 + 1))
                fold_row(s[r, :nc], lim, tile_max[r], r, m, l, acc)
            if nc == block_k:
                np.dot(s, v[b, kvh, j0:j1], pv)
            else:
                p = p_buf[: nr * nc].reshape((nr, nc))
                for r in range(nr):
                    for j in range(nc):
                        p[r, j] = s[r, j]
                np.dot(p, v[b, kvh, j0:j1], pv)
            for r in range(nr):
                for d in range(dv):
                    acc[r, d] += pv[r, d]

        for r in range(nr):
            if not row_sees_keys(i0 + r, lq, lk, causal):  # zeros (FlashAttention's rule)
                for d in range(dv):
                    out[b, h, i0 + r, d] = dt(0.0)
            else:
                inv = dt(1.0) / l[r]  # l = 0 with visible keys (all -inf scores): NaN, as dense
                for d in range(dv):
                    out[b, h, i0 + r, d] = acc[r, d] * inv
            if lse is not None:  # pruned at compile time when not given
                sees = row_sees_keys(i0 + r, lq, lk, causal)
                lse[b, h, i0 + r] = m[r] + np.log(l[r]) if sees else neg_inf
