"""int8 matmul kernels for the graph executor: u8 x s8 -> s32, the form of ``vpdpbusd``
(docs/DESIGN.md §7.4).

What is here (the kernel layer only; the lowering pass that finds Dequantize -> MatMul ->
Quantize and calls these lives in the passes):

* :func:`pack_int8_weight`: a constant ``(K, N)`` int8 weight packed once, at compile time,
  into the layout the dot-product instruction reads, with its per-column sums (the
  zero-point compensation term) and per-output-channel scales.
* :func:`qmatmul_s32`: the exact integer kernel, ``acc[m, n] = sum_k a[m, k] * w[k, n]``
  (u8 activations, s8 weights, s32 sums).
* :func:`qmatmul`: the same product plus, in one pass over each output tile before the
  store: zero-point compensation, rescale, bias, activation, residual, and either a float32
  store or requantisation to u8.
* :func:`quantize`: float32 -> u8/s8 per tensor in one compiled pass (the int8 graph's
  entry; bit for bit ``ops.quantize_array``).
* :func:`int8_backend`: ``"avx512_vnni"``, ``"avx_vnni"``, ``"avx2"`` or ``"portable"``.

The instruction
---------------
``vpdpbusd acc, a, b`` treats each 32-bit lane of ``a`` as 4 unsigned bytes and of ``b`` as
4 signed bytes, and adds the 4 products to the lane's int32 (no saturation; the products
are exact in int32). With 16 lanes (zmm, AVX512-VNNI) one instruction is 64 multiply-adds.
The GEMM micro-kernel therefore keeps ``MR x NBLK`` vector accumulators (``MR`` rows of the
output, ``NBLK`` blocks of ``NB`` = 16 (zmm) or 8 (ymm) columns) in registers for the whole
K loop; each step of the loop covers 4 values of k: it broadcasts 4 activation bytes of a
row (one dword) to every lane, loads ``NBLK`` vectors of weights (``NB`` columns x 4 k's,
the packed layout below), and issues ``MR * NBLK`` ``vpdpbusd``.

The micro-kernel is a Numba ``@intrinsic`` whose code generator writes that loop directly
in LLVM IR (phi nodes for the accumulators) with calls of the LLVM intrinsic
``llvm.x86.avx512.vpdpbusd.512`` (or ``.256``: the 256-bit form, which LLVM emits as the
EVEX instruction under AVX512VL and as the VEX ``{vex} vpdpbusd`` of AVX-VNNI).
The backend is chosen once at import from the CPU features LLVM reports for the host
(what Numba compiles for), or forced with ``BLASST_INT8_BACKEND``. On AVX2 without VNNI
(e.g. Zen 3) the same micro-kernel emulates ``vpdpbusd`` exactly: each lane's 4 weight bytes
split into their even and odd bytes as int16 pairs (shifts, once per weight vector), the
4 activation bytes likewise, and two ``vpmaddwd`` (int16 products, pairwise int32 sums:
exact; ``vpmaddubsw`` would saturate) added to the accumulator -- ``MR x NBLK`` = 4 x 2
blocks of 8 columns, to fit 16 ymm registers. Elsewhere a portable Numba path computes
the same integers with plain int32 loops.

Packed layout (:class:`PackedInt8Weight`)
-----------------------------------------
``data[nb, q, j, t] = w[4 q + t, nb * NB + j]``, shape ``(ceil(N / NB), Kp / 4, NB, 4)``,
``Kp`` = K rounded up to a multiple of 4; the padding (k >= K, n >= N) is zero. One
``(q, :, :)`` slice of a column block is one vector load: lane ``j`` holds the 4 weights of
column ``j`` for k = 4q .. 4q+3, which is exactly what ``vpdpbusd`` multiplies by the 4
broadcast activation bytes.

Zero points
-----------
Weights are symmetric (zero point 0, per-channel scale); activations are asymmetric u8
with one zero point ``za`` per tensor. Then
``sum_k (a - za) w = sum_k a w - za * sum_k w[k, n]``: the second term's column sums are
constant (computed by :func:`pack_int8_weight`), so the kernel only subtracts
``za * col_sums[n]`` per output column.

Range: the int32 sums are exact for ``K <= 65793`` (``255 * 128 * K < 2**31``); larger K is
refused (the vector instruction would wrap).

Blocking and threads
--------------------
The output is cut into tasks of at most ``ROW_BLOCK x COL_BLOCK`` (smaller for small
problems, so that every thread gets >= 2), run by a Numba ``prange`` (one thread-local
``MR x COL_BLOCK`` int32 strip each). Below ``SERIAL_MACS`` of work a call runs on the
calling thread alone (no parallel region), above it on all threads (:func:`auto_threads`
says why nothing in between). ``threads=`` forces a count (set per call:
``numba.set_num_threads`` is thread-local); every count gives the same bytes.

K need not be a multiple of 4: the micro-kernel runs the ``K // 4`` full groups, then one
step on the tail's 1-3 bytes of each row (read one by one, zero-extended), so activations
are used where they lie -- no padded copy -- and no byte past a row is read.

Inside a task, for each strip of ``MR`` rows the micro-kernel sweeps the task's weight
panels, then the epilogue finishes the strip while it is in L1. There is no
K blocking: the accumulators cover the whole K (fine to K ~ 4096; a kc-blocked variant
would keep the weight panel in L1 for larger K). No BLAS is involved, so nothing needs
limiting with threadpoolctl.

Measured (s32 kernel, 1024^3): ~95% of the L1-resident micro-kernel rate on a 2-core Zen 4
EPYC, ~65% (1 thread) to ~70% (16 threads) on a 16-core Sapphire Rapids Xeon VM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import llvmlite.binding as llb
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ..numba_utils import FASTMATH
from .kernels import ACT_NONE, activate, check_act, check_out

__all__ = [
    "BACKENDS", "DynamicQMatMulPlan", "MAX_K", "PackedInt8Weight", "QMatMulPlan",
    "asm_of_kernel", "auto_threads", "available_int8_backends", "dynamic_row_blocks",
    "int8_backend",
    "pack_int8_weight", "qmatmul", "qmatmul_dynamic", "qmatmul_s32", "quantize",
    "quantize_rows", "quantize_unchecked",
    "vnni_peak_macs_per_cycle",
]

#: Backend names, widest first.
BACKENDS = ("avx512_vnni", "avx_vnni", "avx2", "portable")
#: Vector width (int32 lanes, = columns per packed block) of each backend's layout.
_LANES = {"avx512_vnni": 16, "avx_vnni": 8, "avx2": 8, "portable": 16}
#: Code passed to the compiled drivers (a literal: it picks the micro-kernel at compile
#: time): 16 -> zmm VNNI, 8 -> ymm VNNI, 7 -> ymm AVX2 (8 lanes, ``vpdpbusd`` emulated exactly
#: by two ``vpmaddwd``), 0 -> portable loops.
_VW = {"avx512_vnni": 16, "avx_vnni": 8, "avx2": 7, "portable": 0}
#: ... passed to them as the length of a tuple: the length is part of the tuple's Numba
#: type, so each backend gets its own compiled specialisation (and cache entry) from a
#: plain call, with no per-call literal dispatch.
_TAG = {b: (0,) * v for b, v in _VW.items()}

#: The largest K whose sums cannot overflow int32: 255 * 128 * K <= 2**31 - 1.
MAX_K = (2**31 - 1) // (255 * 128)

#: Micro-kernel shape per vector width: (MR rows, NBLK column blocks). Register budget:
#: MR * NBLK accumulators + NBLK weight vectors + 1 broadcast <= 32 zmm (AVX-512) and
#: <= 16 ymm (AVX-VNNI without AVX-512 has 16 vector registers). Measured on Zen 4
#: (1 thread, 1024^3 and DLRM shapes): zmm 6x4, 4x4, 14x2 and 10x2 within noise of each
#: other (~410 GOPS, 90% of the L1 micro-kernel rate), 8x3 and 12x2 5-20% slower; 6x4
#: (NR = 64 columns) wastes no padding on N = 128/256/512/1024, NR = 48 does.
#: MR must be >= 4: tails are cut into micro-kernels of 4, 2 and 1 rows.
MR_ZMM, NBLK_ZMM = 6, 4
MR_YMM, NBLK_YMM = 6, 2
#: AVX2 without VNNI: 4 x 2 blocks -- 8 accumulators, 4 weight vectors (each block's even
#: and odd bytes as int16) and 2 broadcasts in 16 ymm registers.
MR_AVX2, NBLK_AVX2 = 4, 2
MR_PORTABLE = 4
_UK_SHAPE = {16: (MR_ZMM, NBLK_ZMM), 8: (MR_YMM, NBLK_YMM), 7: (MR_AVX2, NBLK_AVX2),
             0: (MR_PORTABLE, 1)}
#: Rows per task (a multiple of every MR above) and the largest number of columns per task
#: (a multiple of every NR = NBLK * NB above). On Zen 4, 48..192 x 128..512 were all
#: within noise on 1024^3 and the DLRM shapes.
ROW_BLOCK = 96
COL_BLOCK = 256
#: Below this much work, ``M * N * (K + EPILOGUE_MACS)``, a call runs on the calling thread
#: only; above it, on all of Numba's threads (:func:`auto_threads`). The epilogue of one
#: output costs about as much as 32 multiply-adds (measured: K = 13 layers are
#: store/epilogue-bound).
SERIAL_MACS = 1 << 20
EPILOGUE_MACS = 32


# ---------------------------------------------------------------------------------------
# Backend detection
# ---------------------------------------------------------------------------------------


def _cpu_features() -> set[str]:
    """The CPU features Numba compiles for: ``NUMBA_CPU_FEATURES`` if set, else none when
    ``NUMBA_CPU_NAME`` names a CPU other than the host (e.g. ``generic`` for portable
    caches), else LLVM's view of the host (``llvmlite.binding.get_host_cpu_features``)."""
    cfg = numba.config
    if getattr(cfg, "CPU_FEATURES", None):
        return {f[1:] for f in str(cfg.CPU_FEATURES).split(",") if f.startswith("+")}
    name = getattr(cfg, "CPU_NAME", None)
    if name and name != "host":
        return set()
    try:
        fm = llb.get_host_cpu_features()
    except RuntimeError:  # pragma: no cover - LLVM cannot tell: stay portable
        return set()
    return {k for k, v in fm.items() if v}


def available_int8_backends(features=None) -> tuple[str, ...]:
    """The backends this CPU (or the feature set ``features``) can run, widest first.

    ``avx_vnni`` is the 256-bit ``vpdpbusd``: AVX-VNNI (VEX), or AVX512-VNNI + AVX512VL
    (the same instruction, EVEX-encoded), so an AVX-512 CPU can run it too."""
    f = _cpu_features() if features is None else set(features)
    out = []
    if {"avx512f", "avx512vnni"} <= f:
        out.append("avx512_vnni")
    if "avxvnni" in f or {"avx512vnni", "avx512vl"} <= f:
        out.append("avx_vnni")
    if "avx2" in f:
        out.append("avx2")
    out.append("portable")
    return tuple(out)


_AVAILABLE = available_int8_backends()  # once: asking LLVM for the features costs ~0.1 ms


def _select_backend() -> str:
    avail = _AVAILABLE
    forced = os.environ.get("BLASST_INT8_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"BLASST_INT8_BACKEND must be one of {', '.join(BACKENDS)}, "
                             f"got {forced!r}")
        if forced not in avail:
            raise ValueError(f"BLASST_INT8_BACKEND={forced} but this CPU lacks it (available: "
                             f"{', '.join(avail)})")
        return forced
    return avail[0]


_BACKEND = _select_backend()


def int8_backend() -> str:
    """The int8 backend chosen at import: ``"avx512_vnni"`` (zmm ``vpdpbusd``),
    ``"avx_vnni"`` (ymm ``vpdpbusd``), ``"avx2"`` (ymm, ``vpdpbusd`` emulated exactly by
    two ``vpmaddwd``) or ``"portable"`` (plain Numba loops). Detected from
    the CPU features Numba compiles for; ``BLASST_INT8_BACKEND`` forces one (a ValueError
    at import if the CPU lacks it)."""
    return _BACKEND


def _resolve_backend(backend):
    if backend is None:
        return _BACKEND
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} or None, got {backend!r}")
    if backend not in _AVAILABLE:
        raise ValueError(f"backend {backend!r} is not available on this CPU (available: "
                         f"{', '.join(_AVAILABLE)})")
    return backend


# ---------------------------------------------------------------------------------------
# The VNNI micro-kernel: an intrinsic that writes the K loop in LLVM IR
# ---------------------------------------------------------------------------------------


@intrinsic(prefer_literal=True)
def _uk_vnni(typingctx, tag, mr, nblk, a, a_off, lda, w, w_off, w_bstride, kq, kt, c, c_off,
             ldc):
    """``c[c_off + i*ldc + j*NB : +NB] = sum_q vpdpbusd(bcast(a[a_off + i*lda + 4q : +4]),
    w[w_off + j*w_bstride + q*4*NB : +4*NB])`` for ``i < mr``, ``j < nblk``, over the
    ``kq`` full groups of 4 k's, then (``kt`` in 1..3) one step on the K tail: the ``kt``
    bytes ``a[.. + 4kq : + kt]`` zero-extended to a word (``lda`` = K needs no multiple of
    4, and no byte past K is read).

    ``tag`` is a tuple whose length (16 or 8: part of its *type*, so known when the code is
    generated) is the lane count; ``mr`` and ``nblk`` (literals) the rows and column
    blocks. ``a`` is any uint8 array, ``w`` int8, indexed through their data
    pointers with byte offsets; ``c`` a C-contiguous int32 array with row stride ``ldc``
    (elements). The accumulators start at zero and live in registers (loop phis) for the
    whole loop over the ``kq`` groups of 4 k's. A tag of length 0 (the portable backend) emits
    nothing: that call sits in a branch never taken."""
    if not (isinstance(tag, types.BaseTuple) and isinstance(mr, types.IntegerLiteral)
            and isinstance(nblk, types.IntegerLiteral)):
        return None
    nbits = len(tag.types)
    rows = mr.literal_value
    ncols = nblk.literal_value
    sig = types.void(tag, mr, nblk, a, a_off, lda, w, w_off, w_bstride, kq, kt, c, c_off,
                     ldc)

    def codegen(context, builder, sig, args):
        if nbits == 0:
            return context.get_dummy_value()
        nblk = ncols
        emulate = nbits == 7  # AVX2: vpdpbusd as two exact vpmaddwd (see _dot below)
        lanes = 8 if emulate else nbits
        i8, i16, i32, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
        vty = ir.VectorType(i32, lanes)
        if emulate:
            wty = ir.VectorType(i16, 2 * lanes)
            fn = cgutils.get_or_insert_function(builder.module,
                                                ir.FunctionType(vty, [wty, wty]),
                                                "llvm.x86.avx2.pmadd.wd")
            eight = ir.Constant(wty, [8] * (2 * lanes))
            lo_mask = ir.Constant(i32, 0x00FF00FF)
        else:
            name = {16: "llvm.x86.avx512.vpdpbusd.512", 8: "llvm.x86.avx512.vpdpbusd.256"}[nbits]
            fn = cgutils.get_or_insert_function(builder.module,
                                                ir.FunctionType(vty, [vty] * 3), name)

        def prep(wv):
            """A weight vector as the kernel multiplies it: VNNI takes the 4 bytes per lane
            as they are; AVX2 splits them into the even bytes (k = 4q, 4q+2) and the odd
            ones (4q+1, 4q+3), each sign-extended to int16 pairs."""
            if not emulate:
                return wv
            x = builder.bitcast(wv, wty)
            return builder.ashr(builder.shl(x, eight), eight), builder.ashr(x, eight)

        def splat(word):
            """A row's 4 activation bytes (an i32 word) broadcast to every lane: as they
            are (VNNI), or as the even and odd bytes zero-extended to int16 pairs (AVX2)."""
            def bcast(v):
                return builder.shuffle_vector(
                    builder.insert_element(undef, v, ir.Constant(i32, 0)), undef, splat_mask)
            if not emulate:
                return bcast(word)
            even = builder.and_(word, lo_mask)
            odd = builder.and_(builder.lshr(word, ir.Constant(i32, 8)), lo_mask)
            return builder.bitcast(bcast(even), wty), builder.bitcast(bcast(odd), wty)

        def _dot(acc, bc, wv):
            """``acc + sum over each lane's 4 bytes of u8 * s8``: one vpdpbusd, or on AVX2
            ``vpmaddwd(a_even, w_even) + vpmaddwd(a_odd, w_odd)`` -- int16 products of a
            u8 and an s8 and their pair sums are exact in int32, as in vpdpbusd (vpmaddubsw
            would saturate)."""
            if not emulate:
                return builder.call(fn, [acc, bc, wv])
            return builder.add(acc, builder.add(builder.call(fn, [bc[0], wv[0]]),
                                                builder.call(fn, [bc[1], wv[1]])))
        _, _, _, a_v, a_off_v, lda_v, w_v, w_off_v, wbs_v, kq_v, kt_v, c_v, c_off_v, ldc_v = args
        targs = sig.args[1:]
        a_data = builder.bitcast(context.make_array(targs[2])(context, builder, a_v).data,
                                 i8.as_pointer())
        w_data = builder.bitcast(context.make_array(targs[5])(context, builder, w_v).data,
                                 i8.as_pointer())
        c_data = builder.bitcast(context.make_array(targs[10])(context, builder, c_v).data,
                                 i32.as_pointer())

        def as64(v, t):
            return context.cast(builder, v, t, types.int64)

        a_off_v, lda_v = as64(a_off_v, targs[3]), as64(lda_v, targs[4])
        w_off_v, wbs_v = as64(w_off_v, targs[6]), as64(wbs_v, targs[7])
        kq_v, kt_v, ldc_v = as64(kq_v, targs[8]), as64(kt_v, targs[9]), as64(ldc_v, targs[12])
        c_data = builder.gep(c_data, [as64(c_off_v, targs[11])])
        # loop-invariant base pointers, one per row of a and per column block of w
        a_rows = [builder.gep(a_data, [builder.add(a_off_v, builder.mul(lda_v,
                                                                         ir.Constant(i64, i)))])
                  for i in range(rows)]
        w_blks = [builder.gep(w_data, [builder.add(w_off_v, builder.mul(wbs_v,
                                                                         ir.Constant(i64, j)))])
                  for j in range(nblk)]
        zero = ir.Constant(vty, None)
        undef = ir.Constant(vty, ir.Undefined)
        splat_mask = ir.Constant(ir.VectorType(i32, lanes), [0] * lanes)
        entry = builder.basic_block
        loop = builder.append_basic_block("vnni.loop")
        done = builder.append_basic_block("vnni.done")
        builder.cbranch(builder.icmp_signed(">", kq_v, ir.Constant(i64, 0)), loop, done)

        builder.position_at_end(loop)
        q = builder.phi(i64, "q")
        q.add_incoming(ir.Constant(i64, 0), entry)
        accs = []
        for _ in range(rows * nblk):
            p = builder.phi(vty)
            p.add_incoming(zero, entry)
            accs.append(p)
        wq = builder.mul(q, ir.Constant(i64, 4 * lanes))
        wvecs = [prep(builder.load(builder.bitcast(builder.gep(wb, [wq]), vty.as_pointer()),
                                   align=1)) for wb in w_blks]
        aq = builder.mul(q, ir.Constant(i64, 4))
        new = []
        for i in range(rows):
            word = builder.load(builder.bitcast(builder.gep(a_rows[i], [aq]), i32.as_pointer()),
                                align=1)
            bc = splat(word)
            for j in range(nblk):
                new.append(_dot(accs[i * nblk + j], bc, wvecs[j]))
        q_next = builder.add(q, ir.Constant(i64, 1))
        body_end = builder.basic_block
        q.add_incoming(q_next, body_end)
        for p, v in zip(accs, new):
            p.add_incoming(v, body_end)
        builder.cbranch(builder.icmp_signed("<", q_next, kq_v), loop, done)

        builder.position_at_end(done)
        sums = []
        for v in new:  # all phis first: LLVM wants them grouped at the top of the block
            res = builder.phi(vty)
            res.add_incoming(zero, entry)
            res.add_incoming(v, body_end)
            sums.append(res)
        # the K tail (K % 4 = kt in 1..3 values of k past the kq full groups): one more
        # step on a word of kt activation bytes, zero-extended -- the packed weight's
        # group kq holds those k's and zeros after them. Every byte is read at an index
        # < kt (clamped, then masked): nothing past the row is touched, so the activation
        # rows need no padding.
        tail = builder.append_basic_block("vnni.tail")
        fin = builder.append_basic_block("vnni.fin")
        builder.cbranch(builder.icmp_signed(">", kt_v, ir.Constant(i64, 0)), tail, fin)
        builder.position_at_end(tail)
        wq = builder.mul(kq_v, ir.Constant(i64, 4 * lanes))
        wvecs = [prep(builder.load(builder.bitcast(builder.gep(wb, [wq]), vty.as_pointer()),
                                   align=1)) for wb in w_blks]
        aq = builder.mul(kq_v, ir.Constant(i64, 4))
        last = builder.sub(kt_v, ir.Constant(i64, 1))
        tail_new = []
        for i in range(rows):
            word = ir.Constant(i32, 0)
            for t in range(4):
                tc = ir.Constant(i64, t)
                inside = builder.icmp_signed("<", tc, kt_v)
                idx = builder.select(inside, tc, last)
                byte = builder.load(builder.gep(a_rows[i], [builder.add(aq, idx)]))
                val = builder.select(inside, builder.zext(byte, i32), ir.Constant(i32, 0))
                word = builder.or_(word, builder.shl(val, ir.Constant(i32, 8 * t)))
            bc = splat(word)
            for j in range(nblk):
                tail_new.append(_dot(sums[i * nblk + j], bc, wvecs[j]))
        tail_end = builder.basic_block
        builder.branch(fin)
        builder.position_at_end(fin)
        results = []
        for v, t in zip(sums, tail_new):
            res = builder.phi(vty)
            res.add_incoming(v, done)
            res.add_incoming(t, tail_end)
            results.append(res)
        for i in range(rows):
            for j in range(nblk):
                res = results[i * nblk + j]
                off = builder.add(builder.mul(ldc_v, ir.Constant(i64, i)),
                                  ir.Constant(i64, j * lanes))
                builder.store(res, builder.bitcast(builder.gep(c_data, [off]), vty.as_pointer()),
                              align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def _uk_portable(mr, a, a_off, lda, w, w_off, kq, kt, c, c_off, ldc, nb):
    """The micro-kernel's contract in plain Numba, one column block of ``nb`` columns:
    identical integers (every product ``u8 * s8`` and every sum is exact in int32, as in
    ``vpdpbusd``). The inner loop runs over the ``nb`` columns (contiguous in ``c``, stride
    4 in ``w``); all indices are uint64 so that Numba adds no negative-index test and LLVM
    vectorises it."""
    u4 = np.uint64(4)
    nbu = np.uint64(nb)
    for i in range(mr):
        ar = np.uint64(a_off + i * lda)
        cr = np.uint64(c_off + i * ldc)
        for l in range(nbu):
            c[cr + l] = 0
        for q in range(np.uint64(kq)):
            aq = ar + u4 * q
            wq = np.uint64(w_off) + u4 * nbu * q
            a0 = np.int32(a[aq])
            a1 = np.int32(a[aq + np.uint64(1)])
            a2 = np.int32(a[aq + np.uint64(2)])
            a3 = np.int32(a[aq + np.uint64(3)])
            for l in range(nbu):
                t = wq + u4 * l
                c[cr + l] += (a0 * np.int32(w[t]) + a1 * np.int32(w[t + np.uint64(1)])
                              + a2 * np.int32(w[t + np.uint64(2)])
                              + a3 * np.int32(w[t + np.uint64(3)]))
        if kt > 0:  # the K tail: kt < 4 bytes, none read past the row
            aq = ar + u4 * np.uint64(kq)
            wq = np.uint64(w_off) + u4 * nbu * np.uint64(kq)
            a0 = np.int32(a[aq])
            a1 = np.int32(a[aq + np.uint64(1)]) if kt > 1 else np.int32(0)
            a2 = np.int32(a[aq + np.uint64(2)]) if kt > 2 else np.int32(0)
            for l in range(nbu):
                t = wq + u4 * l
                c[cr + l] += (a0 * np.int32(w[t]) + a1 * np.int32(w[t + np.uint64(1)])
                              + a2 * np.int32(w[t + np.uint64(2)]))


def _tile(tag, mr, one, a, a_off, lda, w, w_off, w_bstride, kq, kt, c, c_off, ldc, nb):
    """One ``mr x NR`` tile (``NR`` = NBLK column blocks of ``nb``; one block if ``one``)
    into ``c`` (flat int32, row stride ``ldc``), rows ``mr <= MR``. Compiled per backend
    (the tag's type): the portable loops, or the VNNI intrinsic with ``mr`` cut greedily
    into MR, 4, 2 and 1 rows (the shapes compiled as literals: 8 micro-kernels per
    backend)."""
    raise NotImplementedError  # pragma: no cover - only called from compiled code


@overload(_tile, inline="always")
def _tile_ol(tag, mr, one, a, a_off, lda, w, w_off, w_bstride, kq, kt, c, c_off, ldc, nb):
    vw = len(tag.types)
    if vw == 0:
        def impl(tag, mr, one, a, a_off, lda, w, w_off, w_bstride, kq, kt, c, c_off, ldc, nb):
            _uk_portable(mr, a, a_off, lda, w, w_off, kq, kt, c, c_off, ldc, nb)
        return impl
    nblk = _UK_SHAPE[vw][1]

    # full strips of MR rows, then the remainder (< MR <= 8) as 4 + 2 + 1: written without
    # reassigned variables (a while loop here trips Numba's SSA checks after inlining)
    def impl(tag, mr, one, a, a_off, lda, w, w_off, w_bstride, kq, kt, c, c_off, ldc, nb):
        if one:
            _strips(tag, mr, 1, a, a_off, lda, w, w_off, w_bstride, kq, kt, c, c_off, ldc)
        else:
            _strips(tag, mr, nblk, a, a_off, lda, w, w_off, w_bstride, kq, kt, c, c_off, ldc)
    return impl


def _strips(tag, mr, nblk, a, a_off, lda, w, w_off, w_bstride, kq, kt, c, c_off, ldc):
    """``mr`` rows as micro-kernels of MR, 4, 2 and 1 rows, ``nblk`` (a literal) blocks."""
    raise NotImplementedError  # pragma: no cover - only called from compiled code


@overload(_strips, inline="always", prefer_literal=True)
def _strips_ol(tag, mr, nblk, a, a_off, lda, w, w_off, w_bstride, kq, kt, c, c_off, ldc):
    if not isinstance(nblk, types.IntegerLiteral):
        return None
    f = _UK_SHAPE[len(tag.types)][0]
    nbk = nblk.literal_value

    def impl(tag, mr, nblk, a, a_off, lda, w, w_off, w_bstride, kq, kt, c, c_off, ldc):
        n_full = mr // f
        for s in range(n_full):
            _uk_vnni(tag, f, nbk, a, a_off + s * f * lda, lda, w, w_off, w_bstride, kq, kt, c,
                     c_off + s * f * ldc, ldc)
        r4 = n_full * f
        has4 = mr - r4 >= 4
        if has4:
            _uk_vnni(tag, 4, nbk, a, a_off + r4 * lda, lda, w, w_off, w_bstride, kq, kt, c,
                     c_off + r4 * ldc, ldc)
        r2 = r4 + 4 * has4
        has2 = mr - r2 >= 2
        if has2:
            _uk_vnni(tag, 2, nbk, a, a_off + r2 * lda, lda, w, w_off, w_bstride, kq, kt, c,
                     c_off + r2 * ldc, ldc)
        r1 = r2 + 2 * has2
        if mr - r1 >= 1:
            _uk_vnni(tag, 1, nbk, a, a_off + r1 * lda, lda, w, w_off, w_bstride, kq, kt, c,
                     c_off + r1 * ldc, ldc)
    return impl


@njit(inline="always")
def _uk_dims(vw, nb):
    """(MR, NBLK, NR = NBLK * nb) of the micro-kernel for ``vw``."""
    if vw == 16:
        return MR_ZMM, NBLK_ZMM, NBLK_ZMM * nb
    if vw == 8:
        return MR_YMM, NBLK_YMM, NBLK_YMM * nb
    if vw == 7:
        return MR_AVX2, NBLK_AVX2, NBLK_AVX2 * nb
    return MR_PORTABLE, 1, nb


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _activate(buf, n, act):
    """:func:`.kernels.activate` with the float kernels' fast-math flags and numpy's error
    model (no zero test on divisions), so that its loops vectorise: one thread, 196 K GELUs
    in chunks of 256, 0.42-0.64 ms against 4.2-4.7 ms as the epilogue ran them before (Zen
    3). Its own function, not inlined, so that the requantising epilogue around it keeps
    IEEE arithmetic."""
    activate(buf, n, act)


@njit(cache=True)
def _epilogue_tile(c, ldc, mr, nc, r0, n0, n, p, outf, outq, outi, res, fbuf):
    """Finish one strip: ``c`` (flat int32 sums in L1, row stride ``ldc``) holds the output
    block rows ``r0 : r0 + mr``, columns ``n0 : n0 + nc``. ``p`` holds the per-call
    parameters (see :func:`_launch`); ``outf``/``outq``/``outi``/``res`` are flat views of
    the ``(M, n)`` arrays. Mode 0 stores the raw sums (``outi``); modes 1/2 dequantise
    ``dscale[n] * (acc - comp[n])``, add the bias, activate, add the residual, then store
    float32 (``outf``, mode 1) or requantise to u8 (``outq``, mode 2) exactly as
    ``ops.quantize_array``: ``clip(rint(y / out_scale) + out_zp, 0, 255)``, NaN -> zp
    (float32 arithmetic, IEEE division: no fast-math here). Mode 3 (dynamic, per-row
    activation scales) dequantises ``(row_scale[m] * dscale[n]) * (acc - row_zp[m] *
    comp[n])`` (``comp`` = the column sums, ``dscale`` = the weight scales) and stores
    float32 like mode 1.

    Indices into the flat arrays are uint64: Numba adds no negative-index test for
    unsigned indices, so the loops vectorise (and no per-row slice, whose reference count
    update would cost more than a short row). Not inlined: its types are the same for
    every backend, so it is compiled once for all of them."""
    mode, comp, dscale, bias, has_bias, act, _, has_res, out_scale, out_zp, rscale, rzp = p
    ncu = np.uint64(nc)
    if mode == 0:
        for i in range(mr):
            ob = np.uint64((r0 + i) * n + n0)
            cb = np.uint64(i * ldc)
            for j in range(ncu):
                outi[ob + j] = c[cb + j]
        return
    cs = comp[n0:n0 + nc]
    ds = dscale[n0:n0 + nc]
    b = bias[n0:n0 + nc] if has_bias else fbuf[:0]
    lo = np.float32(0.0)
    hi = np.float32(255.0)
    zp = np.float32(out_zp)
    for i in range(mr):
        ob = np.uint64((r0 + i) * n + n0)
        cb = np.uint64(i * ldc)
        if mode == 3:
            rs = rscale[r0 + i]
            rz = rzp[r0 + i]
            for j in range(ncu):
                fbuf[j] = (rs * ds[j]) * np.float32(np.int32(c[cb + j] - rz * cs[j]))
        else:
            for j in range(ncu):
                # acc, za * col_sum and their difference sum_k (a - za) w are all within
                # int32 for K <= MAX_K (|.| <= 255 * 128 * K), so the int32 result is exact
                fbuf[j] = ds[j] * np.float32(np.int32(c[cb + j] - cs[j]))
        if has_bias:
            for j in range(nc):
                fbuf[j] += b[j]
        _activate(fbuf, nc, act)
        if has_res:
            for j in range(ncu):
                fbuf[j] += res[ob + j]
        if mode != 2:
            for j in range(ncu):
                outf[ob + j] = fbuf[j]
        else:
            for j in range(ncu):
                q = np.rint(fbuf[j] / out_scale)
                if np.isnan(q):
                    q = np.float32(0.0)
                q = min(max(q + zp, lo), hi)
                outq[ob + j] = np.uint8(q)


@njit(cache=True)
def _task(tag, t, a, w, n, n_cb, row_block, col_block, p, outf, outq, outi, cbuf, fbuf):
    """Task ``t``: rows ``rb*row_block ..`` x columns ``cb*col_block ..`` of the output.
    Column blocks vary fastest in ``t`` (a thread reuses its rows of ``a``, hot in L2).
    Inside, for each ``MR``-row strip (``MR x K`` bytes of ``a``: L1), the micro-kernel
    sweeps the task's ``NR``-column weight panels (L2) into ``cbuf`` (``MR x col_block``
    int32: L1), which then goes through the epilogue and is stored.

    A function of its own (not inlined), compiled once per backend and shared by the
    serial and the parallel driver: that halves the compile time."""
    n_blocks, kqp, nb, _ = w.shape
    mr_max, nblk, nr = _uk_dims(len(tag), nb)
    wflat = w.reshape(-1)
    aflat = a.reshape(-1)
    cflat = cbuf.reshape(-1)
    lda = a.shape[1]  # = K: rows are not padded (the micro-kernel handles the K tail)
    kq = lda // 4
    kt = lda - 4 * kq
    wbs = kqp * 4 * nb  # bytes per column block of the packed weight (K padded to 4)
    m = a.shape[0]
    rb = t // n_cb
    cb = t % n_cb
    i0 = rb * row_block
    i1 = min(m, i0 + row_block)
    c0 = cb * col_block
    c1 = min(n, c0 + col_block)
    ldc = cbuf.shape[1]
    # flat views (C-contiguous arrays; empty where unused), indexed by the epilogue
    of = outf.reshape(-1)
    oq = outq.reshape(-1)
    oi = outi.reshape(-1)
    res = p[6].reshape(-1)
    for r0 in range(i0, i1, mr_max):
        mr = min(mr_max, i1 - r0)
        for n0 in range(c0, c1, nr):
            blk = n0 // nb
            if blk + nblk <= n_blocks:
                _tile(tag, mr, False, aflat, r0 * lda, lda, wflat, blk * wbs, wbs, kq, kt, cflat,
                      n0 - c0, ldc, nb)
            else:
                # the last panel of the weight has fewer than NBLK blocks: one at a time
                for b in range(blk, n_blocks):
                    _tile(tag, mr, True, aflat, r0 * lda, lda, wflat, b * wbs, wbs, kq, kt,
                          cflat, n0 - c0 + (b - blk) * nb, ldc, nb)
        # the epilogue runs over whole rows of the task's columns (up to COL_BLOCK wide):
        # its loops vectorise (a 48-wide tile row is shorter than LLVM's unrolled
        # 64-element vector body and would run in the scalar remainder loop)
        _epilogue_tile(cflat, ldc, mr, c1 - c0, r0, c0, n, p, of, oq, oi, res, fbuf)


@njit(parallel=True, cache=True)
def _run_par(tag, a, w, n, row_block, col_block, p, outf, outq, outi):
    """All tasks, in parallel (one compiled specialisation per backend: every argument
    has the same type in every call, whatever the mode and post-ops) on the threads
    ``numba.get_num_threads()`` gives (:func:`_run` sets it per call)."""
    m = a.shape[0]
    nb = w.shape[2]
    mr_max = _uk_dims(len(tag), nb)[0]
    n_rb = (m + row_block - 1) // row_block
    n_cb = (n + col_block - 1) // col_block
    for t in prange(n_rb * n_cb):
        cbuf = np.empty((mr_max, col_block), np.int32)
        fbuf = np.empty(col_block, np.float32)
        _task(tag, t, a, w, n, n_cb, row_block, col_block, p, outf, outq, outi, cbuf, fbuf)


@njit(cache=False)
def _swap_threads(n):
    """``numba.set_num_threads(n)`` (thread-local: the next parallel region launched from
    this thread uses ``n`` threads), returning the previous count. Jitted: about 0.3 us a
    call from Python, against ~2 us for the Python-level get/set pair; not cached (Numba
    cannot cache the thread-count calls) but tiny to compile."""
    before = numba.get_num_threads()
    numba.set_num_threads(n)
    return before


@njit(cache=False)
def _num_threads():
    """``numba.get_num_threads()``, jitted (a quarter of the Python call's cost)."""
    return numba.get_num_threads()


@njit(cache=True)
def _run_serial(tag, a, w, n, row_block, col_block, p, outf, outq, outi):
    """:func:`_run_par` on the calling thread (small problems)."""
    m = a.shape[0]
    nb = w.shape[2]
    mr_max = _uk_dims(len(tag), nb)[0]
    n_rb = (m + row_block - 1) // row_block
    n_cb = (n + col_block - 1) // col_block
    cbuf = np.empty((mr_max, col_block), np.int32)
    fbuf = np.empty(col_block, np.float32)
    for t in range(n_rb * n_cb):
        _task(tag, t, a, w, n, n_cb, row_block, col_block, p, outf, outq, outi, cbuf, fbuf)


# ---------------------------------------------------------------------------------------
# Packing (compile time)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedInt8Weight:
    """A constant s8 weight ``(K, N)`` packed for one backend's micro-kernel (built once,
    at compile time, by :func:`pack_int8_weight`).

    Attributes:
        data: int8 ``(n_blocks, Kp // 4, NB, 4)`` C-contiguous, ``data[b, q, j, t] =
            w[4q + t, b*NB + j]``; ``Kp`` = K rounded up to a multiple of 4, ``NB`` = 16 for
            ``avx512_vnni`` and ``portable``, 8 for ``avx_vnni``; ``n_blocks`` =
            ``ceil(N / NB)``. All padding (k >= K, n >= N) is zero.
        k, n: the weight's shape.
        col_sums: int32 ``(N,)``, ``sum_k w[k, n]`` (the activation zero-point term).
        scale: float32 ``(N,)``, the per-output-channel weight scale (zero point 0).
        backend: the backend whose micro-kernel this layout is for.
    """

    data: np.ndarray
    k: int
    n: int
    col_sums: np.ndarray
    scale: np.ndarray
    backend: str

    @property
    def nb(self) -> int:
        return self.data.shape[2]

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.col_sums.nbytes + self.scale.nbytes


def _check_scale(name, s, n):
    """``s`` (scalar or ``(n,)``) as float32 ``(n,)``, every element finite and > 0."""
    arr = np.asarray(s)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise ValueError(f"{name} must be a positive float (or an array of them), got "
                         f"dtype {arr.dtype}")
    if arr.ndim == 0:
        arr = np.full(n, arr, np.float32)
    elif arr.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have shape ({n},), got {arr.shape}")
    arr = np.ascontiguousarray(arr, np.float32)
    bad = ~(np.isfinite(arr) & (arr > 0))
    if bad.any():
        raise ValueError(f"{name} must be finite and > 0, got {arr[bad][0]!r} "
                         f"(at index {int(np.flatnonzero(bad)[0])})")
    return arr


def _check_scalar_scale(name, s):
    if isinstance(s, np.ndarray) and s.ndim != 0:
        raise ValueError(f"{name} must be a scalar (per-tensor), got shape {s.shape}")
    try:
        v = np.float32(s)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive float, got {s!r}") from None
    if isinstance(s, (bool, np.bool_)) or not (np.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be finite and > 0, got {s!r}")
    return v


def _check_int(name, v, lo, hi):
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v[()]
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {v!r}")
    return int(v)


def pack_int8_weight(w_s8, scale, backend=None) -> PackedInt8Weight:
    """Pack a constant int8 weight ``w_s8`` ``(K, N)`` with per-channel ``scale`` (``(N,)``
    or a scalar, every value finite and > 0) for ``backend`` (default
    :func:`int8_backend`). Done once, at compile time: the layout, the zero padding and the
    column sums are all the per-call kernel needs from the weight."""
    if not isinstance(w_s8, np.ndarray):
        raise ValueError(f"w_s8 must be a numpy int8 array, got {type(w_s8).__name__}")
    if w_s8.dtype != np.int8:
        raise ValueError(f"w_s8 must be int8 (symmetric signed weights), got {w_s8.dtype}")
    if w_s8.ndim != 2 or w_s8.shape[0] < 1 or w_s8.shape[1] < 1:
        raise ValueError(f"w_s8 must be 2-D (K, N) with K, N >= 1, got shape {w_s8.shape}")
    k, n = w_s8.shape
    if k > MAX_K:
        raise ValueError(f"w_s8 has K={k} > {MAX_K}: the int32 sums could overflow")
    backend = _resolve_backend(backend)
    scale = _check_scale("scale", scale, n)
    nb = _LANES[backend]
    kp = -(-k // 4) * 4
    n_blocks = -(-n // nb)
    padded = np.zeros((kp, n_blocks * nb), np.int8)
    padded[:k, :n] = w_s8
    # (Kp, NBk*NB) -> (Kp/4, 4, NBk, NB) -> (NBk, Kp/4, NB, 4)
    data = np.ascontiguousarray(padded.reshape(kp // 4, 4, n_blocks, nb).transpose(2, 0, 3, 1))
    col_sums = w_s8.sum(axis=0, dtype=np.int64).astype(np.int32)
    return PackedInt8Weight(data=data, k=int(k), n=int(n), col_sums=col_sums, scale=scale,
                            backend=backend)


# ---------------------------------------------------------------------------------------
# Calls
# ---------------------------------------------------------------------------------------


def _check_pw(pw):
    if not isinstance(pw, PackedInt8Weight):
        raise ValueError(f"pw must be a PackedInt8Weight (from pack_int8_weight), got "
                         f"{type(pw).__name__}")
    if pw.backend not in _AVAILABLE:
        raise ValueError(f"pw was packed for backend {pw.backend!r}, not available here")
    return pw


def _check_a(a, pw):
    if not isinstance(a, np.ndarray):
        raise ValueError(f"a_u8 must be a numpy uint8 array, got {type(a).__name__}")
    if a.dtype != np.uint8:
        raise ValueError(f"a_u8 must be uint8 (quantised activations), got {a.dtype}")
    if a.ndim != 2 or a.shape[1] != pw.k:
        raise ValueError(f"a_u8 must be (M, {pw.k}) to match the packed weight (K={pw.k}), "
                         f"got shape {a.shape}")
    # K need not be a multiple of 4: the micro-kernel reads the K tail byte by byte
    return np.ascontiguousarray(a)


def _check_f32(name, x, shape):
    if x is None:
        return None
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy float32 array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise ValueError(f"{name} must be float32, got {x.dtype}")
    if x.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {x.shape}")
    return np.ascontiguousarray(x)


def _blocks(m, n, pw, n_threads):
    """(row_block, col_block) of the tasks: at most ROW_BLOCK x COL_BLOCK, shrunk (rows
    first, in whole micro-tiles) until there are >= 2 tasks per thread where possible
    (``n_threads`` <= 1: never shrunk)."""
    mr, nblk = _UK_SHAPE[_VW[pw.backend]]
    nr = nblk * pw.nb
    cb = max(nr, COL_BLOCK // nr * nr)
    rb = ROW_BLOCK
    target = 2 * n_threads if n_threads > 1 else 0
    while rb > mr and (-(-m // rb)) * (-(-n // cb)) < target:
        rb = max(mr, (rb // 2) // mr * mr)
    while cb > nr and (-(-m // rb)) * (-(-n // cb)) < target:
        cb = max(nr, (cb // 2) // nr * nr)
    return rb, cb


def auto_threads(m, n, k, n_threads=None) -> int:
    """How many threads a ``(m, k) @ (k, n)`` call uses by default: 1 (the calling thread,
    no parallel region) below :data:`SERIAL_MACS` of work ``m * n * (k + EPILOGUE_MACS)``,
    else all ``n_threads`` (default ``numba.get_num_threads()``) -- nothing in between.

    Why not fewer threads for smaller layers: measured on a 16-core Xeon VM (OpenMP
    layer), every DLRM layer above the threshold ran fastest on all 16 threads in
    isolation (K = 13, 128 x 512: 68 us on 1, 59 on 2, 25 on 16), and inside a graph a
    layer on fewer threads lets the idle ones fall asleep, so that the next layer on all
    of them pays to wake them: a 40 us layer took 600 us after a 2-thread one. A graph whose
    layers all use the same team keeps it spinning from layer to layer."""
    if n_threads is None:
        n_threads = numba.get_num_threads()
    if m * n * (k + EPILOGUE_MACS) < SERIAL_MACS:
        return 1
    return int(max(1, n_threads))


def _check_threads(threads):
    if threads is None:
        return None
    if isinstance(threads, (bool, np.bool_)) or not isinstance(threads, (int, np.integer)) \
            or threads < 1:
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    return int(threads)


_EMPTY_F2 = np.empty((0, 0), np.float32)
_EMPTY_U2 = np.empty((0, 0), np.uint8)
_EMPTY_I2 = np.empty((0, 0), np.int32)
_EMPTY_I32 = np.empty(0, np.int32)
_EMPTY_F1 = np.empty(0, np.float32)


def _schedule(m, pw, threads, cap=None):
    """``(row_block, col_block, n_threads, cap)`` of a call on ``m`` rows: ``threads``
    None picks :func:`auto_threads`; any value is capped at ``cap`` (default
    ``numba.get_num_threads()``, the threads the caller may use)."""
    if cap is None:
        cap = _num_threads()
    nt = auto_threads(m, pw.n, pw.k, cap) if threads is None else min(threads, cap)
    rb, cb = _blocks(m, pw.n, pw, nt)
    return rb, cb, nt, cap


def _params(mode, comp=_EMPTY_I32, dscale=_EMPTY_F1, bias=None, act=ACT_NONE,
            residual=None, out_scale=1.0, out_zp=0, row_scale=_EMPTY_F1, row_zp=_EMPTY_I32):
    """The per-call parameter tuple of the drivers (absent operands as empty arrays +
    flags, so that every call has the same Numba types)."""
    return (int(mode), comp, dscale, _EMPTY_F1 if bias is None else bias, bias is not None,
            int(act), _EMPTY_F2 if residual is None else residual, residual is not None,
            np.float32(out_scale), np.int32(out_zp), row_scale, row_zp)


def _run(a, pw, p, sched, outf=_EMPTY_F2, outq=_EMPTY_U2, outi=_EMPTY_I2):
    """Run the kernel on the schedule ``sched`` (from :func:`_schedule`): on the calling
    thread if it has one thread, else on that many."""
    if a.shape[0] == 0:
        return
    rb, cb, nt, cap = sched
    _on_threads(nt, cap, _run_serial, _run_par,
                (_TAG[pw.backend], a, pw.data, pw.n, rb, cb, p, outf, outq, outi))


def _on_threads(nt, cap, serial, parallel, args):
    """``serial(*args)`` on the calling thread if ``nt <= 1``, else ``parallel(*args)`` on
    ``nt`` of the ``cap`` threads the caller may use (``serial`` and ``parallel``: the same
    jitted body without and with ``parallel=True``)."""
    if nt <= 1:
        serial(*args)
    elif nt == cap:
        parallel(*args)
    else:
        # a parallel region with fewer threads than the pool wakes only those it needs
        before = _swap_threads(nt)
        try:
            parallel(*args)
        finally:
            _swap_threads(before)


def _launch(a, pw, mode, comp=_EMPTY_I32, dscale=_EMPTY_F1, bias=None, act=ACT_NONE,
            residual=None, out_scale=1.0, out_zp=0, outf=_EMPTY_F2, outq=_EMPTY_U2,
            outi=_EMPTY_I2, threads=None):
    """Run the kernel: :func:`_params`, :func:`_schedule` and :func:`_run` in one."""
    p = _params(mode, comp, dscale, bias, act, residual, out_scale, out_zp)
    _run(a, pw, p, _schedule(a.shape[0], pw, threads), outf, outq, outi)


def qmatmul_s32(a_u8, pw, out=None, *, threads=None) -> np.ndarray:
    """The exact integer kernel: ``out[m, n] = sum_k a_u8[m, k] * w[k, n]`` as int32
    (no zero-point compensation), ``a_u8`` ``(M, K)`` uint8, ``pw`` from
    :func:`pack_int8_weight`. Equal, bit for bit, on every backend and thread count
    (``threads``: None picks :func:`auto_threads`, 1 runs on the calling thread)."""
    pw = _check_pw(pw)
    a = _check_a(a_u8, pw)
    out = check_out(out, (a.shape[0], pw.n), np.int32)
    _launch(a, pw, 0, outi=out, threads=_check_threads(threads))
    return out


class QMatMulPlan:
    """A :func:`qmatmul` with everything but the activations (and the residual) fixed:
    validated, and the per-column terms (``a_scale * w_scale[n]``, ``za * col_sums[n]``)
    computed, once -- at graph compile time. Calling it costs only the checks of ``a_u8``,
    ``residual`` and ``out`` and the kernel (a few us less than :func:`qmatmul` per call,
    which matters for small layers); the schedule (task blocks, thread count) of each row
    count is computed on its first call and kept.

    ``plan(a_u8, residual=None, out=None)`` returns what
    ``qmatmul(a_u8, a_scale, a_zero_point, pw, bias, act, residual, out_scale,
    out_zero_point, out, threads=threads)`` returns. Immutable after construction (but for
    the schedule cache); safe to call from several threads at once (each call allocates
    its own scratch).
    """

    __slots__ = ("_comp", "_dscale", "_p", "_sched", "a_scale", "a_zero_point", "act", "bias",
                 "out_scale", "out_zero_point", "pw", "threads")

    def __init__(self, pw, a_scale, a_zero_point, bias=None, act=ACT_NONE, out_scale=None,
                 out_zero_point=0, *, threads=None):
        self.pw = _check_pw(pw)
        self.a_scale = _check_scalar_scale("a_scale", a_scale)
        self.a_zero_point = _check_int("a_zero_point", a_zero_point, 0, 255)
        self.bias = _check_f32("bias", bias, (pw.n,))
        self.act = check_act(act)
        self.threads = _check_threads(threads)
        if out_scale is None:
            if out_zero_point not in (0, None):
                raise ValueError("out_zero_point needs out_scale (a float32 output has no "
                                 "zero point)")
            self.out_scale = None
            self.out_zero_point = 0
        else:
            self.out_scale = _check_scalar_scale("out_scale", out_scale)
            self.out_zero_point = _check_int("out_zero_point", out_zero_point, 0, 255)
        # per column: a_scale * w_scale (rounded to float32 once) and za * col_sum
        self._dscale = (np.float32(self.a_scale) * pw.scale).astype(np.float32)
        self._comp = (pw.col_sums.astype(np.int64) * self.a_zero_point).astype(np.int32)
        # the driver's parameters without a residual (with one, they are built per call)
        self._p = self._params(None)
        self._sched = {}

    def _params(self, residual):
        if self.out_scale is None:
            return _params(1, self._comp, self._dscale, self.bias, self.act, residual)
        return _params(2, self._comp, self._dscale, self.bias, self.act, residual,
                       self.out_scale, self.out_zero_point)

    def schedule(self, m):
        """``(row_block, col_block, threads, cap)`` of a call on ``m`` rows (cached per
        ``m`` and per ``cap = numba.get_num_threads()``)."""
        cap = _num_threads()
        sched = self._sched.get((m, cap))
        if sched is None:
            sched = self._sched[(m, cap)] = _schedule(m, self.pw, self.threads, cap)
        return sched

    def __call__(self, a_u8, residual=None, out=None) -> np.ndarray:
        pw = self.pw
        a = _check_a(a_u8, pw)
        m, n = a.shape[0], pw.n
        residual = _check_f32("residual", residual, (m, n))
        p = self._p if residual is None else self._params(residual)
        if self.out_scale is None:
            out = check_out(out, (m, n), np.float32)
            if np.may_share_memory(out, a_u8):
                raise ValueError("out must not overlap a_u8")
            _run(a, pw, p, self.schedule(m), outf=out)
        else:
            out = check_out(out, (m, n), np.uint8)
            if np.may_share_memory(out, a_u8):
                raise ValueError("out must not overlap a_u8")
            if residual is not None and np.may_share_memory(out, residual):
                raise ValueError("out (uint8) must not overlap residual")
            _run(a, pw, p, self.schedule(m), outq=out)
        return out


def qmatmul(a_u8, a_scale, a_zero_point, pw, bias=None, act=ACT_NONE, residual=None,
            out_scale=None, out_zero_point=0, out=None, *, threads=None) -> np.ndarray:
    """Quantised ``act((a - za) a_scale @ W + bias) + residual``, optionally requantised.

    ``y[m, n] = a_scale * pw.scale[n] * (acc[m, n] - za * pw.col_sums[n]) + bias[n]``
    (``acc`` from the u8 x s8 -> s32 kernel; the product ``a_scale * scale[n]`` is rounded to
    float32 once per column), then the activation (an ``ACT_*`` code of
    :mod:`blasst_ref.graph.kernels`), then ``+ residual``. With ``out_scale`` None the
    result is float32 ``(M, N)``; otherwise it is requantised to uint8 exactly as
    :func:`blasst_ref.graph.ops.quantize_array` does:
    ``clip(round_half_even(y / out_scale) + out_zero_point, 0, 255)`` (NaN -> zero point).
    Every step runs on a strip of output rows in L1 before its store: no float32 ``(M, N)``
    temporary.

    Args:
        a_u8: ``(M, K)`` uint8. a_scale: float > 0. a_zero_point: int in [0, 255].
        pw: a :class:`PackedInt8Weight`. bias: float32 ``(N,)`` or None.
        act: an ``ACT_*`` code.
        residual: float32 ``(M, N)`` or None (may be ``out`` when the output is float32).
        out_scale: float > 0, or None for a float32 output. out_zero_point: int in [0, 255].
        out: the output array (float32 or uint8 ``(M, N)``, C-contiguous) or None.
        threads: how many threads run it: None (default) picks :func:`auto_threads` from
            the problem's size, 1 runs it on the calling thread; capped at
            ``numba.get_num_threads()``. The result is the same bit for bit.

    For repeated calls with the same weight and quantisation parameters (a compiled
    graph), build a :class:`QMatMulPlan` once instead.
    """
    plan = QMatMulPlan(pw, a_scale, a_zero_point, bias, act, out_scale, out_zero_point,
                       threads=threads)
    return plan(a_u8, residual, out)


# ---------------------------------------------------------------------------------------
# Quantize (float32 -> u8 / s8, per tensor): the activations' entry into an int8 graph
# ---------------------------------------------------------------------------------------

#: Below this many elements a :func:`quantize` call runs on the calling thread, above it
#: on all of Numba's threads (the same all-or-one rule as :func:`auto_threads`).
QUANT_SERIAL_ELEMS = 1 << 15
_QRANGE = {"uint8": (0, 255), "int8": (-128, 127)}


@njit(cache=True)
def _quantize_span(x, out, i0, i1, scale, zp, lo, hi):
    """``out[i] = clip(rint(x[i] / scale) + zp, lo, hi)`` (NaN -> zp) for ``i0 <= i < i1``
    on flat arrays: float32 IEEE division, as :func:`~.ops.quantize_array` and the
    requantising epilogue compute it (no fast-math: bit-exact)."""
    for i in range(np.uint64(i0), np.uint64(i1)):
        q = np.rint(x[i] / scale)
        if np.isnan(q):
            q = np.float32(0.0)
        q = min(max(q + zp, lo), hi)
        out[i] = np.int32(q)


@njit(parallel=True, cache=True)
def _quantize_par(x, out, chunk, scale, zp, lo, hi):
    """:func:`_quantize_span` over chunks of ``chunk`` elements, in parallel."""
    n = x.size
    for c in prange((n + chunk - 1) // chunk):
        _quantize_span(x, out, c * chunk, min(n, (c + 1) * chunk), scale, zp, lo, hi)


@njit(cache=True)
def _quantize_serial(x, out, chunk, scale, zp, lo, hi):
    """:func:`_quantize_par`'s twin on the calling thread (``chunk`` unused: one span)."""
    _quantize_span(x, out, 0, x.size, scale, zp, lo, hi)


def quantize(x, scale, zero_point, dtype="uint8", out=None, *, threads=None) -> np.ndarray:
    """Per-tensor ``saturate(round_half_even(x / scale) + zero_point)`` of a float32 ``x``
    as ``dtype`` (``"uint8"`` or ``"int8"``): bit for bit what
    :func:`blasst_ref.graph.ops.quantize_array` returns (NaN -> the zero point), in one
    compiled pass instead of numpy's five (the compiled graph's ``Quantize`` step).

    ``out``: a C-contiguous array of ``dtype`` and ``x``'s shape, or None. ``threads``:
    None picks 1 below :data:`QUANT_SERIAL_ELEMS` elements, else all; 1 runs on the
    calling thread; capped at ``numba.get_num_threads()``."""
    if dtype not in _QRANGE:
        raise ValueError(f"dtype must be 'uint8' or 'int8', got {dtype!r}")
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise ValueError(f"x must be a numpy float32 array, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    scale = _check_scalar_scale("scale", scale)
    lo, hi = _QRANGE[dtype]
    zp = _check_int("zero_point", zero_point, lo, hi)
    out = check_out(out, x.shape, np.dtype(dtype))
    threads = _check_threads(threads)
    quantize_unchecked(np.ascontiguousarray(x).reshape(-1), out.reshape(-1), scale, zp, lo, hi,
                  threads)
    return out


def quantize_unchecked(xf, of, scale, zp, lo, hi, threads=None):
    """:func:`quantize` without its argument checks, for a caller that checked once: ``xf``
    a flat C-contiguous float32 array, ``of`` a flat array of ``xf``'s size and the target
    dtype, ``lo``/``hi`` that dtype's range, ``scale`` finite and > 0, ``zp`` in
    ``[lo, hi]``; ``threads`` as for :func:`quantize`. The compiled graph's ``Quantize``
    step calls this on every run."""
    n = xf.size
    cap = _num_threads()
    nt = (1 if n < QUANT_SERIAL_ELEMS else cap) if threads is None else min(threads, cap)
    chunk = -(-n // (2 * nt))
    _on_threads(nt, cap, _quantize_serial, _quantize_par,
                (xf, of, chunk, np.float32(scale), np.float32(zp), np.float32(lo),
                 np.float32(hi)))


# ---------------------------------------------------------------------------------------
# Dynamic quantization: per-row (per-token) u8 scales computed at run time
# ---------------------------------------------------------------------------------------


#: order keys of float32 bit patterns (:func:`_row_range`): +inf's key; -inf's key
_KEY_POS_INF = 0x7F800000
_KEY_NEG_INF = -0x7F800001


@njit(cache=True)
def _row_range(bits, i, n, kf):
    """Whether row ``i`` of a float32 array viewed as int32 ``bits`` is all finite; if so,
    ``kf`` (float32 ``(2,)``, scratch) gets ``lo = min(0, min row)`` and ``hi = max(0, max
    row)``.

    On integer *order keys* ``b ^ ((b >> 31) & 0x7FFFFFFF)`` of the bit patterns ``b``
    (signed order of the keys = numeric order of finite floats, with -0 < +0; +inf and
    positive NaNs at or above +inf's key, -inf and negative NaNs at or below -inf's): an
    integer min/max reduction, which LLVM vectorises (a float one it keeps scalar without
    fast-math), and the finiteness test comes with it."""
    row = bits[i]
    lo = np.int64(0)  # the key of +0.0
    hi = np.int64(0)
    for j in range(n):
        b = np.int64(row[j])
        k = b ^ ((b >> 31) & 0x7FFFFFFF)
        lo = min(lo, k)
        hi = max(hi, k)
    kb = kf.view(np.int32)
    kb[0] = np.int32(lo ^ ((lo >> 31) & 0x7FFFFFFF))  # the key's own inverse
    kb[1] = np.int32(hi ^ ((hi >> 31) & 0x7FFFFFFF))
    return hi < _KEY_POS_INF and lo > _KEY_NEG_INF


@njit(cache=True)
def _quantize_row(x, bits, i, q, rscale, rzp, kf):
    """Row ``i`` of ``x`` to u8 with its own scale and zero point, as ONNX's
    ``DynamicQuantizeLinear`` does for a whole tensor: ``lo = min(0, min x)``, ``hi =
    max(0, max x)``, ``scale = (hi - lo) / 255``, ``zp = rint(clip(-lo / scale, 0, 255))``,
    ``q = clip(rint(x / scale) + zp, 0, 255)`` -- float32 IEEE arithmetic, round half to
    even (bit for bit :func:`blasst_ref.graph.ops_dynamic.quantize_rows_array`). A row of
    zeros, or one holding an inf or a NaN, gets scale 1 and zero point 0 (NaN -> 0).

    Two vectorised passes over the row (in L1): the range (:func:`_row_range`), then the
    quantization (IEEE division: no fast-math, bit-exact). ``kf``: float32 ``(2,)``
    scratch."""
    row = x[i]
    n = row.shape[0]
    qi = q[i]
    if not _row_range(bits, i, n, kf):
        rscale[i] = np.float32(1.0)
        rzp[i] = 0
        for j in range(n):
            v = np.rint(row[j])
            if np.isnan(v):
                v = np.float32(0.0)
            qi[j] = np.uint8(min(max(v, np.float32(0.0)), np.float32(255.0)))
        return
    lo = kf[0]
    hi = kf[1]
    scale = (hi - lo) / np.float32(255.0)
    if not (scale > np.float32(0.0)) or not np.isfinite(scale):
        scale = np.float32(1.0)
        zp = np.float32(0.0)
    else:
        zp = np.rint(min(max(-lo / scale, np.float32(0.0)), np.float32(255.0)))
    rscale[i] = scale
    rzp[i] = np.int32(zp)
    for j in range(n):  # finite row: no NaN to test for
        v = np.rint(row[j] / scale)
        qi[j] = np.uint8(min(max(v + zp, np.float32(0.0)), np.float32(255.0)))


@njit(parallel=True, cache=True)
def _quantize_rows_par(x, q, rscale, rzp):
    bits = x.view(np.int32)
    m = x.shape[0]
    chunks = min(m, 64)
    for c in prange(chunks):
        kf = np.empty(2, np.float32)
        for i in range(c * m // chunks, (c + 1) * m // chunks):
            _quantize_row(x, bits, i, q, rscale, rzp, kf)


@njit(cache=True)
def _quantize_rows_serial(x, q, rscale, rzp):
    bits = x.view(np.int32)
    kf = np.empty(2, np.float32)
    for i in range(x.shape[0]):
        _quantize_row(x, bits, i, q, rscale, rzp, kf)


def quantize_rows(x, *, threads=None):
    """Per-row dynamic u8 quantization of a float32 ``x`` ``(M, K)``: ``(q, scale, zero
    point)`` with ``q`` uint8 ``(M, K)``, ``scale`` float32 ``(M,)``, ``zero point`` int32
    ``(M,)``; each row as ONNX ``DynamicQuantizeLinear`` quantizes a tensor (see
    :func:`_quantize_row`). Rows in parallel above :data:`QUANT_SERIAL_ELEMS` elements."""
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2:
        raise ValueError(f"x must be a 2-D float32 array, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    x = np.ascontiguousarray(x)
    m = x.shape[0]
    q = np.empty(x.shape, np.uint8)
    rscale = np.empty(m, np.float32)
    rzp = np.empty(m, np.int32)
    cap = _num_threads()
    nt = (1 if x.size < QUANT_SERIAL_ELEMS else cap) if threads is None else \
        min(_check_threads(threads), cap)
    _on_threads(nt, cap, _quantize_rows_serial, _quantize_rows_par, (x, q, rscale, rzp))
    return q, rscale, rzp


@njit(parallel=True, cache=True)
def _run_par_dynamic(tag, x, q, rscale, rzp, w, n, row_block, col_block, p, outf, outq,
                     outi):
    """Dynamic int8 in one parallel region: each task owns ``row_block`` rows, quantizes
    them (:func:`_quantize_row` into ``q``, ``rscale``, ``rzp``, which ``p`` holds too)
    and then runs every column block of those rows (:func:`_task`, mode 3) while the
    quantized rows are hot in L1/L2 -- one pass over ``x`` and one fork/join per call,
    instead of a quantize region and a kernel region."""
    m = x.shape[0]
    nb = w.shape[2]
    mr_max = _uk_dims(len(tag), nb)[0]
    n_rb = (m + row_block - 1) // row_block
    n_cb = (n + col_block - 1) // col_block
    bits = x.view(np.int32)
    for rb in prange(n_rb):
        kf = np.empty(2, np.float32)
        for i in range(rb * row_block, min(m, (rb + 1) * row_block)):
            _quantize_row(x, bits, i, q, rscale, rzp, kf)
        cbuf = np.empty((mr_max, col_block), np.int32)
        fbuf = np.empty(col_block, np.float32)
        for cb in range(n_cb):
            _task(tag, rb * n_cb + cb, q, w, n, n_cb, row_block, col_block, p, outf, outq,
                  outi, cbuf, fbuf)


def dynamic_row_blocks(m, pw, threads):
    """Rows per task of the one-region dynamic driver (:func:`_run_par_dynamic`): the
    fewest equal blocks of whole micro-kernel strips, at most :data:`ROW_BLOCK` rows each,
    whose count is a multiple of ``threads`` (every thread the same rows); None where
    ``m`` has fewer strips than ``threads`` (the two-region path then runs)."""
    mr = _UK_SHAPE[_VW[pw.backend]][0]
    strips = -(-m // mr)
    if threads <= 1 or strips < threads:
        return None
    tasks = threads
    while True:
        rb = -(-strips // tasks) * mr
        if rb <= ROW_BLOCK or rb <= mr:
            return rb
        tasks += threads


class DynamicQMatMulPlan:
    """``act(x @ W + bias) + residual`` with ``x`` float32 quantized per row at run time
    (dynamic quantization, docs/DESIGN.md §7.4): each call quantizes the rows of ``x``
    (:func:`quantize_rows`: one pass over ``x``; on all threads, inside the kernel's own
    parallel region, each task its own rows: :func:`_run_par_dynamic`), then runs the
    u8 x s8 -> s32 kernel whose
    epilogue dequantises every output with its row's scale and zero point --
    ``y[m, n] = (row_scale[m] * w_scale[n]) * (acc[m, n] - row_zp[m] * col_sums[n])`` --
    adds the bias, activates, adds the residual and stores float32. Built once per weight
    (compile time); safe to call from several threads (each call allocates its scratch)."""

    __slots__ = ("_sched", "act", "bias", "pw", "threads")

    def __init__(self, pw, bias=None, act=ACT_NONE, *, threads=None):
        self.pw = _check_pw(pw)
        self.bias = _check_f32("bias", bias, (pw.n,))
        self.act = check_act(act)
        self.threads = _check_threads(threads)
        self._sched = {}

    def __call__(self, x, residual=None, out=None) -> np.ndarray:
        pw = self.pw
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2 or \
                x.shape[1] != pw.k:
            raise ValueError(f"x must be a float32 (M, {pw.k}) array, got "
                             f"{getattr(x, 'dtype', type(x).__name__)} "
                             f"{getattr(x, 'shape', '')}")
        m, n = x.shape[0], pw.n
        residual = _check_f32("residual", residual, (m, n))
        out = check_out(out, (m, n), np.float32)
        if np.may_share_memory(out, x):
            raise ValueError("out must not overlap x")
        if m == 0:
            return out
        cap = _num_threads()
        sched = self._sched.get((m, cap))
        if sched is None:
            sched = _schedule(m, pw, self.threads, cap)
            nt = sched[2]
            rows = dynamic_row_blocks(m, pw, nt) if nt == cap else None
            sched = self._sched[(m, cap)] = (sched, rows)
        sched, rows = sched
        if rows is not None:  # one parallel region: quantize + product per row block
            q = np.empty(x.shape, np.uint8)
            rscale = np.empty(m, np.float32)
            rzp = np.empty(m, np.int32)
            p = _params(3, pw.col_sums, pw.scale, self.bias, self.act, residual,
                        row_scale=rscale, row_zp=rzp)
            cb = _blocks(m, n, pw, 1)[1]
            _run_par_dynamic(_TAG[pw.backend], np.ascontiguousarray(x), q, rscale, rzp,
                             pw.data, n, rows, cb, p, out, _EMPTY_U2, _EMPTY_I2)
            return out
        q, rscale, rzp = quantize_rows(x, threads=self.threads)
        p = _params(3, pw.col_sums, pw.scale, self.bias, self.act, residual,
                    row_scale=rscale, row_zp=rzp)
        _run(q, pw, p, sched, outf=out)
        return out


def qmatmul_dynamic(x, pw, bias=None, act=ACT_NONE, residual=None, out=None, *,
                    threads=None) -> np.ndarray:
    """One call of :class:`DynamicQMatMulPlan`: ``x`` float32 ``(M, K)`` quantized per row,
    times the packed s8 weight ``pw``, post-ops, float32 ``(M, N)`` out."""
    return DynamicQMatMulPlan(pw, bias, act, threads=threads)(x, residual, out)


# ---------------------------------------------------------------------------------------
# Introspection
# ---------------------------------------------------------------------------------------


_ASM_CACHE: dict[str, str] = {}


def asm_of_kernel(backend=None) -> str:
    """The assembly of the micro-kernel of ``backend`` (default: the detected one): a tiny
    function running one full ``MR x NR`` tile, the same intrinsic the drivers inline. On
    a VNNI backend it contains ``vpdpbusd`` (zmm or ymm registers).

    Numba keeps no assembly for cached code, so this compiles that function without the
    cache (about a second, once per process and backend)."""
    backend = _resolve_backend(backend)
    if backend not in _ASM_CACHE:
        pw = pack_int8_weight(np.ones((4, 1), np.int8), 1.0, backend=backend)
        mr, nblk = _UK_SHAPE[_VW[backend]]
        nr = nblk * pw.nb
        a = np.ones((mr, 4), np.uint8).reshape(-1)
        w = np.ones(nblk * pw.data.size, np.int8)
        c = np.zeros((mr, nr), np.int32).reshape(-1)
        probe = njit(cache=False)(_probe_py)
        probe(_TAG[backend], a, w, c, pw.data.size, nr, pw.nb)
        if not (c == 4).all():  # pragma: no cover - a self-check of the probe
            raise RuntimeError(f"kernel probe computed {c[:4]}..., expected 4s")
        _ASM_CACHE[backend] = probe.inspect_asm(probe.signatures[0])
    return _ASM_CACHE[backend]


def _probe_py(tag, a, w, c, wbs, ldc, nb):
    """One full ``MR x NR`` tile of the backend's micro-kernel, K = 4 (for
    :func:`asm_of_kernel`)."""
    _tile(tag, a.size // 4, False, a, 0, 4, w, 0, wbs, 1, 0, c, 0, ldc, nb)


def vnni_peak_macs_per_cycle(backend=None) -> int:
    """u8 x s8 multiply-adds per cycle per core of one ``vpdpbusd`` per cycle at the
    backend's width: 64 (zmm: 16 lanes x 4), 32 (ymm); the issue rate is a property of the
    core (Zen 4: one zmm or two ymm per cycle; Ice Lake / Sapphire Rapids server cores with
    two FMA units: two zmm per cycle) -- multiply by it and by cores x GHz for a peak."""
    backend = _resolve_backend(backend)
    return {"avx512_vnni": 64, "avx_vnni": 32, "avx2": 16, "portable": 0}[backend]
