"""BLASST split-KV decode (flash-decoding) on the GPU, in Numba CUDA.

The algorithm is ``reference._decode`` (docs/DESIGN.md §3): the rows of one tile are *all* query
rows of one kv group, ``R = (Hq // Hkv) * Lq`` of them, row ``r`` being query head
``g * group + r // Lq`` at query position ``r % Lq``; the group decides together whether a
tile is skipped. The key tiles are cut into split-KV chunks of ``split_tiles`` tiles
(``tiling.decode_split_tiles``), each with its own running max, merged by log-sum-exp.

Why it is shaped like this
--------------------------
Decode is memory-bound: every K and V element is read once for only ``R`` rows (4 for
Llama-style GQA at ``Lq = 1``), so the time is the bytes moved. ``Q K^T`` always runs (the
skip vote needs the scores), so K is always read; a skipped tile reads **no V at all**, and
at sparsity ``s`` the bytes are ``K + (1 - s) V``. Everything below serves two goals: read K
and V once, fully coalesced, with many loads in flight; and never touch V of a skipped tile.

Kernel 1: ``split`` — one thread block per (batch, kv head, split)
------------------------------------------------------------------
* **Grid**: ``B * Hkv * n_splits`` blocks (1-D), block ``w`` is batch ``w // (Hkv*n_splits)``,
  kv head ``(w // n_splits) % Hkv``, split ``w % n_splits``; it walks key tiles
  ``[split * split_tiles, min(k_tiles, (split + 1) * split_tiles))``.
* **Block**: ``NT`` threads (256 by default). The work of one tile is spread three ways:

  - *staging* (global -> shared): thread ``t`` loads elements ``t, t + NT, ...`` of a
    ``block_k x DC`` chunk of the K (or V) tile, ``d`` fastest: consecutive threads read
    consecutive addresses of one key row (coalesced), and every thread has
    ``block_k * DC / NT`` independent loads in flight (memory-level parallelism is what a
    memory-bound kernel with one or two blocks per SM lives on);
  - *scores*: thread ``t`` owns score pairs ``(r, j)`` = ``idx // block_k, idx % block_k`` for
    ``idx = t, t + NT, ...`` and computes whole dot products from shared memory (no cross-
    thread reduction over ``D``): the lanes of a warp share ``r`` (``qs`` is a broadcast) and
    walk consecutive keys (``kvs`` rows padded to ``DC + 1``: no bank conflicts);
  - *output*: thread ``t`` owns accumulator elements ``(r, d)`` = ``idx // DC, idx % DC`` of
    every ``Dv`` chunk, kept in a thread-local float32 array (``ps`` row is a broadcast, ``kvs``
    consecutive).

  Row statistics (tile max, row sum) use ``TPR`` threads per row and a shared-memory tree
  reduction. Warp shuffles (``shfl_xor_sync``) would be cheaper, but Numba's CUDA simulator,
  where CI runs these kernels, does not implement them; the block-wide vote uses
  ``cuda.syncthreads_or``, which it does.
* **Shared memory** (float32, static: shapes are compile-time constants, so kernels are
  specialised per shape by a cached factory):

  - ``qs[R, QW]``: the pre-scaled query rows, all of ``Dqk`` (``QW = Dqk`` rounded up to
    ``DC``) when they fit, loaded once per block; else one ``DC`` chunk, re-staged per tile
    (L1/L2-hot: Q is tiny next to K);
  - ``kvs[block_k, DC + 1]``: one chunk of the K tile, later one chunk of the V tile;
  - ``ss[R, block_k]``: the scores of the tile, then its probabilities ``P`` for ``P V``;
  - ``red[NT]``: reduction scratch; ``ms, ls, als, tms[R]``: running max, running sum, the
    tile's rescale factor ``alpha`` and the tile max.

  ``DC`` (columns per chunk) is the largest of 64, 32, 16, 8 (at most ``max(Dqk, Dv)``
  rounded up to a power of two) that fits 48 KB; any head dim works, including the MLA pair
  ``Dqk = 576`` / ``Dv = 512`` (one kv head, ``group = Hq``).

Per key tile
------------
1. ``S = Q K^T`` chunk by chunk along ``Dqk``; masked scores (keys past ``Lk``, or past a
   row's causal horizon ``j > r % Lq + Lk - Lq``, bottom-right aligned) are stored as ``-inf``
   so they take no part in the max.
2. Row max ``m~`` with a NaN-propagating max (a NaN score reaches the vote and, as in the
   reference's ``np.maximum``, the running max).
3. **Vote**: row ``r`` agrees iff ``m~_r - m_r < log(thresh)`` (compared in float64, as the
   reference does); NaN compares false, so a NaN score, or a row that has seen nothing yet
   (``-inf - -inf``), never agrees. Any disagreement (``syncthreads_or``) keeps the tile.
   Skipped: ``tile_map = 2`` and straight to the next tile: no exp, no V load, no ``P V``.
4. Kept: ``tile_map = 1``; online-softmax update of ``m``, ``l`` (a row that has still seen
   nothing shifts by 0, keeping ``l = 0``), ``P`` into ``ss`` (0 for masked keys), then
   ``acc = acc * alpha + P V`` chunk by chunk along ``Dv``.

Version 2 (``_split_kernel_v2``, used wherever :func:`plan_v2` accepts the shape) replaces
this per-tile loop by windows of tiles, 16-byte vector loads and warp shuffles; it is 4.9-5.2x
faster on an H100 (docs/BENCHMARKS.md, CUDA section). Version 1 stays for the shapes v2 does
not take (MLA 576/512, odd head dims, unaligned arrays) and as the readable first step.

Performance of version 1 (H100, numba-cuda 0.30, measured 2026-11): correct, but far from memory-bound:
dense fp16 Llama-GQA decode (B=1, Hq=32/Hkv=8, Lk=32768, D=128) takes ~0.8 ms, ~165 GB/s of
K+V (a device copy moves ~3 TB/s), and skipping speeds it up by only a few percent. The
kernel is latency/issue-bound, not DRAM-bound: only ``B*Hkv*n_splits`` blocks (128 here,
< 1 per SM), each walking its tiles strictly in sequence (stage, barrier, compute, barrier,
~15 barriers per tile for the tree reductions), with no load of tile ``t+1`` in flight while
tile ``t`` computes. The split count is fixed by ``tiling`` (it fixes the skip decisions), so
the parallelism must come from inside a split: ``Q K^T`` and the tile maxima do not depend on
the running state (only the vote and ``P V`` do), so the scores of several tiles can be
computed ahead, many K loads in flight (the CPU kernel scores the whole split first); then
prefetch V of the next kept tile (cp.async) during ``P V``; warp-shuffle reductions on real
GPUs (with the shared-memory path kept for the simulator); vectorised 16-byte loads.

The block then writes its partial state, float32 scratch allocated here:
``part_m, part_l (B*Hkv*n_splits, R)`` and ``part_acc (B*Hkv*n_splits, R, Dv)``. A split with
no tile to visit (causal, past the horizon) writes ``m = -inf, l = 0, acc = 0``.

Kernel 2: ``merge`` — one block per output row
----------------------------------------------
* **Grid**: ``B * Hkv * R`` blocks (= ``B * Hq * Lq`` output rows); **block**: 128 threads
  over ``Dv`` (coalesced reads of ``part_acc`` and writes of ``out``).
* Each split's ``(l, acc)`` is relative to its own max ``m_s``; relative to the common max
  ``M`` it weighs ``exp(m_s - M)``: 0 for a split that saw nothing (``m_s = -inf``).
  ``out = sum_s w_s acc_s / sum_s w_s l_s``, stored in ``out``'s dtype (float16 in,
  float32 compute, float16 out). Rows that see no key (causal, ``Lq > Lk``) store zeros.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import config, cuda, float32, float64, uint64

from ._intrinsics import aligned16 as _aligned16
from ._intrinsics import narrow, widen

COMPUTED = 1  # tile_map codes: as blasst_ref.reference (kernels do not import it)
SKIPPED = 2

DEFAULT_THREADS = 256  #: threads per block of the split kernel (256 beat 128 on an H100)
MERGE_THREADS = 128  #: threads per block of the merge kernel
SHARED_BYTES = 48 * 1024  #: static shared memory available to one block without opt-in


@cuda.jit(device=True)
def _max_nan(a, b):
    """max(a, b) that propagates NaN (like ``np.maximum``); CUDA's ``fmaxf`` drops it."""
    return a if (a > b or a != a) else b


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _pow2_ceil(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def _shared_bytes(rows: int, block_k: int, qw: int, dc: int, nt: int) -> int:
    return 4 * (rows * qw + block_k * (dc + 1) + rows * block_k + nt + 4 * rows)


def plan(rows: int, block_k: int, dqk: int, dv: int, threads: int = DEFAULT_THREADS,
         chunk: int | None = None) -> tuple[int, int]:
    """``(DC, QW)``: columns per head-dim chunk and the width of the staged query rows.

    ``QW = Dqk`` (rounded up to ``DC``) when all of Q fits next to the rest (Q resident,
    loaded once per block), else ``DC`` (Q re-staged per chunk). Raises ``ValueError`` when
    even ``DC = 8`` does not fit: ``R * block_k`` (the score tile) is too large."""
    cands = [chunk] if chunk else [c for c in (64, 32, 16, 8)
                                   if c <= max(8, _pow2_ceil(max(dqk, dv)))]
    for dc in cands:
        qw_res = -(-dqk // dc) * dc
        if _shared_bytes(rows, block_k, qw_res, dc, threads) <= SHARED_BYTES:
            return dc, qw_res
        if _shared_bytes(rows, block_k, dc, dc, threads) <= SHARED_BYTES:
            return dc, dc
    raise ValueError(
        f"decode tile of {rows} rows (query heads per kv head x Lq) x block_k={block_k} keys "
        f"does not fit {SHARED_BYTES} bytes of shared memory; use a smaller block_k"
    )


@functools.lru_cache(maxsize=None)
def _split_kernel(R, BK, DQK, DV, DC, QW, NT):
    """The split kernel specialised for ``R`` rows, ``BK`` keys per tile, head dims, chunk
    ``DC``, staged query width ``QW`` and ``NT`` threads (all compile-time constants)."""
    NCQ = -(-DQK // DC)  # chunks along Dqk
    NCV = -(-DV // DC)  # chunks along Dv
    Q_RES = QW > DC or NCQ == 1  # all of Q resident in shared memory
    EPS = -(-(R * BK) // NT)  # score pairs per thread
    EPV = -(-(R * DC) // NT)  # accumulator elements per thread per Dv chunk
    ACC_N = NCV * EPV
    TPR = min(_pow2_floor(NT // R) if R <= NT else 1, _pow2_ceil(BK))  # threads per row
    RPP = NT // TPR  # rows per reduction pass
    NPASS = -(-R // RPP)
    KV_W = DC + 1  # padded row of kvs: conflict-free column walks
    # The hot loops index with uint64: Numba adds a negative-index wraparound fix to every
    # signed index and keeps Python's range() bookkeeping in the loop, about 25 integer
    # instructions per FMA measured on an H100; unsigned indices and while-loops compile to
    # plain address arithmetic.
    U_DC, U_BK, U_DQK, U_DV = np.uint64(DC), np.uint64(BK), np.uint64(DQK), np.uint64(DV)
    U_NT, U_ONE = np.uint64(NT), np.uint64(1)
    U_BKDC, U_RBK, U_RDC = np.uint64(BK * DC), np.uint64(R * BK), np.uint64(R * DC)

    @cuda.jit
    def split(q, k, v, log_thresh, causal, scale, lk, k_tiles, split_tiles, n_splits,
              part_m, part_l, part_acc, tile_map):
        """q (B,Hq,Lq,Dqk), k (B,Hkv,Lk,Dqk), v (B,Hkv,Lk,Dv); part_m/part_l
        (B*Hkv*n_splits, R), part_acc (B*Hkv*n_splits, R, Dv); tile_map (B,Hkv,1,n_k_tiles)."""
        qs = cuda.shared.array((R, QW), float32)
        kvs = cuda.shared.array((BK, KV_W), float32)
        ss = cuda.shared.array((R, BK), float32)
        red = cuda.shared.array(NT, float32)
        ms = cuda.shared.array(R, float32)
        ls = cuda.shared.array(R, float32)
        als = cuda.shared.array(R, float32)
        tms = cuda.shared.array(R, float32)
        acc = cuda.local.array(ACC_N, float32)  # this thread's (r, d) accumulators
        sacc = cuda.local.array(EPS, float32)  # this thread's (r, j) scores

        t = cuda.threadIdx.x
        ut = uint64(t)
        w = cuda.blockIdx.x
        n_hkv = k.shape[1]
        lq = q.shape[2]
        group = q.shape[1] // n_hkv
        b = w // (n_hkv * n_splits)
        g = (w // n_splits) % n_hkv
        sp = w % n_splits
        offset = lk - lq
        ub, ug, ulk = uint64(b), uint64(g), uint64(lk)
        neg_inf = float32(-math.inf)
        lane = t % TPR  # member of a row group for the row reductions
        r_first = t // TPR

        for r in range(t, R, NT):
            ms[r] = neg_inf
            ls[r] = float32(0.0)
        for e in range(ACC_N):
            acc[e] = float32(0.0)
        if Q_RES:  # the whole pre-scaled Q of the group, once
            for idx in range(t, R * QW, NT):
                r = idx // QW
                d = idx % QW
                x = float32(0.0)
                if d < DQK:
                    x = widen(q[b, g * group + r // lq, r % lq, d]) * scale
                qs[r, d] = x
        cuda.syncthreads()

        kt0 = sp * split_tiles
        kt1 = min(k_tiles, kt0 + split_tiles)
        for kt in range(kt0, kt1):
            j0 = kt * BK
            uj0 = uint64(j0)
            # ---- 1. S = Q K^T, chunk by chunk along Dqk --------------------------------
            for e in range(EPS):
                sacc[e] = float32(0.0)
            for c in range(NCQ):
                if not Q_RES:
                    for idx in range(t, R * DC, NT):
                        r = idx // DC
                        d = idx % DC
                        x = float32(0.0)
                        if c * DC + d < DQK:
                            x = widen(q[b, g * group + r // lq, r % lq, c * DC + d]) * scale
                        qs[r, d] = x
                uc = uint64(c) * U_DC
                uidx = ut
                while uidx < U_BKDC:  # coalesced: d fastest
                    j = uidx // U_DC
                    d = uidx % U_DC
                    x = float32(0.0)
                    if uj0 + j < ulk and uc + d < U_DQK:
                        x = widen(k[ub, ug, uj0 + j, uc + d])
                    kvs[j, d] = x
                    uidx += U_NT
                cuda.syncthreads()
                uq = uc if Q_RES else uint64(0)
                for e in range(EPS):
                    uidx = ut + U_NT * uint64(e)
                    if uidx < U_RBK:
                        r = uidx // U_BK
                        j = uidx % U_BK
                        a = float32(0.0)
                        d = uint64(0)
                        while d < U_DC:
                            a += qs[r, uq + d] * kvs[j, d]
                            d += U_ONE
                        sacc[e] += a
                cuda.syncthreads()  # kvs is overwritten next
            for e in range(EPS):  # masked scores take no part in the max: -inf
                idx = t + NT * e
                if idx < R * BK:
                    r = idx // BK
                    j = idx % BK
                    jg = j0 + j
                    vis = jg < lk and (not causal or jg <= r % lq + offset)
                    ss[r, j] = sacc[e] if vis else neg_inf
            cuda.syncthreads()

            # ---- 2. tile max per row (NaN-propagating), TPR threads per row ------------
            for ps in range(NPASS):
                r = r_first + RPP * ps
                mx = neg_inf
                if r < R:
                    for j in range(lane, BK, TPR):
                        mx = _max_nan(mx, ss[r, j])
                red[t] = mx
                cuda.syncthreads()
                step = TPR // 2
                while step > 0:
                    if lane < step:
                        red[t] = _max_nan(red[t], red[t + step])
                    cuda.syncthreads()
                    step //= 2
                if lane == 0 and r < R:
                    tms[r] = red[t]
                cuda.syncthreads()

            # ---- 3. the group's vote ----------------------------------------------------
            disagree = 0
            for r in range(t, R, NT):
                gap = tms[r] - ms[r]  # float32, as the reference
                if not (float64(gap) < log_thresh):  # NaN: never agrees
                    disagree = 1
            if cuda.syncthreads_or(disagree) == 0:
                if t == 0:
                    tile_map[b, g, 0, kt] = SKIPPED
                continue  # no exp, no V load, no P V; m, l, acc untouched
            if t == 0:
                tile_map[b, g, 0, kt] = COMPUTED

            # ---- 4a. online softmax: m, l, alpha; P into ss ----------------------------
            for ps in range(NPASS):
                r = r_first + RPP * ps
                part = float32(0.0)
                m_old = neg_inf
                shift = float32(0.0)
                if r < R:
                    m_old = ms[r]
                    m_new = _max_nan(m_old, tms[r])
                    shift = float32(0.0) if m_new == neg_inf else m_new
                    for j in range(lane, BK, TPR):
                        jg = j0 + j
                        p = float32(0.0)
                        if jg < lk and (not causal or jg <= r % lq + offset):
                            p = math.exp(ss[r, j] - shift)
                        ss[r, j] = p
                        part += p
                red[t] = part
                cuda.syncthreads()
                step = TPR // 2
                while step > 0:
                    if lane < step:
                        red[t] += red[t + step]
                    cuda.syncthreads()
                    step //= 2
                if lane == 0 and r < R:
                    alpha = math.exp(m_old - shift)
                    ls[r] = ls[r] * alpha + red[t]
                    als[r] = alpha
                    ms[r] = _max_nan(m_old, tms[r])
                cuda.syncthreads()

            # ---- 4b. acc = acc * alpha + P V, chunk by chunk along Dv -------------------
            for c in range(NCV):
                uc = uint64(c) * U_DC
                uidx = ut
                while uidx < U_BKDC:  # the only V reads: kept tiles only
                    j = uidx // U_DC
                    d = uidx % U_DC
                    x = float32(0.0)
                    if uj0 + j < ulk and uc + d < U_DV:
                        x = widen(v[ub, ug, uj0 + j, uc + d])
                    kvs[j, d] = x
                    uidx += U_NT
                cuda.syncthreads()
                for e in range(EPV):
                    uidx = ut + U_NT * uint64(e)
                    if uidx < U_RDC:
                        r = uidx // U_DC
                        d = uidx % U_DC
                        a = float32(0.0)
                        j = uint64(0)
                        while j < U_BK:
                            a += ss[r, j] * kvs[j, d]
                            j += U_ONE
                        acc[c * EPV + e] = acc[c * EPV + e] * als[r] + a
                cuda.syncthreads()

        # ---- the split's partial state ---------------------------------------------------
        for r in range(t, R, NT):
            part_m[w, r] = ms[r]
            part_l[w, r] = ls[r]
        for c in range(NCV):
            for e in range(EPV):
                idx = t + NT * e
                if idx < R * DC:
                    r = idx // DC
                    d = c * DC + idx % DC
                    if d < DV:
                        part_acc[w, r, d] = acc[c * EPV + e]

    return split


@cuda.jit
def _merge_kernel(part_m, part_l, part_acc, causal, lk, n_splits, out):
    """Log-sum-exp merge of the splits of one output row per block into ``out``
    ``(B, Hq, Lq, Dv)``; partials as written by the split kernel."""
    t = cuda.threadIdx.x
    n_hkv = part_m.shape[0] // (out.shape[0] * n_splits)
    R = part_m.shape[1]
    lq = out.shape[2]
    dv = out.shape[3]
    group = out.shape[1] // n_hkv
    row = cuda.blockIdx.x  # (b * Hkv + g) * R + r
    bg = row // R
    r = row % R
    b = bg // n_hkv
    g = bg % n_hkv
    h = g * group + r // lq
    i = r % lq
    w0 = bg * n_splits
    if causal and i + lk - lq < 0:  # the row sees no key: zeros
        for d in range(t, dv, cuda.blockDim.x):
            out[b, h, i, d] = narrow(out, float32(0.0))
        return
    neg_inf = float32(-math.inf)
    mx = neg_inf
    for s in range(n_splits):
        mx = _max_nan(mx, part_m[w0 + s, r])
    shift = float32(0.0) if mx == neg_inf else mx
    total = float32(0.0)
    for s in range(n_splits):
        total += math.exp(part_m[w0 + s, r] - shift) * part_l[w0 + s, r]
    for d in range(t, dv, cuda.blockDim.x):
        o = float32(0.0)
        for s in range(n_splits):
            o += math.exp(part_m[w0 + s, r] - shift) * part_acc[w0 + s, r, d]
        out[b, h, i, d] = narrow(out, o / total)


# ---------------------------------------------------------------------------------------
# Version 2: windows of tiles, vector loads, warp shuffles (the fast path)
#
# Why v1 is slow: one tile at a time, ~15 barriers per tile, scalar 2-byte loads, nothing
# in flight while a tile computes (0.37 TB/s on an H100). v2 rests on one observation: the
# running max of a row after tile t is the max over *all* tiles <= t, skipped ones included
# (a skipped tile had m~ < m + log(thresh) < m in every row). So a whole window of WT tiles
# can be scored first (K only), then voted on, then exponentiated, then multiplied with the
# V rows of its kept tiles, with the same decisions as the reference's sequential walk:
#
#   1. scores: lanes take 16-byte slices of K rows (16 lanes per row for D = 128 in fp16,
#      2 rows per warp instruction), 4 rows in flight per lane; the 4 x R partial dot
#      products are summed over the row's lanes by one reduce-scatter butterfly (shfl_xor),
#      after which each lane stores one score; masked keys store -inf;
#   2. tile maxima, one thread per (row, tile) (padded rows of ss: no bank conflicts);
#   3. votes: one thread per row walks the window (prefix max, float32 gap vs log(thresh)
#      in float64, NaN never agrees), one thread per tile ANDs the rows and writes tile_map;
#   4. P = exp(s - M) with M the running max at the window's end (rescaling acc, l once per
#      window), row sums per (row, tile);
#   5. acc += P V over the kept tiles only, (tile, round) pairs flattened so that 4 V rows
#      are in flight per lane; then acc is summed over the lanes that share a Dv slice
#      (shfl_xor, then shared-memory atomics) into the same partials the merge reads.
#
# On the simulator the same kernel runs with shared-memory reductions and a scalar twin of
# the vector load (_intrinsics.py). Measured (H100, fp16, B=8, Hq=32/Hkv=8, D=128): 1.80 TB/s
# at Lk=16k, 1.95 TB/s at 64k (60-65% of a copy) for the first v2; 2.15-2.19 / 2.32-2.35 TB/s
# (72-79%) since step 1 reduce-scatters its partial sums (_kscore_source) and blocks have 128
# threads; limits and next steps in BENCHMARKS.md.
# ---------------------------------------------------------------------------------------

#: threads per block of the v2 split kernel on a GPU (the simulator uses fewer). 128 beat
#: 256 on an H100: at 128 registers both give 16 warps per SM, but as 4 blocks instead of 2,
#: whose phases (K pass, votes, V pass) overlap better, and B=8 x Hkv=8 x 8 splits (Lk=16k)
#: = 512 blocks fit one wave of 4 x 132
V2_THREADS = 128
#: rounds of K row loads a lane issues before it uses any of them (loads in flight)
V2_UNROLL = 4
#: largest score window (float32 words of ``ss``) the v2 kernel keeps in shared memory
V2_WINDOW_WORDS = 8704
#: register cap of the v2 split kernel (``max_registers``)
V2_REGS = 128
#: issue the next K / V loads before the current group's math (see _split_kernel_v2)
V2_PREFETCH_K, V2_PREFETCH_V = False, False


def plan_v2(rows: int, block_k: int, dqk: int, dv: int, itemsize: int,
            threads: int = V2_THREADS, split_tiles: int | None = None) -> int | None:
    """Tiles per window ``WT`` of the v2 split kernel, or ``None`` when v2 does not apply
    (then :func:`launch_decode` uses version 1, which takes any shape).

    v2 needs: head dims that are whole 16-byte vectors split over a power-of-two number of
    lanes <= 32 (``D / (16 / itemsize)``: 16 lanes for D = 128 in float16); at most 64 query
    registers per lane (``rows * 16 / itemsize``); a tile that the block's rounds cover
    exactly; and a window of at least one tile in shared memory."""
    vec = 16 // itemsize
    if dqk % vec or dv % vec or threads % 32:
        return None
    lpk, lpv = dqk // vec, dv // vec
    if lpk > 32 or lpv > 32 or lpk & (lpk - 1) or lpv & (lpv - 1) or rows * vec > 64:
        return None
    nw = threads // 32
    rsk, rsv = (32 // lpk) * nw, (32 // lpv) * nw
    if block_k % rsv or rows > threads:
        return None
    wt = 1
    while (wt * 2 <= 32 and rows * wt * 2 * (block_k + 1) <= V2_WINDOW_WORDS
           and (split_tiles is None or wt * 2 <= _pow2_ceil(split_tiles))):
        wt *= 2
    while wt <= 32 and (wt * block_k) % (rsk * V2_UNROLL):
        wt *= 2
    if wt > 32 or rows * wt * (block_k + 1) > 2 * V2_WINDOW_WORDS:
        return None
    return wt


_KSCORE: dict = {}
_KSCORE_INLINE = True  #: Numba-level inlining of ``_kscore`` (a tuning switch)


@(cuda.jit(device=True) if config.ENABLE_CUDASIM else cuda.jit(device=True, forceinline=True))
def _pick(c, a, b):
    """``a if c else b`` as a call (a select after inlining, no branch in Numba's IR)."""
    return a if c else b


def _kscore_source(R, VEC, LPK, RSK, BK, BKP, U, sim):
    """Python source of ``_kscore``: the scores of U key rows (this lane's raw 16-byte
    slices ``xa0..``) against the R query rows, reduced over the LPK lanes of a row.

    The U * R partial dot products of a lane are summed over its LPK lanes by a
    *reduce-scatter* butterfly: at the step of offset ``o`` a lane keeps half of its values
    (the upper half if bit ``o`` of its lane is set), sends the other half to lane
    ``lane ^ o`` and adds what it receives. For U * R = LPK = 16 (R = 4, D = 128, 16-bit)
    that is 8 + 4 + 2 + 1 = 15 shuffles for 16 sums, where one butterfly per sum (the
    previous version) took 64; each lane then holds one finished score and stores it."""
    N = U * R
    NP = 1
    while NP < N:
        NP *= 2
    L = []

    def emit(ind, line):
        L.append("    " * ind + line)

    args = ", ".join(f"xa{u}" for u in range(U))
    emit(0, f"def _kscore({args}, k, qr, ss, hzs, red, t, ck, kk, j0, jlim):")
    for u in range(U):
        emit(1, f"y{u} = unpack(k, xa{u})")
    for u in range(U):
        for r in range(R):
            terms = " + ".join(f"qr[{r * VEC + e}] * y{u}[{e}]" for e in range(VEC))
            emit(1, f"v{u * R + r} = {terms}")
    for i in range(N, NP):
        emit(1, f"v{i} = float32(0.0)")
    emit(1, "base = 0")
    n, off, dup = NP, LPK // 2, 0
    while off >= 1:
        if n > 1:
            half = n // 2
            emit(1, f"hb = (ck // {off}) % 2")
            for i in range(half):
                emit(1, f"s_ = _pick(hb, v{i}, v{i + half})")
                emit(1, f"v{i} = _pick(hb, v{i + half}, v{i}) + xor_shfl(s_, {off}, red, t)")
            emit(1, f"base += hb * {half}")
            n = half
        else:
            emit(1, f"v0 += xor_shfl(v0, {off}, red, t)")
            dup |= off
        off //= 2
    for i in range(n):
        emit(1, f"vi = base + {i}")
        cond = []
        if NP > N:
            cond.append(f"vi < {N}")
        if dup:
            cond.append(f"(ck & {dup}) == 0")
        ind = 1
        if cond:
            emit(1, "if " + " and ".join(cond) + ":")
            ind = 2
        emit(ind, f"r = vi % {R}")
        emit(ind, f"key = kk + (vi // {R}) * {RSK}")
        emit(ind, "jg = j0 + key")
        emit(ind, f"ss[r, (key // {BK}) * {BKP} + key % {BK}] = "
                  f"_pick(jg < jlim and jg <= hzs[r], v{i}, float32(-math.inf))")
    return "\n".join(L) + "\n"


def _kscore_fn(R, VEC, LPK, RSK, BK, BKP, U):
    """The compiled ``_kscore`` device function for these constants (see
    :func:`_kscore_source`)."""
    from ._intrinsics import unpack, xor_shfl

    sim = bool(config.ENABLE_CUDASIM)
    key = (R, VEC, LPK, RSK, BK, BKP, U, sim)
    if key not in _KSCORE:
        import linecache

        src = _kscore_source(R, VEC, LPK, RSK, BK, BKP, U, sim)
        fname = f"<blasst_ref.cuda.decode _kscore {key}>"
        linecache.cache[fname] = (len(src), None, src.splitlines(True), fname)
        ns = {"cuda": cuda, "float32": float32, "math": math, "unpack": unpack,
              "xor_shfl": xor_shfl, "_pick": _pick}
        exec(compile(src, fname, "exec"), ns)  # noqa: S102 (our own generated source)
        # inlined by Numba (NVVM-level inlining left ``qr`` in local memory); its
        # selects are ``_pick`` calls, so Numba's front end sees few branches
        jit = cuda.jit(device=True) if sim else cuda.jit(device=True, inline=_KSCORE_INLINE)
        _KSCORE[key] = jit(ns["_kscore"])
    return _KSCORE[key]


@functools.lru_cache(maxsize=None)
def _split_kernel_v2(R, BK, DQK, DV, VEC, NT, WT, REGS=128, PF_K=True, PF_V=True):
    """The v2 split kernel for ``R`` rows, ``BK`` keys per tile, head dims, ``VEC`` elements
    per 16-byte load, ``NT`` threads and windows of ``WT`` tiles (compile-time constants)."""
    from ._intrinsics import SHFL, FULL_MASK, ld16, ldw, unpack

    NW = NT // 32  # warps
    LPK = DQK // VEC  # lanes that share one K row (16 for D = 128 in float16)
    KPI = 32 // LPK  # K rows one warp loads per instruction
    LPV = DV // VEC
    KPV = 32 // LPV
    RSK = KPI * NW  # K rows per block round
    RSV = KPV * NW  # V rows per block round
    WK = WT * BK  # keys per window
    U = V2_UNROLL
    assert U == 4, "the K and V loops below are unrolled by hand for 4 loads"
    NRK = WK // RSK  # rounds of K loads per window (a multiple of U)
    NRV = BK // RSV  # rounds of V loads per kept tile
    BKP = BK + 1  # padded tile row in ss: conflict-free per-(row, tile) walks
    SSW = WT * BKP
    NPAIR = R * WT
    RED_N = NT if not SHFL else 1  # simulator scratch for group_sum
    RV = R * VEC  # local arrays need literal sizes: computed here, not in the kernel
    neg_inf_c = -math.inf

    _kscore = _kscore_fn(R, VEC, LPK, RSK, BK, BKP, U)

    @cuda.jit(device=True, inline=True)
    def _vcol(klist, idx, n_rounds, w, kv):
        """Window key of this lane in flattened V round ``idx``; past the last round, the
        key of the last round (a kept tile: its load is a cache hit, its FMAs skipped by
        the caller)."""
        idx = min(idx, n_rounds - 1)
        return klist[idx // NRV] * BK + (idx % NRV) * RSV + w * KPV + kv

    @cuda.jit(device=True, inline=True)
    def _pv(xw, v, acc, ss, kk, valid):
        """acc[r, :] += P[r, kk] * (this lane's slice ``xw`` (raw words) of window key kk's
        V row)."""
        if valid:
            x = unpack(v, xw)  # a clamped row (past Lk or the split) may hold inf/NaN: never 0 * it
            col = (kk // BK) * BKP + kk % BK
            for r in range(R):
                pr = ss[r, col]
                for e in range(VEC):
                    acc[r * VEC + e] += pr * x[e]

    @cuda.jit(max_registers=REGS) if SHFL else cuda.jit
    def split_v2(q, k, v, n_hq, n_hkv, lq, lk, log_thresh, causal, scale, k_tiles,
                 split_tiles, n_splits, part_m, part_l, part_acc, tile_map):
        """q, k, v: flat (1-D) views of (B,Hq,Lq,Dqk), (B,Hkv,Lk,Dqk), (B,Hkv,Lk,Dv);
        part_m/part_l (B*Hkv*n_splits, R), part_acc (B*Hkv*n_splits, R, Dv);
        tile_map (B, Hkv, 1, n_k_tiles)."""
        ss = cuda.shared.array((R, SSW), float32)  # scores, then P, of one window
        tmax = cuda.shared.array((R, WT), float32)
        psum = cuda.shared.array((R, WT), float32)
        agree = cuda.shared.array((R, WT), np.int32)
        hzs = cuda.shared.array(R, np.int64)
        klist = cuda.shared.array(WT, np.int32)  # the window's kept tiles, in order
        nkept = cuda.shared.array(1, np.int32)
        keep = cuda.shared.array(WT, np.int32)
        ms = cuda.shared.array(R, float32)
        ls = cuda.shared.array(R, float32)
        als = cuda.shared.array(R, float32)
        shs = cuda.shared.array(R, float32)
        sacc = cuda.shared.array((R, DV), float32)
        red = cuda.shared.array(RED_N, float32)
        qr = cuda.local.array(RV, float32)  # this lane's slice of the scaled queries
        acc = cuda.local.array(RV, float32)  # this lane's partial P V

        t = cuda.threadIdx.x
        w = t // 32
        lane = t % 32
        ck = lane % LPK  # which 16-byte slice of a K row
        kl = lane // LPK  # which K row of the warp's instruction
        cv = lane % LPV
        kv = lane // LPV
        wid = cuda.blockIdx.x
        group = n_hq // n_hkv
        b = wid // (n_hkv * n_splits)
        g = (wid // n_splits) % n_hkv
        sp = wid % n_splits
        kbase = (b * n_hkv + g) * lk  # first K/V row of this (batch, kv head)
        offset = lk - lq
        neg_inf = float32(neg_inf_c)
        f_scale = float32(scale)

        for r in range(R):
            h = g * group + r // lq
            x = ld16(q, ((b * n_hq + h) * lq + r % lq) * DQK + ck * VEC)
            for e in range(VEC):
                qr[r * VEC + e] = x[e] * f_scale
                acc[r * VEC + e] = float32(0.0)
        for idx in range(t, R * DV, NT):
            sacc[idx // DV, idx % DV] = float32(0.0)
        if t < R:
            ms[t] = neg_inf
            ls[t] = float32(0.0)
            hzs[t] = min(lk - 1, t % lq + offset) if causal else lk - 1
        cuda.syncthreads()

        kt0 = sp * split_tiles
        kt1 = min(k_tiles, kt0 + split_tiles)
        for wt0 in range(kt0, kt1, WT):
            nwt = min(WT, kt1 - wt0)
            j0 = wt0 * BK
            jlim = min(lk, (wt0 + nwt) * BK)  # keys past it: masked, never used
            # ---- 1. scores of the whole window: U rows of K in flight per lane, and the
            # next U rows loaded (raw words) before the current ones are used -------------
            # (unrolled by hand into tuples: a loop over a local array of loaded vectors
            # was left rolled by the compiler and the array went to local memory)
            kk = w * KPI + kl
            kq = ck * VEC
            xa0 = ldw(k, (kbase + min(j0 + kk, jlim - 1)) * DQK + kq)
            xa1 = ldw(k, (kbase + min(j0 + kk + RSK, jlim - 1)) * DQK + kq)
            xa2 = ldw(k, (kbase + min(j0 + kk + 2 * RSK, jlim - 1)) * DQK + kq)
            xa3 = ldw(k, (kbase + min(j0 + kk + 3 * RSK, jlim - 1)) * DQK + kq)
            for it in range(0, NRK, U):
                kn = kk + U * RSK  # the next group (past the window: clamped, unused)
                if PF_K:  # the next loads are issued before this group's math
                    xb0 = ldw(k, (kbase + min(j0 + kn, jlim - 1)) * DQK + kq)
                    xb1 = ldw(k, (kbase + min(j0 + kn + RSK, jlim - 1)) * DQK + kq)
                    xb2 = ldw(k, (kbase + min(j0 + kn + 2 * RSK, jlim - 1)) * DQK + kq)
                    xb3 = ldw(k, (kbase + min(j0 + kn + 3 * RSK, jlim - 1)) * DQK + kq)
                    _kscore(xa0, xa1, xa2, xa3, k, qr, ss, hzs, red, t, ck, kk, j0, jlim)
                else:  # ... or after it (their registers are reused: no double buffer)
                    _kscore(xa0, xa1, xa2, xa3, k, qr, ss, hzs, red, t, ck, kk, j0, jlim)
                    xb0 = ldw(k, (kbase + min(j0 + kn, jlim - 1)) * DQK + kq)
                    xb1 = ldw(k, (kbase + min(j0 + kn + RSK, jlim - 1)) * DQK + kq)
                    xb2 = ldw(k, (kbase + min(j0 + kn + 2 * RSK, jlim - 1)) * DQK + kq)
                    xb3 = ldw(k, (kbase + min(j0 + kn + 3 * RSK, jlim - 1)) * DQK + kq)
                xa0, xa1, xa2, xa3 = xb0, xb1, xb2, xb3
                kk = kn
            cuda.syncthreads()
            # ---- 2. tile maxima, one thread per (row, tile) ------------------------------
            for p in range(t, NPAIR, NT):
                r = p // WT
                tt = p % WT
                if tt < nwt:
                    mx = neg_inf
                    for jj in range(BK):
                        mx = _max_nan(mx, ss[r, tt * BKP + jj])
                    tmax[r, tt] = mx
            cuda.syncthreads()
            # ---- 3. the votes. The running max of a row after tile t is the max over *all*
            # tiles <= t, skipped ones included: a skipped tile had m~ < m + log(thresh) < m
            # in every row, so it could not have raised m. Hence one thread per row walks the
            # window's tile maxima (a prefix max), and the whole window is decided before any
            # exp or V load.
            if t < R:
                m_old = ms[t]
                pm = m_old
                for tt in range(nwt):
                    tm = tmax[t, tt]
                    gap = tm - pm  # float32, as the reference
                    agree[t, tt] = 1 if float64(gap) < log_thresh else 0  # NaN: 0
                    pm = _max_nan(pm, tm)
                shift = float32(0.0) if pm == neg_inf else pm
                als[t] = math.exp(m_old - shift)
                shs[t] = shift
                ms[t] = pm
            cuda.syncthreads()
            if t < nwt:
                kp = 0
                for r in range(R):
                    if agree[r, t] == 0:
                        kp = 1
                keep[t] = kp
                tile_map[b, g, 0, wt0 + t] = COMPUTED if kp else SKIPPED
            cuda.syncthreads()
            if t == 0:  # the kept tiles in order, for the flattened P V loop below
                nk = 0
                for tt in range(nwt):
                    if keep[tt] != 0:
                        klist[nk] = tt
                        nk += 1
                nkept[0] = nk
            # (the next barrier, after step 4, publishes klist)
            # ---- 4. P = exp(s - m_window) of kept tiles, row sums per (row, tile) ---------
            for p in range(t, NPAIR, NT):
                r = p // WT
                tt = p % WT
                if tt < nwt and keep[tt] != 0:
                    sh = shs[r]
                    s = float32(0.0)
                    last = min(jlim - 1, hzs[r])
                    for jj in range(BK):
                        jg = j0 + tt * BK + jj
                        pv = float32(0.0)
                        if jg <= last:
                            pv = math.exp(ss[r, tt * BKP + jj] - sh)
                        ss[r, tt * BKP + jj] = pv
                        s += pv
                    psum[r, tt] = s
            cuda.syncthreads()
            if t < R:
                lsum = ls[t] * als[t]
                for tt in range(nwt):
                    if keep[tt] != 0:
                        lsum += psum[t, tt]
                ls[t] = lsum
            # ---- 5. acc = acc * alpha + P V over the kept tiles: the only V reads ---------
            for r in range(R):
                alpha = als[r]
                if alpha != float32(1.0):  # after the first window the max rarely moves
                    for e in range(VEC):
                        acc[r * VEC + e] *= alpha
            # (kept tile, round) pairs flattened: 4 rows of V in flight per lane whatever
            # the head dim (a tile has only NRV = 2..8 rounds), across kept tiles, and the
            # next 4 loaded before the current ones are used
            n_rounds = nkept[0] * NRV
            if n_rounds > 0:  # a window with every tile skipped reads no V at all
                kv0 = kv
                c0 = _vcol(klist, 0, n_rounds, w, kv0)
                c1 = _vcol(klist, 1, n_rounds, w, kv0)
                c2 = _vcol(klist, 2, n_rounds, w, kv0)
                c3 = _vcol(klist, 3, n_rounds, w, kv0)
                vq = cv * VEC
                xa0 = ldw(v, (kbase + min(j0 + c0, jlim - 1)) * DV + vq)
                xa1 = ldw(v, (kbase + min(j0 + c1, jlim - 1)) * DV + vq)
                xa2 = ldw(v, (kbase + min(j0 + c2, jlim - 1)) * DV + vq)
                xa3 = ldw(v, (kbase + min(j0 + c3, jlim - 1)) * DV + vq)
                for it in range(0, n_rounds, 4):
                    d0 = _vcol(klist, it + 4, n_rounds, w, kv0)
                    d1 = _vcol(klist, it + 5, n_rounds, w, kv0)
                    d2 = _vcol(klist, it + 6, n_rounds, w, kv0)
                    d3 = _vcol(klist, it + 7, n_rounds, w, kv0)
                    if PF_V:
                        xb0 = ldw(v, (kbase + min(j0 + d0, jlim - 1)) * DV + vq)
                        xb1 = ldw(v, (kbase + min(j0 + d1, jlim - 1)) * DV + vq)
                        xb2 = ldw(v, (kbase + min(j0 + d2, jlim - 1)) * DV + vq)
                        xb3 = ldw(v, (kbase + min(j0 + d3, jlim - 1)) * DV + vq)
                    _pv(xa0, v, acc, ss, c0, it < n_rounds and j0 + c0 < jlim)
                    _pv(xa1, v, acc, ss, c1, it + 1 < n_rounds and j0 + c1 < jlim)
                    _pv(xa2, v, acc, ss, c2, it + 2 < n_rounds and j0 + c2 < jlim)
                    _pv(xa3, v, acc, ss, c3, it + 3 < n_rounds and j0 + c3 < jlim)
                    if not PF_V:
                        xb0 = ldw(v, (kbase + min(j0 + d0, jlim - 1)) * DV + vq)
                        xb1 = ldw(v, (kbase + min(j0 + d1, jlim - 1)) * DV + vq)
                        xb2 = ldw(v, (kbase + min(j0 + d2, jlim - 1)) * DV + vq)
                        xb3 = ldw(v, (kbase + min(j0 + d3, jlim - 1)) * DV + vq)
                    xa0, xa1, xa2, xa3 = xb0, xb1, xb2, xb3
                    c0, c1, c2, c3 = d0, d1, d2, d3
            cuda.syncthreads()  # ss is rewritten by the next window

        # ---- the split's partial state: reduce acc over the lanes that share a slice ------
        for r in range(R):
            for e in range(VEC):
                x = acc[r * VEC + e]
                if SHFL:
                    off = LPV
                    while off < 32:
                        x += cuda.shfl_xor_sync(FULL_MASK, x, off)
                        off *= 2
                if not SHFL or kv == 0:
                    cuda.atomic.add(sacc, (r, cv * VEC + e), x)
        cuda.syncthreads()
        if t < R:
            part_m[wid, t] = ms[t]
            part_l[wid, t] = ls[t]
        for idx in range(t, R * DV, NT):
            part_acc[wid, idx // DV, idx % DV] = sacc[idx // DV, idx % DV]

    return split_v2


_SCRATCH: dict = {}


def _scratch(n_work, rows, dv):
    """Float32 partials of the split kernels, allocated once per shape and device and reused
    (every launch runs on the default stream, in order): a fresh ``cuda.device_array`` per
    call costs a ``cudaMalloc``, tens of microseconds, as much as a 16k-key decode."""
    key = (getattr(cuda.get_current_device(), "id", 0), n_work, rows, dv)
    bufs = _SCRATCH.get(key)
    if bufs is None:
        if len(_SCRATCH) > 16:
            _SCRATCH.clear()
        bufs = (cuda.device_array((n_work, rows), np.float32),
                cuda.device_array((n_work, rows), np.float32),
                cuda.device_array((n_work, rows, dv), np.float32))
        _SCRATCH[key] = bufs
    return bufs


def launch_decode(q, k, v, out, tile_map, log_thresh, causal, scale, block_k, split_tiles,
                  n_splits, *, threads=None, chunk=None, version=None):
    """BLASST split-KV decode on the GPU.

    Args:
        q: ``(B, Hq, Lq, Dqk)`` with ``Lq <= 16``; k: ``(B, Hkv, Lk, Dqk)``;
            v: ``(B, Hkv, Lk, Dv)``: Numba device arrays, C-contiguous, one dtype
            (float32 or float16).
        out: ``(B, Hq, Lq, Dv)``, same dtype, written completely.
        tile_map: int8 ``(B, Hkv, 1, n_k_tiles)``, zero on entry; 1 computed / 2 skipped
            (tiles past the causal horizon stay 0), exactly as the reference.
        log_thresh: ``log(thresh)``, or ``-inf`` for ``thresh == 0`` (nothing skipped).
        causal: bottom-right aligned mask. scale: score scale (applied to q in float32).
        block_k: keys per tile.
        split_tiles, n_splits: ``tiling.decode_split_tiles`` / ``tiling.decode_num_splits``
            of ``(Lk, block_k)`` (any values with ``n_splits * split_tiles >= n_k_tiles``
            work; the reference uses those of ``tiling``).
        threads: threads per block of the split kernel (a multiple of 32, or any power of
            two under the simulator); default ``V2_THREADS`` / ``DEFAULT_THREADS``.
        chunk: force the head-dim chunk ``DC`` of version 1 (implies ``version=1``).
        version: 2 (windows, vector loads, shuffles), 1 (any shape), or ``None``: 2 where
            :func:`plan_v2` accepts the shape and the arrays are 16-byte aligned, else 1.

    Accumulates in float32. Launches two kernels on the default stream; returns nothing.
    """
    threads = threads or (32 if config.ENABLE_CUDASIM else None)  # simulator: 1 Python thread each
    n_b, n_hq, lq, dqk = q.shape
    n_hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    rows = (n_hq // n_hkv) * lq
    n_kt = -(-lk // block_k)
    if n_splits * split_tiles < n_kt:
        raise ValueError(f"{n_splits} splits of {split_tiles} tiles do not cover {n_kt} tiles")
    k_tiles = _visible_tiles(lq, lk, n_kt, block_k, causal)
    n_work = n_b * n_hkv * n_splits
    part_m, part_l, part_acc = _scratch(n_work, rows, dv)
    itemsize = np.dtype(q.dtype).itemsize

    wt = None
    if version != 1 and chunk is None:
        nt2 = threads or V2_THREADS
        wt = plan_v2(rows, block_k, dqk, dv, itemsize, nt2, split_tiles)
        if wt is not None and not _aligned16(q, k, v):
            wt = None
        if version == 2 and wt is None:
            raise ValueError("decode v2 does not apply to this shape / alignment")
    if wt is not None:
        kernel = _split_kernel_v2(rows, block_k, dqk, dv, 16 // itemsize, nt2, wt, V2_REGS,
                                  V2_PREFETCH_K, V2_PREFETCH_V)
        kernel[n_work, nt2](q.reshape(q.size), k.reshape(k.size), v.reshape(v.size),
                            n_hq, n_hkv, lq, lk, float(log_thresh), bool(causal),
                            np.float32(scale), k_tiles, split_tiles, n_splits, part_m, part_l,
                            part_acc, tile_map)
    else:
        threads = threads or DEFAULT_THREADS
        dc, qw = plan(rows, block_k, dqk, dv, threads, chunk)
        kernel = _split_kernel(rows, block_k, dqk, dv, dc, qw, threads)
        kernel[n_work, threads](q, k, v, float(log_thresh), bool(causal), np.float32(scale),
                                lk, k_tiles, split_tiles, n_splits, part_m, part_l, part_acc,
                                tile_map)
    _merge_kernel[n_b * n_hkv * rows, min(MERGE_THREADS, _pow2_ceil(dv))](
        part_m, part_l, part_acc, bool(causal), lk, n_splits, out)


def _visible_tiles(lq, lk, n_kt, block_k, causal):
    """Key tiles any row visits: under the causal mask, tiles past the last query row's
    horizon are masked for every row."""
    if not causal:
        return n_kt
    last_visible = lq - 1 + lk - lq
    return 0 if last_visible < 0 else min(n_kt, last_visible // block_k + 1)


class FastDecode:
    """One decode shape, ready for raw launches (:mod:`._launch`): the compiled v2 split
    kernel and merge kernel, their fixed parameters, and the partials and tile map of this
    shape, allocated once. :meth:`run` takes the data pointers of one call and launches a
    memset of the tile map and the two kernels; it synchronises nothing.

    The tile map it returns is reused by the next call of the same shape (the API copies
    it to the host, when asked for statistics, before it returns)."""

    @classmethod
    def build(cls, q_shape, k_shape, v_shape, dtype, causal, block_k, split_tiles,
              n_splits):
        """A :class:`FastDecode`, or ``None`` where v2 does not apply to the shape."""
        n_b, n_hq, lq, dqk = q_shape
        n_hkv, lk, dv = k_shape[1], k_shape[2], v_shape[3]
        rows = (n_hq // n_hkv) * lq
        itemsize = np.dtype(dtype).itemsize
        wt = plan_v2(rows, block_k, dqk, dv, itemsize, V2_THREADS, split_tiles)
        n_kt = -(-lk // block_k)
        if wt is None or n_splits * split_tiles < n_kt:
            return None
        return cls(q_shape, k_shape, v_shape, dtype, causal, block_k, split_tiles, n_splits,
                   wt)

    def __init__(self, q_shape, k_shape, v_shape, dtype, causal, block_k, split_tiles,
                 n_splits, wt):
        import ctypes

        from numba.cuda import types

        from . import _launch as L

        n_b, n_hq, lq, dqk = q_shape
        n_hkv, lk, dv = k_shape[1], k_shape[2], v_shape[3]
        rows = (n_hq // n_hkv) * lq
        n_kt = -(-lk // block_k)
        k_tiles = _visible_tiles(lq, lk, n_kt, block_k, causal)
        n_work = n_b * n_hkv * n_splits
        dtype = np.dtype(dtype)
        self.itemsize = isz = dtype.itemsize
        self.sizes = (int(np.prod(q_shape)), int(np.prod(k_shape)), int(np.prod(v_shape)))
        self.out_shape = (n_b, n_hq, lq, dv)
        part_m, part_l, part_acc = (cuda.device_array((n_work, rows), np.float32),
                                    cuda.device_array((n_work, rows), np.float32),
                                    cuda.device_array((n_work, rows, dv), np.float32))
        self.tile_map = cuda.device_array((n_b, n_hkv, 1, n_kt), np.int8)
        self._keep = (part_m, part_l, part_acc)
        ptr = L.device_ptr

        arr1, f32 = L.array_type(dtype, 1), L.array_type(np.float32, 2)
        split = _split_kernel_v2(rows, block_k, dqk, dv, 16 // isz, V2_THREADS, wt, V2_REGS,
                                 V2_PREFETCH_K, V2_PREFETCH_V)
        self.k_split, self.f_split = L.compile_kernel(split, (
            arr1, arr1, arr1, types.int64, types.int64, types.int64, types.int64,
            types.float64, types.boolean, types.float32, types.int64, types.int64,
            types.int64, f32, f32, L.array_type(np.float32, 3), L.array_type(np.int8, 4)))
        _, self.f_merge = L.compile_kernel(_merge_kernel, (
            f32, f32, L.array_type(np.float32, 3), types.boolean, types.int64, types.int64,
            L.array_type(dtype, 4)))
        i64 = ctypes.c_int64
        self.mid = [i64(n_hq), i64(n_hkv), i64(lq), i64(lk)]
        self.causal = bool(causal)
        self.tail = ([i64(k_tiles), i64(split_tiles), i64(n_splits)]
                     + L.array_params(ptr(part_m), part_m.shape, 4)
                     + L.array_params(ptr(part_l), part_l.shape, 4)
                     + L.array_params(ptr(part_acc), part_acc.shape, 4)
                     + L.array_params(ptr(self.tile_map), self.tile_map.shape, 1))
        self.merge_head = (L.array_params(ptr(part_m), part_m.shape, 4)
                           + L.array_params(ptr(part_l), part_l.shape, 4)
                           + L.array_params(ptr(part_acc), part_acc.shape, 4)
                           + [bool(causal), i64(lk), i64(n_splits)])
        self.grid_split, self.grid_merge = n_work, n_b * n_hkv * rows
        self.block_merge = min(MERGE_THREADS, _pow2_ceil(dv))
        self.map_ptr, self.map_bytes = ptr(self.tile_map), int(self.tile_map.size)

    def run(self, qp, kp, vp, outp, log_thresh, scale):
        """Launch one call on the data pointers of q, k, v, out; returns the tile map."""
        import ctypes

        from . import _launch as L

        isz = self.itemsize
        nq, nk, nv = self.sizes
        L.memset0(self.map_ptr, self.map_bytes)
        params = (L.array_params(qp, (nq,), isz) + L.array_params(kp, (nk,), isz)
                  + L.array_params(vp, (nv,), isz) + self.mid
                  + [ctypes.c_double(log_thresh), self.causal, ctypes.c_float(scale)]
                  + self.tail)
        L.launch_raw(self.f_split, (self.grid_split, 1, 1), (V2_THREADS, 1, 1), 0, params)
        L.launch_raw(self.f_merge, (self.grid_merge, 1, 1), (self.block_merge, 1, 1), 0,
                     self.merge_head + L.array_params(outp, self.out_shape, isz))
        return self.tile_map
