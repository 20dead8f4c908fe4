"""BLASST prefill on the GPU, in Numba CUDA: two kernel versions (llm.c ``dev/cuda`` style).

The algorithm is ``reference._prefill`` (docs/DESIGN.md §3) tile by tile; this module only
decides how the work of one query tile is spread over the threads of one block.

* **Version 1** (``_make_prefill_kernel``): the first, straightforward SIMT kernel, one to a
  few threads per query row. Any shape (odd head dims, ``Dqk != Dv``, MLA 576 / 512).
  ~2.4-2.8 TFLOP/s on an H100.
* **Version 2** (``_v2_source``): register tiling, 16-byte vector loads, warp shuffles;
  ~28-33 TFLOP/s on an H100 (12x v1), CUDA cores only. Used by :func:`launch_prefill`
  wherever :func:`plan_v2` accepts the shape (``Dqk = Dv`` in {64, 128}, the default tiles)
  and the arrays are 16-byte aligned; v1 everywhere else.

Both make exactly the reference's skip decisions (the tests compare tile maps).

Version 1
=========

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

Why v1 is slow (H100: 57.5 ms for causal B=1 H=32 L=4096 D=128, 2.4 TFLOP/s, ~4% of the fp32
FMA peak): every FMA of ``Q K^T`` and ``P V`` reads *both* operands from shared memory with
scalar loads (two loads per FMA), only 1-2 blocks of 256 threads fit an SM, and every 16-64
columns of D cost two barriers.

Version 2: register tiling
==========================

The classic SGEMM recipe applied to both products of a tile, on CUDA cores (fp32 FMA).

* **Grid** as v1: one block per ``(query tile, head, batch)``, heavy causal tiles first.
* **Block**: ``TR x TC`` threads (16 x 16 = 256 on a GPU): thread ``tid`` is lane
  ``cg = tid % TC`` of *row group* ``rg = tid // TC``. It owns the tile rows
  ``i * TR + rg`` (``i < RPT = block_q / TR``: 8 rows at ``block_q = 128``), and

  - in ``S = Q K^T``: the keys ``c * TC + cg`` (``c < KPT = block_k / TC``: 4 keys at
    ``block_k = 64``), an ``8 x 4`` micro-tile of scores in registers;
  - in ``O += P V``: the output columns ``c * 4 TC + 4 cg + e`` (``e < 4``, ``c < D / 4 TC``),
    an ``8 x 8`` micro-tile of float32 accumulators in registers (D = 128).

  The ``TC`` lanes of a row group are 16 consecutive lanes of one warp, so the row max and
  row sum of a tile are ``shfl_xor`` butterflies (``_intrinsics.group_max/group_sum``; the
  simulator's twins go through shared memory). ``m``, ``l`` of a row live (identical) in
  the registers of its 16 lanes.
* **Shared memory** (float32, dynamic, 205 KB at D = 128; > 48 KB needs the opt-in
  attribute, set by ``_v2_allow_shared``): the pre-scaled Q tile ``[block_q][D + 4]``
  (staged once per block), two K buffers ``[block_k][D + 4]`` (tile ``kt`` in buffer
  ``kt % 2``), one V buffer ``[block_k][D + 4]`` and ``P [block_q][block_k + 16]``. Rows are
  multiples of 16 bytes, so every operand fetch is one ``ld.shared.v4.f32``. The strides are
  chosen for the access patterns: a K row stride of ``D + 4`` words puts the 16 keys a
  half-warp reads in distinct bank quads (2 wavefronts for 256 bytes, the minimum); the P
  stride ``= 16 mod 32`` makes the scalar P stores of two row groups conflict-free.
* **Inner loops**: ``Q K^T`` walks D four columns at a time: 8 Q and 4 K 16-byte loads (Q
  broadcast within a row group) feed 128 FMAs. ``P V`` walks the tile's keys four at a
  time: 8 P loads, then per key 2 V loads (16 consecutive lanes read 256 contiguous
  bytes), 256 FMAs in all. Loads take 6-8% of the issue slots.

Per key tile::

    prefetch K(kt+1) -> registers (raw float16 words, ``ld16raw``)
    S = Q K(kt)^T, first half of D; store K(kt+1) to the other buffer; second half
    mask (only tiles that cross a row's horizon), row max: shuffles
    vote: syncthreads_and  (also the barrier that publishes K(kt+1))
    skipped: tile_map = 2, next tile        <- no exp, no V load, no P V, 1 barrier
    kept: load V(kt) -> registers; softmax (exp, row sums by shuffles, rescale O);
          P -> shared; V -> shared; barrier; O += P V

The vote, masking, NaN and empty-row semantics are v1's, row by row: a padding row (past
``Lq``) agrees, NaN never agrees, a row that has seen nothing shifts by 0.

**Code generation.** Numba has no unroll pragma, and a ``cuda.local.array`` indexed in a
loop that NVVM does not fully unroll is placed in local memory. So the kernel body is Python
source generated by ``_v2_source`` for the compile-time constants: every micro-tile element
is a scalar variable (``s3_1``, ``o5_1_2``) and the loops over them are written out; only the
loops over D (``Q K^T``) and over the tile's keys (``P V``) remain. Conditionals are small
device functions (``_mask``, ``_vote``, ...) compiled with ``forceinline``: inline ternaries
add basic blocks, and Numba's front end is superlinear in them (a first version took 90 s to
compile; now ~20 s per shape and dtype). ``_KERNELS_V2[key][1]`` holds the source; PTX for
an sm_90 target shows 0 bytes of stack / spills at 255 registers (D = 128, ``ptxas -v``):
one 256-thread block per SM. Under the simulator the same source runs with 4 x 1-4 threads.

**Performance** (H100, fp16, B=1 H=32 L=4096 D=128; docs/BENCHMARKS.md): dense 28.2 TFLOP/s
causal, 32.6 TFLOP/s without mask (~47-54% of the ~60 TFLOP/s fp32 FMA peak); at ~75%
sparsity (``llm_like``) 1.50x (causal) / 1.45x (no mask) over its own dense in the kernel.
A skipped tile still costs ~60% of a kept one (ideal: 50%, ``Q K^T`` is half the FMAs):
``Q K^T`` spends 12 loads per 128 FMAs against ``P V``'s 16 per 256, and carries the
per-tile fixed costs (K staging, reductions, the vote barrier), and one block of 8 warps
per SM has little to overlap a barrier with. Next steps: 2 blocks per SM (fewer registers:
``block_q = 64`` per block with a shared vote, or fp16 Q in registers), ``mma.sync``
tensor cores (see shared/device/README.md).
"""

from __future__ import annotations

import math

import numpy as np

from numba import config, cuda, float32

from ._intrinsics import aligned16 as _aligned16
from ._intrinsics import group_max as _group_max
from ._intrinsics import group_sum as _group_sum
from ._intrinsics import narrow, widen

__all__ = ["launch_prefill", "plan_prefill", "plan_v2"]

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
            sees_keys = not causal or gi + offset >= 0
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


def _contiguous(*arrays) -> bool:
    """Whether every array is C-contiguous (v2 reads them as flat vectors)."""
    for a in arrays:
        check = getattr(a, "is_c_contiguous", None)
        if check is not None and not check():
            return False
    return True


def launch_prefill(q, k, v, out, tile_map, log_thresh, causal, scale, block_q, block_k,
                   *, threads_per_row=None, d_chunk=None, version=None, v2_layout=None):
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
        threads_per_row, d_chunk: override the version 1 launch plan (:func:`plan_prefill`;
            either implies ``version=1``); for tests and tuning.
        version: 2 (register-tiled), 1 (any shape), or ``None``: 2 where :func:`plan_v2`
            accepts the shape and the arrays are C-contiguous and 16-byte aligned, else 1.
        v2_layout: ``(TR, TC)`` thread layout of version 2 (tests and tuning).

    Accumulates in float32. The launch is asynchronous (Numba's default stream).
    """
    n_b, n_hq, lq, dqk = q.shape
    n_hkv, lk = k.shape[1], k.shape[2]
    dv = v.shape[3]
    n_qt = -(-lq // block_q)
    plan2 = None
    if version != 1 and threads_per_row is None and d_chunk is None:
        plan2 = plan_v2(block_q, block_k, dqk, dv, q.dtype.itemsize, v2_layout)
        if plan2 is not None and not (_aligned16(q, k, v, out) and _contiguous(q, k, v, out)):
            plan2 = None
        if version == 2 and plan2 is None:
            raise ValueError("prefill v2 does not apply to this shape / alignment")
    if n_b * n_hq * n_qt == 0:
        return
    grid = (n_qt, n_hq, n_b)
    if plan2 is not None:
        entry = _get_kernel_v2(block_q, block_k, dqk, plan2)
        kernel = entry[0]
        args = (q.reshape(q.size), k.reshape(k.size), v.reshape(v.size), out.reshape(out.size),
                tile_map, float(log_thresh), bool(causal), float(scale), n_hq, n_hkv, lq, lk)
        _v2_allow_shared(entry, kernel, args, plan2["shared_bytes"])
        kernel[grid, plan2["threads"], 0, plan2["shared_bytes"]](*args)
        return
    plan = plan_prefill(block_q, block_k, dqk, dv, threads_per_row, d_chunk)
    kernel = _get_kernel(block_q, block_k, dqk, dv, plan["tpr"], plan["dc"])
    kernel[grid, plan["threads"]](q, k, v, out, tile_map, float(log_thresh), bool(causal),
                                  float(scale))


class FastPrefill:
    """One prefill shape, ready for raw launches (:mod:`._launch`, see ``FastDecode`` in
    :mod:`.decode`): the compiled v2 kernel, its fixed parameters and a tile map of this
    shape, allocated once and zeroed (memset) by every :meth:`run`."""

    @classmethod
    def build(cls, q_shape, k_shape, v_shape, dtype, causal, block_q, block_k):
        """A :class:`FastPrefill`, or ``None`` where v2 does not apply to the shape."""
        dqk, dv = q_shape[3], v_shape[3]
        plan2 = plan_v2(block_q, block_k, dqk, dv, np.dtype(dtype).itemsize)
        if plan2 is None or q_shape[0] * q_shape[1] * q_shape[2] == 0:
            return None
        return cls(q_shape, k_shape, v_shape, dtype, causal, block_q, block_k, plan2)

    def __init__(self, q_shape, k_shape, v_shape, dtype, causal, block_q, block_k, plan2):
        import ctypes

        from numba.cuda import types

        from . import _launch as L

        n_b, n_hq, lq, dqk = q_shape
        n_hkv, lk = k_shape[1], k_shape[2]
        n_qt, n_kt = -(-lq // block_q), -(-lk // block_k)
        dtype = np.dtype(dtype)
        self.itemsize = dtype.itemsize
        self.sizes = (int(np.prod(q_shape)), int(np.prod(k_shape)), int(np.prod(v_shape)),
                      int(np.prod(q_shape[:3])) * v_shape[3])
        self.tile_map = cuda.device_array((n_b, n_hq, n_qt, n_kt), np.int8)
        entry = _get_kernel_v2(block_q, block_k, dqk, plan2)
        arr1 = L.array_type(dtype, 1)
        _, self.func = L.compile_kernel(entry[0], (
            arr1, arr1, arr1, arr1, L.array_type(np.int8, 4), types.float64, types.boolean,
            types.float64, types.int64, types.int64, types.int64, types.int64))
        self.shared = plan2["shared_bytes"]
        if self.shared > SHARED_BYTES:
            L.allow_dynamic_shared(self.func, self.shared)
        i64 = ctypes.c_int64
        self.causal = bool(causal)
        self.map_params = L.array_params(L.device_ptr(self.tile_map), self.tile_map.shape, 1)
        self.tail = [i64(n_hq), i64(n_hkv), i64(lq), i64(lk)]
        self.grid, self.block = (n_qt, n_hq, n_b), (plan2["threads"], 1, 1)
        self.map_ptr, self.map_bytes = L.device_ptr(self.tile_map), int(self.tile_map.size)

    def run(self, qp, kp, vp, outp, log_thresh, scale):
        """Launch one call on the data pointers of q, k, v, out; returns the tile map."""
        import ctypes

        from . import _launch as L

        isz = self.itemsize
        nq, nk, nv, no = self.sizes
        L.memset0(self.map_ptr, self.map_bytes)
        params = (L.array_params(qp, (nq,), isz) + L.array_params(kp, (nk,), isz)
                  + L.array_params(vp, (nv,), isz) + L.array_params(outp, (no,), isz)
                  + self.map_params
                  + [ctypes.c_double(log_thresh), self.causal, ctypes.c_double(scale)]
                  + self.tail)
        L.launch_raw(self.func, self.grid, self.block, self.shared, params)
        return self.tile_map


# =========================================================================================
# Version 2: register tiling
# =========================================================================================
#
# See "Version 2" in the module docstring. The kernel body is *generated* Python source:
# every per-thread micro-tile (scores, accumulators, row statistics) is a set of scalar
# variables with the loops over them written out, so the compiler keeps them in registers.
# Only the loops over the head dim (``Q K^T``) and over the keys of a tile (``P V``) remain
# loops, each iteration a block of 16-byte shared-memory loads and 128-256 FMAs.

#: v2 thread layout on a GPU: ``TR`` row groups x ``TC`` lanes per row group (256 threads)
V2_TR, V2_TC = 16, 16
#: dynamic shared memory a v2 block may use (H100/H200: 227 KB with the opt-in attribute)
V2_SHARED_MAX = 227 * 1024
#: at most this many score / accumulator registers per thread
_V2_MAX_S, _V2_MAX_O = 32, 64


def plan_v2(block_q, block_k, dqk, dv, itemsize, layout=None):
    """The v2 launch plan for one shape, or ``None`` where v2 does not apply (then
    :func:`launch_prefill` uses version 1, which takes any shape).

    v2 needs ``Dqk = Dv = D`` with ``D`` a multiple of ``4 * TC`` and of the 16-byte vector
    (8 float16 / 4 float32), ``block_q`` a multiple of ``TR``, ``block_k`` a multiple of ``TC``
    and of 4, micro-tiles of at most 32 scores and 64 accumulators per thread, and its shared
    memory within :data:`V2_SHARED_MAX`.

    ``layout``: ``(TR, TC)`` (a power-of-two ``TC`` <= 32); default ``(16, 16)`` on a GPU and a
    small one under the simulator (one Python thread per GPU thread there).
    """
    vec = 16 // itemsize
    if dqk != dv or dqk % vec or block_k % 4:
        return None
    d = dqk
    if layout is None:
        if config.ENABLE_CUDASIM:
            tc = next((c for c in (4, 2, 1) if d % (4 * c) == 0 and block_k % c == 0), None)
            if tc is None:
                return None
            layout = (4, tc)
        else:
            layout = (V2_TR, V2_TC)
    tr, tc = (int(x) for x in layout)
    if tc < 1 or tc > 32 or tc & (tc - 1) or tr < 1:
        return None
    nt = tr * tc
    if nt > 1024 or (not config.ENABLE_CUDASIM and nt % 32):
        return None
    if block_q % tr or block_k % tc or d % (4 * tc):
        return None
    rpt, kpt, nch = block_q // tr, block_k // tc, d // (4 * tc)
    if rpt * kpt > _V2_MAX_S or rpt * 4 * nch > _V2_MAX_O:
        return None
    qs = d + 4  # padded row of the Q, K, V tiles (a multiple of 4: 16-byte aligned rows)
    ps = block_k + (16 - block_k) % 32  # padded row of P: = 16 mod 32 (conflict-free stores)
    words = block_q * qs + 3 * block_k * qs + block_q * ps  # Q, 2 x K, V, P
    if 4 * words > V2_SHARED_MAX:
        return None
    return {"tr": tr, "tc": tc, "threads": nt, "rpt": rpt, "kpt": kpt, "nch": nch,
            "vec": vec, "qs": qs, "ps": ps, "shared_bytes": 4 * words}


# Small device functions of the generated kernel. They are not inlined by Numba but by NVVM
# (``forceinline``: LLVM's ``alwaysinline``): each conditional expression written inline
# into the generated source would add basic blocks, and Numba's front end (SSA, liveness) is
# superlinear in the number of blocks -- the first generated kernel, with inline ternaries,
# took 90 s to compile.

# (the simulator's jit takes no ``forceinline``)
_v2_device = cuda.jit(device=True) if config.ENABLE_CUDASIM else \
    cuda.jit(device=True, forceinline=True)


@_v2_device
def _gmax(x, red, t, width):
    return _group_max(x, red, t, width)


@_v2_device
def _gsum(x, red, t, width):
    return _group_sum(x, red, t, width)


@_v2_device
def _mask(s, gj, lim):
    """A score of a key past the row's horizon (causal, or past ``Lk``) is ``-inf``."""
    return s if gj <= lim else float32(-math.inf)


@_v2_device
def _vote(agree, ok, tile_max, m_run, log_thresh):
    """``agree`` and this row's vote (padding rows agree; NaN never agrees)."""
    if ok and not (tile_max - m_run < log_thresh):
        return 0
    return agree


@_v2_device
def _shift(m_new):
    """A row that has still seen nothing shifts by 0 (``l`` and ``acc`` stay 0)."""
    return float32(0.0) if m_new == float32(-math.inf) else m_new


@_v2_device
def _horizon(gi, i1, lk, offset, causal):
    """The last key row ``gi`` sees (``-1``: none, also for padding rows)."""
    if gi >= i1:
        return -1
    lim = lk - 1
    if causal:
        lim = min(lim, gi + offset)
    return lim


@_v2_device
def _tile_horizon(i0, i1, lk, offset, causal, block_q):
    """The last key that *every* row of the tile sees (its first row's horizon; ``-1`` for
    a partial tile, whose padding rows see nothing): tiles up to it need no mask."""
    if i1 - i0 < block_q:
        return -1
    lim = lk - 1
    if causal:
        lim = min(lim, i0 + offset)
    return lim


@_v2_device
def _sees(gi, offset, causal):
    return not causal or gi + offset >= 0


@_v2_device
def _fin(acc, l_run, sees):
    """``O / l``; zeros for a row that sees no key (``l = 0`` with visible keys: NaN)."""
    return acc / l_run if sees else float32(0.0)


def _v2_source(BQ, BK, D, TR, TC, VEC, QS, PS, sim, raw=True):
    """Python source of the v2 kernel for these compile-time constants (see "Version 2" in
    the module docstring); ``raw``: stage float16 K / V through raw 32-bit words."""
    NT = TR * TC
    RPT, KPT, NCH = BQ // TR, BK // TC, D // (4 * TC)
    OFF_K = BQ * QS  # two K buffers: tile kt in buffer kt % 2
    KB = BK * QS
    OFF_V = OFF_K + 2 * KB
    OFF_P = OFF_V + BK * QS
    LPR = D // VEC  # 16-byte loads per row of Q / K / V
    RAW = raw and VEC == 8  # K / V loads kept as raw float16 pairs until stored
    NLQ = -(-(BQ * LPR) // NT)  # per thread, for the Q tile
    NLK = -(-(BK * LPR) // NT)  # per thread, for a K or V tile
    R = range
    L = []

    def emit(ind, s):
        L.append("    " * ind + s)

    def load_tile(ind, src, base, j0, tag):
        """16-byte loads of the K or V tile starting at key ``j0`` into ``{tag}{n}``; rows
        past ``lk`` are clamped (a valid address) and zeroed by ``store_tile``."""
        for n in R(NLK):
            emit(ind, f"u{tag}{n} = tid + {n * NT}")
            emit(ind, f"r{tag}{n} = u{tag}{n} // {LPR}")
            emit(ind, f"c{tag}{n} = (u{tag}{n} % {LPR}) * {VEC}")
            emit(ind, f"g{tag}{n} = {j0} + r{tag}{n}")
            ld = "ld16raw" if RAW else "ld16"
            emit(ind, f"{tag}{n} = {ld}({src}, {base} + min(g{tag}{n}, lk - 1) * {D} + c{tag}{n})")

    def store_tile(ind, off, tag):
        for n in R(NLK):
            cond = f"u{tag}{n} < {BK * LPR}" if NLK * NT > BK * LPR else None
            i2 = ind
            if cond:
                emit(ind, f"if {cond}:")
                i2 = ind + 1
            emit(i2, f"if g{tag}{n} < lk:")
            for w in R(VEC // 4):
                if RAW:  # two words of two float16 each, widened by the store
                    src = "k" if tag == "xk" else "v"  # the source gives the word format
                    emit(i2 + 1, f"st4w(sm, {off} + r{tag}{n} * {QS} + c{tag}{n} + {4 * w}, "
                                 f"{tag}{n}[{2 * w}], {tag}{n}[{2 * w + 1}], {src})")
                    continue
                vals = ", ".join(f"{tag}{n}[{4 * w + e}]" for e in R(4))
                emit(i2 + 1, f"st4(sm, {off} + r{tag}{n} * {QS} + c{tag}{n} + {4 * w}, {vals})")
            emit(i2, "else:")
            for w in R(VEC // 4):
                emit(i2 + 1, f"st4(sm, {off} + r{tag}{n} * {QS} + c{tag}{n} + {4 * w}, "
                             "zero, zero, zero, zero)")

    emit(0, "def prefill_v2(q, k, v, out, tile_map, log_thresh, causal, scale, n_hq, n_hkv, "
            "lq, lk):")
    emit(1, "sm = cuda.shared.array(0, float32)" if sim else
         "sm = cuda.shared.array(0, float32, alignment=16)")
    emit(1, f"red = cuda.shared.array({NT}, float32)" if sim else "red = sm")
    emit(1, "tid = cuda.threadIdx.x")
    emit(1, f"rg = tid // {TC}")
    emit(1, f"cg = tid % {TC}")
    emit(1, "zero = float32(0.0)")
    emit(1, "neg_inf = float32(-math.inf)")
    emit(1, f"n_qt = (lq + {BQ - 1}) // {BQ}")
    emit(1, f"n_kt = (lk + {BK - 1}) // {BK}")
    emit(1, "qt = n_qt - 1 - cuda.blockIdx.x")
    emit(1, "h = cuda.blockIdx.y")
    emit(1, "b = cuda.blockIdx.z")
    emit(1, "kvh = h // (n_hq // n_hkv)")
    emit(1, "offset = lk - lq")
    emit(1, f"i0 = qt * {BQ}")
    emit(1, f"i1 = min(lq, i0 + {BQ})")
    emit(1, f"qbase = (b * n_hq + h) * lq * {D}")
    emit(1, f"kbase = (b * n_hkv + kvh) * lk * {D}")
    emit(1, "fscale = float32(scale)")
    # ---- the Q tile, pre-scaled, once per block
    emit(1, "# ---- stage the (pre-scaled) Q tile once")
    for n in R(NLQ):
        emit(1, f"uq = tid + {n * NT}")
        ind = 1
        if NLQ * NT > BQ * LPR:
            emit(1, f"if uq < {BQ * LPR}:")
            ind = 2
        emit(ind, f"rq = uq // {LPR}")
        emit(ind, f"cq = (uq % {LPR}) * {VEC}")
        emit(ind, f"xq = ld16(q, qbase + min(i0 + rq, lq - 1) * {D} + cq)")
        emit(ind, "if i0 + rq < i1:")
        for w in R(VEC // 4):
            vals = ", ".join(f"xq[{4 * w + e}] * fscale" for e in R(4))
            emit(ind + 1, f"st4(sm, rq * {QS} + cq + {4 * w}, {vals})")
        emit(ind, "else:")
        for w in R(VEC // 4):
            emit(ind + 1, f"st4(sm, rq * {QS} + cq + {4 * w}, zero, zero, zero, zero)")
    # ---- per-row state
    emit(1, "# ---- per-row state: row i of this thread is tile row i * TR + rg")
    for i in R(RPT):
        emit(1, f"gi{i} = i0 + {i * TR} + rg")
        emit(1, f"ok{i} = gi{i} < i1")
        emit(1, f"lim{i} = _horizon(gi{i}, i1, lk, offset, causal)")  # last key it sees
        emit(1, f"m{i} = neg_inf")
        emit(1, f"l{i} = zero")
        for c in R(NCH):
            for e in R(4):
                emit(1, f"o{i}_{c}_{e} = zero")
    emit(1, f"mlim = _tile_horizon(i0, i1, lk, offset, causal, {BQ})")
    emit(1, "k_tiles = n_kt")
    emit(1, "if causal:")
    emit(2, "last_visible = i1 - 1 + offset")
    emit(2, f"k_tiles = 0 if last_visible < 0 else min(n_kt, last_visible // {BK} + 1)")
    emit(1, "if k_tiles > 0:")
    load_tile(2, "k", "kbase", "0", "xk")
    store_tile(2, OFF_K, "xk")
    emit(1, "cuda.syncthreads()")
    emit(1, f"qoff = rg * {QS}")
    emit(1, f"poff = {OFF_P} + rg * {PS}")
    emit(1, f"voff = {OFF_V} + cg * 4")
    emit(1, f"pw = {OFF_P} + rg * {PS} + cg")
    emit(1, "for kt in range(k_tiles):")
    emit(2, f"j0 = kt * {BK}")
    emit(2, f"jn = j0 + {BK}")
    emit(2, f"koff = {OFF_K} + (kt % 2) * {KB} + cg * {QS}")
    emit(2, "# prefetch K of the next tile into registers: its latency hides behind Q K^T")
    load_tile(2, "k", "kbase", "jn", "xk")
    # ---- S = Q K^T
    emit(2, "# ---- 1. S = (scale Q) K^T: an RPT x KPT micro-tile, 4 head-dim columns a step")
    for i in R(RPT):
        emit(2, " = ".join(f"s{i}_{c}" for c in R(KPT)) + " = zero")
    def qk_steps(stop):
        emit(2, f"while d < {stop}:")
        for i in R(RPT):
            emit(3, f"qa{i} = ld16(sm, qoff + {i * TR * QS} + d)")
        for c in R(KPT):
            emit(3, f"kb{c} = ld16(sm, koff + {c * TC * QS} + d)")
        for e in R(4):
            for i in R(RPT):
                for c in R(KPT):
                    emit(3, f"s{i}_{c} += qa{i}[{e}] * kb{c}[{e}]")
        emit(3, "d += 4")

    emit(2, "d = 0")
    qk_steps((D // 8) * 4)
    emit(2, "# K of the next tile into the other buffer (last read before the previous vote),")
    emit(2, "# half-way through Q K^T: the loads have landed, and their registers are free")
    emit(2, "if kt + 1 < k_tiles:")
    store_tile(3, f"{OFF_K} + ((kt + 1) % 2) * {KB}", "xk")
    qk_steps(D)
    # ---- mask, row max, vote
    emit(2, "# ---- 2./3. mask (only tiles that cross a row's horizon), row max over the TC")
    emit(2, "# lanes of the row group, vote")
    emit(2, "agree = 1")
    emit(2, f"if j0 + {BK - 1} > mlim:")
    for c in R(KPT):
        emit(3, f"gj{c} = j0 + {c * TC} + cg")
    for i in R(RPT):
        for c in R(KPT):
            emit(3, f"s{i}_{c} = _mask(s{i}_{c}, gj{c}, lim{i})")
    for i in R(RPT):
        emit(2, f"mx{i} = s{i}_0")
        for c in R(1, KPT):
            emit(2, f"mx{i} = _max_nan(mx{i}, s{i}_{c})")
        emit(2, f"mx{i} = _gmax(mx{i}, red, tid, {TC})")
        emit(2, f"agree = _vote(agree, ok{i}, mx{i}, m{i}, log_thresh)")
    emit(2, "if cuda.syncthreads_and(agree):")
    emit(3, "if tid == 0:")
    emit(4, f"tile_map[b, h, qt, kt] = {_SKIPPED}")
    emit(3, "continue  # the vote was the barrier that publishes the next K tile")
    emit(2, "if tid == 0:")
    emit(3, f"tile_map[b, h, qt, kt] = {_COMPUTED}")
    emit(2, "# V of this tile in flight during the softmax")
    load_tile(2, "v", "kbase", "j0", "xv")
    # ---- softmax
    emit(2, "# ---- 4. online softmax; P to shared memory")
    for i in R(RPT):
        emit(2, f"mn = _max_nan(m{i}, mx{i})")
        emit(2, "sh = _shift(mn)")
        emit(2, f"al = float32(math.exp(m{i} - sh))")
        for c in R(KPT):
            emit(2, f"p{c} = float32(math.exp(s{i}_{c} - sh))")
            emit(2, f"sm[pw + {i * TR * PS + c * TC}] = p{c}")
        emit(2, "rs = " + " + ".join(f"p{c}" for c in R(KPT)))
        emit(2, f"rs = _gsum(rs, red, tid, {TC})")
        emit(2, f"l{i} = l{i} * al + rs")
        emit(2, f"m{i} = mn")
        for c in R(NCH):
            for e in R(4):
                emit(2, f"o{i}_{c}_{e} *= al")
    store_tile(2, OFF_V, "xv")
    emit(2, "cuda.syncthreads()")
    # ---- O += P V
    emit(2, "# ---- 5. O += P V: an RPT x 4*NCH micro-tile, 4 keys a step")
    emit(2, "j = 0")
    emit(2, f"while j < {BK}:")
    for i in R(RPT):
        emit(3, f"pa{i} = ld16(sm, poff + {i * TR * PS} + j)")
    for jj in R(4):
        for c in R(NCH):
            emit(3, f"vb{c} = ld16(sm, voff + {c * 4 * TC} + (j + {jj}) * {QS})")
        for e in R(4):
            for i in R(RPT):
                for c in R(NCH):
                    emit(3, f"o{i}_{c}_{e} += pa{i}[{jj}] * vb{c}[{e}]")
    emit(3, "j += 4")
    # ---- epilogue
    emit(1, "# ---- finish: O / l in the output dtype; rows that see no key store zeros")
    emit(1, f"obase = (b * n_hq + h) * lq * {D} + cg * 4")
    for i in R(RPT):
        emit(1, f"if ok{i}:")
        emit(2, f"sees = _sees(gi{i}, offset, causal)")
        emit(2, f"rb = obase + gi{i} * {D}")
        for c in R(NCH):
            for e in R(4):
                emit(2, f"out[rb + {c * 4 * TC + e}] = narrow(out, _fin(o{i}_{c}_{e}, l{i}, sees))")
    return "\n".join(L) + "\n"


_KERNELS_V2: dict = {}
#: K / V tiles loaded as raw float16 words (half the registers in flight); a tuning switch
_V2_RAW = True


def _get_kernel_v2(block_q, block_k, d, plan):
    """The compiled v2 kernel for these constants (generated, built once, then cached)."""
    key = (block_q, block_k, d, plan["tr"], plan["tc"], plan["vec"], _V2_RAW)
    if key not in _KERNELS_V2:
        import linecache

        sim = bool(config.ENABLE_CUDASIM)
        src = _v2_source(block_q, block_k, d, plan["tr"], plan["tc"], plan["vec"], plan["qs"],
                         plan["ps"], sim, _V2_RAW)
        fname = f"<blasst_ref.cuda.prefill v2 {key}>"
        linecache.cache[fname] = (len(src), None, src.splitlines(True), fname)
        ns = _v2_namespace()
        exec(compile(src, fname, "exec"), ns)  # noqa: S102 (our own generated source)
        fn = ns["prefill_v2"]
        fn.__doc__ = "BLASST prefill v2 (generated; see blasst_ref.cuda.prefill)"
        kernel = cuda.jit(fn) if sim else cuda.jit(max_registers=255)(fn)
        _KERNELS_V2[key] = [kernel, src, set()]
    return _KERNELS_V2[key]


def _v2_namespace():
    """The globals of the generated kernel source."""
    from ._intrinsics import ld16, ld16raw, narrow, st4, st4w

    return {"cuda": cuda, "float32": float32, "math": math, "ld16": ld16, "st4": st4,
            "ld16raw": ld16raw, "st4w": st4w, "narrow": narrow,
            "_max_nan": _max_nan, "_gmax": _gmax, "_gsum": _gsum, "_mask": _mask,
            "_vote": _vote, "_shift": _shift, "_horizon": _horizon, "_sees": _sees,
            "_tile_horizon": _tile_horizon,
            "_fin": _fin}


def _v2_allow_shared(entry, kernel, args, nbytes):
    """Opt the compiled kernel in to ``nbytes`` of dynamic shared memory (> 48 KB needs
    ``CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES``, which Numba does not set)."""
    if config.ENABLE_CUDASIM or nbytes <= SHARED_BYTES:
        return
    argtypes = tuple(kernel.typeof_pyval(a) for a in args)
    done = entry[2]
    if argtypes in done:
        return
    from numba.cuda.cudadrv.driver import binding, driver

    kern = kernel.compile(argtypes)
    cufunc = kern._codelibrary.get_cufunc()
    attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    driver.cuKernelSetAttribute(attr, int(nbytes), cufunc.handle, cufunc.device.id)
    done.add(argtypes)
