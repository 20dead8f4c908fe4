"""Tensor-core and async-copy instructions for Numba CUDA kernels, with simulator twins.

numba-cuda has no matrix-instruction API. Each function here is a Numba ``@intrinsic`` that
emits one PTX instruction as LLVM inline assembly (llvmlite's ``ir.InlineAsm``; a result of
several registers comes back as a literal struct, unpacked into a tuple), so the fragments
stay in registers and a kernel stays one Numba function:

=================================  ===========================================================
``mma_f16`` / ``mma_bf16``         ``mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}...f32``
``ldmatrix_x4(smem, i)``           ``ldmatrix.sync.aligned.m8n8.x4.shared.b16``
``ldmatrix_x4_trans(smem, i)``     the same with ``.trans``
``cp_async16(smem, i, gmem, j, n)`` ``cp.async.cg.shared.global`` of 16 bytes (``n`` = 16, or 0
                                   to zero-fill the destination)
``cp_async_commit()``              ``cp.async.commit_group``
``cp_async_wait_all()``            ``cp.async.wait_group 0``
``pack_f16x2`` / ``pack_bf16x2``   ``cvt.rn.{f16,bf16}x2.f32``: two float32 -> one register
``exp2_approx(x)``                 ``ex2.approx.ftz.f32``
``quad_max`` / ``quad_sum``        reductions over the 4 lanes of a quad (``shfl.xor`` 1, 2)
``warp_all(p)`` / ``warp_sync()``  ``vote.all`` / ``bar.warp.sync`` (warp-level vote, barrier)
``ld_b32(arr, i)``                 a 32-bit load of two 16-bit elements
=================================  ===========================================================

and three building blocks made of them that both attention kernels share:
:func:`make_warp_tile_product`, a warp's ``acc += A @ B`` with B read from shared memory by
``ldmatrix`` (``S = Q K^T`` and ``O += P V``); :func:`make_masked_row_max`, the mask of a
ragged or diagonal tile and the row maxima the skip test reads, on the score fragments; and
:func:`make_online_softmax_step`, the online softmax of one kept tile, from the scores to
``P`` packed as the A operand of ``P V``.

Registers are ``uint32``; shared and global operands are an array and a flat element index
(the instruction gets the element's address). Which lane holds which element of a fragment
is :mod:`.fragments`.

**Simulator twins.** Numba's CUDA simulator runs every thread as a Python thread and cannot
execute PTX. Under ``NUMBA_ENABLE_CUDASIM=1`` each name above is instead a Python function
that does the same thing for the whole warp: the lanes post their registers (or addresses)
to a per-block scratch area, meet at ``cuda.syncthreads()``, and each lane reads back its
part of the result, computed with numpy from the layouts of :mod:`.fragments`. So the
tensor-core kernels run unchanged on the simulator (slowly, at small sizes) and CI checks
their indexing. The price: like every barrier, the twins must be called by *all* threads of
the block the same number of times, which the kernels do anyway (every warp runs the same
instruction sequence). Blocks may have at most ``MAX_WARPS`` warps.
"""

from __future__ import annotations

import math
import threading

import numpy as np
from numba import config, cuda, float32

from . import fragments as F
from .rule import max_nan

#: True on a real GPU (PTX instructions); False on Numba's CUDA simulator (twins).
HARDWARE = not bool(config.ENABLE_CUDASIM)
MAX_WARPS = 8
FULL_MASK = 0xFFFFFFFF

__all__ = ["HARDWARE", "MAX_WARPS", "cp_async16", "cp_async_commit", "cp_async_wait_all",
           "exp2_approx", "ldmatrix_x4", "ldmatrix_x4_trans", "mma_bf16", "mma_f16",
           "pack_bf16x2", "pack_f16x2", "quad_max", "quad_sum", "unpack_lo", "unpack_hi",
           "ld_b32", "warp_all", "warp_sync",
           "a_tile_address", "b_pair_address", "bt_pair_address", "c_coords",
           "make_masked_row_max", "make_online_softmax_step", "make_warp_tile_product"]

# The layouts of :mod:`.fragments`, compiled for the device: one source for the kernels, the
# simulator twins, the numpy tests and the tutorial's pictures.
a_tile_address = cuda.jit(device=True, inline=True)(F.a_tile_address)
b_pair_address = cuda.jit(device=True, inline=True)(F.b_pair_address)
bt_pair_address = cuda.jit(device=True, inline=True)(F.bt_pair_address)
c_coords = cuda.jit(device=True, inline=True)(F.c_coords)


if HARDWARE:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    _I32 = ir.IntType(32)
    _I64 = ir.IntType(64)
    _F32 = ir.FloatType()

    def _asm(builder, ret, args, text, constraints, side_effect):
        fnty = ir.FunctionType(ret, [a.type for a in args])
        return builder.call(ir.InlineAsm(fnty, text, constraints, side_effect=side_effect),
                            args)

    def _u32(context, builder, val, ty):
        return context.cast(builder, val, ty, types.uint32)

    def _element_ptr(context, builder, arrty, arr, idxty, idx):
        ary = context.make_array(arrty)(context, builder, arr)
        i = context.cast(builder, idx, idxty, types.intp)
        return builder.gep(ary.data, [i])

    def _shared_addr(builder, ptr):
        """The 32-bit shared-window address of a generic pointer into shared memory."""
        i8 = ir.IntType(8)
        p = builder.bitcast(ptr, i8.as_pointer())
        p3 = builder.addrspacecast(p, ir.PointerType(i8, 3))
        return builder.ptrtoint(p3, _I32)

    def _make_mma(ab_type: str):
        text = (f"mma.sync.aligned.m16n8k16.row.col.f32.{ab_type}.{ab_type}.f32 "
                "{$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13};")

        @intrinsic
        def mma(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
            if not all(isinstance(x, types.Integer) for x in (a0, a1, a2, a3, b0, b1)):
                return None
            if not all(isinstance(x, types.Float) for x in (c0, c1, c2, c3)):
                return None
            sig = types.UniTuple(types.float32, 4)(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)

            def codegen(context, builder, signature, args):
                tys = signature.args
                regs = [_u32(context, builder, v, t) for v, t in zip(args[:6], tys[:6])]
                accs = [context.cast(builder, v, t, types.float32)
                        for v, t in zip(args[6:], tys[6:])]
                res = _asm(builder, ir.LiteralStructType([_F32] * 4), regs + accs, text,
                           "=f,=f,=f,=f,r,r,r,r,r,r,0,1,2,3", False)
                vals = [builder.extract_value(res, i) for i in range(4)]
                return context.make_tuple(builder, signature.return_type, vals)

            return sig, codegen

        return mma

    mma_f16 = _make_mma("f16")
    mma_bf16 = _make_mma("bf16")
    mma_f16.__doc__ = """``D = A @ B + C`` on one m16n8k16 tile: A in 4 f16x2 registers, B in 2, C
    and the returned D as 4 float32 (layouts: :mod:`.fragments`)."""

    def _make_ldmatrix(trans: bool):
        text = ("ldmatrix.sync.aligned.m8n8.x4" + (".trans" if trans else "")
                + ".shared.b16 {$0,$1,$2,$3}, [$4];")

        @intrinsic
        def ldmatrix(typingctx, smem, idx):
            if not isinstance(smem, types.Array) or smem.dtype.bitwidth != 16 \
                    or not isinstance(idx, types.Integer):
                return None
            sig = types.UniTuple(types.uint32, 4)(smem, idx)

            def codegen(context, builder, signature, args):
                ptr = _element_ptr(context, builder, signature.args[0], args[0],
                                   signature.args[1], args[1])
                res = _asm(builder, ir.LiteralStructType([_I32] * 4),
                           [_shared_addr(builder, ptr)], text, "=r,=r,=r,=r,r,~{memory}",
                           True)
                vals = [builder.extract_value(res, i) for i in range(4)]
                return context.make_tuple(builder, signature.return_type, vals)

            return sig, codegen

        return ldmatrix

    ldmatrix_x4 = _make_ldmatrix(False)
    ldmatrix_x4_trans = _make_ldmatrix(True)

    @intrinsic
    def cp_async16(typingctx, smem, sidx, gmem, gidx, nbytes):
        """Copy 16 bytes from ``gmem`` (flat element ``gidx``) to ``smem`` (flat element
        ``sidx``) asynchronously; ``nbytes`` of them are read (16, or 0: zero-fill)."""
        if not (isinstance(smem, types.Array) and isinstance(gmem, types.Array)):
            return None
        sig = types.none(smem, sidx, gmem, gidx, nbytes)

        def codegen(context, builder, signature, args):
            st, si, gt, gi, nt = signature.args
            sptr = _element_ptr(context, builder, st, args[0], si, args[1])
            gptr = _element_ptr(context, builder, gt, args[2], gi, args[3])
            n = _u32(context, builder, args[4], nt)
            _asm(builder, ir.VoidType(),
                 [_shared_addr(builder, sptr), builder.ptrtoint(gptr, _I64), n],
                 "cp.async.cg.shared.global [$0], [$1], 16, $2;", "r,l,r,~{memory}", True)
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def cp_async_commit(typingctx):
        """Close the group of ``cp_async16`` copies issued since the last commit."""
        sig = types.none()

        def codegen(context, builder, signature, args):
            _asm(builder, ir.VoidType(), [], "cp.async.commit_group;", "~{memory}", True)
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def cp_async_wait_all(typingctx):
        """Wait until this thread's committed copies have landed (``wait_group 0``); a
        barrier is still needed before other threads read them."""
        sig = types.none()

        def codegen(context, builder, signature, args):
            _asm(builder, ir.VoidType(), [], "cp.async.wait_group 0;", "~{memory}", True)
            return context.get_dummy_value()

        return sig, codegen

    def _make_pack(kind: str):
        text = f"cvt.rn.{kind}x2.f32 $0, $2, $1;"  # d.hi = cvt($2), d.lo = cvt($1)

        @intrinsic
        def pack(typingctx, lo, hi):
            if not (isinstance(lo, types.Float) and isinstance(hi, types.Float)):
                return None
            sig = types.uint32(lo, hi)

            def codegen(context, builder, signature, args):
                vals = [context.cast(builder, v, t, types.float32)
                        for v, t in zip(args, signature.args)]
                return _asm(builder, _I32, vals, text, "=r,f,f", False)

            return sig, codegen

        return pack

    pack_f16x2 = _make_pack("f16")
    pack_bf16x2 = _make_pack("bf16")

    @intrinsic
    def exp2_approx(typingctx, x):
        """``2**x`` in float32 (``ex2.approx.ftz``: 2 ulp, subnormals flushed)."""
        if not isinstance(x, types.Float):
            return None
        sig = types.float32(x)

        def codegen(context, builder, signature, args):
            v = context.cast(builder, args[0], signature.args[0], types.float32)
            return _asm(builder, _F32, [v], "ex2.approx.ftz.f32 $0, $1;", "=f,f", False)

        return sig, codegen

    @cuda.jit(device=True, inline=True)
    def _max_nan(a, b):
        return a if (a > b or a != a) else b

    @cuda.jit(device=True, inline=True)
    def quad_max(x):
        """NaN-propagating max over the 4 lanes of this lane's quad (all 4 get it)."""
        x = _max_nan(x, cuda.shfl_xor_sync(FULL_MASK, x, 1))
        return _max_nan(x, cuda.shfl_xor_sync(FULL_MASK, x, 2))

    @cuda.jit(device=True, inline=True)
    def quad_sum(x):
        """Sum over the 4 lanes of this lane's quad (all 4 get it)."""
        x += cuda.shfl_xor_sync(FULL_MASK, x, 1)
        return x + cuda.shfl_xor_sync(FULL_MASK, x, 2)

    @cuda.jit(device=True, inline=True)
    def warp_all(pred):
        """True in every lane iff ``pred`` is true in every lane of the warp."""
        return cuda.all_sync(FULL_MASK, pred)

    @cuda.jit(device=True, inline=True)
    def warp_sync():
        """A barrier (and memory fence) for the lanes of this warp only."""
        cuda.syncwarp(FULL_MASK)

    @intrinsic
    def ld_b32(typingctx, arr, idx):
        """The 32-bit word at flat 16-bit element ``idx`` (even) of a 16-bit array: two
        elements in one register, the earlier one in the lower half."""
        if not isinstance(arr, types.Array) or arr.dtype.bitwidth != 16 \
                or not isinstance(idx, types.Integer):
            return None
        sig = types.uint32(arr, idx)

        def codegen(context, builder, signature, args):
            ptr = _element_ptr(context, builder, signature.args[0], args[0],
                               signature.args[1], args[1])
            return builder.load(builder.bitcast(ptr, _I32.as_pointer()), align=4)

        return sig, codegen

    @cuda.jit(device=True, inline=True)
    def unpack_lo(w):
        """The lower 16 bits of a packed register (the earlier element)."""
        return w & 0xFFFF

    @cuda.jit(device=True, inline=True)
    def unpack_hi(w):
        """The upper 16 bits of a packed register (the later element)."""
        return (w >> 16) & 0xFFFF

else:
    # ---- simulator twins: the same contracts, computed for the whole warp with numpy ----

    _A_ROW = np.array([[F.a_coords(ln, e)[0] for e in range(8)] for ln in range(32)])
    _A_COL = np.array([[F.a_coords(ln, e)[1] for e in range(8)] for ln in range(32)])
    _B_ROW = np.array([[F.b_coords(ln, e)[0] for e in range(4)] for ln in range(32)])
    _B_COL = np.array([[F.b_coords(ln, e)[1] for e in range(4)] for ln in range(32)])
    _C_ROW = np.array([[F.c_coords(ln, e)[0] for e in range(4)] for ln in range(32)])
    _C_COL = np.array([[F.c_coords(ln, e)[1] for e in range(4)] for ln in range(32)])

    def _lane():
        t = cuda.threadIdx.x
        return t // 32, t % 32

    _WARP_BARRIERS: dict = {}
    _WARP_BARRIERS_LOCK = threading.Lock()

    def _warp_barrier(w):
        """A barrier for the 32 lanes of warp ``w`` (the simulator runs one block at a time,
        so one barrier per warp index serves every block). Much cheaper than
        ``cuda.syncthreads()``, which the simulator implements by polling every thread; the
        timeout turns a lane lost to an exception elsewhere into an error, not a hang."""
        with _WARP_BARRIERS_LOCK:
            bar = _WARP_BARRIERS.get(w)
            if bar is None or bar.broken:
                bar = _WARP_BARRIERS[w] = threading.Barrier(32, timeout=120)
        return bar

    def _exchange(values):
        """Post this lane's ``values`` (at most 10 numbers) and meet the other lanes of the
        warp at a barrier; returns the ``(32, 10)`` float64 rows they posted (exact for
        uint32 registers and float32 values). One barrier per call: the scratch is
        double-buffered by the parity of a per-thread call count, which is the same in all
        lanes because every lane makes the same calls."""
        th = threading.current_thread()
        n = getattr(th, "_blasst_twin_calls", 0)
        th._blasst_twin_calls = n + 1
        buf = cuda.shared.array((2, MAX_WARPS, 32, 10), np.float64)
        w, ln = _lane()
        buf[n % 2, w, ln, :len(values)] = values
        _warp_barrier(w).wait()
        return buf[n % 2, w]

    def _halves(words: np.ndarray) -> np.ndarray:
        """``(..., n)`` uint32 words -> ``(..., 2n)`` uint16 halves, lower half first."""
        w = np.asarray(words).astype(np.uint32)
        return np.stack([w & 0xFFFF, w >> 16], axis=-1).reshape(*w.shape[:-1], -1) \
            .astype(np.uint16)

    def _to_f32(bits: np.ndarray, bf16: bool) -> np.ndarray:
        if bf16:
            return (bits.astype(np.uint32) << 16).view(np.float32)
        return bits.view(np.float16).astype(np.float32)

    def _mma_twin(bf16, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        rows = _exchange((a0, a1, a2, a3, b0, b1, c0, c1, c2, c3))
        a = np.zeros((16, 16), np.float32)
        b = np.zeros((16, 8), np.float32)
        c = np.zeros((16, 8), np.float32)
        a[_A_ROW, _A_COL] = _to_f32(_halves(rows[:, :4]), bf16)
        b[_B_ROW, _B_COL] = _to_f32(_halves(rows[:, 4:6]), bf16)
        c[_C_ROW, _C_COL] = rows[:, 6:10]
        d = a @ b + c
        _, ln = _lane()
        return tuple(np.float32(d[_C_ROW[ln, e], _C_COL[ln, e]]) for e in range(4))

    @cuda.jit(device=True)
    def mma_f16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        return _mma_twin(False, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)

    @cuda.jit(device=True)
    def mma_bf16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        return _mma_twin(True, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)

    def _ldmatrix_twin(smem, idx, trans):
        addr = _exchange((idx,))[:, 0].astype(np.int64)
        _, ln = _lane()
        regs = []
        for reg in range(4):
            halves = []
            for half in range(2):
                mat, r, c = F.ldmatrix_coords(ln, reg, half, trans)
                halves.append(int(smem[addr[8 * mat + r] + c]) & 0xFFFF)
            regs.append(np.uint32(halves[0] | (halves[1] << 16)))
        return regs[0], regs[1], regs[2], regs[3]

    @cuda.jit(device=True)
    def ldmatrix_x4(smem, idx):
        return _ldmatrix_twin(smem, idx, False)

    @cuda.jit(device=True)
    def ldmatrix_x4_trans(smem, idx):
        return _ldmatrix_twin(smem, idx, True)

    @cuda.jit(device=True)
    def cp_async16(smem, sidx, gmem, gidx, nbytes):
        n = 16 // smem.dtype.itemsize
        if nbytes:
            for e in range(n):
                smem[sidx + e] = gmem[gidx + e]
        else:
            for e in range(n):
                smem[sidx + e] = 0

    @cuda.jit(device=True)
    def cp_async_commit():
        pass

    @cuda.jit(device=True)
    def cp_async_wait_all():
        pass

    @cuda.jit(device=True)
    def pack_f16x2(lo, hi):
        bits = np.array([lo, hi], np.float32).astype(np.float16).view(np.uint16)
        return np.uint32(int(bits[0]) | (int(bits[1]) << 16))

    def _bf16_bits(x) -> int:
        u = int(np.float32(x).view(np.uint32))
        if math.isnan(float(x)):
            return ((u >> 16) | 0x40) & 0xFFFF  # a quiet NaN of the same sign
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF  # round to nearest even

    @cuda.jit(device=True)
    def pack_bf16x2(lo, hi):
        return np.uint32(_bf16_bits(lo) | (_bf16_bits(hi) << 16))

    @cuda.jit(device=True)
    def exp2_approx(x):
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            return np.float32(np.exp2(np.float32(x)))

    def _max_nan(a, b):
        return a if (a > b or a != a) else b

    def _quad_reduce(x, op):
        vals = _exchange((x,))[:, 0].astype(np.float32)
        _, ln = _lane()
        base = ln - ln % 4
        r = vals[base]
        for i in range(1, 4):
            r = op(r, vals[base + i])
        return np.float32(r)

    @cuda.jit(device=True)
    def quad_max(x):
        return _quad_reduce(x, _max_nan)

    @cuda.jit(device=True)
    def quad_sum(x):
        return _quad_reduce(x, lambda a, b: a + b)

    @cuda.jit(device=True)
    def warp_all(pred):
        return bool(np.all(_exchange((1.0 if pred else 0.0,))[:, 0] != 0))

    @cuda.jit(device=True)
    def warp_sync():
        _exchange(())

    @cuda.jit(device=True)
    def ld_b32(arr, idx):
        return np.uint32((int(arr[idx]) & 0xFFFF) | ((int(arr[idx + 1]) & 0xFFFF) << 16))

    @cuda.jit(device=True)
    def unpack_lo(w):
        return int(w) & 0xFFFF

    @cuda.jit(device=True)
    def unpack_hi(w):
        return (int(w) >> 16) & 0xFFFF


def make_warp_tile_product(mma, k_steps: int, n_pairs: int, row: int, b_transposed: bool):
    """A device function ``product(acc, a, smem, base, lr, lc)``: one warp's
    ``acc += A @ B`` over ``k_steps`` 16-wide k-steps and ``2 * n_pairs`` 8-wide n-tiles.

    ``a`` holds the A fragments, four registers per k-step (``a[4*ks : 4*ks+4]``); ``acc``
    the float32 C fragments, four per n-tile; B comes from shared memory by ``ldmatrix``
    (two n-tiles per ``x4`` load) from the 16-bit tile at flat offset ``base`` with rows of
    ``row`` elements, at the lane's addresses ``(lr, lc)``:

    * ``b_transposed=False``: shared rows are B's *columns* (keys of a K tile, ``S = Q K^T``;
      ``lr, lc = b_pair_address(lane)``);
    * ``b_transposed=True``: shared rows are B's rows (a V tile, ``O += P V``, loaded with
      ``.trans``; ``lr, lc = bt_pair_address(lane)``).

    ``mma`` is :func:`mma_f16` or :func:`mma_bf16`; the sizes are compile-time constants of
    the kernel that calls it, so the loops unroll and ``acc`` stays in registers."""

    @cuda.jit(device=True, inline=True)
    def product(acc, a, smem, base, lr, lc):
        for ks in range(k_steps):
            for np2 in range(n_pairs):
                if b_transposed:
                    b0, b1, b2, b3 = ldmatrix_x4_trans(
                        smem, base + (ks * 16 + lr) * row + np2 * 16 + lc)
                else:
                    b0, b1, b2, b3 = ldmatrix_x4(
                        smem, base + (np2 * 16 + lr) * row + ks * 16 + lc)
                i0 = 8 * np2
                c0, c1, c2, c3 = mma(a[4 * ks], a[4 * ks + 1], a[4 * ks + 2], a[4 * ks + 3],
                                     b0, b1, acc[i0], acc[i0 + 1], acc[i0 + 2], acc[i0 + 3])
                acc[i0] = c0
                acc[i0 + 1] = c1
                acc[i0 + 2] = c2
                acc[i0 + 3] = c3
                c0, c1, c2, c3 = mma(a[4 * ks], a[4 * ks + 1], a[4 * ks + 2], a[4 * ks + 3],
                                     b2, b3, acc[i0 + 4], acc[i0 + 5], acc[i0 + 6], acc[i0 + 7])
                acc[i0 + 4] = c0
                acc[i0 + 5] = c1
                acc[i0 + 6] = c2
                acc[i0 + 7] = c3

    return product


def make_masked_row_max(n_tiles: int, causal: bool):
    """A device function ``masked_row_max(s, masked, j0, t, row0, row1, lk, offset,
    scale_log2) -> (max0, max1)`` over a warp's score fragments.

    ``s`` holds the raw ``Q K^T`` accumulators of ``n_tiles`` 8-key n-tiles starting at key
    ``j0`` (four per n-tile, :func:`.fragments.c_coords`); the lane (``t = lane % 4``) holds
    two query rows, ``row0`` and ``row1``. When ``masked`` (the tile crosses ``Lk`` or, with
    ``causal``, a row's bottom-right horizon ``row + offset``), scores past either are set to
    ``-inf`` in ``s``. Returns each row's maximum over the tile, NaN-propagating, reduced
    over the quad, times ``scale_log2`` (the skip test's base-2 units; ``scale > 0``, so the
    scaled maximum is the maximum of the scaled scores)."""
    neg_inf = float32(-math.inf)

    @cuda.jit(device=True, inline=True)
    def masked_row_max(s, masked, j0, t, row0, row1, lk, offset, scale_log2):
        tmax0 = neg_inf
        tmax1 = neg_inf
        for nt in range(n_tiles):
            for e in range(4):
                x = s[4 * nt + e]
                if masked:
                    col = j0 + nt * 8 + 2 * t + (e % 2)
                    row = row0 if e < 2 else row1
                    if col >= lk or (causal and col > row + offset):
                        x = neg_inf
                        s[4 * nt + e] = x
                if e < 2:
                    tmax0 = max_nan(tmax0, x)
                else:
                    tmax1 = max_nan(tmax1, x)
        return quad_max(tmax0) * scale_log2, quad_max(tmax1) * scale_log2

    return masked_row_max


def make_online_softmax_step(pack, k_steps: int, n_out_tiles: int):
    """A device function ``softmax_step(s, o, p, m0, m1, l0, l1, tmax0, tmax1, scale_log2)
    -> (m0, m1, l0, l1)``: one kept key tile of the online softmax, on fragments.

    The lane's two rows have running maxima ``m0, m1`` (base-2 units, ``-inf`` before the
    first key) and partial sums ``l0, l1``; ``tmax0, tmax1`` are the tile's row maxima
    (:func:`make_masked_row_max`). The accumulators ``o`` (``n_out_tiles`` 8-column n-tiles
    of O) are rescaled by ``2**(m_old - m_new)`` -- skipped when no row of the warp moved,
    as it rarely does after the first tiles -- and ``p`` receives ``P = 2**(S * scale_log2 -
    m_new)`` packed two per register (``pack``: :func:`pack_f16x2` or :func:`pack_bf16x2`)
    in the order of the A operand of ``P V`` (``k_steps`` 16-key steps: the C elements of
    n-tiles ``2 ks`` and ``2 ks + 1``, :func:`.fragments.p_as_a_operand`)."""
    neg_inf = float32(-math.inf)
    zero, one = float32(0.0), float32(1.0)

    @cuda.jit(device=True, inline=True)
    def softmax_step(s, o, p, m0, m1, l0, l1, tmax0, tmax1, scale_log2):
        mn0 = max_nan(m0, tmax0)
        mn1 = max_nan(m1, tmax1)
        sh0 = zero if mn0 == neg_inf else mn0  # a row that saw nothing yet
        sh1 = zero if mn1 == neg_inf else mn1
        alpha0 = exp2_approx(m0 - sh0)
        alpha1 = exp2_approx(m1 - sh1)
        l0 *= alpha0
        l1 *= alpha1
        if not warp_all(alpha0 == one and alpha1 == one):
            for nt in range(n_out_tiles):
                o[4 * nt] *= alpha0
                o[4 * nt + 1] *= alpha0
                o[4 * nt + 2] *= alpha1
                o[4 * nt + 3] *= alpha1
        for ks in range(k_steps):
            for half in range(2):
                i0 = 4 * (2 * ks + half)
                p0 = exp2_approx(s[i0] * scale_log2 - sh0)
                p1 = exp2_approx(s[i0 + 1] * scale_log2 - sh0)
                p2 = exp2_approx(s[i0 + 2] * scale_log2 - sh1)
                p3 = exp2_approx(s[i0 + 3] * scale_log2 - sh1)
                l0 += p0 + p1
                l1 += p2 + p3
                p[4 * ks + 2 * half] = pack(p0, p1)
                p[4 * ks + 2 * half + 1] = pack(p2, p3)
        return mn0, mn1, l0, l1

    return softmax_step
