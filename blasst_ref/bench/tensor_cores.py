"""GPU benchmarks of the tensor-core kernels: the mma.sync rate from Numba, and prefill.

    python -m blasst_ref.bench.tensor_cores rate              # the mma.sync ceiling
    python -m blasst_ref.bench.tensor_cores prefill           # v3 vs torch flash / cuDNN

``rate`` runs a kernel that does nothing but ``mma.sync.m16n8k16`` (eight independent
accumulator chains per warp, operands in registers, no memory traffic) on every SM: the
highest tensor-core rate a Numba kernel built on :mod:`blasst_ref.cuda.mma` can reach.
Every prefill figure is compared with it.

``prefill`` times, on the same tensors: our tensor-core kernel (dense, and BLASST at a
threshold searched for ~75% tile sparsity on :func:`blasst_ref.workloads.llm_like` inputs),
our SIMT kernel (the previous version), and PyTorch's SDPA pinned to its flash and cuDNN
backends. FLOPs: ``4 * B * H * Lq * Lk_visible * D`` (``Lk_visible`` halves for causal),
the count FlashAttention's benchmarks use; a skipped tile is counted as if computed, so a
sparse kernel's TFLOP/s is its *effective* rate.

Times are medians of CUDA-event-timed blocks of back-to-back calls, after a warm-up. Needs
a CUDA GPU, numba-cuda and torch.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

import numpy as np


def _events_ms(fn, *, reps: int = 10, blocks: int = 5) -> float:
    """Median over ``blocks`` of the mean time of ``reps`` back-to-back calls, ms."""
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(blocks):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / reps)
    return statistics.median(times)


# ---- the mma.sync ceiling ---------------------------------------------------------------

CHAINS = 8


def _rate_kernel(bf16: bool):
    from numba import cuda, float32

    from ..cuda.mma import mma_bf16, mma_f16

    mma = mma_bf16 if bf16 else mma_f16

    @cuda.jit
    def kernel(seed, out, iters):
        lane = cuda.threadIdx.x % 32
        a = seed[lane]  # operands from memory: nothing for the compiler to fold
        acc = cuda.local.array(4 * CHAINS, float32)
        for i in range(4 * CHAINS):
            acc[i] = float32(0.0)
        for _ in range(iters):
            for c in range(CHAINS):
                r0, r1, r2, r3 = mma(a, a + 1, a + 2, a + 3, a + 4, a + 5, acc[4 * c],
                                     acc[4 * c + 1], acc[4 * c + 2], acc[4 * c + 3])
                acc[4 * c] = r0
                acc[4 * c + 1] = r1
                acc[4 * c + 2] = r2
                acc[4 * c + 3] = r3
        total = float32(0.0)
        for i in range(4 * CHAINS):
            total += acc[i]
        out[cuda.grid(1)] = total

    return kernel


def mma_rate(iters: int = 4096, warps_per_block: int = 4, blocks_per_sm: int = 8) -> dict:
    """TFLOP/s of a kernel that only issues ``mma.sync.m16n8k16`` (fp16 and bf16)."""
    from numba import cuda

    dev = cuda.get_current_device()
    sms = dev.MULTIPROCESSOR_COUNT
    threads = 32 * warps_per_block
    blocks = sms * blocks_per_sm
    seed = cuda.to_device(np.full(32, 0x3C003C00, np.uint32))  # 1.0 in both halves
    out = cuda.device_array(blocks * threads, np.float32)
    res = {"sms": sms, "blocks": blocks, "threads": threads, "iters": iters}
    for name, bf16 in (("fp16", False), ("bf16", True)):
        kern = _rate_kernel(bf16)

        def call():
            kern[blocks, threads](seed, out, iters)

        ms = _events_ms(call, reps=3, blocks=5)
        flops = 2 * 16 * 8 * 16 * CHAINS * iters * (threads // 32) * blocks
        res[f"{name}_tflops"] = flops / ms / 1e9
    return res


# ---- prefill ----------------------------------------------------------------------------


def attention_flops(b, h, lq, lk, d, causal) -> float:
    """``4 * B * H * Lq * Lk * D``, halved for causal (Lq == Lk)."""
    f = 4.0 * b * h * lq * lk * d
    return f / 2 if causal else f


def _torch_bits(t):
    """A Numba view of a torch CUDA tensor's 16-bit elements (no copy)."""
    import torch
    from numba import cuda

    return cuda.as_cuda_array(t.view(torch.int16))


def v3_call(q, k, v, out, *, causal, scale, thresh=0.0, block_q=64, block_k=64,
            tile_map=None):
    """A zero-argument callable running the v3 kernel on torch tensors (B, H, L, D)."""
    import torch
    from numba import cuda

    from ..cuda import prefill_v3

    bf16 = q.dtype == torch.bfloat16
    nb, nh, lq, _ = q.shape
    lk = k.shape[2]
    if tile_map is None:
        tile_map = torch.zeros((nb, nh, -(-lq // block_q), -(-lk // block_k)), dtype=torch.int8,
                               device=q.device)
    views = [_torch_bits(x) for x in (q, k, v, out)]
    tm = cuda.as_cuda_array(tile_map)
    log_thresh = -math.inf if thresh == 0 else math.log(thresh)

    call = prefill_v3.prepare(*views, tm, log_thresh, causal, scale, block_q, block_k,
                              bf16=bf16)
    return call, tile_map


def sdpa_call(q, k, v, *, causal, backend):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kind = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "math": SDPBackend.MATH}[backend]

    def call():
        with sdpa_kernel(kind):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return call


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def search_thresh(q, k, v, out, target, *, causal, scale, block_q, block_k, tol=0.02):
    """Bisect log10(thresh) until the v3 tile sparsity is within ``tol`` of ``target``."""
    lo, hi = -10.0, math.log10(1 - 1e-9)
    best = None
    for _ in range(40):
        mid = (lo + hi) / 2
        call, tm = v3_call(q, k, v, out, causal=causal, scale=scale, thresh=10 ** mid,
                           block_q=block_q, block_k=block_k)
        call()
        tmn = tm.cpu().numpy()
        sp = float((tmn == 2).sum() / max(1, (tmn > 0).sum()))
        if best is None or abs(sp - target) < abs(best[1] - target):
            best = (10 ** mid, sp)
        if abs(sp - target) <= tol:
            break
        if sp < target:
            lo = mid
        else:
            hi = mid
    return best


def prefill_rows(lengths=(4096, 16384, 32768), sparse_lengths=(16384, 32768),
                 dims=(128, 64), block_qs=(64, 128), log=print) -> list[dict]:
    import torch

    from .. import workloads

    rows = []
    dtypes = (torch.float16, torch.bfloat16)
    for d in dims:
        for lq in lengths:
            for causal in (False, True):
                for dt in dtypes:
                    b, h = 1, 32
                    g = torch.Generator(device="cuda").manual_seed(0)
                    q, k, v = (torch.randn((b, h, lq, d), device="cuda", dtype=dt, generator=g)
                               for _ in range(3))
                    out = torch.empty_like(q)
                    scale = 1 / math.sqrt(d)
                    flops = attention_flops(b, h, lq, lq, d, causal)
                    row = {"d": d, "L": lq, "causal": causal, "dtype": str(dt)[6:]}
                    for bq in block_qs:
                        call, _ = v3_call(q, k, v, out, causal=causal, scale=scale,
                                          block_q=bq)
                        ms = _events_ms(call)
                        row[f"v3_bq{bq}_tflops"] = flops / ms / 1e9
                        if bq == block_qs[0]:
                            ref = sdpa_call(q, k, v, causal=causal, backend="flash")()
                            row["v3_err_vs_flash"] = rel_err(out, ref)
                    for be in ("flash", "cudnn"):
                        try:
                            row[f"{be}_tflops"] = flops / _events_ms(
                                sdpa_call(q, k, v, causal=causal, backend=be)) / 1e9
                        except Exception as exc:  # noqa: BLE001 - a backend may refuse a shape
                            row[f"{be}_tflops"] = None
                            row[f"{be}_error"] = str(exc)[:120]
                    log(json.dumps(row))
                    rows.append(row)
                    del q, k, v, out
    # BLASST at ~75% sparsity on LLM-like inputs
    for lq in sparse_lengths:
        for causal in (True, False):
            d, h = 128, 32
            qn, kn, vn = workloads.llm_like(1, h, h, lq, lq, d, seed=0)
            q, k, v = (torch.from_numpy(np.ascontiguousarray(x)).to("cuda", torch.float16)
                       for x in (qn, kn, vn))
            out = torch.empty_like(q)
            scale = 1 / math.sqrt(d)
            flops = attention_flops(1, h, lq, lq, d, causal)
            row = {"d": d, "L": lq, "causal": causal, "dtype": "float16", "workload": "llm_like"}
            for bq in block_qs:
                thresh, sp = search_thresh(q, k, v, out, 0.75, causal=causal, scale=scale,
                                           block_q=bq, block_k=64)
                dense, _ = v3_call(q, k, v, out, causal=causal, scale=scale, block_q=bq)
                sparse, _ = v3_call(q, k, v, out, causal=causal, scale=scale, thresh=thresh,
                                    block_q=bq)
                row[f"bq{bq}_thresh"] = thresh
                row[f"bq{bq}_sparsity"] = sp
                row[f"bq{bq}_dense_tflops"] = flops / _events_ms(dense) / 1e9
                row[f"bq{bq}_sparse_tflops"] = flops / _events_ms(sparse) / 1e9
                sparse()
                ref = sdpa_call(q, k, v, causal=causal, backend="flash")()
                row[f"bq{bq}_sparse_err"] = rel_err(out, ref)
            for be in ("flash", "cudnn"):
                row[f"{be}_tflops"] = flops / _events_ms(
                    sdpa_call(q, k, v, causal=causal, backend=be)) / 1e9
            log(json.dumps(row))
            rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m blasst_ref.bench.tensor_cores",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["rate", "prefill", "all"])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768],
                   help="sequence lengths of the dense rows")
    p.add_argument("--sparse-lengths", type=int, nargs="+", default=[16384, 32768],
                   help="sequence lengths of the BLASST rows (llm_like, ~75%% sparsity)")
    p.add_argument("--dims", type=int, nargs="+", default=[128, 64], help="head dims")
    p.add_argument("--block-q", type=int, nargs="+", default=[64, 128],
                   help="query tile sizes of the tensor-core kernel to time")
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args(argv)
    res = {}
    if args.what in ("rate", "all"):
        res["mma_rate"] = mma_rate()
        print(json.dumps(res["mma_rate"]), flush=True)
    if args.what in ("prefill", "all"):
        res["prefill"] = prefill_rows(args.lengths, args.sparse_lengths, args.dims,
                                      args.block_q, log=lambda s: print(s, flush=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
