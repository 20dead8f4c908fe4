"""The skip rule of :mod:`blasst_ref.rule`, compiled as CUDA device functions.

The same Python source that the numpy reference calls and the CPU kernels compile with
``numba.njit``: here ``numba.cuda.jit(device=True, inline=True)`` makes each function a device
function that Numba inlines into the kernel that calls it. The kernel modules import the
compiled functions from here, and :data:`NAMESPACE` puts them into the globals of the
generated kernel sources (prefill v2, decode v2), so that no kernel, written or generated,
restates the rule.
"""

from __future__ import annotations

from numba import cuda

from .. import rule as _rule
from ..rule import COMPUTED, NOT_VISITED, SKIPPED

__all__ = ["COMPUTED", "NAMESPACE", "NOT_VISITED", "SKIPPED", "key_visible", "last_visible_key",
           "max_nan", "row_sees_keys", "row_votes_skip", "visited_k_tiles"]

#: :data:`blasst_ref.rule.KERNEL_FUNCTIONS` as device functions (``max_nan`` keeps the NaN
#: that CUDA's ``fmaxf`` would drop)
(row_votes_skip, max_nan, key_visible, last_visible_key, row_sees_keys,
 visited_k_tiles) = (cuda.jit(device=True, inline=True)(f) for f in _rule.KERNEL_FUNCTIONS)

#: the names a generated kernel source may use for the rule (tile codes included)
NAMESPACE = {f.py_func.__name__: f for f in (row_votes_skip, max_nan, key_visible,
                                            last_visible_key, row_sees_keys, visited_k_tiles)}
NAMESPACE.update(COMPUTED=COMPUTED, SKIPPED=SKIPPED, NOT_VISITED=NOT_VISITED)
