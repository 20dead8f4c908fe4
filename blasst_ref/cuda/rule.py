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
           "max_nan",
           "row_sees_keys", "row_votes_skip", "visited_k_tiles"]

_device = cuda.jit(device=True, inline=True)

#: :func:`blasst_ref.rule.row_votes_skip` on the device
row_votes_skip = _device(_rule.row_votes_skip)
#: :func:`blasst_ref.rule.max_nan` on the device (CUDA's ``fmaxf`` would drop a NaN)
max_nan = _device(_rule.max_nan)
#: :func:`blasst_ref.rule.key_visible` on the device
key_visible = _device(_rule.key_visible)
#: :func:`blasst_ref.rule.last_visible_key` on the device
last_visible_key = _device(_rule.last_visible_key)
#: :func:`blasst_ref.rule.row_sees_keys` on the device
row_sees_keys = _device(_rule.row_sees_keys)
#: :func:`blasst_ref.rule.visited_k_tiles` on the device
visited_k_tiles = _device(_rule.visited_k_tiles)

#: the names a generated kernel source may use for the rule (tile codes included)
NAMESPACE = {
    "row_votes_skip": row_votes_skip, "max_nan": max_nan, "key_visible": key_visible,
    "last_visible_key": last_visible_key,
    "row_sees_keys": row_sees_keys, "visited_k_tiles": visited_k_tiles, "COMPUTED": COMPUTED,
    "SKIPPED": SKIPPED,
    "NOT_VISITED": NOT_VISITED,
}
