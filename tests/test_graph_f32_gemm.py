"""``graph.f32_gemm``: the FMA micro-kernel GEMM with its fused epilogue.

Against a float64 oracle on Hypothesis-drawn shapes (M, K, N not multiples of the micro-tile,
K across several K chunks), every activation, with and without bias and residual (the
residual may be the output itself), serial and parallel; the block schedule gives every
thread the same number of equal tasks; a compiled graph's packed matmuls run on it.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.special import erf

from blasst_ref import graph as bg
from blasst_ref.graph import f32_gemm as F
from blasst_ref.graph import kernels as K

from helpers import record_calls

pytestmark = pytest.mark.skipif(not F.available(),
                                reason="needs a CPU with AVX-512 or AVX2+FMA")

seeds = st.integers(0, 2**32 - 1)


def oracle(a, w, bias, act, residual):
    y = a.astype(np.float64) @ w.astype(np.float64)
    if bias is not None:
        y = y + bias
    if act == K.ACT_RELU:
        y = np.maximum(y, 0)
    elif act == K.ACT_GELU:
        y = 0.5 * y * (1 + erf(y / np.sqrt(2)))
    elif act == K.ACT_GELU_TANH:
        y = 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y ** 3)))
    elif act == K.ACT_TANH:
        y = np.tanh(y)
    elif act == K.ACT_EXP:
        y = np.exp(y)
    return y if residual is None else y + residual


@given(m=st.integers(1, 150), k=st.integers(1, 600), n=st.integers(1, 200),
       act=st.sampled_from(range(len(K.ACT_NAMES))), bias=st.booleans(),
       residual=st.sampled_from(["none", "separate", "in place"]),
       parallel=st.booleans(), seed=seeds)
def test_gemm_equals_float64(m, k, n, act, bias, residual, parallel, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    r = rng.standard_normal((m, n)).astype(np.float32) if residual != "none" else None
    want = oracle(a, w, b, act, r)
    out = r if residual == "in place" else np.full((m, n), np.nan, np.float32)
    got = F.gemm(a, F.pack(w), b, act, r if residual != "in place" else out, out,
                 parallel=parallel)
    assert got is out
    err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
    assert err <= 2e-6, err


@given(m=st.integers(1, 5000), n=st.integers(1, 3000), threads=st.integers(1, 16))
def test_blocks_give_every_thread_equal_tasks(m, n, threads):
    rb, cb = F.blocks(m, n, threads)
    assert rb % F.MR == 0 and cb % F.NR == 0
    assert rb <= max(F.ROW_BLOCK, F.MR) and cb <= F.COL_BLOCK
    tasks = -(-m // rb) * -(-n // cb)
    assert tasks % threads == 0 or rb == F.MR or threads == 1
    assert -(-m // rb) * rb - m < rb  # no empty row block


def test_bad_arguments():
    pw = F.pack(np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match=r"a must be a float32 \(M, 4\)"):
        F.gemm(np.ones((2, 5), np.float32), pw)
    with pytest.raises(ValueError, match="bias must be a float32"):
        F.gemm(np.ones((2, 4), np.float32), pw, bias=np.ones(4, np.float32))
    with pytest.raises(ValueError, match="w must be a non-empty 2-D float32"):
        F.pack(np.ones((4, 3)))


def test_compiled_graph_runs_the_fma_kernel(monkeypatch):
    calls = record_calls(monkeypatch, F, "gemm")
    g = bg.models.mlp([13, 70, 9], 33, final_activation="relu")
    feeds = bg.models.example_inputs(g, seed=2)
    cg = bg.compile(g)
    got = cg(**feeds)["y"]
    assert len(calls) == 2
    want = bg.interpret(g, **feeds)["y"]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5
