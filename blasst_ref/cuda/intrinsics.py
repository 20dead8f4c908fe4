"""Small device helpers shared by the fast (v2) CUDA kernels, each with a simulator twin.

Numba's CUDA simulator (where CI runs the kernels) executes every GPU thread as a Python
thread: it has no warp shuffles (``cuda.shfl_xor_sync``), no ``cuda.syncwarp`` and cannot run
LLVM intrinsics. Every helper here therefore exists twice, selected once at import time by
``numba.config.ENABLE_CUDASIM``:

* on a GPU (``SHFL = True``): warp shuffles and 16-byte vector loads / stores,
* on the simulator: the same contract through shared memory and ``cuda.syncthreads()``
  (reductions) or scalar element accesses (loads / stores).

The vector helpers take any C-contiguous array, global or shared: they address it through
its data pointer, and NVVM turns the access into ``ld.shared.v4`` / ``st.shared.v4`` where
the pointer comes from a shared array (prefill v2 reads all its operands with ``ld16`` on a
float32 shared array). ``ld16raw`` / ``st4w`` move float16 data in its raw 32-bit words and
widen it at the store, halving the registers a load in flight occupies.

The kernels call the helpers *uniformly* (every thread of the block, the same number of
times), which both implementations need: shuffles with a full mask need the whole warp, the
simulator's barriers the whole block.

NOTE: kernels that import these helpers are compiled by factories (no ``cache=True``); if
that changes, delete ``blasst_ref/cuda/__pycache__`` after editing this file (Numba's cache
only tracks the kernel's own file). The NaN-keeping max of :func:`group_max` is the skip
rule's :func:`blasst_ref.rule.max_nan` (compiled in :mod:`.rule`).
"""

from __future__ import annotations

from numba import config, cuda, float32

from .rule import max_nan

#: True on a real GPU: warp shuffles and vector-load intrinsics are available.
SHFL = not bool(config.ENABLE_CUDASIM)
FULL_MASK = 0xFFFFFFFF

__all__ = ["SHFL", "group_max", "group_sum", "ld16", "ld16raw", "ldw", "narrow", "st4",
           "st4w", "unpack", "widen", "xor_shfl"]

# bfloat16 (torch.bfloat16) arrives as its raw bits, in a uint16 / int16 array (Numba has no
# bfloat16 array type): every helper below that widens or narrows an element treats a 2-byte
# *integer* array as bfloat16. bf16 -> f32 is ``bits << 16``; f32 -> bf16 rounds to nearest
# even (NaN stays a quiet NaN of the same sign).


if SHFL:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def ld16(typingctx, arr, idx):
        """16 bytes at flat element ``idx`` of a C-contiguous float16/float32 array, widened
        to float32: a ``UniTuple(float32, 8)`` (float16) or ``UniTuple(float32, 4)``
        (float32). One 16-byte ``ld.v4.b32`` (global or shared memory): the caller
        guarantees ``idx`` is a multiple of the vector width and the array's base pointer is
        16-byte aligned."""
        if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
            return None
        n = _vec_width(arr.dtype)
        if n is None:
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
                vals += _word_to_f32(builder, word, arrty.dtype)
            return context.make_tuple(builder, signature.return_type, vals)

        return sig, codegen

    @intrinsic
    def st4(typingctx, arr, idx, a, b, c, d):
        """Store four float32 values at flat elements ``idx .. idx + 3`` of a C-contiguous
        float32 array (global or shared): one 16-byte ``st.v4.f32``. The caller guarantees
        ``idx`` is a multiple of 4 and the array's base pointer is 16-byte aligned."""
        if not isinstance(arr, types.Array) or arr.dtype != types.float32 \
                or not isinstance(idx, types.Integer):
            return None
        sig = types.none(arr, idx, types.float32, types.float32, types.float32,
                         types.float32)

        def codegen(context, builder, signature, args):
            arrty, idxty = signature.args[:2]
            ary = context.make_array(arrty)(context, builder, args[0])
            i = context.cast(builder, args[1], idxty, types.intp)
            ptr = builder.gep(ary.data, [i])
            f32 = ir.FloatType()
            vty = ir.VectorType(f32, 4)
            vec = ir.Constant(vty, ir.Undefined)
            for e in range(4):
                vec = builder.insert_element(vec, args[2 + e], ir.Constant(ir.IntType(32), e))
            builder.store(vec, builder.bitcast(ptr, vty.as_pointer()), align=16)
            return context.get_dummy_value()

        return sig, codegen

    def _is_bf16(dt):
        return dt in (types.uint16, types.int16)

    def _word_to_f32(builder, word, dt):
        """The float32 values of one 32-bit word of an array of dtype ``dt``."""
        i32 = ir.IntType(32)
        f32 = ir.FloatType()
        if dt == types.float32:
            return [builder.bitcast(word, f32)]
        if dt == types.float16:
            out = []
            for sh in (0, 16):  # little-endian: the lower half is the earlier element
                bits = builder.trunc(builder.lshr(word, ir.Constant(i32, sh)), ir.IntType(16))
                out.append(builder.fpext(builder.bitcast(bits, ir.HalfType()), f32))
            return out
        lo = builder.shl(word, ir.Constant(i32, 16))
        hi = builder.and_(word, ir.Constant(i32, 0xFFFF0000))
        return [builder.bitcast(lo, f32), builder.bitcast(hi, f32)]

    def _f32_to_bf16(builder, x):
        """float32 -> bfloat16 bits (i16), round to nearest even; NaN -> quiet NaN."""
        i32 = ir.IntType(32)
        u = builder.bitcast(x, i32)
        lsb = builder.and_(builder.lshr(u, ir.Constant(i32, 16)), ir.Constant(i32, 1))
        rnd = builder.add(builder.add(u, ir.Constant(i32, 0x7FFF)), lsb)
        nan = builder.icmp_unsigned(">", builder.and_(u, ir.Constant(i32, 0x7FFFFFFF)),
                                    ir.Constant(i32, 0x7F800000))
        qn = builder.or_(u, ir.Constant(i32, 0x00400000))
        res = builder.select(nan, qn, rnd)
        return builder.trunc(builder.lshr(res, ir.Constant(i32, 16)), ir.IntType(16))

    def _vec_width(dt):
        if dt == types.float32:
            return 4
        if dt == types.float16 or _is_bf16(dt):
            return 8
        return None

    @intrinsic
    def ldw(typingctx, arr, idx):
        """16 raw bytes at flat element ``idx`` of a C-contiguous float16 / bfloat16 /
        float32 array: ``UniTuple(uint32, 4)`` (one ``ld.v4.b32``; same alignment contract as
        :func:`ld16`). Widen with :func:`unpack`. Raw words occupy 4 registers per load
        in flight whatever the dtype (8 elements of float16 widened would take 8)."""
        if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer) \
                or _vec_width(arr.dtype) is None:
            return None
        sig = types.UniTuple(types.uint32, 4)(arr, idx)

        def codegen(context, builder, signature, args):
            arrty, idxty = signature.args
            ary = context.make_array(arrty)(context, builder, args[0])
            i = context.cast(builder, args[1], idxty, types.intp)
            ptr = builder.gep(ary.data, [i])
            i32 = ir.IntType(32)
            vec = builder.load(builder.bitcast(ptr, ir.VectorType(i32, 4).as_pointer()),
                               align=16)
            vals = [builder.extract_element(vec, ir.Constant(i32, wd)) for wd in range(4)]
            return context.make_tuple(builder, signature.return_type, vals)

        return sig, codegen

    #: the raw float16 load the prefill kernel keeps in flight (widened by :func:`st4w`):
    #: on a GPU the same 16-byte load as :func:`ldw`; its simulator twin differs
    ld16raw = ldw

    @intrinsic
    def unpack(typingctx, arr, words):
        """The elements of 4 raw words from :func:`ldw` of ``arr``, as float32: 8 values
        (float16, bfloat16) or 4 (float32). ``arr`` only gives the dtype."""
        if not isinstance(arr, types.Array) or _vec_width(arr.dtype) is None:
            return None
        n = _vec_width(arr.dtype)
        sig = types.UniTuple(types.float32, n)(arr, words)

        def codegen(context, builder, signature, args):
            dt = signature.args[0].dtype
            vals = []
            for wd in range(4):
                vals += _word_to_f32(builder, builder.extract_value(args[1], wd), dt)
            return context.make_tuple(builder, signature.return_type, vals)

        return sig, codegen

    @intrinsic
    def widen(typingctx, x):
        """One element as float32: float16 / float32 as themselves, a uint16 / int16 as
        bfloat16 bits."""
        if x not in (types.float16, types.float32, types.uint16, types.int16):
            return None
        sig = types.float32(x)

        def codegen(context, builder, signature, args):
            dt = signature.args[0]
            v = args[0]
            if dt == types.float32:
                return v
            if dt == types.float16:  # Numba keeps float16 values as i16 bits
                return builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType())
            word = builder.zext(v, ir.IntType(32))
            return builder.bitcast(builder.shl(word, ir.Constant(ir.IntType(32), 16)),
                                   ir.FloatType())

        return sig, codegen

    @intrinsic
    def narrow(typingctx, arr, x):
        """float32 ``x`` as an element of ``arr``'s dtype (float16: round to nearest even;
        a uint16 / int16 array: bfloat16 bits, round to nearest even)."""
        if not isinstance(arr, types.Array) or arr.dtype not in (
                types.float16, types.float32, types.uint16, types.int16) \
                or not isinstance(x, types.Float):
            return None
        sig = arr.dtype(arr, x)

        def codegen(context, builder, signature, args):
            dt = signature.args[0].dtype
            v = context.cast(builder, args[1], signature.args[1], types.float32)
            if dt == types.float32:
                return v
            if dt == types.float16:  # Numba keeps float16 values as i16 bits
                return builder.bitcast(builder.fptrunc(v, ir.HalfType()), ir.IntType(16))
            return _f32_to_bf16(builder, v)

        return sig, codegen

    @intrinsic
    def st4w(typingctx, arr, idx, w0, w1, src):
        """Widen the four elements in words ``w0, w1`` (from :func:`ldw` / :func:`ld16raw`
        of ``src``, float16 or bfloat16) to float32 and store them at flat elements
        ``idx .. idx + 3`` of a float32 array: one 16-byte store (``idx`` a multiple of 4,
        base 16-byte aligned)."""
        if not isinstance(arr, types.Array) or arr.dtype != types.float32 \
                or not isinstance(idx, types.Integer) or not isinstance(src, types.Array) \
                or not (src.dtype == types.float16 or _is_bf16(src.dtype)):
            return None
        sig = types.none(arr, idx, types.uint32, types.uint32, src)

        def codegen(context, builder, signature, args):
            arrty, idxty = signature.args[:2]
            dt = signature.args[4].dtype
            ary = context.make_array(arrty)(context, builder, args[0])
            i = context.cast(builder, args[1], idxty, types.intp)
            ptr = builder.gep(ary.data, [i])
            i32 = ir.IntType(32)
            f32 = ir.FloatType()
            vty = ir.VectorType(f32, 4)
            vec = ir.Constant(vty, ir.Undefined)
            vals = _word_to_f32(builder, args[2], dt) + _word_to_f32(builder, args[3], dt)
            for e, x in enumerate(vals):
                vec = builder.insert_element(vec, x, ir.Constant(i32, e))
            builder.store(vec, builder.bitcast(ptr, vty.as_pointer()), align=16)
            return context.get_dummy_value()

        return sig, codegen

    @cuda.jit(device=True, inline=True)
    def xor_shfl(x, off, scratch, t):
        """``x`` of lane ``lane ^ off`` (a butterfly exchange; every lane must call it)."""
        return cuda.shfl_xor_sync(FULL_MASK, x, off)

else:

    @cuda.jit(device=True)
    def ld16(arr, idx):
        """Simulator twin of the vector load: the same elements, one at a time."""
        n = 16 // arr.dtype.itemsize
        return tuple(float32(arr[idx + e]) for e in range(n))

    @cuda.jit(device=True)
    def st4(arr, idx, a, b, c, d):
        """Simulator twin of the 16-byte vector store: four scalar stores."""
        arr[idx] = a
        arr[idx + 1] = b
        arr[idx + 2] = c
        arr[idx + 3] = d

    @cuda.jit(device=True)
    def ld16raw(arr, idx):
        """Simulator twin: the 8 float16 of the load as 4 "words", each a pair of float32
        (the simulator has no bit casts); :func:`st4w`'s twin takes the same pairs."""
        return ((float32(arr[idx]), float32(arr[idx + 1])),
                (float32(arr[idx + 2]), float32(arr[idx + 3])),
                (float32(arr[idx + 4]), float32(arr[idx + 5])),
                (float32(arr[idx + 6]), float32(arr[idx + 7])))

    @cuda.jit(device=True)
    def ldw(arr, idx):
        """Simulator twin of the raw 16-byte load: the elements, already float32 (the
        simulator has no bit casts); :func:`unpack`'s twin passes them through."""
        n = 16 // arr.dtype.itemsize
        return tuple(float32(arr[idx + e]) for e in range(n))

    @cuda.jit(device=True)
    def unpack(arr, words):
        """Simulator twin: ``words`` are already the float32 elements."""
        return words

    @cuda.jit(device=True)
    def widen(x):
        """Simulator twin (bfloat16 never reaches the simulator: the API refuses it)."""
        return float32(x)

    @cuda.jit(device=True)
    def narrow(arr, x):
        """Simulator twin: the assignment into ``arr`` converts."""
        return x

    @cuda.jit(device=True)
    def st4w(arr, idx, w0, w1, src):
        """Simulator twin of the widening store."""
        arr[idx] = w0[0]
        arr[idx + 1] = w0[1]
        arr[idx + 2] = w1[0]
        arr[idx + 3] = w1[1]

    @cuda.jit(device=True)
    def xor_shfl(x, off, scratch, t):
        """Simulator twin of the butterfly exchange, through ``scratch`` (shared, one
        float32 per thread) and two barriers: every thread of the block must call it."""
        scratch[t] = x
        cuda.syncthreads()
        y = scratch[t ^ off]
        cuda.syncthreads()
        return y


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
def group_max(x, scratch, t, width):
    """NaN-propagating max of ``x`` over the aligned group of ``width`` lanes holding ``t``
    (see :func:`group_sum`); every lane of the group gets it."""
    if SHFL:
        off = width // 2
        while off > 0:
            x = max_nan(x, cuda.shfl_xor_sync(FULL_MASK, x, off))
            off //= 2
        return x
    scratch[t] = x
    cuda.syncthreads()
    base = t - t % width
    s = scratch[base]
    for i in range(1, width):
        s = max_nan(s, scratch[base + i])
    cuda.syncthreads()
    return s


def aligned16(*arrays) -> bool:
    """Whether every array's data starts on a 16-byte boundary (the v2 vector loads)."""
    for a in arrays:
        try:
            ptr = a.__cuda_array_interface__["data"][0]
        except AttributeError:  # the simulator's arrays have no interface: nothing to align
            continue
        if ptr % 16:
            return False
    return True
