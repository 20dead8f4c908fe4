"""Decode, version 3: tensor cores, one warp per split-KV chunk.

What it does differently from version 2 (:mod:`.decode_v2`, windows of tiles on CUDA cores):

* **A warp is a flash-decoding worker.** Each warp owns one split-KV chunk of key tiles (the
  chunks of :func:`blasst_ref.tiling.decode_split_tiles`, so the skip decisions are the
  reference's) and walks it alone: its own ``cp.async`` ring in shared memory (two K stages
  and one V buffer), its own running max / sum / accumulator, warp-level barriers only. A
  block of four warps is four independent chunks; nothing waits for a block barrier, so
  a warp whose V is in flight never holds up the others.
* **The GQA group is the M of an mma.** The ``R = (Hq / Hkv) * Lq`` query rows that share a
  kv head (4 for Llama-style GQA) are padded to the 16 rows of ``mma.m16n8k16``; ``S = Q K^T``
  and ``O += P V`` are two tensor-core loops per tile, so a tile costs a few hundred
  instructions per warp and the kernel is left with what decode is bound by: bytes.
* **K streams, V waits for the vote.** The next K tile is prefetched while this one is
  scored; a tile's V is requested only after the warp has voted to keep it (``vote.all``
  over the rows the lanes hold), so a skipped tile reads no V bytes at all, and a kept tile's
  V arrives while its softmax is computed.
* **The seeded skip test** (docs/DESIGN.md §3.5): a chunk that does not start at key
  tile 0 first scores tile 0 itself (``Q K^T`` only, no exp, no V) to get each row's sink
  maximum ``s0``, and tests every tile against ``max(m, s0)``; chunk 0 reaches the same
  reference through its own running max. ``seeded=False`` keeps the unseeded test.

The warps write the same partial states (``m``, ``l``, unnormalised ``O`` per chunk) that the
split-KV merge kernel of the SIMT versions reads, and that kernel finishes the job.

Measured: docs/BENCHMARKS.md ("CUDA decode").
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, uint16, uint32

from .mma import (b_pair_address, bt_pair_address, cp_async16, cp_async_commit,
                  cp_async_wait_all, ld_b32, make_masked_row_max, make_online_softmax_step,
                  make_warp_tile_product, mma_bf16, mma_f16, pack_bf16x2, pack_f16x2, quad_sum,
                  warp_all, warp_sync)
from . import combine
from .mma import HARDWARE
from .prefill_v3 import allow_shared, is_bf16, takes_dtype
from .problem import KernelVersion
from .rule import COMPUTED, SKIPPED  # tile map codes
from .rule import max_nan as _max_nan  # the skip rule's functions (blasst_ref.rule)
from .rule import row_votes_skip as _votes_skip

__all__ = ["HEAD_DIMS", "MAX_ROWS", "VERSION", "accepts", "make_kernel", "prepare", "shape_accepts",
           "shared_bytes"]

HEAD_DIMS = (64, 128)
MAX_ROWS = 16  #: the query rows of one kv group (``group * Lq``) fit one mma's M
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
NEG_INF = float32(-math.inf)
WARPS = 4


def shape_accepts(rows: int, d: int, dv: int, block_k: int) -> bool:
    """Whether v3 decode takes ``rows = group * Lq`` query rows, these dims and tiles."""
    return 1 <= rows <= MAX_ROWS and d == dv and d in HEAD_DIMS and block_k in (32, 64)


def warp_elements(d: int, block_k: int) -> int:
    """16-bit elements of shared memory per warp: two K stages and one V buffer."""
    return 3 * block_k * (d + 8)


def shared_bytes(d: int, block_k: int, warps: int = WARPS) -> int:
    return 2 * warps * warp_elements(d, block_k)


def make_kernel(rows: int, d: int, block_k: int, causal: bool, bf16: bool, seeded: bool,
                warps: int = WARPS):
    """The v3 decode kernel for these compile-time constants.

    Kernel arguments: ``q, k, v`` flat 16-bit arrays (bits of float16 / bfloat16) in the
    layouts ``(B, Hq, Lq, D)``, ``(B, Hkv, Lk, D)``, ``(B, Hkv, Lk, D)``; ``n_hq, n_hkv, lq,
    lk``; ``scale_log2`` (``scale * log2(e)``), ``log_thresh2`` (``log(thresh) * log2(e)``,
    ``-inf`` for dense); ``k_tiles`` (visible key tiles), ``split_tiles``, ``n_splits``;
    the partials ``part_m, part_l`` float32 ``(B * Hkv * n_splits, rows)`` (natural-log
    units, as the merge kernel reads them) and ``part_acc`` ``(B * Hkv * n_splits, rows,
    Dv)``; ``tile_map`` int8 ``(B, Hkv, 1, n_k_tiles)``. Grid ``(ceil(n_splits / warps),
    B * Hkv)``, ``32 * warps`` threads, :func:`shared_bytes` of dynamic shared memory.
    """
    if not shape_accepts(rows, d, d, block_k):
        raise ValueError(f"decode v3 does not take rows={rows}, d={d}, block_k={block_k}")
    dv = d
    KS, NS, KP, NO = d // 16, block_k // 8, block_k // 16, dv // 8
    ROW = d + 8  # padded shared-memory row (16-bit elements)
    STAGE = block_k * ROW
    PER_WARP = warp_elements(d, block_k)
    CHUNKS = d // 8  # 16-byte chunks per row
    ITERS = block_k * CHUNKS // 32
    Q_REGS, S_REGS, P_REGS, O_REGS = 4 * KS, 4 * NS, 4 * KP, 4 * NO
    R = rows
    CAUSAL, SEEDED = causal, seeded
    mma = mma_bf16 if bf16 else mma_f16
    pack = pack_bf16x2 if bf16 else pack_f16x2

    @cuda.jit(device=True, inline=True)
    def load_tile(smem, s_off, gmem, g_off, valid, lane):
        """cp.async one ``block_k x D`` tile (rows ``>= valid`` zero-filled) by one warp."""
        for i in range(ITERS):
            c = lane + 32 * i
            r = c // CHUNKS
            col = (c % CHUNKS) * 8
            ok = r < valid
            cp_async16(smem, s_off + r * ROW + col, gmem,
                       g_off + (r if ok else 0) * d + col, 16 if ok else 0)

    qk_product = make_warp_tile_product(mma, KS, NS // 2, ROW, b_transposed=False)
    pv_product = make_warp_tile_product(mma, KP, NO // 2, ROW, b_transposed=True)
    row_max = make_masked_row_max(NS, CAUSAL)
    softmax_step = make_online_softmax_step(pack, KP, NO)

    @cuda.jit(device=True, inline=True)
    def scores(s, qf, smem, kb, br, bc):
        """``S = Q K^T`` of the tile at shared offset ``kb`` into the fragments ``s``."""
        for i in range(S_REGS):
            s[i] = float32(0.0)
        qk_product(s, qf, smem, kb, br, bc)

    @cuda.jit(device=True, inline=True)
    def mask_and_max(s, j0, t, qi0, qi1, lq, lk, scale_log2):
        """Mask keys past ``Lk`` or a row's causal horizon (``-inf``); the row maxima of
        this lane's two rows in base-2 units (quad-reduced)."""
        offset = lk - lq
        masked = j0 + block_k > lk
        if CAUSAL:
            masked = masked or j0 + block_k - 1 > offset
        return row_max(s, masked, j0, t, qi0, qi1, lk, offset, scale_log2)

    @cuda.jit(fastmath=False)
    def kernel(q, k, v, n_hq, n_hkv, lq, lk, scale_log2, log_thresh2, k_tiles, split_tiles,
               n_splits, part_m, part_l, part_acc, tile_map):
        warp = cuda.threadIdx.x // 32
        lane = cuda.threadIdx.x % 32
        g = lane // 4
        t = lane % 4
        split = cuda.blockIdx.x * warps + warp
        if split >= n_splits:
            return  # (only warp-level barriers below: an idle warp may leave)
        bg = cuda.blockIdx.y
        b = bg // n_hkv
        kvh = bg % n_hkv
        group = n_hq // n_hkv
        smem = cuda.shared.array(0, uint16)
        base = warp * PER_WARP  # this warp's K stage 0, K stage 1, V buffer
        k_base = bg * lk * d
        v_base = bg * lk * dv
        t0 = split * split_tiles
        t1 = min(k_tiles, t0 + split_tiles)
        voting = log_thresh2 > NEG_INF

        # Q fragments straight from global memory: row r = (head g*group + r // Lq, r % Lq),
        # rows >= R are zeros (the padding of the mma's 16 rows)
        r0 = g
        r1 = g + 8
        qi0 = r0 % lq
        qi1 = r1 % lq
        q_row0 = ((b * n_hq + kvh * group + r0 // lq) * lq + qi0) * d
        q_row1 = ((b * n_hq + kvh * group + r1 // lq) * lq + qi1) * d
        qf = cuda.local.array(Q_REGS, uint32)
        for ks in range(KS):
            for j in range(4):
                col = ks * 16 + 2 * t + 8 * (j // 2)
                if j % 2 == 0:
                    qf[4 * ks + j] = ld_b32(q, q_row0 + col) if r0 < R else uint32(0)
                else:
                    qf[4 * ks + j] = ld_b32(q, q_row1 + col) if r1 < R else uint32(0)

        s = cuda.local.array(S_REGS, float32)
        pf = cuda.local.array(P_REGS, uint32)
        o = cuda.local.array(O_REGS, float32)
        for i in range(O_REGS):
            o[i] = float32(0.0)
        m0 = NEG_INF
        m1 = NEG_INF
        l0 = float32(0.0)
        l1 = float32(0.0)
        br, bc = b_pair_address(lane)
        vr, vc = bt_pair_address(lane)

        # the sink reference s0 of each row: tile 0's max, scored here unless this chunk
        # starts at tile 0 (whose running max already covers it)
        s00 = NEG_INF
        s01 = NEG_INF
        if t0 < t1:
            load_tile(smem, base, k, k_base + t0 * block_k * d, min(block_k, lk - t0 * block_k),
                      lane)
            seed_here = SEEDED and voting and t0 > 0
            if seed_here:
                load_tile(smem, base + STAGE, k, k_base, min(block_k, lk), lane)
            cp_async_commit()
            if seed_here:
                cp_async_wait_all()
                warp_sync()
                scores(s, qf, smem, base + STAGE, br, bc)
                s00, s01 = mask_and_max(s, 0, t, qi0, qi1, lq, lk, scale_log2)

        for kt in range(t0, t1):
            stage = (kt - t0) % 2
            cp_async_wait_all()  # K of this tile has landed ...
            warp_sync()  # ... for every lane; the buffers refilled below are free
            j0 = kt * block_k
            if kt + 1 < t1:  # prefetch the next K while this one is scored
                load_tile(smem, base + (1 - stage) * STAGE, k, k_base + (j0 + block_k) * d,
                          min(block_k, lk - j0 - block_k), lane)
                cp_async_commit()
            scores(s, qf, smem, base + stage * STAGE, br, bc)
            tmax0, tmax1 = mask_and_max(s, j0, t, qi0, qi1, lq, lk, scale_log2)

            if voting:  # the group decides together: every real row must agree
                agree = True
                if r0 < R:
                    agree = _votes_skip(tmax0, _max_nan(m0, s00), log_thresh2)
                if r1 < R:
                    agree = agree and _votes_skip(tmax1, _max_nan(m1, s01), log_thresh2)
                skip = warp_all(agree)
            else:
                skip = False
            if lane == 0:
                tile_map[b, kvh, 0, kt] = SKIPPED if skip else COMPUTED
            if skip:
                continue  # no exp, no V bytes, no P V

            load_tile(smem, base + 2 * STAGE, v, v_base + j0 * dv, min(block_k, lk - j0), lane)
            cp_async_commit()

            m0, m1, l0, l1 = softmax_step(s, o, pf, m0, m1, l0, l1, tmax0, tmax1, scale_log2)

            cp_async_wait_all()  # V (and the prefetched K) have landed ...
            warp_sync()  # ... for every lane
            pv_product(o, pf, smem, base + 2 * STAGE, vr, vc)

        # ---- this chunk's partial state, as the merge kernel reads it ----------------------
        l0 = quad_sum(l0)
        l1 = quad_sum(l1)
        w = bg * n_splits + split
        if t == 0:
            if r0 < R:
                part_m[w, r0] = m0 * float32(LN2)  # back to natural-log units
                part_l[w, r0] = l0
            if r1 < R:
                part_m[w, r1] = m1 * float32(LN2)
                part_l[w, r1] = l1
        for nt in range(NO):
            col = nt * 8 + 2 * t
            if r0 < R:
                part_acc[w, r0, col] = o[4 * nt]
                part_acc[w, r0, col + 1] = o[4 * nt + 1]
            if r1 < R:
                part_acc[w, r1, col] = o[4 * nt + 2]
                part_acc[w, r1, col + 1] = o[4 * nt + 3]

    return kernel


# ---- host side ---------------------------------------------------------------------------

_KERNELS: dict = {}


def get_kernel(rows, d, block_k, causal, bf16, seeded):
    key = (rows, d, block_k, bool(causal), bool(bf16), bool(seeded))
    if key not in _KERNELS:
        _KERNELS[key] = make_kernel(*key)
    return _KERNELS[key]


def prepare(q4, k4, v4, part_m, part_l, part_acc, tile_map, log_thresh, causal, scale,
            block_k, k_tiles, split_tiles, n_splits, *, bf16=False, seeded=True):
    """A zero-argument callable that runs the v3 split kernel on Numba device arrays (4-D,
    C-contiguous 16-bit: float16, or bfloat16 bits when ``bf16``), writing the partials
    (see :func:`make_kernel`); the merge kernel of the SIMT path then writes the output."""
    n_b, n_hq, lq, d = q4.shape
    n_hkv, lk = k4.shape[1], k4.shape[2]
    rows = (n_hq // n_hkv) * lq
    kernel = get_kernel(rows, d, block_k, causal, bf16, seeded)
    bits = [x.reshape(x.size).view(np.uint16) for x in (q4, k4, v4)]
    log_thresh2 = -math.inf if log_thresh == -math.inf else log_thresh * LOG2E
    nbytes = shared_bytes(d, block_k)
    args = (*bits, np.int64(n_hq), np.int64(n_hkv), np.int64(lq), np.int64(lk),
            np.float32(scale * LOG2E), np.float32(log_thresh2), np.int64(k_tiles),
            np.int64(split_tiles), np.int64(n_splits), part_m, part_l, part_acc, tile_map)
    allow_shared(kernel, args, nbytes)
    configured = kernel[(-(-n_splits // WARPS), n_b * n_hkv), 32 * WARPS, 0, nbytes]

    def run():
        configured(*args)

    return run


# ---- the version table's entry (:mod:`.launch`) ------------------------------------------


def seeded(problem) -> bool:
    """Whether ``problem`` asks for the seeded skip test (``decode_seed="sink"``)."""
    return bool(problem.seeded)


def accepts(problem, threads=None, chunk=None, **_):
    """The plan ``(bf16,)`` for a decode ``problem``, or ``None``: float16 / bfloat16,
    ``Dqk = Dv`` in :data:`HEAD_DIMS`, at most :data:`MAX_ROWS` rows per kv group, 16-byte
    aligned arrays, on a real GPU only (the simulator runs the SIMT versions; the tests
    drive v3 directly), and none of the SIMT versions' tuning options."""
    if not HARDWARE or threads is not None or chunk is not None:
        return None
    return gpu_plan(problem)


def gpu_plan(problem):
    """The plan a GPU would use for ``problem``, on any machine."""
    if not problem.decode or not problem.aligned or not takes_dtype(problem.dtype) \
            or not shape_accepts(problem.rows, problem.dqk, problem.dv, problem.block_k):
        return None
    return (is_bf16(problem.dtype),)


def launch_version(p, problem, q, k, v, out, tile_map, log_thresh, scale):
    """The split kernel, then the merge (:mod:`.combine`), through Numba's dispatcher."""
    n_work = problem.batch * problem.kv_heads * problem.n_splits
    parts = combine.partials(n_work, problem.rows, problem.dv)
    prepare(q, k, v, *parts, tile_map, log_thresh, problem.causal, scale, problem.block_k,
            problem.k_tiles, problem.split_tiles, problem.n_splits, bf16=p[0],
            seeded=seeded(problem))()
    combine.launch_merge(problem, *parts, out)


def _split_args(problem) -> tuple:
    from numba.cuda import types

    from .numba_internals import Array

    b, hq, hkv, lq, lk, d = (problem.batch, problem.q_heads, problem.kv_heads, problem.q_len,
                             problem.kv_len, problem.dqk)
    n_work = b * hkv * problem.n_splits
    ml = Array(np.float32, (n_work, problem.rows))
    acc = Array(np.float32, (n_work, problem.rows, problem.dv))
    return (Array(np.uint16, (b * hq * lq * d,)), Array(np.uint16, (b * hkv * lk * d,)),
            Array(np.uint16, (b * hkv * lk * problem.dv,)), types.int64, types.int64,
            types.int64, types.int64, types.float32, types.float32, types.int64, types.int64,
            types.int64, ml, ml, acc, Array(np.int8, problem.tile_map_shape))


def kernels(p, problem):
    """``[(label, dispatcher, argtypes)]`` of a call (for register reports)."""
    from .numba_internals import argtypes

    split = get_kernel(problem.rows, problem.dqk, problem.block_k, problem.causal, p[0],
                       seeded(problem))
    return [("decode_v3 split", split, argtypes(_split_args(problem))),
            ("merge", combine.merge_kernel, argtypes(combine.merge_args(problem)))]


class Fast:
    """One decode shape, ready for raw launches (:class:`.numba_internals.RawKernel`): the
    compiled split and merge kernels, the partials and the tile map of this shape. The
    runner of the raw-pointer host path (``fast`` of :data:`VERSION`)."""

    def __init__(self, p, problem):
        from .numba_internals import RawKernel, device_ptr

        n_work = problem.batch * problem.kv_heads * problem.n_splits
        self.partials = (cuda.device_array((n_work, problem.rows), np.float32),
                         cuda.device_array((n_work, problem.rows), np.float32),
                         cuda.device_array((n_work, problem.rows, problem.dv), np.float32))
        self.tile_map = cuda.device_array(problem.tile_map_shape, np.int8)
        split = get_kernel(problem.rows, problem.dqk, problem.block_k, problem.causal, p[0],
                           seeded(problem))
        self.split = RawKernel(split, _split_args(problem),
                               shared=shared_bytes(problem.dqk, problem.block_k))
        self.merge = RawKernel(combine.merge_kernel, combine.merge_args(problem))
        self.parts = tuple(device_ptr(a) for a in self.partials)
        self.map_ptr, self.map_bytes = device_ptr(self.tile_map), int(self.tile_map.size)
        self.sizes = (problem.q_heads, problem.kv_heads, problem.q_len, problem.kv_len)
        self.tiles = (problem.k_tiles, problem.split_tiles, problem.n_splits)
        self.grid = (-(-problem.n_splits // WARPS), problem.batch * problem.kv_heads, 1)
        self.merge_grid = (problem.batch * problem.kv_heads * problem.rows, 1, 1)
        self.merge_block = (combine.merge_block(problem.dv), 1, 1)
        self.causal, self.kv_len = problem.causal, problem.kv_len

    def run(self, qp, kp, vp, outp, log_thresh, scale):
        """Launch one call on the data pointers of q, k, v, out; returns the tile map."""
        from .numba_internals import memset0

        memset0(self.map_ptr, self.map_bytes)
        log_thresh2 = -math.inf if log_thresh == -math.inf else log_thresh * LOG2E
        self.split.launch(self.grid, (32 * WARPS, 1, 1), qp, kp, vp, *self.sizes,
                          scale * LOG2E, log_thresh2, *self.tiles, *self.parts, self.map_ptr)
        self.merge.launch(self.merge_grid, self.merge_block, *self.parts, self.causal,
                          self.kv_len, self.tiles[2], outp)
        return self.tile_map


#: this version's entry in the version table (:mod:`.launch`)
VERSION = KernelVersion("decode_v3", "decode", 3, accepts, launch_version, kernels, fast=Fast,
                        gpu_plan=gpu_plan)
