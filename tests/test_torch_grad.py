"""Gradients through blasst_ref.torch.attention and the "blasst" HF attention (docs/DESIGN.md §11).

Oracles: ``torch.autograd.gradcheck`` in float64 (finite differences of the function itself),
float64 torch autograd of the explicitly masked dense formula (the keys of the kept tiles
only, softmax over them), and torch SDPA's autograd at ``thresh = 0``. Fresh random inputs,
small shapes.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed")

import blasst_ref  # noqa: E402
import blasst_ref.torch as bt  # noqa: E402
from blasst_ref.reference_backward import kept_keys  # noqa: E402


def _qkv(b=1, hq=4, hkv=2, lq=48, lk=48, d=16, dv=None, dtype=torch.float32, seed=0,
         window=8.0):
    """LLM-like inputs (a local window: tiles to skip) as leaf tensors requiring grad."""
    qkv = blasst_ref.workloads.llm_like(b, hq, hkv, lq, lk, d, v_dim=dv, seed=seed,
                                        dtype="float64", window=window)
    return tuple(torch.from_numpy(x).to(dtype).requires_grad_(True) for x in qkv)


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _masked_dense(q, k, v, keep, scale):
    """float64 softmax attention over the keys ``keep`` ``(B, Hq, Lq, Lk)`` marks (GQA: kv
    heads repeated), differentiated by torch's autograd."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~torch.from_numpy(keep), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("thresh", [0.0, 0.05], ids=["dense", "skipping"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradcheck_float64(thresh, causal):
    """Finite differences of the function BLASST computes. At ``thresh > 0`` it is piecewise
    smooth: the inputs are chosen so that gradcheck's steps move no tile decision (checked)."""
    q, k, v = _qkv(hq=2, hkv=1, lq=12, lk=12, d=8, dv=6, dtype=torch.float64, seed=5,
                   window=4.0)
    kw = dict(is_causal=causal, backend="reference", block_q=4, block_k=4)
    _, st = bt.attention(q, k, v, thresh, return_stats=True, **kw)
    if thresh:
        assert st.sparsity > 0.3, st.sparsity
        for x in (q, k, v):  # the decisions hold under a step far larger than gradcheck's
            with torch.no_grad():
                x += 1e-4
            assert np.array_equal(bt.attention(q, k, v, thresh, return_stats=True,
                                               **kw)[1].tile_map, st.tile_map)
            with torch.no_grad():
                x -= 1e-4
    assert torch.autograd.gradcheck(lambda a, b, c: bt.attention(a, b, c, thresh, **kw),
                                    (q, k, v), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("lq,lk,causal", [(80, 80, True), (40, 96, True), (3, 90, True),
                                          (64, 64, False)],
                         ids=["square", "cache", "decode", "full"])
def test_grads_equal_autograd_of_the_masked_dense_formula(lq, lk, causal):
    """CPU kernels, float32, GQA, ``Dv != Dqk``, a threshold that skips: the gradients equal
    float64 autograd of softmax attention over exactly the keys the forward kept."""
    q, k, v = _qkv(b=2, hq=4, hkv=2, lq=lq, lk=lk, d=16, dv=8, seed=int(lq + lk))
    thresh, scale = 0.05, 0.3
    out, st = bt.attention(q, k, v, thresh, is_causal=causal, scale=scale, backend="cpu",
                           block_q=16, block_k=16, return_stats=True)
    assert st.skipped_tiles > 0, "the test needs skipped tiles to mean anything"
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(lq))
    grads = torch.autograd.grad(out, (q, k, v), dout)
    keep = kept_keys(st.tile_map, lq, lk, 4, causal=causal, block_q=16, block_k=16)
    leaves = tuple(x.detach().double().requires_grad_(True) for x in (q, k, v))
    ref_out = _masked_dense(*leaves, keep, scale)
    ref = torch.autograd.grad(ref_out, leaves, dout.double())
    assert _rel(out, ref_out) < 1e-5
    for name, g, r in zip("qkv", grads, ref):
        assert g.dtype == torch.float32 and g.shape == r.shape
        assert _rel(g, r) < 1e-5, name
    # skipping changed the gradient: the oracle is not just dense attention
    dense = torch.autograd.grad(_masked_dense(*leaves, np.ones_like(keep) if not causal else
                                              kept_keys(np.ones_like(st.tile_map), lq, lk, 4,
                                                        causal=True, block_q=16, block_k=16),
                                              scale), leaves, dout.double())
    assert _rel(grads[0], dense[0]) > 1e-4


@pytest.mark.parametrize("causal", [False, True])
def test_thresh0_grads_equal_sdpa_autograd(causal):
    q, k, v = _qkv(b=2, hq=4, hkv=2, lq=70, lk=70, d=16, seed=3)
    dout = torch.randn(2, 4, 70, 16, generator=torch.Generator().manual_seed(4))
    ours = torch.autograd.grad(bt.attention(q, k, v, is_causal=causal), (q, k, v), dout)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                            enable_gqa=True)
    theirs = torch.autograd.grad(sdpa, (q, k, v), dout)
    for name, a, b in zip("qkv", ours, theirs):
        assert _rel(a, b) < 1e-5, name


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_low_precision_grads_come_in_the_input_dtype(dtype, tol):
    q, k, v = _qkv(lq=40, lk=40, seed=7)
    dout = torch.randn(1, 4, 40, 16, generator=torch.Generator().manual_seed(8))
    ref = torch.autograd.grad(bt.attention(q, k, v, is_causal=True), (q, k, v), dout)
    low = tuple(x.detach().to(dtype).requires_grad_(True) for x in (q, k, v))
    out = bt.attention(*low, is_causal=True)
    assert out.dtype == dtype
    grads = torch.autograd.grad(out, low, dout.to(dtype))
    for name, g, r in zip("qkv", grads, ref):
        assert g.dtype == dtype and bool(torch.isfinite(g).all()), name
        assert _rel(g, r) < tol, name


def test_stats_and_decisions_match_the_no_grad_call():
    q, k, v = _qkv(lq=64, lk=64, seed=9)
    kw = dict(is_causal=True, backend="cpu", block_q=16, block_k=16, return_stats=True)
    out, st = bt.attention(q, k, v, 0.05, **kw)
    assert out.requires_grad and st.skipped_tiles > 0
    with torch.no_grad():
        out0, st0 = bt.attention(q, k, v, 0.05, **kw)
    np.testing.assert_array_equal(st.tile_map, st0.tile_map)
    assert (st.sparsity, st.phase, st.block_q, st.block_k) == (st0.sparsity, st0.phase,
                                                               st0.block_q, st0.block_k)
    assert _rel(out, out0) < 1e-6
    # only some inputs need a gradient: the others get none
    kq = k.detach()
    (gq,) = torch.autograd.grad(bt.attention(q, kq, v.detach(), 0.05, is_causal=True).sum(), (q,))
    assert gq.shape == q.shape and kq.grad is None


def test_hf_model_trains_through_blasst():
    """A tiny Llama built from a config (no download): through ``"blasst"``, at thresh 0 the
    parameter gradients equal SDPA's; at a skipping threshold they are finite and nonzero."""
    pytest.importorskip("transformers", reason="the torch extra is not installed")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, max_position_embeddings=256, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # peaked heads, so that a threshold skips tiles
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30.0)
            layer.self_attn.k_proj.weight.mul_(30.0)
    ids = torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(1))

    def grads():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    sdpa = grads()
    bt.configure(model, 0.0, block_q=16, block_k=16, backend="cpu")
    dense = grads()
    assert dense.keys() == sdpa.keys() and len(dense) == len(list(model.parameters()))
    for n in sdpa:
        assert _rel(dense[n], sdpa[n]) < 1e-4, n
    bt.configure(model, 80.0, block_q=16, block_k=16, backend="cpu")  # thresh = 80 / 96
    with bt.collect_stats() as st:
        sparse = grads()
    assert sum(c.skipped for c in st.calls) > 0, st.format_table()
    for n, g in sparse.items():
        assert bool(torch.isfinite(g).all()) and float(g.norm()) > 0, n
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert _rel(sparse[q_proj], dense[q_proj]) > 1e-6  # the skipped tiles changed it
    model.set_attn_implementation("sdpa")
