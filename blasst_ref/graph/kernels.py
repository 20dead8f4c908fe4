"""Numba parallel CPU kernels for the fused ops of the graph executor (docs/DESIGN.md §7).

These are plain functions on numpy arrays; they know nothing about the IR. The passes
decide *what* to fuse, these kernels decide *how* a fused op runs fast on a CPU:

* :func:`pack_weight` + :func:`matmul_packed`: ``out = act(a @ W + bias) + residual`` with a
  constant weight ``W`` packed once (compile time) into column panels. The product is cut
  into ``(row block, panel)`` tasks run by a Numba ``prange``; each task multiplies its
  ``(rows, K) x (K, panel)`` block with BLAS (``np.dot``) into a thread-local buffer and
  applies the post-ops while that block is still in L1/L2, then stores it. numpy's
  ``a @ w + bias`` followed by ``np.maximum(., 0)`` instead streams the whole ``(M, N)``
  product through memory three times (and allocates twice).
* :func:`matmul_epilogue`: the same post-ops on an already computed product (when neither
  operand is constant), one parallel pass.
* :func:`layernorm`, :func:`softmax_lastaxis`, :func:`gelu`: row-wise / element-wise ops.

Activation codes (``act``) are small ints so that one compiled kernel serves them all: the
switch sits outside the inner loops (one branch per row segment, the loops vectorise).

All kernels keep IEEE NaN/inf semantics (``numba_utils.FASTMATH`` has no 'nnan'/'ninf'), accept
float32 and float64 (one dtype per call) and compute in the input dtype except where noted
(layernorm's statistics and softmax's row sum accumulate in float64).

Numba's cache checks a kernel's own file only: after editing ``blasst_ref/numba_utils.py``
(whose ``exp`` is inlined here), delete ``blasst_ref/graph/__pycache__``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange
from numba.core import types
from numba.extending import overload

from ..numba_utils import FASTMATH, blas_single_threaded, exp

__all__ = [
    "ACT_NONE", "ACT_RELU", "ACT_GELU", "ACT_GELU_TANH", "ACT_TANH", "ACT_EXP", "ACT_NAMES",
    "PANEL", "ROW_BLOCK", "PackedWeight", "pack_weight", "matmul_packed", "matmul_epilogue",
    "layernorm", "softmax_lastaxis", "gelu", "activate", "check_act", "check_out",
]

ACT_NONE, ACT_RELU, ACT_GELU, ACT_GELU_TANH, ACT_TANH, ACT_EXP = 0, 1, 2, 3, 4, 5
#: Activation names by code (for reports and error messages).
ACT_NAMES = ("none", "relu", "gelu", "gelu_tanh", "tanh", "exp")

#: Default panel width (columns of W per task). Measured on a 2-core AVX-512 EPYC against
#: 256 and 512 (DLRM and BERT MLP shapes): no width wins everywhere; 128 was best or close
#: on most shapes, and gives two tasks (both threads busy) for N = 256 at small M. Each
#: task is one OpenBLAS call, which re-packs its operands: splitting one product into
#: blocks costs ~7-20% against one big call (measured single-threaded), which wider panels
#: and taller row blocks reduce but fewer tasks then balance worse.
PANEL = 128
#: Default rows per task. Multiples of 16 match OpenBLAS's sgemm micro-kernel (16 x 4 on
#: AVX-512). It is halved for small problems until there are enough tasks for the threads.
ROW_BLOCK = 128
#: Below this many multiply-adds (M * N * K) a call runs the serial kernel: starting the
#: threads and switching BLAS to one thread (threadpoolctl, ~13 us) would cost more than
#: the product itself (measured: about break-even at 2M multiply-adds on 2 cores). The
#: serial kernel lets BLAS use its own threads.
SERIAL_MACS = 1 << 21

_INV_SQRT2 = 0.7071067811865476
_SQRT_2_OVER_PI = 0.7978845608028654
_GELU_TANH_C = 0.044715


# ---------------------------------------------------------------------------------------
# Scalar/row helpers (inlined into the kernels)
# ---------------------------------------------------------------------------------------


# erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z / 2), z >= 0: Numerical Recipes' Chebyshev
# fit ("erfcc"), fractional error < 1.2e-7 for every z (P's coefficients, constant first).
_ERFC_P = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807,
           -1.13520398, 1.48851587, -0.82215223, 0.17087277)


def gelu_exact(x):  # pragma: no cover - replaced by the overload inside jitted code
    """Exact-form GELU ``0.5 x erfc(-x / sqrt 2)`` of one value inside jitted kernels."""
    return 0.5 * x * math.erfc(-x * _INV_SQRT2)


@overload(gelu_exact, fastmath=FASTMATH)
def _gelu_exact_overload(x):
    """float32: a branch-free form the loop vectoriser takes (libm's ``erfc`` is a scalar
    call that stops it, and GELU over a BERT FFN's output then costs as much as the
    product): ``erfc(|x| / sqrt 2)`` from ``_ERFC_P`` with the vectorisable ``exp``, as
    ``t exp(P(t) - x*x/2)``, so the negative tail keeps its relative accuracy: against
    float64 ``erfc``, max relative error 1e-6 for |x| < 3, 3e-6 for |x| < 6 and 1e-5
    down to float32's smallest normals (x ~ -13; the rounding of ``x*x`` grows with it).
    float64: ``math.erfc`` (accuracy first)."""
    if isinstance(x, types.Float) and x.bitwidth == 32:
        def gelu_f32(x):
            f = np.float32
            a = abs(x)
            z = a * f(_INV_SQRT2)
            t = f(1.0) / (f(1.0) + f(0.5) * z)
            p = f(_ERFC_P[9])
            p = p * t + f(_ERFC_P[8])
            p = p * t + f(_ERFC_P[7])
            p = p * t + f(_ERFC_P[6])
            p = p * t + f(_ERFC_P[5])
            p = p * t + f(_ERFC_P[4])
            p = p * t + f(_ERFC_P[3])
            p = p * t + f(_ERFC_P[2])
            p = p * t + f(_ERFC_P[1])
            p = p * t + f(_ERFC_P[0])
            e = t * exp(p - f(0.5) * (x * x))  # x * x / 2: one rounding less than z * z
            y = x * (f(1.0) - f(0.5) * e) if x >= f(0.0) else f(0.5) * x * e
            return x if x != x else y  # NaN in, NaN out
        return gelu_f32
    if isinstance(x, types.Float):
        return lambda x: 0.5 * x * math.erfc(-x * _INV_SQRT2)
    return None


@njit(inline="always", fastmath=FASTMATH)
def activate(c, n, act):
    """Apply activation ``act`` to ``c[:n]`` in place (``c`` 1-D, contiguous).

    One branch on ``act``, then a plain loop per activation, so that each loop vectorises
    (relu, gelu and gelu_tanh in float32, and exp do; tanh is a scalar libm call)."""
    dt = c.dtype.type
    if act == 1:  # relu; NaN stays NaN (as np.maximum(x, 0))
        for j in range(n):
            x = c[j]
            c[j] = dt(0.0) if x < dt(0.0) else x
    elif act == 2:  # gelu, exact: 0.5 x (1 + erf(x / sqrt 2)) = 0.5 x erfc(-x / sqrt 2)
        # erfc keeps relative accuracy in the negative tail, where 1 + erf(.) cancels
        for j in range(n):
            c[j] = gelu_exact(c[j])
    elif act == 3:  # gelu, tanh form: 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u))
        # the sigmoid form needs one (vectorisable) exp, and has no cancellation for u << 0
        for j in range(n):
            x = c[j]
            u = dt(_SQRT_2_OVER_PI) * (x + dt(_GELU_TANH_C) * x * x * x)
            c[j] = x / (dt(1.0) + exp(dt(-2.0) * u))
    elif act == 4:
        for j in range(n):
            c[j] = math.tanh(c[j])
    elif act == 5:
        for j in range(n):
            c[j] = exp(c[j])


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _finish_segment(c, nc, bias, n0, act, residual, i, out):
    """Post-ops of one row segment: ``out[i, n0:n0+nc] = act(c[:nc] + bias[n0:]) + residual[i, n0:]``.

    ``c`` is a thread-local buffer (clobbered), so ``out`` may alias ``residual`` or the
    array ``c`` was read from: every input element is read before its output is written.
    ``bias``/``residual`` may be None: Numba compiles a specialisation where the branch is
    pruned (no per-element test)."""
    # contiguous 1-D slices indexed from 0: the loops then vectorise (an index n0 + j of
    # unknown sign would carry a negative-index wraparound test per element)
    o = out[i, n0:n0 + nc]
    if bias is not None:
        b = bias[n0:n0 + nc]
        for j in range(nc):
            c[j] += b[j]
    activate(c, nc, act)
    if residual is not None:
        res = residual[i, n0:n0 + nc]
        for j in range(nc):
            o[j] = c[j] + res[j]
    else:
        for j in range(nc):
            o[j] = c[j]


# ---------------------------------------------------------------------------------------
# Packed matmul with fused post-ops
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedWeight:
    """A constant ``(K, N)`` weight cut into column panels (built by :func:`pack_weight`).

    Attributes:
        panels: ``(ceil(n / panel), k, panel)`` C-contiguous; panel ``p`` holds columns
            ``p*panel : (p+1)*panel`` of ``W``, the last one zero-padded.
        k, n: the weight's shape.
        panel: the panel width actually used, at most the one requested: the fewest panels
            of that width, made about equally wide (``n = 300`` with ``panel = 256`` gives two
            panels of 160, not 256 + a mostly-zero 256; ``n = 1`` gives one panel of 1).
    """

    panels: np.ndarray
    k: int
    n: int
    panel: int

    @property
    def dtype(self):
        return self.panels.dtype

    @property
    def n_panels(self) -> int:
        return self.panels.shape[0]

    @property
    def nbytes(self) -> int:
        return self.panels.nbytes


def pack_weight(w, panel=PANEL) -> PackedWeight:
    """Pack a constant weight ``w`` ``(K, N)`` into column panels, once, at compile time.

    Why panels: each task of :func:`matmul_packed` multiplies by one ``(K, panel)`` block,
    which BLAS wants contiguous (``np.dot`` in Numba takes contiguous operands only); a
    column slice of ``w`` is strided, so we copy every panel out once here instead of on
    every call.

    Returns a :class:`PackedWeight` with ``panels`` of shape ``(ceil(N/p), K, p)``, ``p <=
    panel`` the balanced width (see :class:`PackedWeight`), zero-padded in the last panel.
    """
    w = _check_array("w", w, ndim=2)
    if w.shape[0] < 1 or w.shape[1] < 1:
        raise ValueError(f"w must have K >= 1 and N >= 1, got shape {w.shape}")
    if isinstance(panel, bool) or not isinstance(panel, (int, np.integer)) or panel < 1:
        raise ValueError(f"panel must be a positive int, got {panel!r}")
    k, n = w.shape
    # balanced widths: as few panels as ``panel`` allows, all about equally wide (rounded
    # up to a multiple of 16, the sgemm micro-kernel's width, where that wastes < 1/8 and
    # stays <= panel), so the last one is not mostly zero padding
    n_panels = -(-n // int(panel))
    p = -(-n // n_panels)
    p16 = -(-p // 16) * 16
    p = int(p16 if (p >= 128 and p16 <= panel) else p)
    n_panels = -(-n // p)
    padded = np.zeros((k, n_panels * p), w.dtype)
    padded[:, :n] = w
    # (K, n_panels, p) -> (n_panels, K, p): panel-major, each panel a plain row-major block
    panels = np.ascontiguousarray(padded.reshape(k, n_panels, p).transpose(1, 0, 2))
    return PackedWeight(panels=panels, k=int(k), n=int(n), panel=p)


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _matmul_task(a, panels, n, bias, act, residual, out, row_block, t):
    """Task ``t`` of :func:`_matmul_packed_par`: one ``(row block, panel)`` block of ``out``.

    Panels vary fastest in ``t``: a thread (which gets a contiguous range of ``t``) reuses
    its ``a`` row block, hot in L2, across consecutive panels."""
    n_panels, _, p = panels.shape
    m = a.shape[0]
    rb = t // n_panels
    pi = t % n_panels
    i0 = rb * row_block
    nr = min(m, i0 + row_block) - i0
    n0 = pi * p
    nc = min(n, n0 + p) - n0  # valid columns (the last panel is padded)
    c = np.empty((nr, p), a.dtype)  # thread-local product block
    # a[i0:i0+nr] of a C array is C-contiguous: BLAS gets it without a copy
    np.dot(a[i0:i0 + nr], panels[pi], c)
    for r in range(nr):
        _finish_segment(c[r], nc, bias, n0, act, residual, i0 + r, out)


@njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True)
def _matmul_packed_par(a, panels, n, bias, act, residual, out, row_block):
    """``out = act(a @ W + bias) + residual``, tasks in parallel (BLAS must be 1-thread).

    Args:
        a: ``(M, K)`` C-contiguous. panels: ``(n_panels, K, p)`` from :func:`pack_weight`.
        n: columns of W. bias: ``(N,)`` or None. act: activation code.
        residual: ``(M, N)`` or None (may alias ``out``). out: ``(M, N)``, written fully.
        row_block: rows per task.
    """
    n_rb = (a.shape[0] + row_block - 1) // row_block
    for t in prange(n_rb * panels.shape[0]):
        _matmul_task(a, panels, n, bias, act, residual, out, row_block, t)


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _matmul_packed_serial(a, panels, n, bias, act, residual, out, row_block):
    """:func:`_matmul_packed_par` on the calling thread (for problems too small to share)."""
    n_rb = (a.shape[0] + row_block - 1) // row_block
    for t in range(n_rb * panels.shape[0]):
        _matmul_task(a, panels, n, bias, act, residual, out, row_block, t)


def _row_block(m, n_panels, row_block, n_threads):
    """Rows per task: ``row_block`` (default :data:`ROW_BLOCK`), halved (down to 16) while
    there are fewer than two tasks per thread, so that small-M calls still use every thread
    and the last, partial round of tasks costs little."""
    mb = ROW_BLOCK if row_block is None else int(row_block)
    if row_block is None:
        while mb > 16 and (-(-m // mb)) * n_panels < 2 * n_threads:
            mb //= 2
    return max(1, min(mb, m))


def matmul_packed(a, pw, bias=None, act=ACT_NONE, residual=None, out=None, *, row_block=None):
    """``out = act(a @ W + bias) + residual`` with ``W`` packed by :func:`pack_weight`.

    Args:
        a: ``(M, K)`` float32/float64 (the dtype of ``pw``).
        pw: a :class:`PackedWeight` of ``W`` ``(K, N)``.
        bias: ``(N,)`` or None. act: an ``ACT_*`` code.
        residual: ``(M, N)`` or None; added after the activation. May be ``out`` itself.
        out: ``(M, N)`` C-contiguous, or None to allocate. Must not overlap ``a``.
        row_block: rows per task (default: chosen from the shape; a tuning knob).

    Order of the post-ops: bias, activation, then the residual add (a transformer block's
    ``x + act(x W + b)``).
    """
    if not isinstance(pw, PackedWeight):
        raise ValueError(f"pw must be a PackedWeight (from pack_weight), got {type(pw).__name__}")
    a = _check_array("a", a, ndim=2, dtype=pw.dtype)
    m, k = a.shape
    if k != pw.k:
        raise ValueError(f"a must be (M, {pw.k}) to match the packed weight (K={pw.k}), got {a.shape}")
    n = pw.n
    bias = _check_optional("bias", bias, (n,), a.dtype)
    residual = _check_optional("residual", residual, (m, n), a.dtype)
    out = check_out(out, (m, n), a.dtype)
    if np.may_share_memory(out, a):
        raise ValueError("out must not overlap a (a is read while out is written)")
    act = check_act(act)
    if row_block is not None and (isinstance(row_block, bool) or int(row_block) < 1):
        raise ValueError(f"row_block must be a positive int, got {row_block!r}")
    if m == 0:
        return out
    n_threads = numba.get_num_threads()
    mb = _row_block(m, pw.n_panels, row_block, n_threads)
    if m * n * k < SERIAL_MACS or n_threads == 1:
        _matmul_packed_serial(a, pw.panels, n, bias, act, residual, out, mb)
    else:
        # each thread calls BLAS on its own block: a multi-threaded BLAS underneath would
        # oversubscribe the cores
        with blas_single_threaded():
            _matmul_packed_par(a, pw.panels, n, bias, act, residual, out, mb)
    return out


# ---------------------------------------------------------------------------------------
# Post-ops on a computed product
# ---------------------------------------------------------------------------------------

#: Columns per task of :func:`matmul_epilogue` (a segment and its buffer stay in L1).
_SEG = 2048


@njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True)
def _epilogue_kernel(y, bias, act, residual, out, seg):
    """``out = act(y + bias) + residual`` over ``(M, N)``; tasks are (row, column segment)
    so that a single long row is still split across threads."""
    m, n = y.shape
    n_seg = (n + seg - 1) // seg
    for t in prange(m * n_seg):
        i = t // n_seg
        n0 = (t % n_seg) * seg
        nc = min(n, n0 + seg) - n0
        c = np.empty(nc, y.dtype)  # copy first: out may alias y or residual
        y_row = y[i]
        for j in range(nc):
            c[j] = y_row[n0 + j]
        _finish_segment(c, nc, bias, n0, act, residual, i, out)


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _epilogue_serial(y, bias, act, residual, out, seg):
    """:func:`_epilogue_kernel` on one thread (see :func:`matmul_epilogue`'s ``parallel``)."""
    m, n = y.shape
    n_seg = (n + seg - 1) // seg
    for t in range(m * n_seg):
        i = t // n_seg
        n0 = (t % n_seg) * seg
        nc = min(n, n0 + seg) - n0
        c = np.empty(nc, y.dtype)
        y_row = y[i]
        for j in range(nc):
            c[j] = y_row[n0 + j]
        _finish_segment(c, nc, bias, n0, act, residual, i, out)


def matmul_epilogue(y, bias=None, act=ACT_NONE, residual=None, out=None, *, parallel=True):
    """``out = act(y + bias) + residual`` on an already computed product ``y`` ``(M, N)``.

    Args:
        y: ``(M, N)`` float32/float64. bias: ``(N,)`` or None. act: an ``ACT_*`` code.
        residual: ``(M, N)`` or None. out: ``(M, N)`` or None; may alias ``y`` or
            ``residual``.
        parallel: False runs one thread. Right after a multi-threaded BLAS call that is
            faster on few cores: BLAS's threads are still spinning when Numba's OpenMP
            threads start, and the two pools then trade the cores back and forth (measured
            on 2 cores: a parallel epilogue after ``np.matmul`` cost ~8 ms, the serial one
            0.02-0.5 ms).
    """
    y = _check_array("y", y, ndim=2)
    m, n = y.shape
    bias = _check_optional("bias", bias, (n,), y.dtype)
    residual = _check_optional("residual", residual, (m, n), y.dtype)
    out = check_out(out, (m, n), y.dtype)
    act = check_act(act)
    if y.size:
        (_epilogue_kernel if parallel else _epilogue_serial)(y, bias, act, residual, out, _SEG)
    return out


# ---------------------------------------------------------------------------------------
# LayerNorm, softmax, GELU
# ---------------------------------------------------------------------------------------


@njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True)
def _layernorm_kernel(x, gamma, beta, eps, out):
    """Row-wise LayerNorm of ``x`` ``(M, N)`` into ``out`` (may alias ``x``).

    Two passes over the row (it stays in cache), both accumulated in float64: the mean,
    then the biased variance of ``x - mean`` (no ``E[x^2] - E[x]^2`` cancellation)."""
    m, n = x.shape
    dt = x.dtype.type
    for i in prange(m):
        row = x[i]
        s = 0.0
        for j in range(n):
            s += np.float64(row[j])
        mean = s / n
        v = 0.0
        for j in range(n):
            d = np.float64(row[j]) - mean
            v += d * d
        rstd = 1.0 / math.sqrt(v / n + eps)
        o = out[i]
        for j in range(n):
            o[j] = dt((np.float64(row[j]) - mean) * rstd) * gamma[j] + beta[j]


def layernorm(x, gamma, beta, eps=1e-5, out=None):
    """LayerNorm over the last axis (ONNX ``LayerNormalization``, axis=-1).

    ``out = (x - mean) / sqrt(var + eps) * gamma + beta``, ``var`` the biased variance.

    Args:
        x: ``(M, N)``. gamma, beta: ``(N,)``. eps: >= 0.
        out: ``(M, N)`` or None; may alias ``x``.
    """
    x = _check_array("x", x, ndim=2)
    m, n = x.shape
    gamma = _check_array("gamma", gamma, ndim=1, dtype=x.dtype, shape=(n,))
    beta = _check_array("beta", beta, ndim=1, dtype=x.dtype, shape=(n,))
    eps = float(eps)
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    out = check_out(out, (m, n), x.dtype)
    if x.size:
        _layernorm_kernel(x, gamma, beta, eps, out)
    return out


@njit(inline="always", fastmath=FASTMATH)
def _row_max(row, n):
    """``max(row[:n])``, NaN ignored (the caller's sum catches NaN). Eight independent
    chains: a float max reduction does not vectorise without 'nnan', and one chain of
    dependent maxes would be latency-bound."""
    ninf = row.dtype.type(-np.inf)
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = ninf
    j = 0
    while j + 8 <= n:
        m0 = max(m0, row[j])
        m1 = max(m1, row[j + 1])
        m2 = max(m2, row[j + 2])
        m3 = max(m3, row[j + 3])
        m4 = max(m4, row[j + 4])
        m5 = max(m5, row[j + 5])
        m6 = max(m6, row[j + 6])
        m7 = max(m7, row[j + 7])
        j += 8
    while j < n:
        m0 = max(m0, row[j])
        j += 1
    return max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))


@njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True)
def _softmax_kernel(x, out):
    """Row-wise safe softmax of ``x`` ``(M, N)`` into ``out`` (may alias ``x``).

    NaN semantics match numpy's ``exp(x - max) / sum``: a NaN in the row makes its
    ``exp`` NaN, hence the sum and the whole row NaN; a row of all ``-inf`` has
    ``x - max = -inf - -inf = NaN``; a ``+inf`` entry gives ``inf - inf = NaN``."""
    m, n = x.shape
    dt = x.dtype.type
    for i in prange(m):
        row = x[i]
        o = out[i]
        mx = _row_max(row, n)
        s = 0.0
        for j in range(n):
            e = exp(row[j] - mx)
            o[j] = e
            s += np.float64(e)
        inv = dt(1.0 / s)
        for j in range(n):
            o[j] *= inv


def softmax_lastaxis(x, out=None):
    """Softmax over the last axis of ``x`` ``(M, N)``; ``out`` ``(M, N)`` may alias ``x``."""
    x = _check_array("x", x, ndim=2)
    out = check_out(out, x.shape, x.dtype)
    if x.size:
        _softmax_kernel(x, out)
    return out


@njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True)
def _act_kernel(x, act, out, seg):
    """``out = act(x)`` over 1-D ``x`` in segments (``out`` may alias ``x``)."""
    n = x.shape[0]
    for t in prange((n + seg - 1) // seg):
        n0 = t * seg
        nc = min(n, n0 + seg) - n0
        c = np.empty(nc, x.dtype)
        for j in range(nc):
            c[j] = x[n0 + j]
        activate(c, nc, act)
        for j in range(nc):
            out[n0 + j] = c[j]


def gelu(x, out=None, *, approximate=False):
    """GELU of ``x`` (any shape), element-wise; ``out`` (same shape) may alias ``x``.

    ``approximate=False``: the exact ``0.5 x (1 + erf(x / sqrt 2))`` (ONNX Gelu default);
    ``True``: the tanh form ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``.
    """
    x = _check_array("x", x, ndim=None)
    out = check_out(out, x.shape, x.dtype)
    if x.size:
        act = ACT_GELU_TANH if approximate else ACT_GELU
        _act_kernel(x.reshape(-1), act, out.reshape(-1), _SEG)
    return out


# ---------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _check_array(name, x, ndim, dtype=None, shape=None):
    """``x`` as a C-contiguous array (inputs are copied if strided), or a ValueError."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {x.shape}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"{name} must be float32 or float64, got {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise ValueError(f"{name} must be {np.dtype(dtype)} (the dtype of the other operands), got {x.dtype}")
    if shape is not None and x.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {x.shape}")
    return np.ascontiguousarray(x)


def _check_optional(name, x, shape, dtype):
    return None if x is None else _check_array(name, x, ndim=len(shape), dtype=dtype, shape=shape)


def check_out(out, shape, dtype, name="out"):
    """``out`` checked (a C-contiguous, writeable array of ``shape``/``dtype``), or a new one."""
    if out is None:
        return np.empty(shape, dtype)
    if not isinstance(out, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(out).__name__}")
    if out.shape != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"{name} must be a {np.dtype(dtype)} array of shape {tuple(shape)}, "
                         f"got {out.dtype} {out.shape}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"{name} must be C-contiguous and writeable")
    return out


def check_act(act):
    """``act`` as an int if it is one of the ``ACT_*`` codes, else a ValueError."""
    if isinstance(act, bool) or not isinstance(act, (int, np.integer)) or not 0 <= act < len(ACT_NAMES):
        raise ValueError(f"act must be one of the ACT_* codes 0..{len(ACT_NAMES) - 1} "
                         f"({', '.join(ACT_NAMES)}), got {act!r}")
    return int(act)
