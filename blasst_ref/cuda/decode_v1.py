"""Decode, version 1: the first split-KV (flash-decoding) kernel, one tile at a time.

What it does: one thread block per (batch, kv head, split) walks its split's key tiles in
order, staging K and V chunks of the head dim through shared memory, with shared-memory tree
reductions and a block-wide vote (``cuda.syncthreads_or``). Any shape: odd head dims,
``Dqk != Dv``, the MLA pair 576 / 512 (one kv head, ``group = Hq``), unaligned arrays. The
version table (:mod:`.launch`) uses it wherever :mod:`.decode_v2` does not take the shape.

Measured (H100, fp16, B=8, Hq=32/Hkv=8, D=128, kernel alone): 1452 us at Lk = 16k (0.37 TB/s
of K+V), 5687 us at 64k; the first version 2 took 299 / 1101 us there (4.9-5.2x faster).
History: docs/BENCHMARKS.md, CUDA section.

The algorithm is ``reference._decode`` (docs/DESIGN.md §3.5): the rows of one tile are *all*
query rows of one kv group, ``R = (Hq // Hkv) * Lq`` of them, row ``r`` being query head
``g * group + r // Lq`` at query position ``r % Lq``; the group decides together whether a
tile is skipped. The key tiles are cut into split-KV chunks of ``split_tiles`` tiles
(``tiling.decode_split_tiles``), each with its own running max; the partial states are
merged by log-sum-exp (:mod:`.combine`). The kernel is written out in this file.

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
3. **Vote**: row ``r`` agrees iff :func:`blasst_ref.rule.row_votes_skip` says so,
   ``m~_r - m_ref_r < log(thresh)`` with ``m_ref_r = max_nan(m_r, s0_r)``: seeded (the
   default, docs/DESIGN.md §3.5), a split that does not start at tile 0 first runs steps 1-2
   on tile 0 alone to get each row's sink maximum ``s0_r`` (one extra K tile, no V);
   unseeded, ``s0_r = -inf``. A NaN score, or a row with no reference yet, never agrees. Any disagreement (``syncthreads_or``) keeps the tile.
   Skipped: ``tile_map = 2`` and straight to the next tile: no exp, no V load, no ``P V``.
4. Kept: ``tile_map = 1``; online-softmax update of ``m``, ``l`` (a row that has still seen
   nothing shifts by 0, keeping ``l = 0``), ``P`` into ``ss`` (0 for masked keys), then
   ``acc = acc * alpha + P V`` chunk by chunk along ``Dv``.

Why it is slow
--------------
It is latency / issue-bound, not DRAM-bound: only ``B*Hkv*n_splits`` blocks (128 for one
Llama sequence at 32k keys, < 1 per SM), each walking its tiles strictly in sequence (stage,
barrier, compute, barrier: ~15 barriers per tile for the tree reductions), with no load of
tile ``t+1`` in flight while tile ``t`` computes. Version 2 scores whole windows of tiles
ahead, with many 16-byte loads in flight and warp shuffles.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32, uint64

from . import combine
from .intrinsics import widen
from .problem import KernelVersion, pow2_ceil, pow2_floor
from .rule import COMPUTED, SKIPPED, last_visible_key, max_nan, row_votes_skip

__all__ = ["THREADS", "VERSION", "accepts", "kernel", "kernels", "launch", "plan"]

THREADS = 256  #: threads per block of the split kernel (256 beat 128 on an H100)
SHARED_BYTES = 48 * 1024  #: static shared memory available to one block without opt-in


def _shared_bytes(rows: int, block_k: int, qw: int, dc: int, nt: int) -> int:
    return 4 * (rows * qw + block_k * (dc + 1) + rows * block_k + nt + 4 * rows)


def plan(rows: int, block_k: int, dqk: int, dv: int, threads: int = THREADS,
         chunk: int | None = None) -> tuple[int, int]:
    """``(DC, QW)``: columns per head-dim chunk and the width of the staged query rows.

    ``QW = Dqk`` (rounded up to ``DC``) when all of Q fits next to the rest (Q resident,
    loaded once per block), else ``DC`` (Q re-staged per chunk). Raises ``ValueError`` when
    even ``DC = 8`` does not fit: ``R * block_k`` (the score tile) is too large."""
    cands = [chunk] if chunk else [c for c in (64, 32, 16, 8)
                                   if c <= max(8, pow2_ceil(max(dqk, dv)))]
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
def kernel(R, BK, DQK, DV, DC, QW, NT, SEEDED=True):
    """The split kernel specialised for ``R`` rows, ``BK`` keys per tile, head dims, chunk
    ``DC``, staged query width ``QW``, ``NT`` threads and the seeded skip test or not
    (``SEEDED``, docs/DESIGN.md §3.5; all compile-time constants)."""
    NCQ = -(-DQK // DC)  # chunks along Dqk
    NCV = -(-DV // DC)  # chunks along Dv
    Q_RES = QW > DC or NCQ == 1  # all of Q resident in shared memory
    EPS = -(-(R * BK) // NT)  # score pairs per thread
    EPV = -(-(R * DC) // NT)  # accumulator elements per thread per Dv chunk
    ACC_N = NCV * EPV
    TPR = min(pow2_floor(NT // R) if R <= NT else 1, pow2_ceil(BK))  # threads per row
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
        s0s = cuda.shared.array(R, float32)  # the sink reference s0 (-inf: none)
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
        ub, ug, ulk = uint64(b), uint64(g), uint64(lk)
        neg_inf = float32(-math.inf)
        lane = t % TPR  # member of a row group for the row reductions
        r_first = t // TPR

        for r in range(t, R, NT):
            ms[r] = neg_inf
            ls[r] = float32(0.0)
            s0s[r] = neg_inf
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
        # Seeded (docs/DESIGN.md §3.5): a split that does not start at tile 0 first scores
        # tile 0 (steps 1-2 only: its row maxima become s0; no vote, no exp, no V), then
        # votes every tile of its own against max(m, s0). Split 0's running max covers
        # tile 0 from its first tile on.
        seed_here = SEEDED and 0 < kt0 < kt1 and log_thresh > -math.inf
        for it in range(kt0 - 1 if seed_here else kt0, kt1):
            kt = it if it >= kt0 else 0
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
                    vis = jg <= last_visible_key(r % lq, lq, lk, causal)
                    ss[r, j] = sacc[e] if vis else neg_inf
            cuda.syncthreads()

            # ---- 2. tile max per row (NaN-propagating), TPR threads per row ------------
            for ps in range(NPASS):
                r = r_first + RPP * ps
                mx = neg_inf
                if r < R:
                    for j in range(lane, BK, TPR):
                        mx = max_nan(mx, ss[r, j])
                red[t] = mx
                cuda.syncthreads()
                step = TPR // 2
                while step > 0:
                    if lane < step:
                        red[t] = max_nan(red[t], red[t + step])
                    cuda.syncthreads()
                    step //= 2
                if lane == 0 and r < R:
                    tms[r] = red[t]
                cuda.syncthreads()

            if it < kt0:  # the seed pass: keep tile 0's maxima, nothing else
                for r in range(t, R, NT):
                    s0s[r] = tms[r]
                cuda.syncthreads()
                continue

            # ---- 3. the group's vote ----------------------------------------------------
            disagree = 0
            for r in range(t, R, NT):  # blasst_ref.rule.row_votes_skip, row by row
                if not row_votes_skip(tms[r], max_nan(ms[r], s0s[r]), log_thresh):
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
                    m_new = max_nan(m_old, tms[r])
                    shift = float32(0.0) if m_new == neg_inf else m_new
                    last = last_visible_key(r % lq, lq, lk, causal)  # the row's last key
                    for j in range(lane, BK, TPR):
                        jg = j0 + j
                        p = float32(0.0)
                        if jg <= last:
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
                    ms[r] = max_nan(m_old, tms[r])
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


def accepts(problem, threads=None, chunk=None, **_):
    """``(threads, DC, QW)`` for a decode ``problem``. Version 1 is the catch-all: it takes
    every shape whose score tile fits, and raises :func:`plan`'s ``ValueError`` (which says
    what to change) for one that does not."""
    if not problem.decode:
        return None
    nt = threads or THREADS
    dc, qw = plan(problem.rows, problem.block_k, problem.dqk, problem.dv, nt, chunk)
    return nt, dc, qw


def launch(p, problem, q, k, v, out, tile_map, log_thresh, scale):
    """Launch the split kernel and the merge (:mod:`.combine`) through Numba's dispatcher
    (4-D Numba device arrays; ``p`` from :func:`accepts`)."""
    nt, dc, qw = p
    n_work = problem.batch * problem.kv_heads * problem.n_splits
    part_m, part_l, part_acc = combine.partials(n_work, problem.rows, problem.dv)
    split = kernel(problem.rows, problem.block_k, problem.dqk, problem.dv, dc, qw, nt,
                   problem.seeded)
    split[n_work, nt](q, k, v, float(log_thresh), problem.causal, np.float32(scale),
                      problem.kv_len, problem.k_tiles, problem.split_tiles, problem.n_splits,
                      part_m, part_l, part_acc, tile_map)
    combine.launch_merge(problem, part_m, part_l, part_acc, out)


def kernels(p, problem):
    """``[(label, dispatcher, argtypes)]`` of a call (for register reports)."""
    from numba.cuda import types

    from .numba_internals import argtypes, array_type

    nt, dc, qw = p
    arr, i64 = array_type(problem.dtype, 4), types.int64
    ml, acc = array_type(np.float32, 2), array_type(np.float32, 3)
    split = kernel(problem.rows, problem.block_k, problem.dqk, problem.dv, dc, qw, nt,
                   problem.seeded)
    return [("decode_v1 split", split, (arr, arr, arr, types.float64, types.boolean,
                                        types.float32, i64, i64, i64, i64, ml, ml, acc,
                                        array_type(np.int8, 4))),
            ("merge", combine.merge_kernel, argtypes(combine.merge_args(problem)))]


#: this version's entry in the version table (:mod:`.launch`)
VERSION = KernelVersion("decode_v1", "decode", 1, accepts, launch, kernels)
