"""Tests of the fused-op CPU kernels of the graph executor (``blasst_ref/graph/kernels.py``).

Every kernel is compared with a plain numpy computation in float64, by relative norm error
(float32: ~1e-5; float64: ~1e-12). ``out`` is poisoned with NaN before each call, so an
element a kernel forgets to write shows up. Inputs are fresh random numbers (never zeros,
never constants) from a seed that Hypothesis draws.

The strategies of this file live here (not in ``tests/strategies.py``): they describe
matmul/row-op shapes, which nothing else in the suite uses.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
from helpers import rel_err
from hypothesis import given
from hypothesis import strategies as st

from blasst_ref.graph import kernels as K

DTYPES = [np.float32, np.float64]
TOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-12}
ACTS = [K.ACT_NONE, K.ACT_RELU, K.ACT_GELU, K.ACT_GELU_TANH, K.ACT_TANH, K.ACT_EXP]


# ---------------------------------------------------------------------------------------
# Strategies and helpers
# ---------------------------------------------------------------------------------------


@st.composite
def matmul_cases(draw, max_m=70, max_k=40, max_n=300):
    """A matmul_packed call: sizes (M, K, N), a panel width that mostly does not divide N
    (small widths give many panels and a padded last one), an explicit row block or the
    default, the post-ops, the residual mode and the dtype."""
    m = draw(st.integers(1, max_m))
    k = draw(st.integers(1, max_k))
    n = draw(st.integers(1, max_n))
    panel = draw(st.sampled_from([1, 7, 16, 48, K.PANEL, 1024]))
    row_block = draw(st.sampled_from([None, 1, 5, 16, 64]))
    act = draw(st.sampled_from(ACTS))
    with_bias = draw(st.booleans())
    residual = draw(st.sampled_from(["none", "separate", "alias_out"]))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**32 - 1))
    return dict(m=m, k=k, n=n, panel=panel, row_block=row_block, act=act,
                with_bias=with_bias, residual=residual, dtype=dtype, seed=seed)


def rand(rng, shape, dtype, scale=1.0, loc=0.0):
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


def act_ref(y, act):
    """The reference activations, in float64 (GELU is the exact erf form, as in BERT)."""
    if act == K.ACT_NONE:
        return y
    if act == K.ACT_RELU:
        return np.maximum(y, 0.0)
    if act == K.ACT_GELU:
        return 0.5 * y * (1.0 + scipy.special.erf(y / math.sqrt(2.0)))
    if act == K.ACT_GELU_TANH:
        return 0.5 * y * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (y + 0.044715 * y**3)))
    if act == K.ACT_TANH:
        return np.tanh(y)
    if act == K.ACT_EXP:
        return np.exp(y)
    raise AssertionError(act)


def poisoned(shape, dtype):
    return np.full(shape, np.nan, dtype)


def run_matmul(case, out_kind="poisoned"):
    """Build the inputs of ``case``, call matmul_packed, return (out, reference)."""
    rng = np.random.default_rng(case["seed"])
    m, k, n, dt = case["m"], case["k"], case["n"], case["dtype"]
    # scaled so that a @ W is about N(0, 1): exp and tanh stay in a well-conditioned range
    a = rand(rng, (m, k), dt)
    w = rand(rng, (k, n), dt, scale=1.0 / math.sqrt(k))
    bias = rand(rng, (n,), dt, scale=0.5) if case["with_bias"] else None
    res = rand(rng, (m, n), dt) if case["residual"] != "none" else None
    ref = a.astype(np.float64) @ w.astype(np.float64)
    if bias is not None:
        ref = ref + bias
    ref = act_ref(ref, case["act"])
    if res is not None:
        ref = ref + res
    pw = K.pack_weight(w, case["panel"])
    if case["residual"] == "alias_out":
        out = res  # in-place residual add
    else:
        out = poisoned((m, n), dt) if out_kind == "poisoned" else None
    got = K.matmul_packed(a, pw, bias, case["act"], res, out, row_block=case["row_block"])
    if out is not None:
        assert got is out
    return got, ref


# ---------------------------------------------------------------------------------------
# pack_weight
# ---------------------------------------------------------------------------------------


@given(k=st.integers(1, 20), n=st.integers(1, 200), panel=st.integers(1, 300),
       seed=st.integers(0, 2**32 - 1))
def test_pack_weight_layout(k, n, panel, seed):
    w = rand(np.random.default_rng(seed), (k, n), np.float32)
    pw = K.pack_weight(w, panel)
    p = pw.panel
    assert 1 <= p <= panel and (pw.k, pw.n) == (k, n)
    assert pw.panels.shape == (-(-n // p), k, p) and pw.panels.flags.c_contiguous
    assert pw.panels.dtype == w.dtype
    # panel i holds columns i*p:(i+1)*p; the padding is zero
    flat = pw.panels.transpose(1, 0, 2).reshape(k, -1)
    np.testing.assert_array_equal(flat[:, :n], w)
    assert not flat[:, n:].any()
    # not a mostly-padded last panel: the padding is less than one panel
    assert pw.panels.shape[0] * p - n < p


def test_pack_weight_is_a_frozen_copy():
    w = rand(np.random.default_rng(0), (5, 9), np.float64)
    pw = K.pack_weight(w)
    w[:] = 1.0  # later changes of w do not reach the packed copy
    assert not np.all(pw.panels[0, :, :9] == 1.0)
    with pytest.raises(Exception):
        pw.k = 3


# ---------------------------------------------------------------------------------------
# matmul_packed
# ---------------------------------------------------------------------------------------


@given(matmul_cases())
def test_matmul_packed_matches_numpy(case):
    got, ref = run_matmul(case)
    assert got.dtype == case["dtype"] and got.shape == (case["m"], case["n"])
    assert rel_err(got, ref) < TOL[np.dtype(case["dtype"])]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("residual", ["none", "separate", "alias_out"])
def test_matmul_packed_parallel_path(act, residual):
    """Large enough (M N K >= SERIAL_MACS) for the parallel kernel, with several row blocks
    and panels, a padded last panel and a partial last row block."""
    case = dict(m=203, k=67, n=333, panel=128, row_block=None, act=act, with_bias=True,
                residual=residual, dtype=np.float32, seed=act * 7 + len(residual))
    assert case["m"] * case["k"] * case["n"] >= K.SERIAL_MACS
    got, ref = run_matmul(case)
    assert rel_err(got, ref) < TOL[np.dtype(np.float32)]


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 64, 300), (300, 1, 5), (5, 300, 1),
                                   (1, 13, 512), (32, 256, 1), (130, 40, 257)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_packed_edge_shapes(m, k, n, dtype):
    case = dict(m=m, k=k, n=n, panel=K.PANEL, row_block=None, act=K.ACT_RELU,
                with_bias=True, residual="separate", dtype=dtype, seed=m * 1000 + n)
    got, ref = run_matmul(case)
    assert rel_err(got, ref) < TOL[np.dtype(dtype)]


def test_matmul_packed_allocates_out_and_defaults():
    case = dict(m=9, k=4, n=21, panel=8, row_block=None, act=K.ACT_NONE, with_bias=False,
                residual="none", dtype=np.float32, seed=3)
    got, ref = run_matmul(case, out_kind="none")
    assert got.shape == (9, 21) and got.flags.c_contiguous
    assert rel_err(got, ref) < TOL[np.dtype(np.float32)]


def test_matmul_packed_strided_input_is_accepted():
    rng = np.random.default_rng(11)
    a = rand(rng, (40, 30), np.float32)[:, ::2]  # a strided view: copied by the wrapper
    w = rand(rng, (15, 17), np.float32)
    got = K.matmul_packed(a, K.pack_weight(w, 16), out=poisoned((40, 17), np.float32))
    assert rel_err(got, a.astype(np.float64) @ w) < 1e-5


def test_matmul_packed_keeps_nan_through_relu():
    rng = np.random.default_rng(5)
    a = rand(rng, (4, 3), np.float32)
    a[2, 1] = np.nan
    out = K.matmul_packed(a, K.pack_weight(rand(rng, (3, 6), np.float32)), act=K.ACT_RELU)
    assert np.all(np.isnan(out[2])) and not np.any(np.isnan(np.delete(out, 2, axis=0)))


# ---------------------------------------------------------------------------------------
# matmul_epilogue
# ---------------------------------------------------------------------------------------


@given(m=st.integers(1, 40), n=st.integers(1, 5000), act=st.sampled_from(ACTS),
       with_bias=st.booleans(), mode=st.sampled_from(["none", "separate", "alias_out", "alias_y"]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1))
def test_matmul_epilogue_matches_numpy(m, n, act, with_bias, mode, dtype, seed):
    rng = np.random.default_rng(seed)
    y = rand(rng, (m, n), dtype)
    bias = rand(rng, (n,), dtype) if with_bias else None
    res = rand(rng, (m, n), dtype) if mode in ("separate", "alias_out") else None
    ref = y.astype(np.float64) + (0.0 if bias is None else bias)
    ref = act_ref(ref, act) + (0.0 if res is None else res)
    out = {"alias_out": res, "alias_y": y}.get(mode, poisoned((m, n), dtype))
    got = K.matmul_epilogue(y, bias, act, res, out)
    assert got is out
    assert rel_err(got, ref) < TOL[np.dtype(dtype)]


# ---------------------------------------------------------------------------------------
# layernorm
# ---------------------------------------------------------------------------------------


def layernorm_ref(x, gamma, beta, eps):
    x = x.astype(np.float64)
    mean = x.mean(axis=1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=1, keepdims=True)  # biased, as ONNX
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


@given(m=st.integers(1, 50), n=st.integers(1, 1100), loc=st.sampled_from([0.0, 3.0, 1e3]),
       eps=st.sampled_from([1e-5, 1e-12, 0.1]), alias=st.booleans(),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1))
def test_layernorm_matches_numpy(m, n, loc, eps, alias, dtype, seed):
    rng = np.random.default_rng(seed)
    # loc = 1e3 with unit spread: the E[x^2] - E[x]^2 formula would lose every digit in float32
    x = rand(rng, (m, n), dtype, loc=loc)
    gamma = rand(rng, (n,), dtype, loc=1.0, scale=0.3)
    beta = rand(rng, (n,), dtype)
    ref = layernorm_ref(x, gamma, beta, eps)
    out = x if alias else poisoned((m, n), dtype)
    got = K.layernorm(x, gamma, beta, eps, out)
    assert got is out
    # n = 1: var = 0 and the output is beta (x - mean = 0 exactly)
    tol = 1e-4 if dtype == np.float32 else 1e-10  # the float32 input's rounding, times 1/std
    assert rel_err(got, ref) < tol


# ---------------------------------------------------------------------------------------
# softmax
# ---------------------------------------------------------------------------------------


def softmax_ref(x):
    x = x.astype(np.float64)
    with np.errstate(invalid="ignore"):
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


@given(m=st.integers(1, 40), n=st.integers(1, 1100), scale=st.sampled_from([1.0, 30.0]),
       n_neg_inf=st.integers(0, 5), alias=st.booleans(), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**32 - 1))
def test_softmax_matches_numpy(m, n, scale, n_neg_inf, alias, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rand(rng, (m, n), dtype, scale=scale)
    # masked entries (-inf) in some rows, never the whole row
    for _ in range(n_neg_inf if n > 1 else 0):
        x[rng.integers(m), rng.integers(1, n)] = -np.inf
    x[:, 0] = np.abs(x[:, 0])  # keeps every row with a finite entry
    ref = softmax_ref(x)
    out = x if alias else poisoned((m, n), dtype)
    got = K.softmax_lastaxis(x, out)
    assert got is out
    assert rel_err(got, ref) < TOL[np.dtype(dtype)] * 2
    np.testing.assert_allclose(got.astype(np.float64).sum(axis=1), 1.0, rtol=1e-5)
    assert np.all(got[np.isneginf(ref)] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_nan_and_inf_rows(dtype):
    x = rand(np.random.default_rng(2), (5, 37), dtype)
    x[0, :] = -np.inf          # every key masked: exp(-inf - -inf) = NaN, as numpy
    x[1, 5] = np.nan           # a NaN spreads over its row
    x[2, 7] = np.inf           # inf - inf = NaN, as numpy
    x[3, ::2] = -np.inf        # half masked: fine
    got = K.softmax_lastaxis(x)
    with np.errstate(invalid="ignore"):
        ref = softmax_ref(x)
    assert np.all(np.isnan(got[:3])) and np.all(np.isnan(ref[:3]))
    assert rel_err(got[3:], ref[3:]) < TOL[np.dtype(dtype)] * 2
    assert np.all(got[3, ::2] == 0)


# ---------------------------------------------------------------------------------------
# gelu
# ---------------------------------------------------------------------------------------


@given(shape=st.lists(st.integers(1, 60), min_size=1, max_size=3), approximate=st.booleans(),
       alias=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1))
def test_gelu_matches_numpy(shape, approximate, alias, dtype, seed):
    x = rand(np.random.default_rng(seed), tuple(shape), dtype, scale=3.0)
    ref = act_ref(x.astype(np.float64), K.ACT_GELU_TANH if approximate else K.ACT_GELU)
    out = x if alias else poisoned(x.shape, dtype)
    got = K.gelu(x, out, approximate=approximate)
    assert got is out
    assert rel_err(got, ref) < TOL[np.dtype(dtype)]


@pytest.mark.parametrize("approximate", [False, True])
def test_gelu_tails_and_specials(approximate):
    # the negative tail is tiny and must keep its relative accuracy (no 1 + erf cancellation)
    x = np.array([-12.0, -8.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 30.0, np.inf, np.nan], np.float32)
    act = K.ACT_GELU_TANH if approximate else K.ACT_GELU
    if approximate:
        ref = x.astype(np.float64) / (1 + np.exp(-2 * math.sqrt(2 / math.pi)
                                                  * (x.astype(np.float64) + 0.044715 * x.astype(np.float64) ** 3)))
    else:
        ref = 0.5 * x.astype(np.float64) * scipy.special.erfc(-x.astype(np.float64) / math.sqrt(2))
    got = K.gelu(x, approximate=approximate)
    fin = np.isfinite(ref) & (np.abs(ref) > np.finfo(np.float32).tiny)  # float32's normal range
    np.testing.assert_allclose(got[fin], ref[fin], rtol=1e-5)
    assert got[-2] == np.inf and np.isnan(got[-1])
    assert act in ACTS


# ---------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------


def _bad_calls():
    f32, f64 = np.float32, np.float64
    a = np.ones((4, 3), f32) * 0.5
    pw = K.pack_weight(np.ones((3, 5), f32))
    y = np.ones((4, 5), f32)
    return [
        ("w", lambda: K.pack_weight(np.ones(3, f32))),
        ("w", lambda: K.pack_weight(np.ones((3, 4), np.int32))),
        ("w", lambda: K.pack_weight(np.ones((0, 4), f32))),
        ("panel", lambda: K.pack_weight(np.ones((3, 4), f32), panel=0)),
        ("pw", lambda: K.matmul_packed(a, np.ones((3, 5), f32))),
        ("a", lambda: K.matmul_packed(np.ones((4, 2), f32), pw)),
        ("a", lambda: K.matmul_packed(a.astype(f64), pw)),
        ("a", lambda: K.matmul_packed([[1.0, 2.0, 3.0]], pw)),
        ("bias", lambda: K.matmul_packed(a, pw, bias=np.ones(4, f32))),
        ("bias", lambda: K.matmul_packed(a, pw, bias=np.ones(5, f64))),
        ("residual", lambda: K.matmul_packed(a, pw, residual=np.ones((4, 4), f32))),
        ("out", lambda: K.matmul_packed(a, pw, out=np.ones((5, 4), f32))),
        ("out", lambda: K.matmul_packed(a, pw, out=np.ones((4, 5), f64))),
        ("out", lambda: K.matmul_packed(a, pw, out=np.ones((5, 4), f32).T)),
        ("act", lambda: K.matmul_packed(a, pw, act=6)),
        ("act", lambda: K.matmul_packed(a, pw, act=-1)),
        ("act", lambda: K.matmul_packed(a, pw, act=1.0)),
        ("row_block", lambda: K.matmul_packed(a, pw, row_block=0)),
        ("y", lambda: K.matmul_epilogue(np.ones(5, f32))),
        ("bias", lambda: K.matmul_epilogue(y, bias=np.ones((1, 5), f32))),
        ("act", lambda: K.matmul_epilogue(y, act=99)),
        ("x", lambda: K.layernorm(np.ones(5, f32), np.ones(5, f32), np.ones(5, f32))),
        ("gamma", lambda: K.layernorm(y, np.ones(4, f32), np.ones(5, f32))),
        ("beta", lambda: K.layernorm(y, np.ones(5, f32), np.ones(5, f64))),
        ("eps", lambda: K.layernorm(y, np.ones(5, f32), np.ones(5, f32), eps=-1.0)),
        ("x", lambda: K.softmax_lastaxis(np.ones((2, 3, 4), f32))),
        ("x", lambda: K.softmax_lastaxis(np.ones((2, 3), np.float16))),
        ("out", lambda: K.softmax_lastaxis(y, out=np.ones((5, 4), f32))),
        ("x", lambda: K.gelu(np.ones(3, np.int64))),
        ("out", lambda: K.gelu(y, out=np.ones((4, 5), f64))),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_arguments_raise_value_error_naming_them(i):
    name, call = _bad_calls()[i]
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call()


def test_out_overlapping_a_is_rejected():
    buf = np.ones((4, 8), np.float32)
    a = buf.reshape(-1)[:16].reshape(4, 4)  # a C-contiguous view sharing memory with out
    pw = K.pack_weight(np.ones((4, 8), np.float32))
    with pytest.raises(ValueError, match="overlap"):
        K.matmul_packed(a, pw, out=buf)
