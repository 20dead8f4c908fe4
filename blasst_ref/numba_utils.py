"""Numba helpers that the CPU attention kernels (:mod:`blasst_ref.cpu`) and the graph
executor's kernels (:mod:`blasst_ref.graph.kernels`) share.

* :data:`FASTMATH`: the LLVM fast-math flags every CPU kernel is compiled with.
* :func:`exp`: an ``exp`` for jitted code that LLVM can vectorise (below).
* :func:`blas_single_threaded`: a context manager that limits BLAS to one thread while
  Numba's threads run kernels that call BLAS on small blocks (thread-safe: blocks of
  different Python threads take turns).

Numba's cache checks a kernel's own file only: after editing this file, whose ``exp`` is
inlined into the kernels, delete ``blasst_ref/cpu/__pycache__`` and
``blasst_ref/graph/__pycache__``.

``math.exp`` on float32 compiles to a call of libm's ``expf``, which stops the loop
vectoriser: the softmax loop then costs more than the two tile products together. ``exp``
below is, for float32, the classic Cody-Waite range reduction plus a degree-6 polynomial
(relative error below 5e-7 for x in [-87, 88]; 0 below, inf above, NaN kept), built from operations that vectorise; for float64
it is ``math.exp`` (accuracy first: float64 is the checking dtype, not the fast one).
"""

from __future__ import annotations

import math
import threading

import numpy as np
from numba import njit
from numba.core import types
from numba.extending import overload

__all__ = ["FASTMATH", "blas_single_threaded", "exp", "exp_array_f32"]

#: LLVM fast-math flags for the kernels: reassociation (vectorised reductions) and
#: contraction (FMA), but NOT 'nnan'/'ninf': the running max starts at -inf and NaN inputs
#: must propagate as in dense attention.
FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693145751953125)  # ln 2 split in two so that n * LN2_HI is exact
_LN2_LO = np.float32(1.428606765330187e-06)
_EXP_LO = np.float32(-87.33654)  # below: exp underflows float32 (result 0)
_EXP_HI = np.float32(88.0)  # above: inf (the kernels only take exp of x <= 0)


def exp(x):  # pragma: no cover - replaced by the overload inside jitted code
    """exp(x) inside jitted kernels (float32: vectorisable polynomial; float64: math.exp)."""
    return math.exp(x)


@overload(exp, fastmath=FASTMATH)
def _exp_overload(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:

        def exp_f32(x):
            xc = min(max(x, _EXP_LO), _EXP_HI)  # keep the exponent bit trick in range
            n = np.floor(xc * _LOG2E + np.float32(0.5))
            r = xc - n * _LN2_HI - n * _LN2_LO  # |r| <= ln2/2
            p = np.float32(1.0 / 720.0)
            p = p * r + np.float32(1.0 / 120.0)
            p = p * r + np.float32(1.0 / 24.0)
            p = p * r + np.float32(1.0 / 6.0)
            p = p * r + np.float32(0.5)
            p = p * r + np.float32(1.0)
            p = p * r + np.float32(1.0)
            two_n = np.int32((np.int32(n) + np.int32(127)) << np.int32(23)).view(np.float32)
            y = p * two_n
            y = np.float32(0.0) if x < _EXP_LO else y
            y = np.float32(np.inf) if x > _EXP_HI else y
            return x if x != x else y  # NaN in, NaN out

        return exp_f32
    if isinstance(x, types.Float):
        return lambda x: math.exp(x)
    return None


@njit(fastmath=FASTMATH, cache=True)
def exp_array_f32(x, out):
    """Vectorised float32 exp over a 1-D array (used by tests to check ``exp``)."""
    for i in range(x.shape[0]):
        out[i] = exp(x[i])


_controller = None
_controller_lock = threading.Lock()
#: held by the thread whose kernels run under the limit (re-entrant: a compiled graph's
#: call holds it and its attention step takes it again)
_blas_lock = threading.RLock()
_blas_depth = 0  # how deeply the holder of _blas_lock has entered blas_single_threaded


def _blas_controller():
    global _controller
    with _controller_lock:
        if _controller is None:
            # Numba's np.dot calls scipy's BLAS: load it before threadpoolctl takes its
            # inventory of loaded libraries, or the limit would miss it.
            import scipy.linalg.cython_blas  # noqa: F401
            from threadpoolctl import ThreadpoolController

            _controller = ThreadpoolController()
    return _controller


class _BlasSingleThreaded:
    """The context manager :func:`blas_single_threaded` returns (a class, not a generator:
    it is entered on every CPU kernel call, and this costs half as much)."""

    __slots__ = ("_limiter",)

    def __enter__(self):
        global _blas_depth
        _blas_lock.acquire()
        try:
            self._limiter = None
            if _blas_depth == 0:  # nested in this thread: BLAS is already limited
                self._limiter = _blas_controller().limit(limits=1, user_api="blas")
                self._limiter.__enter__()
            _blas_depth += 1
        except BaseException:
            _blas_lock.release()
            raise
        return self

    def __exit__(self, *exc):
        global _blas_depth
        try:
            _blas_depth -= 1
            if self._limiter is not None:
                self._limiter.__exit__(*exc)
        finally:
            _blas_lock.release()
        return False


def blas_single_threaded():
    """Context manager limiting BLAS libraries to one thread (threadpoolctl) while the
    block runs.

    Kernels that run in Numba's threads and call BLAS (``np.dot``) on small tiles want a
    single-threaded BLAS underneath: a multi-threaded one would oversubscribe the cores, and
    its idle pool threads would spin against Numba's.

    The limit is process-wide (BLAS has one thread pool), so the blocks of different
    Python threads take turns: one thread at a time sets the limit, runs, and restores
    what it found, from that same thread (threadpoolctl lets only the thread that set a
    limit change it again). Limiting and restoring from overlapping threads instead left
    BLAS at one thread for the whole process, or let a call run under another's restored
    limit. The kernels inside already use every core, so taking turns costs little.
    Re-entrant: a block inside a block of the same thread changes nothing."""
    return _BlasSingleThreaded()
