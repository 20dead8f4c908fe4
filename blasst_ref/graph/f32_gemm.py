"""float32 GEMM with a fused epilogue on an FMA micro-kernel written from Numba (no BLAS).

``out = act(a @ W + bias) + residual`` for a constant weight ``W`` packed once (compile
time), with every thread a Numba thread: the same product that
:func:`blasst_ref.graph.kernels.matmul_packed` computes with one OpenBLAS call per block
(which re-packs its operands each time), and that the ``"blas"`` mode computes with one
multi-threaded BLAS call and a separate post-op pass (two thread pools that trade the
cores back and forth on a small machine).

The micro-kernel
----------------
An ``MR x NR`` block of the output (``NR = NBLK`` vectors of ``L`` float32 lanes: 6 x 64 on
AVX-512, 6 x 16 on AVX2) stays in ``MR * NBLK`` vector registers for a whole run over k;
each step of the loop broadcasts ``a[i, k]`` for the ``MR`` rows, loads the ``NBLK`` weight
vectors of row k of the packed panel, and issues ``MR * NBLK`` fused multiply-adds
(``llvm.fma.v16f32``, one ``vfmadd231ps zmm`` each). It is a Numba ``@intrinsic`` whose code
generator writes that loop in LLVM IR (the accumulators are loop phis), exactly as
:mod:`.int8_kernels` does with ``vpdpbusd``. Register budget on AVX-512: 24 accumulators +
4 weight vectors + 1 broadcast <= 32 zmm.

Blocking
--------
Packed weight: ``(ceil(N / NR), K, NR)``, panel ``p`` holding columns ``p*NR : (p+1)*NR``
(zero-padded), each row of a panel one contiguous ``NR``-float run: the loads of a k step.
A task owns ``ROW_BLOCK x COL_BLOCK`` outputs and a thread-local accumulator block of that
size (L2). It walks K in chunks of ``KC``: for each chunk, every ``MR``-row strip of ``a``
(``MR x KC`` floats: L1) runs the micro-kernel over the task's panels (``KC x NR`` each: L2,
reused by every strip), adding into the accumulator block. After the last chunk the
epilogue -- bias, activation, residual -- runs over each row of the block while it is in
cache, and stores it. ``a`` is read in place (no packing: its rows are the MR streams of
the micro-kernel).

The activations are :func:`.kernels.activate`'s (GELU in float32 by its vectorisable
``erfc``: libm's scalar one would make GELU over a BERT FFN's output cost as much as the
product itself).

Backends: ``"avx512"`` (zmm), ``"avx2"`` (ymm with FMA), else :func:`available` is False and
callers keep :func:`~blasst_ref.graph.kernels.matmul_packed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import llvmlite.binding as llb
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ..numba_utils import FASTMATH
from .kernels import activate

__all__ = ["KC", "MR", "ROW_BLOCK", "COL_BLOCK", "PackedF32Weight", "available", "backend",
           "blocks", "gemm", "pack"]

MR = 6
#: The largest rows and columns per task (a multiple of MR, of NR); the K chunk. A call cuts
#: its output into equal blocks of at most this size, as many as it takes for every thread
#: to get the same number of tasks (:func:`blocks`).
ROW_BLOCK = 96
COL_BLOCK = 256
KC = 256
#: Below this many multiply-adds a call runs on the calling thread only.
SERIAL_MACS = 1 << 20


def _host_features() -> set[str]:
    cfg = numba.config
    if cfg.CPU_FEATURES:
        return {f[1:] for f in cfg.CPU_FEATURES.split(",") if f.startswith("+")}
    if cfg.CPU_NAME and cfg.CPU_NAME != "host":
        return set()
    return {f for f, on in llb.get_host_cpu_features().items() if on}


def _select() -> str:
    feats = _host_features()
    if "avx512f" in feats:
        return "avx512"
    if "avx2" in feats and "fma" in feats:
        return "avx2"
    return "none"


_BACKEND = _select()
#: float32 lanes per vector and vectors per micro-kernel row, by backend
_LANES = {"avx512": 16, "avx2": 8, "none": 16}
_NBLK = {"avx512": 4, "avx2": 2, "none": 4}
#: The backend's tag: a tuple whose *length* (part of its Numba type) is the lane count,
#: so each backend compiles its own specialisation from a plain call.
_TAG = (0,) * (_LANES[_BACKEND] if _BACKEND != "none" else 0)
NR = _LANES[_BACKEND] * _NBLK[_BACKEND]


def backend() -> str:
    """``"avx512"``, ``"avx2"`` or ``"none"`` (no FMA micro-kernel on this CPU)."""
    return _BACKEND


def available() -> bool:
    return _BACKEND != "none"


# ---------------------------------------------------------------------------------------
# The micro-kernel
# ---------------------------------------------------------------------------------------


@intrinsic(prefer_literal=True)
def _uk(typingctx, tag, mr, a, a_off, lda, w, w_off, kk, c, c_off, ldc):
    """``c[c_off + i*ldc + j*L : +L] += sum_{k<kk} a[a_off + i*lda + k] *
    w[w_off + k*NR + j*L : +L]`` for ``i < mr`` (a literal), ``j < NBLK``; ``a``, ``w``,
    ``c`` flat float32 arrays. The accumulators start from ``c`` and stay in registers for
    the whole k loop."""
    if not (isinstance(tag, types.BaseTuple) and isinstance(mr, types.IntegerLiteral)):
        return None
    lanes = len(tag.types)
    rows = mr.literal_value
    sig = types.void(tag, mr, a, a_off, lda, w, w_off, kk, c, c_off, ldc)

    def codegen(context, builder, sig, args):
        if lanes == 0:
            return context.get_dummy_value()
        nblk = 4 if lanes == 16 else 2
        nr = lanes * nblk
        f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
        vty = ir.VectorType(f32, lanes)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                             f"llvm.fma.v{lanes}f32")
        _, _, a_v, a_off_v, lda_v, w_v, w_off_v, kk_v, c_v, c_off_v, ldc_v = args
        targs = sig.args

        def data(i, v):
            return builder.bitcast(context.make_array(targs[i])(context, builder, v).data,
                                   f32.as_pointer())

        def as64(i, v):
            return context.cast(builder, v, targs[i], types.int64)

        a_data, w_data, c_data = data(2, a_v), data(5, w_v), data(8, c_v)
        a_off_v, lda_v, w_off_v = as64(3, a_off_v), as64(4, lda_v), as64(6, w_off_v)
        kk_v, c_off_v, ldc_v = as64(7, kk_v), as64(9, c_off_v), as64(10, ldc_v)
        a_rows = [builder.gep(a_data, [builder.add(a_off_v, builder.mul(
            lda_v, ir.Constant(i64, i)))]) for i in range(rows)]
        w_base = builder.gep(w_data, [w_off_v])
        c_ptrs = [[builder.bitcast(builder.gep(c_data, [builder.add(
            c_off_v, builder.add(builder.mul(ldc_v, ir.Constant(i64, i)),
                                 ir.Constant(i64, j * lanes)))]), vty.as_pointer())
            for j in range(nblk)] for i in range(rows)]
        init = [builder.load(c_ptrs[i][j], align=4) for i in range(rows) for j in range(nblk)]
        entry = builder.basic_block
        loop = builder.append_basic_block("fma.loop")
        done = builder.append_basic_block("fma.done")
        builder.cbranch(builder.icmp_signed(">", kk_v, ir.Constant(i64, 0)), loop, done)

        builder.position_at_end(loop)
        k = builder.phi(i64, "k")
        k.add_incoming(ir.Constant(i64, 0), entry)
        accs = []
        for v in init:
            p = builder.phi(vty)
            p.add_incoming(v, entry)
            accs.append(p)
        wk = builder.gep(w_base, [builder.mul(k, ir.Constant(i64, nr))])
        wvecs = [builder.load(builder.bitcast(builder.gep(wk, [ir.Constant(i64, j * lanes)]),
                                              vty.as_pointer()), align=4)
                 for j in range(nblk)]
        undef = ir.Constant(vty, ir.Undefined)
        splat = ir.Constant(ir.VectorType(i32, lanes), [0] * lanes)
        new = []
        for i in range(rows):
            s = builder.load(builder.gep(a_rows[i], [k]), align=4)
            bc = builder.shuffle_vector(builder.insert_element(undef, s, ir.Constant(i32, 0)),
                                        undef, splat)
            for j in range(nblk):
                new.append(builder.call(fma, [bc, wvecs[j], accs[i * nblk + j]]))
        k_next = builder.add(k, ir.Constant(i64, 1))
        body_end = builder.basic_block
        k.add_incoming(k_next, body_end)
        for p, v in zip(accs, new):
            p.add_incoming(v, body_end)
        builder.cbranch(builder.icmp_signed("<", k_next, kk_v), loop, done)

        builder.position_at_end(done)
        results = []
        for v0, v in zip(init, new):  # every phi first: LLVM wants them at the block's top
            res = builder.phi(vty)
            res.add_incoming(v0, entry)
            res.add_incoming(v, body_end)
            results.append(res)
        for idx, res in enumerate(results):
            i, j = divmod(idx, nblk)
            builder.store(res, c_ptrs[i][j], align=4)
        return context.get_dummy_value()

    return sig, codegen


def _strip(tag, mr, a, a_off, lda, w, w_off, kk, c, c_off, ldc):
    """``mr <= MR`` rows as micro-kernels of MR, 4, 2 and 1 rows (literal shapes)."""
    raise NotImplementedError  # pragma: no cover - only called from compiled code


@overload(_strip, inline="always")
def _strip_ol(tag, mr, a, a_off, lda, w, w_off, kk, c, c_off, ldc):
    def impl(tag, mr, a, a_off, lda, w, w_off, kk, c, c_off, ldc):
        if mr == MR:
            _uk(tag, MR, a, a_off, lda, w, w_off, kk, c, c_off, ldc)
            return
        has4 = mr >= 4
        if has4:
            _uk(tag, 4, a, a_off, lda, w, w_off, kk, c, c_off, ldc)
        r2 = 4 * has4
        has2 = mr - r2 >= 2
        if has2:
            _uk(tag, 2, a, a_off + r2 * lda, lda, w, w_off, kk, c, c_off + r2 * ldc, ldc)
        r1 = r2 + 2 * has2
        if mr - r1 >= 1:
            _uk(tag, 1, a, a_off + r1 * lda, lda, w, w_off, kk, c, c_off + r1 * ldc, ldc)
    return impl


# ---------------------------------------------------------------------------------------
# Epilogue
# ---------------------------------------------------------------------------------------


@njit(inline="always", fastmath=FASTMATH)
def _finish_row(c, nc, bias, n0, act, residual, i, out):
    """``out[i, n0:n0+nc] = act(c[:nc] + bias[n0:]) + residual[i, n0:]`` (``c`` clobbered);
    activation codes as :mod:`.kernels`."""
    o = out[i, n0:n0 + nc]
    if bias is not None:
        b = bias[n0:n0 + nc]
        for j in range(nc):
            c[j] += b[j]
    activate(c, nc, act)
    if residual is not None:
        r = residual[i, n0:n0 + nc]
        for j in range(nc):
            o[j] = c[j] + r[j]
    else:
        for j in range(nc):
            o[j] = c[j]


# ---------------------------------------------------------------------------------------
# Drivers
# ---------------------------------------------------------------------------------------


@njit(cache=True, fastmath=FASTMATH)
def _task(tag, t, a, w, n, n_cb, row_block, col_block, bias, act, residual, out, acc):
    """Task ``t``: rows ``rb*row_block ..`` x columns ``cb*col_block ..`` (column blocks
    vary fastest: a thread keeps its rows of ``a`` hot); ``acc`` a thread-local
    ``(row_block, col_block)`` float32 block."""
    n_panels, k, nr = w.shape
    m, lda = a.shape
    rb = t // n_cb
    cb = t % n_cb
    i0 = rb * row_block
    i1 = min(m, i0 + row_block)
    c0 = cb * col_block
    c1 = min(n, c0 + col_block)
    p0 = c0 // nr
    p1 = (c1 + nr - 1) // nr
    ldc = acc.shape[1]
    aflat = a.reshape(-1)
    wflat = w.reshape(-1)
    cflat = acc.reshape(-1)
    for r in range(i1 - i0):
        for j in range(ldc):
            acc[r, j] = 0.0
    for k0 in range(0, k, KC):
        kk = min(KC, k - k0)
        for r0 in range(i0, i1, MR):
            mr = min(MR, i1 - r0)
            for p in range(p0, p1):
                _strip(tag, mr, aflat, r0 * lda + k0, lda, wflat, (p * k + k0) * nr, kk,
                       cflat, (r0 - i0) * ldc + (p - p0) * nr, ldc)
    for r in range(i1 - i0):
        _finish_row(acc[r], c1 - c0, bias, c0, act, residual, i0 + r, out)


@njit(parallel=True, cache=True)
def _run_par(tag, a, w, n, row_block, col_block, bias, act, residual, out):
    n_rb = (a.shape[0] + row_block - 1) // row_block
    n_cb = (n + col_block - 1) // col_block
    for t in prange(n_rb * n_cb):
        acc = np.empty((row_block, col_block), np.float32)
        _task(tag, t, a, w, n, n_cb, row_block, col_block, bias, act, residual, out, acc)


@njit(cache=True)
def _run_serial(tag, a, w, n, row_block, col_block, bias, act, residual, out):
    n_rb = (a.shape[0] + row_block - 1) // row_block
    n_cb = (n + col_block - 1) // col_block
    acc = np.empty((row_block, col_block), np.float32)
    for t in range(n_rb * n_cb):
        _task(tag, t, a, w, n, n_cb, row_block, col_block, bias, act, residual, out, acc)


def _round_up(x: int, step: int) -> int:
    return -(-x // step) * step


def blocks(m: int, n: int, threads: int) -> tuple[int, int]:
    """``(row_block, col_block)`` of a call: the output cut into equal blocks (rows in
    multiples of MR, columns of NR) of at most ROW_BLOCK x COL_BLOCK, and then into more
    rows until the task count is a multiple of ``threads`` (Numba's static schedule gives
    each thread the same number of tasks: equal tasks are equal work) -- or until a block
    is one micro-kernel tall. (M = 128, N = 384 on 2 threads: 4 tasks of 66 x 192, not
    96 + 32 rows x 256 + 128 columns, whose largest task is six times its smallest.)"""
    n_cb = -(-n // COL_BLOCK)
    col_block = _round_up(-(-n // n_cb), NR)
    n_cb = -(-n // col_block)
    n_rb = -(-m // ROW_BLOCK)
    while True:
        row_block = _round_up(-(-m // n_rb), MR)
        tasks = -(-m // row_block) * n_cb
        if threads <= 1 or tasks % threads == 0 or row_block <= MR:
            return row_block, col_block
        n_rb += 1


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedF32Weight:
    """A constant float32 ``(K, N)`` weight packed for the micro-kernel by :func:`pack`:
    ``panels`` ``(ceil(N / NR), K, NR)``, zero-padded past column ``n``."""

    panels: np.ndarray
    k: int
    n: int

    @property
    def nbytes(self) -> int:
        return self.panels.nbytes


def pack(w) -> PackedF32Weight:
    """Pack a constant float32 weight ``w`` ``(K, N)`` once (compile time)."""
    w = np.asarray(w)
    if w.ndim != 2 or w.dtype != np.float32 or 0 in w.shape:
        raise ValueError(f"w must be a non-empty 2-D float32 array, got {w.dtype} {w.shape}")
    k, n = w.shape
    n_panels = -(-n // NR)
    padded = np.zeros((k, n_panels * NR), np.float32)
    padded[:, :n] = w
    panels = np.ascontiguousarray(padded.reshape(k, n_panels, NR).transpose(1, 0, 2))
    panels.setflags(write=False)
    return PackedF32Weight(panels, int(k), int(n))


def gemm(a, pw: PackedF32Weight, bias=None, act: int = 0, residual=None, out=None, *,
         parallel: bool | None = None) -> np.ndarray:
    """``out = act(a @ W + bias) + residual`` on the FMA micro-kernel.

    Args:
        a: ``(M, K)`` float32 C-contiguous. pw: :func:`pack` of ``W`` ``(K, N)``.
        bias: ``(N,)`` or None. act: an activation code of :mod:`.kernels`.
        residual: ``(M, N)`` or None; may be ``out`` itself (each element is read just
            before the same element is written).
        out: ``(M, N)`` float32 C-contiguous (not overlapping ``a``), or None.
        parallel: None picks by size (:data:`SERIAL_MACS`).

    Raises ``RuntimeError`` where :func:`available` is False.
    """
    if not available():
        raise RuntimeError("this CPU has neither AVX-512 nor AVX2+FMA: use "
                           "kernels.matmul_packed")
    if not isinstance(pw, PackedF32Weight):
        raise ValueError(f"pw must be a PackedF32Weight (from pack), got {type(pw).__name__}")
    if not (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.ndim == 2
            and a.shape[1] == pw.k):
        raise ValueError(f"a must be a float32 (M, {pw.k}) array, got "
                         f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
    a = np.ascontiguousarray(a)
    m, n = a.shape[0], pw.n
    if out is None:
        out = np.empty((m, n), np.float32)
    if out.shape != (m, n) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 ({m}, {n}) array")
    for name, x, shape in (("bias", bias, (n,)), ("residual", residual, (m, n))):
        if x is not None and (x.shape != shape or x.dtype != np.float32):
            raise ValueError(f"{name} must be a float32 {shape} array, got {x.dtype} {x.shape}")
    if residual is not None:
        residual = np.ascontiguousarray(residual)
    if m == 0:
        return out
    threads = numba.get_num_threads()
    if parallel is None:
        parallel = m * n * pw.k >= SERIAL_MACS and threads > 1
    row_block, col_block = blocks(m, n, threads if parallel else 1)
    (_run_par if parallel else _run_serial)(_TAG, a, pw.panels, n, row_block, col_block,
                                            bias, int(act), residual, out)
    return out
