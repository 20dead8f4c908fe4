"""Prefill, version 3: tensor cores (mma.sync from Numba), FlashAttention-2 structure.

What it does differently from version 2 (:mod:`.prefill_v2`, CUDA cores):

* ``S = Q K^T`` and ``O += P V`` run on tensor cores, ``mma.sync.m16n8k16`` with float16 or
  bfloat16 operands and float32 accumulation (:mod:`.mma`, inline PTX from Numba).
* A block of ``block_q / 16`` warps; each warp owns 16 query rows. The Q fragments stay in
  registers for the whole kernel; S, P and O live in registers as mma fragments
  (:mod:`.fragments`): the online softmax works on the accumulator fragments (row max and
  sum: two shuffles inside a quad), and P is converted to 16-bit pairs in registers and used
  directly as the A operand of ``P V`` -- no shared-memory round trip.
* K and V tiles come through shared memory with ``cp.async`` (K double-buffered: the next
  tile's K is in flight while this one is scored). Rows are padded by 16 bytes so that the
  eight row addresses of an ``ldmatrix`` fall in different banks.
* **The skip vote**: each thread tests its two rows with the skip rule, and one
  ``bar.red.and`` (``cuda.syncthreads_and``) combines the whole block's vote. **A tile's V
  is requested only after the vote kept it**: a skipped tile costs its K load and the QK^T
  product, nothing else -- no exp, no V bytes, no P V.
* Causal masking is computed only on the tiles that straddle the diagonal (and on a ragged
  last key tile); fully masked tiles are never visited. Query tiles are scheduled heaviest
  first (causal), so the long rows do not finish last.

The scores are kept in base-2 units (``s * scale * log2(e)``, then ``ex2.approx``); the skip
rule is unit-free (``m~ - m < log(thresh)`` with both sides in the same units), so the test
is the same, ``log(thresh)`` converted once on the host.

Measured: see docs/BENCHMARKS.md ("CUDA: tensor cores"); the kernel is chosen for D in
{64, 128}, float16 / bfloat16, on a real GPU; the simulator runs it too (:mod:`.mma`'s
twins), at small sizes.
"""

from __future__ import annotations

import math

from numba import cuda, float32, uint16, uint32

from .mma import (a_tile_address, b_pair_address, bt_pair_address, cp_async16, cp_async_commit,
                  cp_async_wait_all, ldmatrix_x4, make_masked_row_max, make_online_softmax_step,
                  make_warp_tile_product, mma_bf16, mma_f16, pack_bf16x2, pack_f16x2, quad_sum,
                  unpack_hi, unpack_lo)
from .mma import HARDWARE
from .problem import KernelVersion
from .rule import COMPUTED, SKIPPED  # tile map codes
from .rule import row_votes_skip as _votes_skip  # the skip rule (blasst_ref.rule)

__all__ = ["HEAD_DIMS", "VERSION", "KernelShape", "accepts", "launch", "make_kernel", "prepare",
           "shared_bytes", "tile_accepts"]

#: head dimensions (Dqk == Dv) the tensor-core kernel is built for
HEAD_DIMS = (64, 128)
LOG2E = 1.4426950408889634
NEG_INF = float32(-math.inf)


class KernelShape:
    """The compile-time constants of one v3 kernel, and its shared-memory layout.

    ``block_q / 16`` warps, each owning 16 query rows. (Two 16-row slabs per warp would
    halve the shared-memory reads per FLOP, as FlashAttention-2 does at D = 128; in Numba
    the loops then exceed what NVVM unrolls, the fragment arrays go to local memory and the
    kernel spills: measured with ptxas, not taken.)

    Shared memory holds 16-bit elements: the Q tile (``block_q`` rows), two K tiles and two
    V tiles (``block_k`` rows each), every row padded by 8 elements (16 bytes) so that the
    eight row addresses of an ``ldmatrix`` fall in different banks."""

    def __init__(self, d: int, dv: int, block_q: int, block_k: int):
        self.d, self.dv, self.block_q, self.block_k = d, dv, block_q, block_k
        self.warps = block_q // 16
        self.threads = 32 * self.warps
        self.q_row = d + 8
        self.v_row = dv + 8
        self.k_off = block_q * self.q_row
        self.v_off = self.k_off + 2 * block_k * self.q_row
        self.elements = self.v_off + 2 * block_k * self.v_row

    @property
    def shared_bytes(self) -> int:
        return 2 * self.elements


def tile_accepts(d: int, dv: int, block_q: int, block_k: int) -> bool:
    """Whether v3 takes this head dim and tile shape."""
    if not (d == dv and d in HEAD_DIMS and block_q in (16, 32, 64, 128)
            and block_k in (32, 64, 128)):
        return False
    threads = 2 * block_q
    return all((rows * d // 8) % threads == 0 for rows in (block_q, block_k))


def shared_bytes(d: int, dv: int, block_q: int, block_k: int) -> int:
    return KernelShape(d, dv, block_q, block_k).shared_bytes


def make_kernel(d: int, dv: int, block_q: int, block_k: int, causal: bool, bf16: bool):
    """Compile-time specialised v3 kernel (see the module docstring).

    Kernel arguments: ``q, k, v, out`` flat 16-bit arrays (the bits of float16 / bfloat16
    values) in the layouts ``(B, Hq, Lq, D)``, ``(B, Hkv, Lk, D)``, ``(B, Hkv, Lk, Dv)``,
    ``(B, Hq, Lq, Dv)``; ``tile_map`` int8 ``(B, Hq, n_q_tiles, n_k_tiles)``; ``lse`` float32
    ``(B * Hq * Lq,)`` (written when ``write_lse``; natural log of the row's softmax sum, in
    units of the scaled scores); ``lq, lk, n_hq, group`` (Hq / Hkv); ``scale_log2`` =
    ``scale * log2(e)``; ``log_thresh2`` = ``log(thresh) * log2(e)`` (``-inf`` for dense);
    ``n_q_tiles``. Launch: grid ``(n_q_tiles, B * Hq)``, :attr:`KernelShape.threads`
    threads, dynamic shared memory :attr:`KernelShape.shared_bytes`.
    """
    if not tile_accepts(d, dv, block_q, block_k):
        raise ValueError(f"prefill v3 does not take d={d}, dv={dv}, tiles {block_q}x{block_k}")
    S = KernelShape(d, dv, block_q, block_k)
    NT = S.threads
    KS = d // 16  # k-steps of S = Q K^T
    NS = block_k // 8  # n-tiles of S (8 keys each)
    KP = block_k // 16  # k-steps of P V
    NO = dv // 8  # n-tiles of O
    QROW, VROW, K_OFF, V_OFF = S.q_row, S.v_row, S.k_off, S.v_off
    Q_CHUNKS, V_CHUNKS = d // 8, dv // 8  # 16-byte chunks per row
    Q_ITERS = block_q * Q_CHUNKS // NT
    K_ITERS = block_k * Q_CHUNKS // NT
    V_ITERS = block_k * V_CHUNKS // NT
    CAUSAL = causal
    # register arrays (their sizes must be literals for Numba)
    Q_REGS, S_REGS, P_REGS, O_REGS = 4 * KS, 4 * NS, 4 * KP, 4 * NO
    mma = mma_bf16 if bf16 else mma_f16
    qk_product = make_warp_tile_product(mma, KS, NS // 2, QROW, b_transposed=False)
    pv_product = make_warp_tile_product(mma, KP, NO // 2, VROW, b_transposed=True)
    row_max = make_masked_row_max(NS, CAUSAL)
    pack = pack_bf16x2 if bf16 else pack_f16x2
    softmax_step = make_online_softmax_step(pack, KP, NO)

    @cuda.jit(device=True, inline=True)
    def load_rows(smem, s_off, s_row, gmem, g_off, g_row, valid, chunks, iters, tid):
        """cp.async ``iters * NT`` 16-byte chunks: rows of ``chunks`` chunks, from global
        rows of ``g_row`` elements into shared rows of ``s_row``; rows ``>= valid`` are
        zero-filled (their address clamped to the tile's first row)."""
        for i in range(iters):
            c = tid + i * NT
            r = c // chunks
            col = (c % chunks) * 8
            ok = r < valid
            src = g_off + (r if ok else 0) * g_row + col
            cp_async16(smem, s_off + r * s_row + col, gmem, src, 16 if ok else 0)

    @cuda.jit(fastmath=False)
    def kernel(q, k, v, out, tile_map, lse, lq, lk, n_hq, group, scale_log2, log_thresh2,
               n_qt, write_lse):
        tid = cuda.threadIdx.x
        warp = tid // 32
        lane = tid % 32
        g = lane // 4
        t = lane % 4
        bh = cuda.blockIdx.y
        b = bh // n_hq
        h = bh % n_hq
        kvh = b * (n_hq // group) + h // group
        qt = n_qt - 1 - cuda.blockIdx.x  # causal: the longest rows first
        q0 = qt * block_q
        offset = lk - lq
        smem = cuda.shared.array(0, uint16)
        voting = log_thresh2 > NEG_INF  # thresh == 0: nothing can be skipped

        # key tiles this block visits: causal ones beyond its last row's horizon never
        q_valid = min(block_q, lq - q0)
        n_kt = (lk + block_k - 1) // block_k
        if CAUSAL:
            last_visible = q0 + q_valid - 1 + offset
            n_kt = 0 if last_visible < 0 else min(n_kt, last_visible // block_k + 1)

        q_base = (bh * lq + q0) * d
        k_base = kvh * lk * d
        v_base = kvh * lk * dv
        load_rows(smem, 0, QROW, q, q_base, d, q_valid, Q_CHUNKS, Q_ITERS, tid)
        if n_kt > 0:
            load_rows(smem, K_OFF, QROW, k, k_base, d, min(block_k, lk), Q_CHUNKS, K_ITERS,
                      tid)
            if not voting:  # dense: V is never skipped, so it may travel with K
                load_rows(smem, V_OFF, VROW, v, v_base, dv, min(block_k, lk), V_CHUNKS,
                          V_ITERS, tid)
        cp_async_commit()
        cp_async_wait_all()
        cuda.syncthreads()

        # Q fragments: registers for the whole kernel
        qf = cuda.local.array(Q_REGS, uint32)
        ar, ac = a_tile_address(lane)
        for ks in range(KS):
            a0, a1, a2, a3 = ldmatrix_x4(smem, (warp * 16 + ar) * QROW + ks * 16 + ac)
            qf[4 * ks] = a0
            qf[4 * ks + 1] = a1
            qf[4 * ks + 2] = a2
            qf[4 * ks + 3] = a3

        # this lane's two query rows (g and g + 8 of the warp's 16) and their running state
        row0 = q0 + warp * 16 + g
        row1 = row0 + 8
        m0 = NEG_INF  # running max, base-2 units
        m1 = NEG_INF
        l0 = float32(0.0)  # this lane's part of the row sums (quad-reduced at the end)
        l1 = float32(0.0)
        o = cuda.local.array(O_REGS, float32)
        for i in range(O_REGS):
            o[i] = float32(0.0)
        s = cuda.local.array(S_REGS, float32)
        pf = cuda.local.array(P_REGS, uint32)
        br, bc = b_pair_address(lane)
        vr, vc = bt_pair_address(lane)
        synced = True  # this thread's copies have landed and the block has met since

        for kt in range(n_kt):
            if not synced:
                cp_async_wait_all()  # K of this tile has landed ...
                cuda.syncthreads()  # ... for every thread; the buffers we refill are free
            synced = False
            j0 = kt * block_k
            j1 = j0 + block_k
            if kt + 1 < n_kt:  # prefetch the next K while this one is scored
                load_rows(smem, K_OFF + ((kt + 1) % 2) * block_k * QROW, QROW, k,
                          k_base + j1 * d, d, min(block_k, lk - j1), Q_CHUNKS, K_ITERS, tid)
                cp_async_commit()

            # ---- S = Q K^T on tensor cores -------------------------------------------
            kb = K_OFF + (kt % 2) * block_k * QROW
            for i in range(S_REGS):
                s[i] = float32(0.0)
            qk_product(s, qf, smem, kb, br, bc)

            # ---- mask the diagonal / ragged tile, row maxima (base 2) -----------------
            masked = j0 + block_k > lk
            if CAUSAL:
                masked = masked or j0 + block_k - 1 > q0 + offset
            tmax0, tmax1 = row_max(s, masked, j0, t, row0, row1, lk, offset, scale_log2)

            # ---- the skip vote: every row of the block must agree ---------------------
            if voting:
                agree = True
                if row0 < lq:
                    agree = _votes_skip(tmax0, m0, log_thresh2)
                if row1 < lq:
                    agree = agree and _votes_skip(tmax1, m1, log_thresh2)
                skip = cuda.syncthreads_and(1 if agree else 0) != 0
                if tid == 0:
                    tile_map[b, h, qt, kt] = SKIPPED if skip else COMPUTED
                if skip:
                    continue  # no exp, no V load, no P V; m, l, O unchanged
                # V of a kept tile: requested only now, and it travels during the softmax
                load_rows(smem, V_OFF + (kt % 2) * block_k * VROW, VROW, v, v_base + j0 * dv,
                          dv, min(block_k, lk - j0), V_CHUNKS, V_ITERS, tid)
                cp_async_commit()
            elif tid == 0:
                tile_map[b, h, qt, kt] = COMPUTED

            # ---- online softmax on the fragments --------------------------------------
            m0, m1, l0, l1 = softmax_step(s, o, pf, m0, m1, l0, l1, tmax0, tmax1, scale_log2)

            cp_async_wait_all()  # V (and the prefetched K) have landed ...
            cuda.syncthreads()  # ... for every thread, and every warp is done with P V - 1
            synced = True
            if not voting and kt + 1 < n_kt:  # dense: the next V travels during this P V
                load_rows(smem, V_OFF + ((kt + 1) % 2) * block_k * VROW, VROW, v,
                          v_base + j1 * dv, dv, min(block_k, lk - j1), V_CHUNKS, V_ITERS, tid)
                cp_async_commit()

            # ---- O += P V on tensor cores ---------------------------------------------
            pv_product(o, pf, smem, V_OFF + (kt % 2) * block_k * VROW, vr, vc)

        # ---- normalise and store ------------------------------------------------------
        l0 = quad_sum(l0)
        l1 = quad_sum(l1)
        inv0 = float32(0.0) if l0 == float32(0.0) else float32(1.0) / l0  # no key: zeros
        inv1 = float32(0.0) if l1 == float32(0.0) else float32(1.0) / l1
        for nt in range(NO):
            col = nt * 8 + 2 * t
            w0 = pack(o[4 * nt] * inv0, o[4 * nt + 1] * inv0)
            w1 = pack(o[4 * nt + 2] * inv1, o[4 * nt + 3] * inv1)
            if row0 < lq:
                i0 = (bh * lq + row0) * dv + col
                out[i0] = unpack_lo(w0)
                out[i0 + 1] = unpack_hi(w0)
            if row1 < lq:
                i1 = (bh * lq + row1) * dv + col
                out[i1] = unpack_lo(w1)
                out[i1 + 1] = unpack_hi(w1)
        if write_lse and t == 0:
            if row0 < lq:
                lse[bh * lq + row0] = (m0 + math.log2(l0)) / LOG2E if l0 > 0 else NEG_INF
            if row1 < lq:
                lse[bh * lq + row1] = (m1 + math.log2(l1)) / LOG2E if l1 > 0 else NEG_INF

    return kernel, S


# ---- host side ---------------------------------------------------------------------------

_KERNELS: dict = {}


def get_kernel(d, dv, block_q, block_k, causal, bf16):
    """The compiled-on-demand kernel for these constants (cached per process)."""
    key = (d, dv, block_q, block_k, bool(causal), bool(bf16))
    if key not in _KERNELS:
        _KERNELS[key] = make_kernel(*key)
    return _KERNELS[key]


def prepare(q4, k4, v4, out4, tile_map, log_thresh, causal, scale, block_q, block_k, *,
            bf16=False, lse=None):
    """A zero-argument callable that runs v3 on these Numba device arrays (4-D,
    C-contiguous; float16, or 16-bit integer arrays holding bfloat16 bits when ``bf16``).
    ``tile_map`` int8 ``(B, Hq, n_q_tiles, n_k_tiles)``; ``lse`` optional float32
    ``(B, Hq, Lq)``. Everything but the launch is done here, once."""
    import numpy as np

    n_b, n_hq, lq, d = q4.shape
    n_hkv, lk, dv = k4.shape[1], k4.shape[2], v4.shape[3]
    kernel, shape = get_kernel(d, dv, block_q, block_k, causal, bf16)
    bits = [x.reshape(x.size).view(np.uint16) for x in (q4, k4, v4, out4)]
    n_qt = -(-lq // block_q)
    write_lse = lse is not None
    lse = cuda.device_array(1, np.float32) if lse is None else lse.reshape(lse.size)
    log_thresh2 = -math.inf if log_thresh == -math.inf else log_thresh * LOG2E
    args = (*bits, tile_map, lse, np.int64(lq), np.int64(lk), np.int64(n_hq),
            np.int64(n_hq // n_hkv), np.float32(scale * LOG2E), np.float32(log_thresh2),
            np.int64(n_qt), bool(write_lse))
    allow_shared(kernel, args, shape.shared_bytes)
    configured = kernel[(n_qt, n_b * n_hq), shape.threads, 0, shape.shared_bytes]

    def run():
        configured(*args)

    return run


def launch(q4, k4, v4, out4, tile_map, log_thresh, causal, scale, block_q, block_k, *,
           bf16=False, lse=None):
    """Run v3 once (see :func:`prepare`)."""
    prepare(q4, k4, v4, out4, tile_map, log_thresh, causal, scale, block_q, block_k,
            bf16=bf16, lse=lse)()


def allow_shared(kernel, args, nbytes):
    """Opt the kernel compiled for ``args`` in to ``nbytes`` of dynamic shared memory (above
    the default 48 KB); nothing to do on the simulator."""
    if nbytes <= 48 * 1024 or not HARDWARE:
        return
    from numba import typeof

    from .numba_internals import raise_shared_limit

    raise_shared_limit(kernel, tuple(typeof(a) for a in args), nbytes)


# ---- the version table's entry (:mod:`.launch`) ------------------------------------------


def is_bf16(dtype) -> bool:
    """A 2-byte integer array holds bfloat16 bits (torch's bfloat16 crosses as int16)."""
    import numpy as np

    return np.dtype(dtype).kind in "iu" and np.dtype(dtype).itemsize == 2


def takes_dtype(dtype) -> bool:
    import numpy as np

    return np.dtype(dtype) == np.float16 or is_bf16(dtype)


def accepts(problem, threads_per_row=None, d_chunk=None, layout=None, **_):
    """The plan ``(bf16,)`` for a prefill ``problem``, or ``None``: v3 takes float16 /
    bfloat16, ``Dqk = Dv`` in :data:`HEAD_DIMS`, the tiles of :func:`tile_accepts`, 16-byte
    aligned arrays, on a real GPU only (on Numba's simulator every warp-level instruction
    is a Python barrier: the SIMT versions serve it, and the tests drive v3 directly), and
    none of the SIMT versions' tuning options."""
    if not HARDWARE or threads_per_row is not None or d_chunk is not None or layout is not None:
        return None
    return gpu_plan(problem)


def gpu_plan(problem):
    """The plan a GPU would use for ``problem``, on any machine."""
    if problem.decode or not problem.aligned or not takes_dtype(problem.dtype) \
            or not tile_accepts(problem.dqk, problem.dv, problem.block_q, problem.block_k):
        return None
    return (is_bf16(problem.dtype),)


def _args(problem) -> tuple:
    """The kernel's arguments as :class:`.numba_internals.Array` / Numba scalar types."""
    import numpy as np
    from numba.cuda import types

    from .numba_internals import Array

    b, hq, hkv = problem.batch, problem.q_heads, problem.kv_heads
    lq, lk, d, dv = problem.q_len, problem.kv_len, problem.dqk, problem.dv
    flat = [Array(np.uint16, (n,)) for n in (b * hq * lq * d, b * hkv * lk * d,
                                             b * hkv * lk * dv, b * hq * lq * dv)]
    return (*flat, Array(np.int8, problem.tile_map_shape), Array(np.float32, (1,)),
            types.int64, types.int64, types.int64, types.int64, types.float32, types.float32,
            types.int64, types.boolean)


def launch_version(p, problem, q, k, v, out, tile_map, log_thresh, scale):
    """Launch through Numba's dispatcher (4-D Numba device arrays; ``p`` from
    :func:`accepts`)."""
    launch(q, k, v, out, tile_map, log_thresh, problem.causal, scale, problem.block_q,
           problem.block_k, bf16=p[0])


def kernels(p, problem):
    """``[(label, dispatcher, argtypes)]`` of a call (for register reports)."""
    from .numba_internals import argtypes

    kernel, _ = get_kernel(problem.dqk, problem.dv, problem.block_q, problem.block_k,
                           problem.causal, p[0])
    return [("prefill_v3", kernel, argtypes(_args(problem)))]


class Fast:
    """One prefill shape, ready for raw launches (:class:`.numba_internals.RawKernel`): the
    compiled kernel, a tile map of this shape (zeroed by every :meth:`run`) and a dummy
    log-sum-exp buffer. The runner of the raw-pointer host path (``fast`` of
    :data:`VERSION`)."""

    def __init__(self, p, problem):
        import numpy as np

        from .numba_internals import RawKernel, device_ptr

        kernel, shape = get_kernel(problem.dqk, problem.dv, problem.block_q, problem.block_k,
                                   problem.causal, p[0])
        self.tile_map = cuda.device_array(problem.tile_map_shape, np.int8)
        self.lse = cuda.device_array(1, np.float32)
        self.kernel = RawKernel(kernel, _args(problem), shared=shape.shared_bytes)
        self.map_ptr, self.map_bytes = device_ptr(self.tile_map), int(self.tile_map.size)
        self.lse_ptr = device_ptr(self.lse)
        self.n_qt = problem.n_q_tiles
        self.grid = (self.n_qt, problem.batch * problem.q_heads, 1)
        self.block = (shape.threads, 1, 1)
        self.sizes = (problem.q_len, problem.kv_len, problem.q_heads,
                      problem.q_heads // problem.kv_heads)

    def run(self, qp, kp, vp, outp, log_thresh, scale):
        """Launch one call on the data pointers of q, k, v, out; returns the tile map."""
        from .numba_internals import memset0

        memset0(self.map_ptr, self.map_bytes)
        log_thresh2 = -math.inf if log_thresh == -math.inf else log_thresh * LOG2E
        self.kernel.launch(self.grid, self.block, qp, kp, vp, outp, self.map_ptr, self.lse_ptr,
                           *self.sizes, scale * LOG2E, log_thresh2, self.n_qt, False)
        return self.tile_map


#: this version's entry in the version table (:mod:`.launch`)
VERSION = KernelVersion("prefill_v3", "prefill", 3, accepts, launch_version, kernels,
                        fast=Fast, gpu_plan=gpu_plan)
