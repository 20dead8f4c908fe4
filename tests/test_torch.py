"""blasst_ref.torch.attention and blasst_ref.attention on torch CPU tensors (docs/DESIGN.md §10).

Checked against the float64 oracle ``dense_attention`` and against PyTorch SDPA, on fresh
random inputs; ``thresh > 0`` against :func:`blasst_ref.attention` on the same data as numpy.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed")

import blasst_ref  # noqa: E402
import blasst_ref.torch as bt  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _qkv(b=2, hq=4, hkv=2, lq=96, lk=96, d=32, dv=None, dtype=torch.float32, seed=0):
    """LLM-like inputs (sinks, a local window: tiles to skip) as torch tensors."""
    qkv = blasst_ref.workloads.llm_like(b, hq, hkv, lq, lk, d, v_dim=dv, seed=seed)
    return tuple(torch.from_numpy(x).to(dtype) for x in qkv)


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("causal", [False, True])
def test_thresh0_equals_oracle_and_sdpa(causal):
    q, k, v = _qkv()
    out = bt.attention(q, k, v, is_causal=causal, backend="cpu")
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (2, 4, 96, 32)
    oracle = blasst_ref.dense_attention(q.numpy(), k.numpy(), v.numpy(), causal=causal)
    assert _rel(out, oracle) < 1e-5
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    assert _rel(out, sdpa) < 1e-5


def test_causal_is_bottom_right_for_a_cache():
    q, k, v = _qkv(lq=24, lk=130, dv=16)
    out = bt.attention(q, k, v, is_causal=True, scale=0.3, backend="cpu")
    oracle = blasst_ref.dense_attention(q.numpy(), k.numpy(), v.numpy(), causal=True, scale=0.3)
    assert _rel(out, oracle) < 1e-5


@pytest.mark.parametrize("lq", [160, 3])  # prefill and the split-KV decode path
def test_thresh_positive_equals_numpy_call(lq):
    q, k, v = _qkv(lq=lq, lk=160)
    thresh = 0.05
    out, st = bt.attention(q, k, v, thresh, is_causal=True, backend="cpu", block_q=16,
                           block_k=16, return_stats=True)
    ref, ref_st = blasst_ref.attention(q.numpy(), k.numpy(), v.numpy(), thresh, causal=True,
                                       backend="cpu", block_q=16, block_k=16, return_stats=True)
    assert st.skipped_tiles > 0, "the test needs skipped tiles to mean anything"
    np.testing.assert_array_equal(st.tile_map, ref_st.tile_map)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=0)
    dense = blasst_ref.dense_attention(q.numpy(), k.numpy(), v.numpy(), causal=True)
    assert _rel(out, dense) > 1e-7  # skipping changed the result (within the bound)


def test_blasst_ref_attention_takes_torch_cpu_tensors():
    q, k, v = _qkv(b=1, lq=40, lk=40)
    out = blasst_ref.attention(q, k, v, causal=True, backend="reference")
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    out3 = blasst_ref.attention(q[0], k[0], v[0], causal=True)  # 3-D
    assert out3.shape == (4, 40, 32)
    assert _rel(out3, out[0]) < 1e-6
    # a non-contiguous view (the layout HF hands over: (B, L, H, D) transposed) works too
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qt.is_contiguous()
    assert _rel(blasst_ref.attention(qt, k, v, causal=True), out) < 1e-6


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2), (torch.float64, 1e-12)])
def test_dtypes(dtype, tol):
    q, k, v = _qkv(dtype=dtype, lq=64, lk=64)
    out = bt.attention(q, k, v, is_causal=True)
    assert out.dtype == dtype
    oracle = blasst_ref.dense_attention(*(x.double().numpy() for x in (q, k, v)), causal=True)
    assert _rel(out.double(), oracle) < tol


def test_errors_name_the_argument():
    q, k, v = _qkv(lq=32, lk=32)
    with pytest.raises(TypeError, match="query must be a torch.Tensor"):
        bt.attention(q.numpy(), k, v)
    with pytest.raises(ValueError, match="attn_mask"):
        bt.attention(q, k, v, attn_mask=torch.ones(32, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout_p"):
        bt.attention(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="enable_gqa"):
        bt.attention(q, k, v, enable_gqa=False)
    with pytest.raises(ValueError, match="thresh"):
        bt.attention(q, k, v, 1.5)
    with pytest.raises(TypeError, match="all be torch CPU tensors or all numpy"):
        blasst_ref.attention(q, k.numpy(), v)


def test_gradient_flows_instead_of_being_cut():
    """(tests/test_torch_grad.py checks the gradients' values.)"""
    q, k, v = _qkv(lq=32, lk=32)
    q.requires_grad_(True)
    out = bt.attention(q, k, v)
    assert out.grad_fn is not None
    out.sum().backward()
    assert q.grad is not None and bool(torch.isfinite(q.grad).all())
    with torch.no_grad():
        assert bt.attention(q, k, v).grad_fn is None


def test_module_named_torch_shadows_nothing():
    import importlib

    real = importlib.import_module("torch")
    assert pathlib.Path(real.__file__).parent.name == "torch"
    assert "blasst_ref" not in real.__file__ and hasattr(real, "Tensor")
    # with blasst_ref/ itself on sys.path (a script run from inside it), the clash is named
    code = "import sys; sys.path.insert(0, 'blasst_ref'); import torch"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode != 0
    assert "imported as the top-level module 'torch'" in res.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch CUDA tensors)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_tensors_take_the_cuda_backend(dtype):
    q, k, v = (x.cuda() for x in _qkv(lq=256, lk=256, d=64, dtype=dtype))
    out, st = bt.attention(q, k, v, is_causal=True, return_stats=True)
    assert out.is_cuda and out.dtype == dtype and st.backend == "cuda"
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert _rel(out.float().cpu(), sdpa.float().cpu()) < (1e-2 if dtype == torch.bfloat16 else 2e-3)
    # thresh > 0 on a non-contiguous view (HF hands over transposed layouts)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    out2, st2 = bt.attention(qt, k, v, 0.05, is_causal=True, return_stats=True)
    assert st2.skipped_tiles > 0 and out2.shape == out.shape
