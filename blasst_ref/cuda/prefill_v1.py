"""Prefill, version 1: the first, straightforward SIMT kernel (llm.c ``dev/cuda`` style).

What it does: one thread block per query tile, one to a few threads per query row, every
operand staged through shared memory in chunks of the head dim. Any shape: odd head dims,
``Dqk != Dv``, the MLA pair ``Dqk = 576`` / ``Dv = 512``. The version table
(:mod:`.launch`) uses it wherever a newer version does not take the shape.

Measured (H100, fp16, B=1 H=32 L=4096 D=128): 57.5 ms causal, 2.4-2.8 TFLOP/s, ~4% of the
fp32 FMA peak: every FMA reads both operands from shared memory with scalar loads, only 1-2
blocks of 256 threads fit an SM, and every 16-64 columns of D cost two barriers. History:
docs/BENCHMARKS.md, CUDA section.

The algorithm is ``reference._prefill`` (docs/DESIGN.md §3.3) tile by tile; the skip vote is
:func:`blasst_ref.rule.row_votes_skip`, compiled for the device in :mod:`.rule`. The kernel
is written out in this file (no generated source).

Kernel layout
-------------
* **Grid**: one thread block per ``(query tile, query head, batch)`` =
  ``(blockIdx.x, blockIdx.y, blockIdx.z)``. Query tiles are visited in reverse
  (``qt = n_q_tiles - 1 - blockIdx.x``) so that under causal masking the heaviest tiles start
  first and the light ones fill the tail. Query head ``h`` reads kv head ``h // (Hq // Hkv)``
  (GQA/MQA): nothing is shared between the blocks of one kv group except through L2.
* **Block**: ``TPR`` threads per query row ("a row group"), ``block_q * TPR`` threads rounded
  up to whole warps (the extra threads form padding rows that never vote, never write).
  Thread ``tid`` works on row ``r = tid // TPR`` as member ``t = tid % TPR`` of its group.
  Inside a row group the work is split two ways:

  - scores: member ``t`` owns keys ``j = t, t + TPR, t + 2 TPR, ...`` of the tile and computes
    their full dot products (no reduction over D is needed);
  - output: member ``t`` owns output columns ``t, t + TPR, ...`` of every D chunk and keeps
    their float32 accumulators in a thread-local array.

  The row statistics ``m`` (running max) and ``l`` (running sum) are kept, identical, by every
  member of the group; the two row reductions per tile (max, sum) go through a small
  shared-memory scratch ``red[row, member]`` (a barrier, then every member reads the whole
  row). Warp shuffles would be cheaper, but Numba's CUDA simulator, where CI runs these
  kernels, does not implement them.
* **Shared memory** (float32, static, so specialised per shape):

  - ``qs[rows, DC + 1]``: one D chunk of the (pre-scaled) query tile,
  - ``kvs[block_k, DC + 1]``: one D chunk of the K tile, later one chunk of the V tile,
  - ``ps[rows, block_k + 1]``: the probabilities ``P`` of a kept tile, for ``P V``,
  - ``red[rows, TPR]``: the reduction scratch.

  The ``+ 1`` pads break the power-of-two strides that would make the lanes of a warp hit one
  bank. Heads are cut into chunks of ``DC`` columns (``DC`` the largest of 64, 32, ... that
  fits the 48 KB of static shared memory next to ``ps``), so any head dim works, including
  the MLA pair ``Dqk = 576`` / ``Dv = 512``; the *skip tile* stays ``block_q x block_k``.

Per key tile
------------
1. ``S = Q K^T`` chunk by chunk along ``Dqk`` (stage Q and K chunks, barrier, accumulate in
   registers, barrier). The Q tile is re-staged for every key tile rather than kept
   resident: at ``Dqk = 576`` it cannot stay in shared memory, and it is L2/L1 hot anyway.
2. Causal mask (bottom-right: row ``i`` sees key ``j`` iff ``j <= i + Lk - Lq``) and the
   row max ``m~`` (NaN-propagating, so a NaN score reaches the vote).
3. **Skip vote**: each row votes with :func:`blasst_ref.rule.row_votes_skip`, ``m~ - m <
   log(thresh)`` (a NaN score, or a row that has seen nothing yet, never votes; padding rows
   agree); ``cuda.syncthreads_and`` makes it block-wide. A skipped tile costs only step 1:
   no exp, no V load, no ``P V``, and ``m``, ``l``, the accumulators are untouched.
4. Otherwise: online-softmax update, ``P`` to shared memory, then ``O += P V`` chunk by chunk
   along ``Dv`` (stage V chunk, barrier, accumulate, barrier).

Finally ``O / l`` is stored in the output dtype (float16 in, float32 compute, float16 out);
rows that see no key at all (causal, ``Lq > Lk``) store zeros; rows whose visible scores are
all ``-inf`` have ``l = 0`` and store NaN, as dense attention does.

Kernels are compiled per ``(block_q, block_k, Dqk, Dv, TPR, DC)`` by a module-level factory
(shared and local array shapes must be compile-time constants in Numba) and cached in a dict;
the array dtype (float32/float16) is specialised by Numba's dispatcher itself.
"""

from __future__ import annotations

import math

import numpy as np
from numba import config, cuda, float32

from .intrinsics import narrow, widen
from .problem import KernelVersion, pow2_ceil, pow2_floor
from .rule import (COMPUTED, SKIPPED, key_visible, max_nan, row_sees_keys, row_votes_skip,
                   visited_k_tiles)

__all__ = ["VERSION", "accepts", "kernel", "kernels", "launch", "make_kernel", "plan"]

#: Static shared memory per block (bytes) that a kernel may use: CUDA's 48 KB static limit.
SHARED_BYTES = 48 * 1024
#: Target threads per block when choosing threads per row (see :func:`plan`).
_TARGET_THREADS = 256
#: At most this many float32 output accumulators per thread (more spill to local memory).
_MAX_ACC_PER_THREAD = 64


def _shared_floats(rows, block_k, tpr, dc):
    """float32 words of shared memory used by one block (see the module docstring)."""
    return rows * (dc + 1) + block_k * (dc + 1) + rows * (block_k + 1) + rows * tpr


def plan(block_q, block_k, dqk, dv, threads_per_row=None, d_chunk=None):
    """Choose the compile-time constants of the kernel for one problem shape.

    Args:
        block_q, block_k: the tile (the unit of the skip decision).
        dqk, dv: head dims of q/k and of v.
        threads_per_row: threads per query row (a power of two <= 32, ``block_q * TPR <= 1024``);
            default: enough for ~256 threads per block and at most 64 accumulators per thread.
        d_chunk: width of the D chunks staged through shared memory; default: the largest of
            64, 32, 16, 8, 4 that fits in 48 KB (and no wider than the head dims need).

    Returns:
        dict with ``tpr``, ``dc``, ``threads`` (per block), ``rows`` (padded rows),
        ``shared_bytes``.

    Raises:
        ValueError: when the tile cannot fit (``P`` alone, ``block_q x block_k`` float32, must
            fit in shared memory: at most ~``block_q * block_k <= 11000``).
    """
    if threads_per_row is None:
        tpr = max(_TARGET_THREADS // block_q, -(-dv // _MAX_ACC_PER_THREAD), 1)
        tpr = min(pow2_floor(tpr), 32, pow2_floor(max(1, 1024 // block_q)))
    else:
        tpr = int(threads_per_row)
        if tpr < 1 or tpr > 32 or tpr & (tpr - 1):
            raise ValueError(f"threads_per_row must be a power of two in [1, 32], got {tpr}")
    threads = -(-(block_q * tpr) // 32) * 32  # whole warps
    if threads > 1024:
        raise ValueError(
            f"block_q={block_q} with {tpr} threads per row needs {threads} threads per block "
            f"(CUDA allows 1024): use a smaller block_q"
        )
    rows = threads // tpr
    budget = SHARED_BYTES // 4
    if d_chunk is None:
        widest = pow2_ceil(max(dqk, dv))
        dc = 0
        for cand in (64, 32, 16, 8, 4):
            if cand <= max(widest, 4) and _shared_floats(rows, block_k, tpr, cand) <= budget:
                dc = cand
                break
        if dc == 0:
            raise ValueError(
                f"a {block_q} x {block_k} tile does not fit in {SHARED_BYTES // 1024} KB of "
                f"shared memory (P alone needs {4 * rows * (block_k + 1)} bytes): use smaller "
                f"tiles on the CUDA backend"
            )
    else:
        dc = int(d_chunk)
        if _shared_floats(rows, block_k, tpr, dc) > budget:
            raise ValueError(f"d_chunk={dc} does not fit in shared memory for this tile")
    return {
        "tpr": tpr,
        "dc": dc,
        "threads": threads,
        "rows": rows,
        "shared_bytes": 4 * _shared_floats(rows, block_k, tpr, dc),
    }


_KERNELS: dict = {}


def kernel(block_q, block_k, dqk, dv, tpr, dc):
    """The compiled kernel for these constants (built once, then cached)."""
    key = (block_q, block_k, dqk, dv, tpr, dc)
    if key not in _KERNELS:
        _KERNELS[key] = make_kernel(block_q, block_k, dqk, dv, tpr, dc)
    return _KERNELS[key]


def make_kernel(block_q, block_k, dqk, dv, tpr, dc):
    """Build the kernel for one set of compile-time constants (see the module docstring)."""
    threads = -(-(block_q * tpr) // 32) * 32
    rows = threads // tpr  # >= block_q; rows past block_q are padding
    kpt = -(-block_k // tpr)  # keys per thread
    cpc = -(-dc // tpr)  # output columns per thread per D chunk
    n_qk_chunks = -(-dqk // dc)
    n_v_chunks = -(-dv // dc)
    n_acc = n_v_chunks * cpc
    dcp = dc + 1  # padded row lengths of the shared tiles
    bkp = block_k + 1
    # Registers: the whole block must fit in the SM's 64K 32-bit registers, or the launch
    # fails (CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, seen for MLA at 512 threads). Capping the
    # registers per thread makes the compiler spill to local memory instead.
    # (The simulator's jit takes no such option.)
    opts = {} if config.ENABLE_CUDASIM else {"max_registers": min(255, 65536 // threads // 8 * 8)}

    @cuda.jit(**opts)
    def prefill_kernel(q, k, v, out, tile_map, log_thresh, causal, scale):
        """q (B, Hq, Lq, Dqk), k (B, Hkv, Lk, Dqk), v (B, Hkv, Lk, Dv), out (B, Hq, Lq, Dv),
        tile_map int8 (B, Hq, n_q_tiles, n_k_tiles); log_thresh float64, causal bool,
        scale float."""
        qs = cuda.shared.array((rows, dcp), float32)
        kvs = cuda.shared.array((block_k, dcp), float32)
        ps = cuda.shared.array((rows, bkp), float32)
        red = cuda.shared.array((rows, tpr), float32)
        sc = cuda.local.array(kpt, float32)  # this thread's scores of the current tile
        acc = cuda.local.array(n_acc, float32)  # this thread's output accumulators

        n_hq, lq = q.shape[1], q.shape[2]
        n_hkv, lk = k.shape[1], k.shape[2]
        n_qt = (lq + block_q - 1) // block_q
        qt = n_qt - 1 - cuda.blockIdx.x  # heavy (late) causal tiles first
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        kvh = h // (n_hq // n_hkv)
        tid = cuda.threadIdx.x
        r = tid // tpr
        t = tid % tpr
        i0 = qt * block_q
        i1 = min(lq, i0 + block_q)
        gi = i0 + r  # this thread's query row
        row_ok = gi < i1  # padding rows (past Lq or past block_q) never vote, never write
        f_scale = float32(scale)
        neg_inf = float32(-math.inf)

        m_run = neg_inf
        l_run = float32(0.0)
        for a in range(n_acc):
            acc[a] = float32(0.0)

        # tiles past the last row's horizon are masked for every row: not visited
        k_tiles = visited_k_tiles(i1, lq, lk, block_k, causal)

        for kt in range(k_tiles):
            j0 = kt * block_k

            # ---- 1. S = (scale Q) K^T, chunk by chunk along Dqk --------------------------
            for u in range(kpt):
                sc[u] = float32(0.0)
            for c in range(n_qk_chunks):
                d0 = c * dc
                cuda.syncthreads()  # the previous readers of qs / kvs are done
                for idx in range(tid, rows * dc, threads):
                    rr = idx // dc
                    dd = idx % dc
                    x = float32(0.0)
                    if i0 + rr < i1 and d0 + dd < dqk:
                        x = widen(q[b, h, i0 + rr, d0 + dd]) * f_scale
                    qs[rr, dd] = x
                for idx in range(tid, block_k * dc, threads):
                    jj = idx // dc
                    dd = idx % dc
                    x = float32(0.0)
                    if j0 + jj < lk and d0 + dd < dqk:
                        x = widen(k[b, kvh, j0 + jj, d0 + dd])
                    kvs[jj, dd] = x
                cuda.syncthreads()
                for u in range(kpt):
                    j = t + u * tpr
                    if j < block_k:
                        s = sc[u]
                        for dd in range(dc):
                            s += qs[r, dd] * kvs[j, dd]
                        sc[u] = s

            # ---- 2. mask and row max ------------------------------------------------------
            part = neg_inf
            for u in range(kpt):
                gj = j0 + t + u * tpr
                if t + u * tpr < block_k and key_visible(gi, gj, lq, lk, causal):
                    part = max_nan(part, sc[u])
                else:
                    sc[u] = neg_inf  # masked (or past Lk): contributes nothing
            red[r, t] = part
            cuda.syncthreads()
            tile_max = neg_inf
            for w in range(tpr):
                tile_max = max_nan(tile_max, red[r, w])

            # ---- 3. block-wide skip vote -------------------------------------------------
            # each row votes with the rule (blasst_ref.rule.row_votes_skip: NaN never votes,
            # nor a row that has seen nothing yet); padding rows agree
            agree = 1
            if row_ok and not row_votes_skip(tile_max, m_run, log_thresh):
                agree = 0
            if cuda.syncthreads_and(agree):  # also the barrier before red is reused below
                if tid == 0:
                    tile_map[b, h, qt, kt] = SKIPPED
                continue  # uniform over the block: no exp, no V load, no P V
            if tid == 0:
                tile_map[b, h, qt, kt] = COMPUTED

            # ---- 4. online softmax update, P to shared memory -----------------------------
            m_new = max_nan(m_run, tile_max)
            # a row that has still seen nothing shifts by 0: l and acc stay 0
            shift = float32(0.0) if m_new == neg_inf else m_new
            alpha = float32(math.exp(m_run - shift))
            part = float32(0.0)
            for u in range(kpt):
                j = t + u * tpr
                if j < block_k:
                    gj = j0 + j
                    p = float32(0.0)
                    if key_visible(gi, gj, lq, lk, causal):
                        p = float32(math.exp(sc[u] - shift))
                    ps[r, j] = p
                    part += p
            red[r, t] = part
            cuda.syncthreads()
            row_sum = float32(0.0)
            for w in range(tpr):
                row_sum += red[r, w]
            l_run = l_run * alpha + row_sum
            m_run = m_new
            if alpha != float32(1.0):  # after the first tiles the max rarely moves
                for a in range(n_acc):
                    acc[a] *= alpha

            # ---- 5. O += P V, chunk by chunk along Dv ------------------------------------
            for c in range(n_v_chunks):
                d0 = c * dc
                cuda.syncthreads()  # readers of kvs (K, or the previous V chunk) are done
                for idx in range(tid, block_k * dc, threads):
                    jj = idx // dc
                    dd = idx % dc
                    x = float32(0.0)
                    if j0 + jj < lk and d0 + dd < dv:
                        x = widen(v[b, kvh, j0 + jj, d0 + dd])
                    kvs[jj, dd] = x
                cuda.syncthreads()
                for w in range(cpc):
                    col = t + w * tpr
                    if col < dc:
                        s = float32(0.0)
                        for j in range(block_k):
                            s += ps[r, j] * kvs[j, col]
                        acc[c * cpc + w] += s

        # ---- finish: O / l, in the output dtype ------------------------------------------
        if row_ok:
            sees_keys = row_sees_keys(gi, lq, lk, causal)
            for c in range(n_v_chunks):
                for w in range(cpc):
                    col = c * dc + t + w * tpr
                    if t + w * tpr < dc and col < dv:
                        if sees_keys:
                            # l = 0 with visible keys (all scores -inf): 0 / 0 = NaN, as dense
                            out[b, h, gi, col] = narrow(out, acc[c * cpc + w] / l_run)
                        else:
                            out[b, h, gi, col] = narrow(out, float32(0.0))

    return prefill_kernel


def accepts(problem, threads_per_row=None, d_chunk=None, **_):
    """The launch plan of :func:`plan` for a prefill ``problem``. Version 1 is the
    catch-all: it takes every shape whose tile fits, and raises :func:`plan`'s
    ``ValueError`` (which says what to change) for one that does not."""
    if problem.decode:
        return None
    return plan(problem.block_q, problem.block_k, problem.dqk, problem.dv, threads_per_row,
                d_chunk)


def launch(p, problem, q, k, v, out, tile_map, log_thresh, scale):
    """Launch through Numba's dispatcher (``q, k, v, out, tile_map``: 4-D Numba device arrays,
    C-contiguous; ``p`` from :func:`accepts`)."""
    kern = kernel(problem.block_q, problem.block_k, problem.dqk, problem.dv, p["tpr"], p["dc"])
    grid = (problem.n_q_tiles, problem.q_heads, problem.batch)
    kern[grid, p["threads"]](q, k, v, out, tile_map, float(log_thresh), problem.causal,
                             float(scale))


def kernels(p, problem):
    """``[(label, dispatcher, argtypes)]`` of a call (for register reports)."""
    from numba.cuda import types

    from .numba_internals import array_type

    arr = array_type(problem.dtype, 4)
    kern = kernel(problem.block_q, problem.block_k, problem.dqk, problem.dv, p["tpr"], p["dc"])
    return [("prefill_v1", kern, (arr, arr, arr, arr, array_type(np.int8, 4), types.float64,
                                  types.boolean, types.float64))]


#: this version's entry in the version table (:mod:`.launch`)
VERSION = KernelVersion("prefill_v1", "prefill", 1, accepts, launch, kernels)
