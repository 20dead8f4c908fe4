"""``attention(..., backend="cuda")`` through the public API: array kinds, shapes, stats, errors.

In CI this runs on Numba's CUDA simulator (tests/conftest.py switches it on where there is
no GPU) at toy sizes; on the GPU machine the same tests run on the real device, and the
torch / CuPy tests (skipped where those libraries have no GPU) run too. The kernels'
numerics are tested in test_cuda_prefill.py and test_cuda_decode.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import random_qkv, rel_err
from numba import cuda

import blasst_ref as br

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def _host(x):
    return x.copy_to_host() if hasattr(x, "copy_to_host") else np.asarray(x)


@pytest.mark.parametrize(
    "shape,causal",
    [
        ((1, 4, 2, 20, 24, 8, 4), True),  # prefill, GQA, Dv != Dqk, Lq < Lk
        ((1, 4, 2, 1, 40, 8, 8), True),  # decode, GQA group of 2
    ],
)
def test_numba_device_arrays_in_and_out(shape, causal):
    b, hq, hkv, lq, lk, d, dv = shape
    rng = np.random.default_rng(lq)
    q, k, v = random_qkv(rng, b, hq, hkv, lq, lk, d, dv, q_scale=2.0, k_scale=2.0,
                         dtype=np.float32)
    dq, dk, dv_ = (cuda.to_device(x) for x in (q, k, v))
    out, stats = br.attention(dq, dk, dv_, 0.05, causal=causal, backend="auto",
                              block_q=8, block_k=8, return_stats=True)
    assert stats.backend == "cuda"
    assert hasattr(out, "copy_to_host"), "a Numba array in gives a Numba array out"
    ref = br.blasst_attention_reference(q, k, v, 0.05, causal=causal, block_q=8, block_k=8)
    np.testing.assert_array_equal(stats.tile_map, ref.tile_map)
    assert rel_err(_host(out), ref.out.astype(np.float64)) < 1e-5


def test_three_d_in_three_d_out_exact_at_thresh_zero():
    rng = np.random.default_rng(1)
    q, k, v = random_qkv(rng, 1, 2, 1, 12, 12, 8, 8, dtype=np.float32)
    out = br.attention(*(cuda.to_device(x[0]) for x in (q, k, v)), causal=True,
                       backend="cuda", block_q=8, block_k=8)
    host = _host(out)
    assert host.shape == (2, 12, 8)
    assert rel_err(host, br.dense_attention(q[0], k[0], v[0], causal=True)) < 1e-5


def test_non_contiguous_input_is_a_clear_error():
    rng = np.random.default_rng(2)
    q, k, v = random_qkv(rng, 1, 2, 2, 16, 16, 8, 8, dtype=np.float32)
    dq = cuda.to_device(np.concatenate([q, q], axis=3))[:, :, :, ::2]
    with pytest.raises(ValueError, match="q is not C-contiguous"):
        br.attention(dq, cuda.to_device(k), cuda.to_device(v), backend="cuda")


def test_host_and_device_mixed_is_a_clear_error():
    rng = np.random.default_rng(3)
    q, k, v = random_qkv(rng, 1, 2, 2, 16, 16, 8, 8, dtype=np.float32)
    with pytest.raises(TypeError, match="must all be host .* or all CUDA arrays"):
        br.attention(cuda.to_device(q), k, v, backend="auto")


def _torch_cuda():
    torch = pytest.importorskip("torch", reason="torch not installed: run on the GPU machine")
    if SIMULATOR or not torch.cuda.is_available():
        pytest.skip("torch CUDA tensors need a real GPU (the simulator has none): run on the "
                    "GPU machine")
    return torch


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_torch_tensors_in_place_and_torch_out(dtype):
    torch = _torch_cuda()
    rng = np.random.default_rng(4)
    q, k, v = random_qkv(rng, 2, 8, 2, 300, 300, 64, 64, dtype=np.float32)
    tq, tk, tv = (torch.from_numpy(x).to("cuda", getattr(torch, dtype)) for x in (q, k, v))
    out = br.attention(tq, tk, tv, causal=True)
    assert isinstance(out, torch.Tensor) and out.is_cuda and out.dtype == tq.dtype
    want = br.dense_attention(*(t.float().cpu().numpy() for t in (tq, tk, tv)), causal=True)
    assert rel_err(out.float().cpu().numpy(), want) < (2e-3 if dtype == "float16" else 1e-5)


def test_cupy_arrays_in_and_cupy_out():
    cupy = pytest.importorskip("cupy", reason="CuPy not installed: run on the GPU machine")
    if SIMULATOR:
        pytest.skip("CuPy arrays need a real GPU (the simulator has none): run on the GPU machine")
    rng = np.random.default_rng(5)
    q, k, v = random_qkv(rng, 1, 4, 4, 1, 5000, 128, 128, dtype=np.float32)
    out = br.attention(*(cupy.asarray(x) for x in (q, k, v)), causal=True)
    assert isinstance(out, cupy.ndarray)
    assert rel_err(cupy.asnumpy(out), br.dense_attention(q, k, v, causal=True)) < 1e-5


@pytest.mark.parametrize("lq,d", [(300, 128), (1, 128), (40, 24), (1, 24)],
                         ids=["prefill-v2", "decode-v2", "prefill-v1", "decode-v1"])
def test_torch_bfloat16_in_and_out(lq, d):
    """bfloat16 tensors are read as their bits, computed in float32 and stored as bfloat16,
    on the fast path (v2 shapes, D = 128) and the general one (v1 shapes, D = 24)."""
    torch = _torch_cuda()
    rng = np.random.default_rng(6)
    q, k, v = random_qkv(rng, 2, 8, 2, lq, 600, d, d, dtype=np.float32, q_scale=2.0,
                         k_scale=2.0)
    tq, tk, tv = (torch.from_numpy(x).to("cuda", torch.bfloat16) for x in (q, k, v))
    out, stats = br.attention(tq, tk, tv, 0.0, causal=True, return_stats=True)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16
    assert tuple(out.shape) == (2, 8, lq, d)
    exact = [t.float().cpu().numpy() for t in (tq, tk, tv)]  # the bf16-rounded inputs
    want = br.dense_attention(*exact, causal=True)
    assert rel_err(out.float().cpu().numpy(), want) < 1e-2  # bf16 output rounding: 2^-9
    # skipping: the decisions of float32 inputs holding the same (bf16) values
    _, st32 = br.attention(*(torch.from_numpy(x).cuda() for x in exact), 0.2, causal=True,
                           return_stats=True)
    _, st16 = br.attention(tq, tk, tv, 0.2, causal=True, return_stats=True)
    assert st16.skipped_tiles > 0
    assert np.mean(st16.tile_map != st32.tile_map) < 0.01  # only ties at the margin


def test_torch_non_contiguous_is_a_clear_error():
    torch = _torch_cuda()
    t = torch.zeros((1, 2, 16, 16), dtype=torch.float16, device="cuda")
    for dt in (torch.float16, torch.bfloat16):
        x = t.to(dt)
        with pytest.raises(ValueError, match="q is not C-contiguous"):
            br.attention(x.transpose(2, 3), x, x)


@pytest.mark.parametrize("lq", [1, 200])
def test_fast_path_equals_general_path(lq):
    """The raw-pointer host path (cached plans, reused tile map) launches the same kernels
    as Numba's dispatcher: equal outputs and tile maps, call after call."""
    torch = _torch_cuda()
    import blasst_ref.cuda as bc

    rng = np.random.default_rng(7)
    q, k, v = random_qkv(rng, 2, 8, 2, lq, 3000, 128, 128, dtype=np.float16, q_scale=2.0,
                         k_scale=2.0)
    tq, tk, tv = (torch.from_numpy(x).cuda() for x in (q, k, v))
    for thresh in (0.0, 0.05, 0.2):
        lt = 1.0 / np.sqrt(128)
        fast = bc._attention_fast(tq, tk, tv, thresh, True, lt, 128, 64)
        assert fast is not None, "the fast path must take this shape"
        f_map = fast[1].copy_to_host()
        gen = bc._attention_general(tq, tk, tv, thresh, True, lt, 128, 64)
        assert fast[2] == gen[2], "both paths run the same kernel version"
        np.testing.assert_array_equal(f_map, gen[1].copy_to_host())
        torch.testing.assert_close(fast[0], gen[0], rtol=0, atol=0)
        if thresh == 0.2:
            assert (f_map == 2).any()


@pytest.mark.parametrize("decode_seed", ["sink", "none"])
def test_decode_seed_reaches_the_cuda_kernels(decode_seed, monkeypatch):
    """``decode_seed`` through the API: the CUDA backend takes the reference's decisions
    for each seed (several split-KV chunks, an attention sink in key tile 0)."""
    monkeypatch.setattr(br.tiling, "MIN_TILES_PER_SPLIT", 2)
    q, k, v = random_qkv(4, 1, 4, 1, 1, 64, 8, dtype=np.float32, q_scale=1.5, sink=12.0)
    out, stats = br.attention(*(cuda.to_device(x) for x in (q, k, v)), 0.05, block_k=8,
                              backend="cuda", return_stats=True, decode_seed=decode_seed)
    ref = br.blasst_attention_reference(q, k, v, 0.05, block_k=8, decode_seed=decode_seed)
    other = br.blasst_attention_reference(q, k, v, 0.05, block_k=8,
                                          decode_seed="none" if decode_seed == "sink" else "sink")
    assert (ref.tile_map != other.tile_map).any(), "the seeds must decide differently here"
    np.testing.assert_array_equal(stats.tile_map, ref.tile_map)
    assert rel_err(_host(out), ref.out.astype(np.float64)) < 1e-5
