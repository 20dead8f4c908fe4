"""The two per-tile steps both CPU kernels share: the skip vote and the online-softmax fold.

The skip rule itself is :mod:`blasst_ref.rule`'s (docs/DESIGN.md §3.3), compiled here from
the same source as the reference and the CUDA kernels use (``njit(inline="always")``: no call
in the kernels)."""

from __future__ import annotations

import numpy as np
from numba import njit

from .. import rule
from ..numba_utils import FASTMATH, exp

#: :data:`blasst_ref.rule.KERNEL_FUNCTIONS`, compiled for the CPU kernels (inlined: no call)
(row_votes_skip, max_nan, key_visible, last_visible_key, row_sees_keys,
 visited_k_tiles) = (njit(inline="always")(f) for f in rule.KERNEL_FUNCTIONS)


@njit(inline="always", fastmath=FASTMATH)
def fold_row(row, lim, tile_max, r, m, l, acc):
    """Fold one row of a kept tile into the running state of row ``r``.

    Args:
        row: the row's scores in this tile, ``(n_keys,)``; overwritten with the
            probabilities ``p = exp(s - m_new)`` (0 for the masked keys ``row[lim:]``), ready
            for ``P @ V``.
        lim: keys ``row[:lim]`` are visible to this row (causal mask), the rest are masked.
        tile_max: the max of ``row[:lim]`` (computed before the skip test).
        r: the row's index into ``m``, ``l`` (``(rows,)``) and ``acc`` (``(rows, Dv)``).

    ``m`` is the running max, ``l`` the running sum relative to it, ``acc`` the unnormalised
    output; the old ``l`` and ``acc`` are rescaled by ``alpha = exp(m_old - m_new)``, which
    after the first tiles is almost always 1 (the rescale of ``acc`` is then skipped).
    """
    dt = row.dtype.type
    m_old = m[r]
    # NaN-keeping max: as in the reference, a row whose visible scores held a NaN keeps a
    # NaN running max, so no later tile of it can be skipped (its output is NaN anyway).
    m_new = max_nan(tile_max, m_old)
    # a row that has seen nothing yet shifts by 0, keeping l = 0 and acc = 0
    shift = dt(0.0) if m_new == dt(-np.inf) else m_new
    alpha = exp(m_old - shift)
    row_sum = dt(0.0)
    n_nan = 0  # the caller's tile max may skip NaN (it must vectorise): count them here
    for j in range(lim):
        x = row[j]
        n_nan += x != x
        p = exp(x - shift)
        row[j] = p
        row_sum += p
    for j in range(lim, row.shape[0]):
        row[j] = dt(0.0)
    l[r] = l[r] * alpha + row_sum
    m[r] = m_new if n_nan == 0 else dt(np.nan)
    if alpha != dt(1.0):
        acc_row = acc[r]
        for d in range(acc_row.shape[0]):
            acc_row[d] *= alpha


@njit(inline="always")
def rows_agree_to_skip(tile_max, m_ref, n_rows, log_thresh):
    """Whether a tile is skipped: every row ``r < n_rows`` votes for it
    (:func:`blasst_ref.rule.row_votes_skip` of ``tile_max[r]`` against ``m_ref[r]``, the
    row's running max; its docstring gives the NaN / ``-inf`` / ``thresh = 0`` cases)."""
    for r in range(n_rows):
        if not row_votes_skip(tile_max[r], m_ref[r], log_thresh):
            return False
    return True


@njit(inline="always")
def rows_agree_to_skip_seeded(tile_max, m, s0, n_rows, log_thresh):
    """:func:`rows_agree_to_skip` of split-KV decode: each row ``r`` measures the tile against
    ``max_nan(m[r], s0[r])``, its running max raised to the sink maximum ``s0[r]`` of
    docs/DESIGN.md §3.5's seeded test (``s0 = -inf``, the unseeded test, leaves ``m``)."""
    for r in range(n_rows):
        if not row_votes_skip(tile_max[r], max_nan(m[r], s0[r]), log_thresh):
            return False
    return True
