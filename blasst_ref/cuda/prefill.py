"""BLASST prefill on the GPU: a straightforward SIMT kernel in Numba CUDA.

The algorithm is ``reference._prefill`` (DESIGN.md §3) tile by tile; this module only
decides how the work of one query tile is spread over the threads of one block.

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
3. **Skip vote**: each row agrees iff ``m~ - m < log(thresh)`` (NaN compares false: a NaN
   score, or a row that has seen nothing yet, ``-inf - -inf``, never agrees; padding rows
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

from numba import config, cuda, float32

__all__ = ["launch_prefill", "plan_prefill"]

#: tile_map codes (``reference.COMPUTED`` / ``reference.SKIPPED``)
_COMPUTED = 1
_SKIPPED = 2

#: Static shared memory per block (bytes) that a kernel may use: CUDA's 48 KB static limit.
SHARED_BYTES = 48 * 1024
#: Target threads per block when choosing threads per row (see :func:`plan_prefill`).
_TARGET_THREADS = 256
#: At most this many float32 output accumulators per thread (more spill to local memory).
_MAX_ACC_PER_THREAD = 64


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, int(x)).bit_length() - 1)


def _pow2_ceil(x: int) -> int:
    return 1 << (max(1, int(x)) - 1).bit_length()


def _shared_floats(rows, block_k, tpr, dc):
    """float32 words of shared memory used by one block (see the module docstring)."""
    return rows * (dc + 1) + block_k * (dc + 1) + rows * (block_k + 1) + rows * tpr


def plan_prefill(block_q, block_k, dqk, dv, threads_per_row=None, d_chunk=None):
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
        tpr = min(_pow2_floor(tpr), 32, _pow2_floor(max(1, 1024 // block_q)))
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
        widest = _pow2_ceil(max(dqk, dv))
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


@cuda.jit(device=True, inline=True)
def _max_nan(a, b):
    """``max(a, b)`` that propagates NaN (like ``np.maximum``): NaN scores must reach the
    skip vote and poison the row, as in the reference."""
    if a > b or a != a:
        return a
    return b


_KERNELS: dict = {}


def _get_kernel(block_q, block_k, dqk, dv, tpr, dc):
    """The compiled kernel for these constants (built once, then cached)."""
    key = (block_q, block_k, dqk, dv, tpr, dc)
    if key not in _KERNELS:
        _KERNELS[key] = _make_prefill_kernel(block_q, block_k, dqk, dv, tpr, dc)
    return _KERNELS[key]


def _make_prefill_kernel(block_q, block_k, dqk, dv, tpr, dc):
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
        n_kt = (lk + block_k - 1) // block_k
        qt = n_qt - 1 - cuda.blockIdx.x  # heavy (late) causal tiles first
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        kvh = h // (n_hq // n_hkv)
        tid = cuda.threadIdx.x
        r = tid // tpr
        t = tid % tpr
        offset = lk - lq  # bottom-right causal alignment
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

        k_tiles = n_kt
        if causal:  # tiles past the last row's horizon are masked for every row: not visited
            last_visible = i1 - 1 + offset
            k_tiles = 0 if last_visible < 0 else min(n_kt, last_visible // block_k + 1)

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
                        x = float32(q[b, h, i0 + rr, d0 + dd]) * f_scale
                    qs[rr, dd] = x
                for idx in range(tid, block_k * dc, threads):
                    jj = idx // dc
                    dd = idx % dc
                    x = float32(0.0)
                    if j0 + jj < lk and d0 + dd < dqk:
                        x = float32(k[b, kvh, j0 + jj, d0 + dd])
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
                if t + u * tpr < block_k and gj < lk and (not causal or gj <= gi + offset):
                    part = _max_nan(part, sc[u])
                else:
                    sc[u] = neg_inf  # masked (or past Lk): contributes nothing
            red[r, t] = part
            cuda.syncthreads()
            tile_max = neg_inf
            for w in range(tpr):
                tile_max = _max_nan(tile_max, red[r, w])

            # ---- 3. block-wide skip vote -------------------------------------------------
            # float32 gap, compared in float64 against log(thresh), exactly as the reference.
            # NaN (a NaN score; -inf - -inf for a row that has seen nothing) never agrees.
            agree = 1
            if row_ok and not (tile_max - m_run < log_thresh):
                agree = 0
            if cuda.syncthreads_and(agree):  # also the barrier before red is reused below
                if tid == 0:
                    tile_map[b, h, qt, kt] = _SKIPPED
                continue  # uniform over the block: no exp, no V load, no P V
            if tid == 0:
                tile_map[b, h, qt, kt] = _COMPUTED

            # ---- 4. online softmax update, P to shared memory -----------------------------
            m_new = _max_nan(m_run, tile_max)
            # a row that has still seen nothing shifts by 0: l and acc stay 0
            shift = float32(0.0) if m_new == neg_inf else m_new
            alpha = float32(math.exp(m_run - shift))
            part = float32(0.0)
            for u in range(kpt):
                j = t + u * tpr
                if j < block_k:
                    gj = j0 + j
                    p = float32(0.0)
                    if gj < lk and (not causal or gj <= gi + offset):
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
                        x = float32(v[b, kvh, j0 + jj, d0 + dd])
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
            sees_keys = not causal or gi + offset >= 0
            for c in range(n_v_chunks):
                for w in range(cpc):
                    col = c * dc + t + w * tpr
                    if t + w * tpr < dc and col < dv:
                        if sees_keys:
                            # l = 0 with visible keys (all scores -inf): 0 / 0 = NaN, as dense
                            out[b, h, gi, col] = acc[c * cpc + w] / l_run
                        else:
                            out[b, h, gi, col] = float32(0.0)

    return prefill_kernel


def launch_prefill(q, k, v, out, tile_map, log_thresh, causal, scale, block_q, block_k,
                   *, threads_per_row=None, d_chunk=None):
    """BLASST prefill on the GPU, in place.

    Args:
        q: ``(B, Hq, Lq, Dqk)``, k: ``(B, Hkv, Lk, Dqk)``, v: ``(B, Hkv, Lk, Dv)``: Numba
            device arrays (``cuda.as_cuda_array`` views of the caller's memory), C-contiguous,
            one dtype, float32 or float16.
        out: ``(B, Hq, Lq, Dv)``, q's dtype, written completely.
        tile_map: int8 ``(B, Hq, n_q_tiles, n_k_tiles)``, zero on entry; visited tiles get
            1 (computed) or 2 (skipped), exactly as ``reference.blasst_attention_reference``.
        log_thresh: ``log(thresh)``, ``-inf`` for ``thresh = 0`` (nothing skipped).
        causal: bottom-right aligned mask. scale: score scale.
        block_q, block_k: the tile of the skip decision.
        threads_per_row, d_chunk: override the launch plan (:func:`plan_prefill`); for
            tests and tuning.

    Accumulates in float32. The launch is asynchronous (Numba's default stream).
    """
    n_b, n_hq, lq, dqk = q.shape
    dv = v.shape[3]
    plan = plan_prefill(block_q, block_k, dqk, dv, threads_per_row, d_chunk)
    kernel = _get_kernel(block_q, block_k, dqk, dv, plan["tpr"], plan["dc"])
    n_qt = -(-lq // block_q)
    if n_b * n_hq * n_qt == 0:
        return
    grid = (n_qt, n_hq, n_b)
    kernel[grid, plan["threads"]](q, k, v, out, tile_map, float(log_thresh), bool(causal),
                                  float(scale))
