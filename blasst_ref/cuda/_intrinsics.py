"""Small device helpers shared by the fast (v2) CUDA kernels, each with a simulator twin.

Numba's CUDA simulator (where CI runs the kernels) executes every GPU thread as a Python
thread: it has no warp shuffles (``cuda.shfl_xor_sync``), no ``cuda.syncwarp`` and cannot run
LLVM intrinsics. Every helper here therefore exists twice, selected once at import time by
``numba.config.ENABLE_CUDASIM``:

* on a GPU (``SHFL = True``): warp shuffles and 16-byte vector loads (``ld.global.v4``),
* on the simulator: the same contract through shared memory and ``cuda.syncthreads()``.

The kernels call the helpers *uniformly* (every thread of the block, the same number of
times), which both implementations need: shuffles with a full mask need the whole warp, the
simulator's barriers the whole block.

NOTE: kernels that import these helpers are compiled by factories (no ``cache=True``); if
that changes, delete ``blasst_ref/cuda/__pycache__`` after editing this file (Numba's cache
only tracks the kernel's own file).
"""

from __future__ import annotations

from numba import config, cuda, float32

#: True on a real GPU: warp shuffles and vector-load intrinsics are available.
SHFL = not bool(config.ENABLE_CUDASIM)
FULL_MASK = 0xFFFFFFFF

__all__ = ["SHFL", "ld16", "group_sum", "group_max"]


if SHFL:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def ld16(typingctx, arr, idx):
        """16 bytes at flat element ``idx`` of a C-contiguous float16/float32 array, widened
        to float32: a ``UniTuple(float32, 8)`` (float16) or ``UniTuple(float32, 4)``
        (float32). One ``ld.global.v4.b32``: the caller guarantees ``idx`` is a multiple of
        the vector width and the array's base pointer is 16-byte aligned."""
        if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
            return None
        if arr.dtype == types.float16:
            n = 8
        elif arr.dtype == types.float32:
            n = 4
        else:
            return None
        sig = types.UniTuple(types.float32, n)(arr, idx)

        def codegen(context, builder, signature, args):
            arrty, idxty = signature.args
            ary = context.make_array(arrty)(context, builder, args[0])
            i = context.cast(builder, args[1], idxty, types.intp)
            ptr = builder.gep(ary.data, [i])
            # always load 4 x 32-bit words (NVVM rejects a <8 x half> load), then unpack
            i32 = ir.IntType(32)
            vptr = builder.bitcast(ptr, ir.VectorType(i32, 4).as_pointer())
            vec = builder.load(vptr, align=16)
            vals = []
            for wd in range(4):
                word = builder.extract_element(vec, ir.Constant(i32, wd))
                if arrty.dtype == types.float32:
                    vals.append(builder.bitcast(word, ir.FloatType()))
                    continue
                for sh in (0, 16):  # little-endian: the lower half is the earlier element
                    bits = builder.trunc(builder.lshr(word, ir.Constant(i32, sh)),
                                         ir.IntType(16))
                    vals.append(builder.fpext(builder.bitcast(bits, ir.HalfType()),
                                              ir.FloatType()))
            return context.make_tuple(builder, signature.return_type, vals)

        return sig, codegen

else:

    @cuda.jit(device=True)
    def ld16(arr, idx):
        """Simulator twin of the vector load: the same elements, one at a time."""
        n = 16 // arr.dtype.itemsize
        return tuple(float32(arr[idx + e]) for e in range(n))


@cuda.jit(device=True, inline=True)
def group_sum(x, scratch, t, width):
    """Sum of ``x`` over the aligned group of ``width`` consecutive lanes (a power of two
    <= 32) that holds thread ``t``; every lane of the group gets the sum.

    GPU: a butterfly of ``log2(width)`` ``shfl_xor`` steps (no shared memory, no barrier).
    Simulator: through ``scratch`` (shared, one float32 per thread) and two barriers."""
    if SHFL:
        off = width // 2
        while off > 0:
            x += cuda.shfl_xor_sync(FULL_MASK, x, off)
            off //= 2
        return x
    scratch[t] = x
    cuda.syncthreads()
    base = t - t % width
    s = float32(0.0)
    for i in range(width):
        s += scratch[base + i]
    cuda.syncthreads()
    return s


@cuda.jit(device=True, inline=True)
def _max_nan(a, b):
    """max(a, b) that propagates NaN (like ``np.maximum``); CUDA's ``fmaxf`` drops it."""
    return a if (a > b or a != a) else b


@cuda.jit(device=True, inline=True)
def group_max(x, scratch, t, width):
    """NaN-propagating max of ``x`` over the aligned group of ``width`` lanes holding ``t``
    (see :func:`group_sum`); every lane of the group gets it."""
    if SHFL:
        off = width // 2
        while off > 0:
            x = _max_nan(x, cuda.shfl_xor_sync(FULL_MASK, x, off))
            off //= 2
        return x
    scratch[t] = x
    cuda.syncthreads()
    base = t - t % width
    s = scratch[base]
    for i in range(1, width):
        s = _max_nan(s, scratch[base + i])
    cuda.syncthreads()
    return s
