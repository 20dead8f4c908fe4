"""BLASST decode on the CPU: split-KV (flash-decoding) with a log-sum-exp merge.

Decode is memory-bound: each K and V element is read once for only ``group * Lq`` query
rows, so the time is the bytes moved. A skipped tile never touches its V rows, which is
where the speedup comes from: at sparsity ``s`` the bytes are ``K + (1 - s) V``, an ideal
speedup of ``2 / (2 - s)`` for ``Dqk == Dv``.

Two kernels, as on a GPU:

1. :func:`decode_split_kernel`, a ``prange`` over (batch, kv head, split): the rows of every
   tile are all query rows of all query heads of one kv group (they decide together whether
   to skip), and each split starts with its own running max. Seeded (the default,
   docs/DESIGN.md §3.5), a split other than the first also scores key tile 0 (one extra K
   tile read, no V) and tests its tiles against ``max(m_r, s0_r)``, so even its first tile
   may be skipped; unseeded, its first tile is dense. It writes the split's partial state
   ``(m, l, acc)`` (``m = -inf, l = 0, acc = 0`` for a split that skipped everything: weight
   0 in the merge).
2. :func:`decode_merge_kernel`, a ``prange`` over (batch, kv head): rescales the partial
   states to the common max and divides by the merged sum.

``Q K^T`` always runs, so each split first computes all its scores, streaming its K rows
once; the tile-by-tile part is the skip test and ``O += P V``, a plain loop that
reads each kept V row once for all ``group * Lq`` rows (4 for Llama-style GQA).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..numba_utils import FASTMATH, exp
from ..rule import COMPUTED, SKIPPED
from .online import (fold_row, last_visible_key, max_nan, row_sees_keys,
                     rows_agree_to_skip_seeded, visited_k_tiles)


@njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True)
def decode_split_kernel(q, k, v, log_thresh, causal, scale, block_k, split_tiles, skip_test,
                        part_m, part_l, part_acc, tile_map, seeded=True):
    """Partial BLASST states of every split-KV chunk.

    Args:
        q: ``(B, Hq, Lq, Dqk)``; k: ``(B, Hkv, Lk, Dqk)``; v: ``(B, Hkv, Lk, Dv)``; C-contiguous,
            one float dtype.
        log_thresh, causal, scale, block_k: as in the prefill kernel.
        split_tiles: key tiles per split (``tiling.decode_split_tiles``).
        skip_test: ``True``, or ``None`` to compile the skip test out (Numba prunes
            ``if skip_test is not None`` for a None-typed argument).
        part_m, part_l: ``(B, Hkv, n_splits, R)`` with ``R = (Hq // Hkv) * Lq``, written.
        part_acc: ``(B, Hkv, n_splits, R, Dv)``, written.
        tile_map: int8 ``(B, Hkv, 1, n_k_tiles)``, zero on entry.
        seeded: the seeded skip test (docs/DESIGN.md §3.5, ``decode_seed="sink"``): a split
            that does not start at tile 0 first scores key tile 0 itself (``Q K^T`` only: no
            exp, no V) and tests each tile against ``max_nan(m_r, s0_r)``, ``s0_r`` row
            ``r``'s max over that tile; ``False``: against ``m_r`` only.

    Row ``r`` of a group is query head ``g * group + r // Lq`` at query position ``r % Lq``.
    """
    dt = q.dtype.type
    n_b, n_hq, lq, dqk = q.shape
    n_hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    group = n_hq // n_hkv
    n_rows = group * lq
    n_splits = part_m.shape[2]
    neg_inf = dt(-np.inf)

    # tiles past the last query row's horizon are masked for every row: never visited
    k_tiles = visited_k_tiles(lq, lq, lk, block_k, causal)

    for w in prange(n_b * n_hkv * n_splits):
        b = w // (n_hkv * n_splits)
        g = (w // n_splits) % n_hkv
        sp = w % n_splits

        q_rows = np.empty((n_rows, dqk), q.dtype)
        for r in range(n_rows):
            for d in range(dqk):
                q_rows[r, d] = q[b, g * group + r // lq, r % lq, d] * dt(scale)
        m = np.full(n_rows, neg_inf, q.dtype)
        l = np.zeros(n_rows, q.dtype)
        acc = np.zeros((n_rows, dv), q.dtype)
        tile_max = np.empty(n_rows, q.dtype)
        s0 = np.full(n_rows, neg_inf, q.dtype)  # the sink reference (-inf: unseeded)

        kt0 = sp * split_tiles
        kt1 = min(k_tiles, kt0 + split_tiles)
        if kt1 <= kt0:
            for r in range(n_rows):
                part_m[b, g, sp, r] = m[r]
                part_l[b, g, sp, r] = dt(0.0)
                for d in range(dv):
                    part_acc[b, g, sp, r, d] = dt(0.0)
            continue
        if seeded and skip_test is not None and kt0 > 0 and log_thresh > -np.inf:
            # s0: tile 0's row maxima over visible keys, scored as below (same loop, same
            # rounding as split 0's own scores of tile 0): one extra K tile read per split
            n0 = min(lk, block_k)
            k_g = k[b, g]
            for j in range(n0):
                k_row = k_g[j]
                for r in range(n_rows):
                    if j <= last_visible_key(r % lq, lq, lk, causal):
                        q_row = q_rows[r]
                        dot = dt(0.0)
                        for d in range(dqk):
                            dot += q_row[d] * k_row[d]
                        s0[r] = max_nan(dot, s0[r])
        js = kt0 * block_k
        je = min(lk, kt1 * block_k)
        # Q K^T is never skipped: score the whole split first, streaming each K row once
        # for all rows (a plain loop: BLAS is 4x slower than this at 4 rows); only the
        # P.V part below is decided tile by tile.
        s = np.empty((n_rows, je - js), q.dtype)
        k_g = k[b, g]
        for j in range(je - js):
            k_row = k_g[js + j]
            for r in range(n_rows):
                q_row = q_rows[r]
                dot = dt(0.0)
                for d in range(dqk):
                    dot += q_row[d] * k_row[d]
                s[r, j] = dot

        for kt in range(kt0, kt1):
            j0 = kt * block_k
            nc = min(lk, j0 + block_k) - j0
            c0 = j0 - js  # column of key j0 in s
            for r in range(n_rows):
                lim = min(nc, max(0, last_visible_key(r % lq, lq, lk, causal) - j0 + 1))
                # A max that keeps NaN, over visible scores only: a NaN score never lets its
                # tile be skipped, and one the causal mask hides does not count (as in the
                # reference). Decode is memory-bound: this scalar loop costs nothing.
                mx = neg_inf
                row = s[r, c0:c0 + lim]
                for j in range(lim):
                    mx = max_nan(row[j], mx)
                tile_max[r] = mx

            if skip_test is not None:  # pruned at compile time when None
                skip = rows_agree_to_skip_seeded(tile_max, m, s0, n_rows, log_thresh)
                if skip:  # the V rows of this tile are never read
                    tile_map[b, g, 0, kt] = SKIPPED
                    continue
            tile_map[b, g, 0, kt] = COMPUTED

            for r in range(n_rows):
                lim = min(nc, max(0, last_visible_key(r % lq, lq, lk, causal) - j0 + 1))
                fold_row(s[r, c0:c0 + nc], lim, tile_max[r], r, m, l, acc)
            # O += P V, one V row at a time (read once, from L1) for all rows
            v_g = v[b, g]
            for j in range(nc):
                v_row = v_g[j0 + j]
                for r in range(n_rows):
                    p = s[r, c0 + j]
                    arow = acc[r]
                    for d in range(dv):
                        arow[d] += p * v_row[d]

        for r in range(n_rows):
            part_m[b, g, sp, r] = m[r]
            part_l[b, g, sp, r] = l[r]
            for d in range(dv):
                part_acc[b, g, sp, r, d] = acc[r, d]


@njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True)
def decode_merge_kernel(part_m, part_l, part_acc, causal, lk, out, lse=None):
    """Merge split-KV partial states by log-sum-exp into ``out`` ``(B, Hq, Lq, Dv)``.

    Each split's ``(l, acc)`` is relative to its own max ``m_s``; relative to the common max
    ``M`` it is weighted by ``exp(m_s - M)`` (0 for a split that saw nothing). The optional
    ``lse`` ``(B, Hq, Lq)`` gets each row's log-sum-exp ``M + log(l)`` of its kept scores
    (``-inf`` for a row that sees no key), for the backward."""
    dt = out.dtype.type
    n_b, n_hkv, n_splits, n_rows = part_m.shape
    n_hq, lq, dv = out.shape[1], out.shape[2], out.shape[3]
    group = n_hq // n_hkv
    neg_inf = dt(-np.inf)
    for w in prange(n_b * n_hkv):
        b = w // n_hkv
        g = w % n_hkv
        o = np.empty(dv, out.dtype)
        for r in range(n_rows):
            h = g * group + r // lq
            i = r % lq
            if not row_sees_keys(i, lq, lk, causal):  # zeros (FlashAttention's rule)
                for d in range(dv):
                    out[b, h, i, d] = dt(0.0)
                if lse is not None:
                    lse[b, h, i] = neg_inf
                continue
            mx = neg_inf
            for sp in range(n_splits):
                mx = max(mx, part_m[b, g, sp, r])
            shift = dt(0.0) if mx == neg_inf else mx
            total = dt(0.0)
            for d in range(dv):
                o[d] = dt(0.0)
            for sp in range(n_splits):
                wgt = exp(part_m[b, g, sp, r] - shift)
                total += wgt * part_l[b, g, sp, r]
                for d in range(dv):
                    o[d] += wgt * part_acc[b, g, sp, r, d]
            inv = dt(1.0) / total
            for d in range(dv):
                out[b, h, i, d] = o[d] * inv
            if lse is not None:  # pruned at compile time when not given
                lse[b, h, i] = shift + np.log(total)
