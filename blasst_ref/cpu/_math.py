"""The CPU kernels' math helpers now live in :mod:`blasst_ref.numba_utils` (shared with the
graph executor); this name stays only for ``_online.py``'s import until that file moves to
the public module too."""

from ..numba_utils import FASTMATH, exp  # noqa: F401
