"""BLASST split-KV decode (flash-decoding) on the GPU, in Numba CUDA.

The algorithm is ``reference._decode`` (DESIGN.md §3): the rows of one tile are *all* query
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
from numba import cuda, float32, float64, uint64

from ._intrinsics import aligned16 as _aligned16

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
                    x = float32(q[b, g * group + r // lq, r % lq, d]) * scale
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
                            x = float32(q[b, g * group + r // lq, r % lq, c * DC + d]) * scale
                        qs[r, d] = x
                uc = uint64(c) * U_DC
                uidx = ut
                while uidx < U_BKDC:  # coalesced: d fastest
                    j = uidx // U_DC
                    d = uidx % U_DC
                    x = float32(0.0)
                    if uj0 + j < ulk and uc + d < U_DQK:
                        x = float32(k[ub, ug, uj0 + j, uc + d])
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
                        x = float32(v[ub, ug, uj0 + j, uc + d])
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
            out[b, h, i, d] = 0.0
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
        out[b, h, i, d] = o / total


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
#      2 rows per warp instruction), 4 rows in flight per lane; the R partial dot products
#      are summed over the row's lanes with shfl_xor; masked keys store -inf;
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
# at Lk=16k, 1.95 TB/s at 64k (60-65% of a copy); limits and next steps in BENCHMARKS.md.
# ---------------------------------------------------------------------------------------

#: threads per block of the v2 split kernel on a GPU (the simulator uses fewer)
V2_THREADS = 256
#: rounds of K row loads a lane issues before it uses any of them (loads in flight)
V2_UNROLL = 4
#: largest score window (float32 words of ``ss``) the v2 kernel keeps in shared memory
V2_WINDOW_WORDS = 8704


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


@functools.lru_cache(maxsize=None)
def _split_kernel_v2(R, BK, DQK, DV, VEC, NT, WT):
    """The v2 split kernel for ``R`` rows, ``BK`` keys per tile, head dims, ``VEC`` elements
    per 16-byte load, ``NT`` threads and windows of ``WT`` tiles (compile-time constants)."""
    from ._intrinsics import SHFL, FULL_MASK, group_sum, ld16

    NW = NT // 32  # warps
    LPK = DQK // VEC  # lanes that share one K row (16 for D = 128 in float16)
    KPI = 32 // LPK  # K rows one warp loads per instruction
    LPV = DV // VEC
    KPV = 32 // LPV
    RSK = KPI * NW  # K rows per block round
    RSV = KPV * NW  # V rows per block round
    WK = WT * BK  # keys per window
    U = V2_UNROLL
    NRK = WK // RSK  # rounds of K loads per window (a multiple of U)
    NRV = BK // RSV  # rounds of V loads per kept tile
    BKP = BK + 1  # padded tile row in ss: conflict-free per-(row, tile) walks
    SSW = WT * BKP
    NPAIR = R * WT
    RED_N = NT if not SHFL else 1  # simulator scratch for group_sum
    RV = R * VEC  # local arrays need literal sizes: computed here, not in the kernel
    neg_inf_c = -math.inf

    @cuda.jit(device=True, inline=True)
    def _scores(x, qr, ss, red, t, ck, kk, j0, jlim, hz):
        """Scores of window key ``kk`` (this lane's 16-byte slice ``x`` of its K row) for
        the R rows: partial dot products, summed over the LPK lanes of the row. ``hz[r]``:
        the last key row ``r`` sees (its causal horizon, precomputed: a 64-bit ``r % Lq``
        per key and row cost more than the dot product itself)."""
        jg = j0 + kk
        for r in range(R):
            a = float32(0.0)
            for e in range(VEC):
                a += qr[r * VEC + e] * x[e]
            a = group_sum(a, red, t, LPK)
            if ck == 0:
                vis = jg < jlim and jg <= hz[r]
                ss[r, (kk // BK) * BKP + kk % BK] = a if vis else float32(neg_inf_c)

    @cuda.jit(device=True, inline=True)
    def _vcol(klist, idx, n_rounds, w, kv):
        """Window key of this lane in flattened V round ``idx``; past the last round, a
        key past ``jlim`` (its load is clamped, its FMAs skipped)."""
        if idx >= n_rounds:
            return WK
        return klist[idx // NRV] * BK + (idx % NRV) * RSV + w * KPV + kv

    @cuda.jit(device=True, inline=True)
    def _pv(x, acc, ss, kk, valid):
        """acc[r, :] += P[r, kk] * (this lane's slice ``x`` of window key kk's V row)."""
        if valid:  # a clamped row (past Lk or the split) may hold inf/NaN: never 0 * it
            col = (kk // BK) * BKP + kk % BK
            for r in range(R):
                pr = ss[r, col]
                for e in range(VEC):
                    acc[r * VEC + e] += pr * x[e]

    @cuda.jit(max_registers=128) if SHFL else cuda.jit
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
        hz = cuda.local.array(R, np.int64)  # last key each row sees
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
            hz[r] = min(lk - 1, r % lq + offset) if causal else lk - 1
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
            # ---- 1. scores of the whole window: 4 rows of K in flight per lane ----------
            # (unrolled by hand into tuples: a loop over a local array of loaded vectors
            # was left rolled by the compiler and the array went to local memory)
            for it in range(0, NRK, 4):
                kk = it * RSK + w * KPI + kl
                x0 = ld16(k, (kbase + min(j0 + kk, jlim - 1)) * DQK + ck * VEC)
                x1 = ld16(k, (kbase + min(j0 + kk + RSK, jlim - 1)) * DQK + ck * VEC)
                x2 = ld16(k, (kbase + min(j0 + kk + 2 * RSK, jlim - 1)) * DQK + ck * VEC)
                x3 = ld16(k, (kbase + min(j0 + kk + 3 * RSK, jlim - 1)) * DQK + ck * VEC)
                _scores(x0, qr, ss, red, t, ck, kk, j0, jlim, hz)
                _scores(x1, qr, ss, red, t, ck, kk + RSK, j0, jlim, hz)
                _scores(x2, qr, ss, red, t, ck, kk + 2 * RSK, j0, jlim, hz)
                _scores(x3, qr, ss, red, t, ck, kk + 3 * RSK, j0, jlim, hz)
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
            # the head dim (a tile has only NRV = 2..8 rounds), across kept tiles
            n_rounds = nkept[0] * NRV
            for it in range(0, n_rounds, 4):
                c0 = _vcol(klist, it, n_rounds, w, kv)
                c1 = _vcol(klist, it + 1, n_rounds, w, kv)
                c2 = _vcol(klist, it + 2, n_rounds, w, kv)
                c3 = _vcol(klist, it + 3, n_rounds, w, kv)
                x0 = ld16(v, (kbase + min(j0 + c0, jlim - 1)) * DV + cv * VEC)
                x1 = ld16(v, (kbase + min(j0 + c1, jlim - 1)) * DV + cv * VEC)
                x2 = ld16(v, (kbase + min(j0 + c2, jlim - 1)) * DV + cv * VEC)
                x3 = ld16(v, (kbase + min(j0 + c3, jlim - 1)) * DV + cv * VEC)
                _pv(x0, acc, ss, c0, j0 + c0 < jlim)
                _pv(x1, acc, ss, c1, j0 + c1 < jlim)
                _pv(x2, acc, ss, c2, j0 + c2 < jlim)
                _pv(x3, acc, ss, c3, j0 + c3 < jlim)
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
    n_b, n_hq, lq, dqk = q.shape
    n_hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    rows = (n_hq // n_hkv) * lq
    n_kt = -(-lk // block_k)
    if n_splits * split_tiles < n_kt:
        raise ValueError(f"{n_splits} splits of {split_tiles} tiles do not cover {n_kt} tiles")
    k_tiles = n_kt
    if causal:  # tiles past the last query row's horizon are masked for every row
        last_visible = lq - 1 + lk - lq
        k_tiles = 0 if last_visible < 0 else min(n_kt, last_visible // block_k + 1)
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
        kernel = _split_kernel_v2(rows, block_k, dqk, dv, 16 // itemsize, nt2, wt)
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
