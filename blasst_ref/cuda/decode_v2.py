"""Decode, version 2: windows of tiles, 16-byte vector loads, warp shuffles.

What it does differently from version 1 (:mod:`.decode_v1`): a block scores a whole window
of up to 32 tiles before it votes, with four 16-byte K loads in flight per lane and the
partial dot products reduced by one reduce-scatter butterfly of warp shuffles (generated
code, :func:`kscore_source`); then it votes on the window, exponentiates, and reads V only
for the kept tiles, again four 16-byte rows in flight per lane. It takes head dims that are
whole 16-byte vectors over a power-of-two number of lanes <= 32 (D = 64 / 128 in 16-bit or
float32), up to 64 query registers per lane, on 16-byte aligned arrays (:func:`plan`);
version 1 serves the rest. The merge is :mod:`.combine`'s.

Measured (H100, fp16, B=8, Hq=32/Hkv=8, D=128, docs/BENCHMARKS.md): dense 245-250 us at
Lk = 16k and 915-925 us at 64k in the kernel (72-73% / 78-79% of the copy bandwidth);
through the API 1.19x (16k) / 1.36x (64k) over its own dense at ~73% sparsity. ptxas
(sm_90, 128-register cap): no spills in float32; float16 spills 64 bytes at D = 64 / 128
(table in docs/BENCHMARKS.md).

**The generated source.** ``_kscore``, the score step of one group of K rows, is Python text
written by :func:`kscore_source` for the compile-time constants; read it with
``blasst_ref.cuda.launch.dump_source("decode_v2", directory=...)`` (default shape: GQA 32/8,
one query row, D = 128, float16), which writes ``decode_v2_kscore_*.py``. The rest of the
kernel is written out below.

How it works
------------
Version 1 walks one tile at a time, ~15 barriers per tile, scalar 2-byte loads, nothing in
flight while a tile computes (0.37 TB/s on an H100). Version 2 rests on one observation: the
running max of a row after tile t is the max over *all* tiles <= t, skipped ones included
(a skipped tile had m~ < m + log(thresh) < m in every row). So a whole window of WT tiles
can be scored first (K only), then voted on, then exponentiated, then multiplied with the
V rows of its kept tiles, with the same decisions as the reference's sequential walk:

  1. scores: lanes take 16-byte slices of K rows (16 lanes per row for D = 128 in fp16,
     2 rows per warp instruction), 4 rows in flight per lane; the 4 x R partial dot
     products are summed over the row's lanes by one reduce-scatter butterfly (shfl_xor),
     after which each lane stores one score; masked keys store -inf;
  2. tile maxima, one thread per (row, tile) (padded rows of ss: no bank conflicts);
  3. votes: one thread per row walks the window, voting with
     :func:`blasst_ref.rule.row_votes_skip` against the prefix max of the window's tile
     maxima (seeded, raised to the row's sink maximum ``s0``: its ``m_ref``), one thread
     per tile ANDs the rows and writes tile_map; seeded (docs/DESIGN.md §3.5), a split
     that does not start at tile 0 first runs steps 1-2 on tile 0 alone to get ``s0``;
  4. P = exp(s - M) with M the running max at the window's end (rescaling acc, l once per
     window), row sums per (row, tile);
  5. acc += P V over the kept tiles only, (tile, round) pairs flattened so that 4 V rows
     are in flight per lane; then acc is summed over the lanes that share a Dv slice
     (shfl_xor, then shared-memory atomics) into the same partials the merge reads.

On the simulator the same kernel runs with shared-memory reductions and a scalar twin of
the vector load (:mod:`.intrinsics`).
"""

from __future__ import annotations

import functools
import linecache
import math

import numpy as np
from numba import config, cuda, float32

from . import combine, numba_internals
from .intrinsics import FULL_MASK, SHFL, ld16, ldw, unpack, xor_shfl
from .problem import KernelVersion, pow2_ceil
from .rule import COMPUTED, SKIPPED, last_visible_key, max_nan, row_votes_skip

__all__ = ["REGS", "THREADS", "VERSION", "accepts", "kernel", "kscore_source", "launch",
           "plan", "sources"]

#: threads per block of the split kernel on a GPU (the simulator uses fewer). 128 beat
#: 256 on an H100: at 128 registers both give 16 warps per SM, but as 4 blocks instead of 2,
#: whose phases (K pass, votes, V pass) overlap better, and B=8 x Hkv=8 x 8 splits (Lk=16k)
#: = 512 blocks fit one wave of 4 x 132
THREADS = 128
#: rounds of K row loads a lane issues before it uses any of them (loads in flight)
UNROLL = 4
#: largest score window (float32 words of ``ss``) the kernel keeps in shared memory
WINDOW_WORDS = 8704
#: register cap of the split kernel (``max_registers``)
REGS = 128


def plan(rows: int, block_k: int, dqk: int, dv: int, itemsize: int,
         threads: int = THREADS, split_tiles: int | None = None) -> int | None:
    """Tiles per window ``WT`` of the split kernel, or ``None`` when this version does not
    apply (then the version table uses version 1, which takes any shape).

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
    while (wt * 2 <= 32 and rows * wt * 2 * (block_k + 1) <= WINDOW_WORDS
           and (split_tiles is None or wt * 2 <= pow2_ceil(split_tiles))):
        wt *= 2
    while wt <= 32 and (wt * block_k) % (rsk * UNROLL):
        wt *= 2
    if wt > 32 or rows * wt * (block_k + 1) > 2 * WINDOW_WORDS:
        return None
    return wt


_KSCORE: dict = {}


@(cuda.jit(device=True) if config.ENABLE_CUDASIM else cuda.jit(device=True, forceinline=True))
def _pick(c, a, b):
    """``a if c else b`` as a call (a select after inlining, no branch in Numba's IR)."""
    return a if c else b


def kscore_source(R, VEC, LPK, RSK, BK, BKP, U):
    """Python source of ``_kscore``: the scores of U key rows (this lane's raw 16-byte
    slices ``xa0..``) against the R query rows, reduced over the LPK lanes of a row.

    The U * R partial dot products of a lane are summed over its LPK lanes by a
    *reduce-scatter* butterfly: at the step of offset ``o`` a lane keeps half of its values
    (the upper half if bit ``o`` of its lane is set), sends the other half to lane
    ``lane ^ o`` and adds what it receives. For U * R = LPK = 16 (R = 4, D = 128, 16-bit)
    that is 8 + 4 + 2 + 1 = 15 shuffles for 16 sums, where one butterfly per sum (the
    previous version) took 64; each lane then holds one finished score and stores it.
    :func:`blasst_ref.cuda.launch.dump_source` writes it to a file."""
    N = U * R
    NP = 1
    while NP < N:
        NP *= 2
    L = []

    def emit(ind, line):
        L.append("    " * ind + line)

    args = ", ".join(f"xa{u}" for u in range(U))
    emit(0, f"# Generated by blasst_ref.cuda.decode_v2.kscore_source for R={R} VEC={VEC} "
            f"LPK={LPK} RSK={RSK} BK={BK} BKP={BKP} U={U}.")
    emit(0, "# Globals: unpack, xor_shfl (blasst_ref.cuda.intrinsics), _pick (decode_v2).")
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


def _kscore_name(R, VEC, LPK, RSK, BK, BKP, U) -> str:
    return f"decode_v2_kscore_r{R}_vec{VEC}_lpk{LPK}_rsk{RSK}_bk{BK}_u{U}.py"


def _kscore_fn(R, VEC, LPK, RSK, BK, BKP, U):
    """The compiled ``_kscore`` device function for these constants (see
    :func:`kscore_source`)."""
    sim = bool(config.ENABLE_CUDASIM)
    key = (R, VEC, LPK, RSK, BK, BKP, U, sim)
    if key not in _KSCORE:
        src = kscore_source(R, VEC, LPK, RSK, BK, BKP, U)
        fname = f"<blasst_ref.cuda.decode_v2 {_kscore_name(R, VEC, LPK, RSK, BK, BKP, U)}>"
        linecache.cache[fname] = (len(src), None, src.splitlines(True), fname)
        ns = {"cuda": cuda, "float32": float32, "math": math, "unpack": unpack,
              "xor_shfl": xor_shfl, "_pick": _pick}
        exec(compile(src, fname, "exec"), ns)  # noqa: S102 (our own generated source)
        # inlined by Numba (NVVM-level inlining left ``qr`` in local memory); its
        # selects are ``_pick`` calls, so Numba's front end sees few branches
        jit = cuda.jit(device=True) if sim else cuda.jit(device=True, inline=True)
        _KSCORE[key] = jit(ns["_kscore"])
    return _KSCORE[key]


@functools.lru_cache(maxsize=None)
def kernel(R, BK, DQK, DV, VEC, NT, WT, regs=REGS, SEEDED=True):
    """The split kernel for ``R`` rows, ``BK`` keys per tile, head dims, ``VEC`` elements
    per 16-byte load, ``NT`` threads and windows of ``WT`` tiles, with the seeded skip test
    or not (``SEEDED``, docs/DESIGN.md §3.5; compile-time constants), capped at ``regs``
    registers per thread on a GPU."""

    NW = NT // 32  # warps
    LPK = DQK // VEC  # lanes that share one K row (16 for D = 128 in float16)
    KPI = 32 // LPK  # K rows one warp loads per instruction
    LPV = DV // VEC
    KPV = 32 // LPV
    RSK = KPI * NW  # K rows per block round
    RSV = KPV * NW  # V rows per block round
    WK = WT * BK  # keys per window
    U = UNROLL
    assert U == 4, "the K and V loops below are unrolled by hand for 4 loads"
    NRK = WK // RSK  # rounds of K loads per window (a multiple of U)
    NRK0 = min(NRK, -(-BK // (RSK * U)) * U)  # rounds that cover one tile (the seed pass)
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

    @cuda.jit(max_registers=regs) if SHFL else cuda.jit
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
        s0s = cuda.shared.array(R, float32)  # the sink reference s0 (-inf: none)
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
            s0s[t] = neg_inf
            hzs[t] = last_visible_key(t % lq, lq, lk, causal)
        cuda.syncthreads()

        kt0 = sp * split_tiles
        kt1 = min(k_tiles, kt0 + split_tiles)
        # Seeded (docs/DESIGN.md §3.5): a split that does not start at tile 0 first runs
        # steps 1-2 on a window of tile 0 alone (its row maxima become s0: no vote, no exp,
        # no V) and then votes against max(m, s0). Split 0's running max covers tile 0.
        seed_here = SEEDED and 0 < kt0 < kt1 and log_thresh > -math.inf
        for ww in range(kt0 - WT if seed_here else kt0, kt1, WT):
            seed_pass = ww < kt0
            wt0 = 0 if seed_pass else ww
            nwt = 1 if seed_pass else min(WT, kt1 - wt0)
            j0 = wt0 * BK
            jlim = min(lk, (wt0 + nwt) * BK)  # keys past it: masked, never used
            # ---- 1. scores of the whole window: U rows of K in flight per lane (raw words),
            # the next U rows loaded as soon as the current ones are used ------------------
            # (unrolled by hand into tuples: a loop over a local array of loaded vectors
            # was left rolled by the compiler and the array went to local memory)
            kk = w * KPI + kl
            kq = ck * VEC
            xa0 = ldw(k, (kbase + min(j0 + kk, jlim - 1)) * DQK + kq)
            xa1 = ldw(k, (kbase + min(j0 + kk + RSK, jlim - 1)) * DQK + kq)
            xa2 = ldw(k, (kbase + min(j0 + kk + 2 * RSK, jlim - 1)) * DQK + kq)
            xa3 = ldw(k, (kbase + min(j0 + kk + 3 * RSK, jlim - 1)) * DQK + kq)
            for it in range(0, NRK0 if seed_pass else NRK, U):
                kn = kk + U * RSK  # the next group (past the window: clamped, unused)
                # after this group's math, into its registers (issuing them before it, a
                # double buffer, measured neutral on an H100 and spilled)
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
                        mx = max_nan(mx, ss[r, tt * BKP + jj])
                    tmax[r, tt] = mx
            cuda.syncthreads()
            if seed_pass:  # keep tile 0's maxima, nothing else
                if t < R:
                    s0s[t] = tmax[t, 0]
                cuda.syncthreads()
                continue
            # ---- 3. the votes. The running max of a row after tile t is the max over *all*
            # tiles <= t, skipped ones included: a skipped tile had m~ < m + log(thresh) < m
            # in every row, so it could not have raised m. Hence one thread per row walks the
            # window's tile maxima (a prefix max), and the whole window is decided before any
            # exp or V load.
            # Seeded, a skipped tile may hold a max above m (it is below s0 + log(thresh)),
            # but never above max(m, s0): the prefix max still gives every vote its
            # reference max(m, s0); the running max itself is taken over the kept tiles
            # below, once the group has decided.
            if t < R:
                m_old = ms[t]
                pm = m_old
                s0 = s0s[t]
                for tt in range(nwt):
                    tm = tmax[t, tt]
                    agree[t, tt] = 1 if row_votes_skip(tm, max_nan(pm, s0), log_thresh) else 0
                    pm = max_nan(pm, tm)
                if not SEEDED:
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
            if SEEDED:  # the running max over the kept tiles only
                if t < R:
                    m_old = ms[t]
                    pm = m_old
                    for tt in range(nwt):
                        if keep[tt] != 0:
                            pm = max_nan(pm, tmax[t, tt])
                    shift = float32(0.0) if pm == neg_inf else pm
                    als[t] = math.exp(m_old - shift)
                    shs[t] = shift
                    ms[t] = pm
                cuda.syncthreads()
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
                    _pv(xa0, v, acc, ss, c0, it < n_rounds and j0 + c0 < jlim)
                    _pv(xa1, v, acc, ss, c1, it + 1 < n_rounds and j0 + c1 < jlim)
                    _pv(xa2, v, acc, ss, c2, it + 2 < n_rounds and j0 + c2 < jlim)
                    _pv(xa3, v, acc, ss, c3, it + 3 < n_rounds and j0 + c3 < jlim)
                    # the next 4 after these FMAs, into their registers (as for K above)
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


def accepts(problem, threads=None, chunk=None, **_):
    """``(threads, WT)`` for a decode ``problem``, or ``None`` where this version does not
    take it: a shape :func:`plan` refuses, unaligned arrays, or version 1's ``chunk``."""
    if not problem.decode or not problem.aligned or chunk is not None:
        return None
    nt = threads or THREADS
    wt = plan(problem.rows, problem.block_k, problem.dqk, problem.dv, problem.itemsize, nt,
              problem.split_tiles)
    return None if wt is None else (nt, wt)


def gpu_plan(problem):
    """The plan a GPU would use for ``problem`` (the GPU's threads, on any machine)."""
    wt = plan(problem.rows, problem.block_k, problem.dqk, problem.dv, problem.itemsize,
              THREADS, problem.split_tiles)
    return None if wt is None else (THREADS, wt)


def _kscore_constants(p, problem):
    nt, _ = p
    vec = 16 // problem.itemsize
    lpk = problem.dqk // vec
    rsk = (32 // lpk) * (nt // 32)
    return (problem.rows, vec, lpk, rsk, problem.block_k, problem.block_k + 1, UNROLL)


def sources(p, problem, sim=False) -> dict:
    """``{file name: generated source}`` of plan ``p`` (the same text on a GPU and on the
    simulator), for :func:`blasst_ref.cuda.launch.dump_source`."""
    consts = _kscore_constants(p, problem)
    return {_kscore_name(*consts): kscore_source(*consts)}


def _split(p, problem):
    nt, wt = p
    return kernel(problem.rows, problem.block_k, problem.dqk, problem.dv,
                  16 // problem.itemsize, nt, wt, REGS, problem.seeded)


def launch(p, problem, q, k, v, out, tile_map, log_thresh, scale):
    """Launch the split kernel and the merge (:mod:`.combine`) through Numba's dispatcher
    (4-D Numba device arrays, C-contiguous, 16-byte aligned; ``p`` from :func:`accepts`)."""
    nt = p[0]
    n_work = problem.batch * problem.kv_heads * problem.n_splits
    part_m, part_l, part_acc = combine.partials(n_work, problem.rows, problem.dv)
    _split(p, problem)[n_work, nt](
        q.reshape(q.size), k.reshape(k.size), v.reshape(v.size), problem.q_heads,
        problem.kv_heads, problem.q_len, problem.kv_len, float(log_thresh), problem.causal,
        np.float32(scale), problem.k_tiles, problem.split_tiles, problem.n_splits, part_m,
        part_l, part_acc, tile_map)
    combine.launch_merge(problem, part_m, part_l, part_acc, out)


def _split_args(problem) -> tuple:
    """The split kernel's arguments for ``problem`` (flat 1-D q, k, v, as :func:`launch`
    passes them), as :class:`.numba_internals.Array` / Numba scalar types."""
    from numba.cuda import types

    from .numba_internals import Array

    dt, rows, dv = problem.dtype, problem.rows, problem.dv
    n_work = problem.batch * problem.kv_heads * problem.n_splits
    n_q = problem.batch * problem.q_heads * problem.q_len
    n_kv = problem.batch * problem.kv_heads * problem.kv_len
    ml, acc = Array(np.float32, (n_work, rows)), Array(np.float32, (n_work, rows, dv))
    i64 = types.int64
    return (Array(dt, (n_q * problem.dqk,)), Array(dt, (n_kv * problem.dqk,)),
            Array(dt, (n_kv * dv,)), i64, i64, i64, i64, types.float64, types.boolean,
            types.float32, i64, i64, i64, ml, ml, acc, Array(np.int8, problem.tile_map_shape))


def kernels(p, problem):
    """``[(label, dispatcher, argtypes)]`` of a call (for register reports)."""
    from .numba_internals import argtypes

    return [("decode_v2 split", _split(p, problem), argtypes(_split_args(problem))),
            ("merge", combine.merge_kernel, argtypes(combine.merge_args(problem)))]


class _Fast:
    """One decode shape, ready for raw launches (:class:`.numba_internals.RawKernel`): the
    compiled split and merge kernels, and the partials and tile map of this shape, allocated
    once. :meth:`run` launches a memset of the tile map and the two kernels; it synchronises
    nothing. The tile map it returns is reused by the next call of the same shape (the API
    copies it to the host, when asked for statistics, before it returns).

    The runner of the raw-pointer host path (``fast`` of :data:`VERSION`); building it
    raises :class:`.numba_internals.InternalsMissing` where an internal is missing."""

    def __init__(self, p, problem):
        from .numba_internals import RawKernel, device_ptr

        nt = p[0]
        rows, dv = problem.rows, problem.dv
        n_work = problem.batch * problem.kv_heads * problem.n_splits
        self.partials = (cuda.device_array((n_work, rows), np.float32),
                         cuda.device_array((n_work, rows), np.float32),
                         cuda.device_array((n_work, rows, dv), np.float32))
        self.tile_map = cuda.device_array(problem.tile_map_shape, np.int8)
        self.split = RawKernel(_split(p, problem), _split_args(problem))
        self.merge = RawKernel(combine.merge_kernel, combine.merge_args(problem))
        self.parts = tuple(device_ptr(a) for a in self.partials)
        self.map_ptr, self.map_bytes = device_ptr(self.tile_map), int(self.tile_map.size)
        self.shape = (problem.q_heads, problem.kv_heads, problem.q_len, problem.kv_len)
        self.causal = problem.causal
        self.splits = (problem.k_tiles, problem.split_tiles, problem.n_splits)
        self.merge_args = (problem.causal, problem.kv_len, problem.n_splits)
        self.grid_split, self.block_split = (n_work, 1, 1), (nt, 1, 1)
        self.grid_merge = (problem.batch * problem.kv_heads * rows, 1, 1)
        self.block_merge = (combine.merge_block(dv), 1, 1)

    def run(self, qp, kp, vp, outp, log_thresh, scale):
        """Launch one call on the data pointers of q, k, v, out; returns the tile map."""
        numba_internals.memset0(self.map_ptr, self.map_bytes)
        self.split.launch(self.grid_split, self.block_split, qp, kp, vp, *self.shape,
                          log_thresh, self.causal, scale, *self.splits, *self.parts,
                          self.map_ptr)
        self.merge.launch(self.grid_merge, self.block_merge, *self.parts, *self.merge_args,
                          outp)
        return self.tile_map


#: this version's entry in the version table (:mod:`.launch`)
VERSION = KernelVersion("decode_v2", "decode", 2, accepts, launch, kernels, fast=_Fast,
                        sources=sources, gpu_plan=gpu_plan)
