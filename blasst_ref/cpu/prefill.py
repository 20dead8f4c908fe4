"""BLASST prefill on the CPU: one Numba ``prange`` over (batch, query head, query tile).

The algorithm is ``reference._prefill`` line for line; what differs is how each step is made
fast on a CPU core:

* the two tile products, ``S = Q K^T`` (``block_q x Dqk`` by ``Dqk x block_k``) and
  ``O += P V`` (``block_q x block_k`` by ``block_k x Dv``), are BLAS calls through ``np.dot``
  on contiguous tiles (``K^T`` is a transposed view: BLAS reads it without a copy). At the
  default 128 x 64 tiles Q, one K tile, one V tile and S fit in a core's L2;
* the softmax loop is vectorised (``_math.exp`` is a polynomial LLVM can vectorise);
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

from ._math import FASTMATH, exp

COMPUTED = np.int8(1)
SKIPPED = np.int8(2)


@njit(inline="always")
def _has_nan(x):
    for v in x.ravel():
        if v != v:
            return True
    return False


@njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True)
def prefill_kernel(q, k, v, log_thresh, causal, scale, block_q, block_k, skip_test, out, tile_map):
    """BLASST prefill, in place.

    Args:
        q: ``(B, Hq, Lq, Dqk)``, k: ``(B, Hkv, Lk, Dqk)``, v: ``(B, Hkv, Lk, Dv)``, all
            C-contiguous float32 (or all float64).
        log_thresh: ``log(thresh)``, ``-inf`` for ``thresh = 0``.
        causal: bottom-right aligned mask. scale: score scale.
        block_q, block_k: tile sizes.
        skip_test: ``True``, or ``None`` to compile the skip test out (Numba prunes
            ``if skip_test is not None`` for a None-typed argument).
        out: ``(B, Hq, Lq, Dv)`` written completely.
        tile_map: int8 ``(B, Hq, n_q_tiles, n_k_tiles)``, zero on entry; visited tiles get
            1 (computed) or 2 (skipped).
    """
    dt = q.dtype.type
    n_b, n_hq, lq, dqk = q.shape
    n_hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    group = n_hq // n_hkv
    offset = lk - lq  # bottom-right causal alignment: row i sees keys j <= i + offset
    n_qt = (lq + block_q - 1) // block_q
    n_kt = (lk + block_k - 1) // block_k
    neg_inf = dt(-np.inf)

    for w in prange(n_b * n_hq * n_qt):
        b = w // (n_hq * n_qt)
        h = (w // n_qt) % n_hq
        # Zig-zag over query tiles (0, n-1, 1, n-2, ...): under causal masking tile qt costs
        # ~qt + 1, and prange hands each thread one contiguous range of w: interleaving
        # light and heavy tiles balances the threads even for a single head.
        z = w % n_qt
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
        pv = np.empty((nr, dv), q.dtype)

        k_tiles = n_kt
        if causal:  # tiles past the last row's horizon are never visited
            last_visible = i1 - 1 + offset
            k_tiles = 0 if last_visible < 0 else min(n_kt, last_visible // block_k + 1)

        for kt in range(k_tiles):
            j0 = kt * block_k
            j1 = min(lk, j0 + block_k)
            nc = j1 - j0
            s = s_buf[: nr * nc].reshape((nr, nc))
            np.dot(q_tile, k[b, kvh, j0:j1].T, s)

            # Only tiles that cross the diagonal need a per-row key limit.
            partial = causal and (j1 - 1 > i0 + offset)
            for r in range(nr):
                lim = nc
                if partial:
                    lim = min(nc, max(0, i0 + r + offset - j0 + 1))
                mx = neg_inf
                row = s[r]
                for j in range(lim):
                    mx = max(mx, row[j])
                tile_max[r] = mx

            if skip_test is not None:  # pruned at compile time when None
                skip = True
                for r in range(nr):
                    if not (tile_max[r] - m[r] < log_thresh):
                        skip = False
                        break
                # The row max above ignores NaN (a NaN-aware max does not vectorise); a NaN
                # score must keep its tile, so check for one on this (cheap) path only.
                if skip and not _has_nan(s):
                    tile_map[b, h, qt, kt] = SKIPPED
                    continue
            tile_map[b, h, qt, kt] = COMPUTED

            for r in range(nr):
                lim = nc
                if partial:
                    lim = min(nc, max(0, i0 + r + offset - j0 + 1))
                m_new = max(m[r], tile_max[r])
                # a row that has seen nothing yet shifts by 0, keeping l = 0 and acc = 0
                shift = dt(0.0) if m_new == neg_inf else m_new
                alpha = exp(m[r] - shift)
                row_sum = dt(0.0)
                row = s[r]
                for j in range(lim):
                    p = exp(row[j] - shift)
                    row[j] = p
                    row_sum += p
                for j in range(lim, nc):
                    row[j] = dt(0.0)
                l[r] = l[r] * alpha + row_sum
                m[r] = m_new
                if alpha != dt(1.0):
                    for d in range(dv):
                        acc[r, d] *= alpha
            np.dot(s, v[b, kvh, j0:j1], pv)
            for r in range(nr):
                for d in range(dv):
                    acc[r, d] += pv[r, d]

        for r in range(nr):
            if causal and i0 + r + offset < 0:  # the row sees no key: zeros
                for d in range(dv):
                    out[b, h, i0 + r, d] = dt(0.0)
            else:
                inv = dt(1.0) / l[r]  # l = 0 with visible keys (all -inf scores): NaN, as dense
                for d in range(dv):
                    out[b, h, i0 + r, d] = acc[r, d] * inv
