"""The two per-tile steps both CPU kernels share: the skip vote and the online-softmax fold."""

from __future__ import annotations

import numpy as np
from numba import njit

from ._math import FASTMATH, exp


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
    m_new = tile_max if (tile_max > m_old or tile_max != tile_max) else m_old
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
def rows_agree_to_skip(tile_max, m, n_rows, log_thresh):
    """The BLASST skip rule (docs/DESIGN.md §3.3): every row ``r < n_rows`` agrees that
    ``exp(tile_max[r] - m[r]) < thresh``, written ``tile_max[r] - m[r] < log(thresh)``.

    NaN compares false (a NaN max never lets a tile be skipped), ``log(0) = -inf`` never
    skips, and a row that has seen nothing yet (``m = -inf``) never agrees."""
    for r in range(n_rows):
        if not (tile_max[r] - m[r] < log_thresh):
            return False
    return True
