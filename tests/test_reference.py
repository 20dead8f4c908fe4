"""The oracle itself: ``dense_attention`` and the readable blockwise spec (docs/DESIGN.md §3).

Every other test compares against ``dense_attention``, so it is checked here against
formulations written independently of it: a per-head, per-row loop over
``scipy.special.softmax``, an explicit ``np.tril`` mask, and the meaning of bottom-right
causal alignment (row ``i`` of a causal problem is the non-causal attention of that query over
the key prefix ``k[: i + Lk - Lq + 1]``).
"""

from __future__ import annotations

import numpy as np
import pytest
import strategies as S
from helpers import rel_err
from hypothesis import given
from hypothesis import strategies as st
from scipy.special import softmax

from blasst_ref import dense_attention, reference

RTOL64 = 1e-12  # float64 throughout: only summation order differs between formulations


def _loop_attention(q, k, v, causal, scale=None):
    """Attention one (batch, head, row) at a time, with scipy's softmax over the keys the row
    sees. Written without reference to ``dense_attention``."""
    b_, hq, lq, dqk = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    scale = 1.0 / np.sqrt(dqk) if scale is None else scale
    out = np.zeros((b_, hq, lq, dv))
    for b in range(b_):
        for h in range(hq):
            g = h // (hq // hkv)
            for i in range(lq):
                n_seen = min(lk, i + lk - lq + 1) if causal else lk
                if n_seen <= 0:
                    continue  # sees no key: zeros
                s = (k[b, g, :n_seen] @ q[b, h, i]) * scale
                out[b, h, i] = softmax(s) @ v[b, g, :n_seen]
    return out


@given(S.cases(np.float64, max_lq=60, max_lk=80), st.booleans())
def test_dense_matches_per_row_softmax_loop(case, custom_scale):
    p = case.problem
    scale = 0.37 if custom_scale else None
    got = dense_attention(case.q, case.k, case.v, causal=p.causal, scale=scale)
    want = _loop_attention(case.q, case.k, case.v, p.causal, scale)
    assert got.shape == p.out_shape
    assert got.dtype == np.float64
    assert rel_err(got, want) <= RTOL64


@given(S.cases(np.float64, phase="prefill", causal=False, max_lq=40, max_lk=40))
def test_dense_gqa_reads_kv_head_h_over_group(case):
    """Query head ``h`` reads kv head ``h // (Hq // Hkv)``: compare head by head with MHA."""
    p = case.problem
    got = dense_attention(case.q, case.k, case.v)
    for h in range(p.hq):
        g = h // p.group
        want = dense_attention(case.q[:, h:h + 1], case.k[:, g:g + 1], case.v[:, g:g + 1])
        assert rel_err(got[:, h:h + 1], want) <= RTOL64


@given(st.integers(1, 40), st.integers(1, 16), S.seeds())
def test_causal_equal_lengths_is_tril_mask(length, d, seed):
    """``Lq == Lk``: the mask is the lower triangle, as PyTorch's ``is_causal=True``."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((2, length, d)) for _ in range(3))
    s = np.einsum("hid,hjd->hij", q, k) / np.sqrt(d)
    s = np.where(np.tril(np.ones((length, length), bool)), s, -np.inf)
    want = softmax(s, axis=-1) @ v
    got = dense_attention(q, k, v, causal=True)
    assert rel_err(got, want) <= RTOL64


@given(st.integers(1, 30), st.integers(0, 40), st.integers(1, 12), S.seeds())
def test_causal_is_bottom_right_aligned(lq, extra, d, seed):
    """``Lq <= Lk``: row ``i`` attends to exactly the keys ``j <= i + (Lk - Lq)``, i.e. its
    causal output is the non-causal attention of that one query over that key prefix."""
    lk = lq + extra
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, 1, lq, d))
    k = rng.standard_normal((1, 1, lk, d))
    v = rng.standard_normal((1, 1, lk, d + 1))
    got = dense_attention(q, k, v, causal=True)
    for i in range(lq):
        n = i + extra + 1
        want = dense_attention(q[:, :, i:i + 1], k[:, :, :n], v[:, :, :n])
        assert rel_err(got[:, :, i:i + 1], want) <= RTOL64
    # and the last row sees every key: it equals non-causal attention
    full = dense_attention(q[:, :, -1:], k, v)
    assert rel_err(got[:, :, -1:], full) <= RTOL64


@given(st.integers(2, 40), st.integers(1, 30), st.integers(1, 12), S.seeds())
def test_causal_rows_that_see_no_key_are_zeros(lq, lk, d, seed):
    """``Lq > Lk``: the first ``Lq - Lk`` rows see no key and are exactly zero; the rest are
    the square causal problem of the last ``Lk`` queries."""
    lk = min(lk, lq - 1)
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, 2, lq, d))
    k = rng.standard_normal((1, 1, lk, d))
    v = rng.standard_normal((1, 1, lk, 3))
    got = dense_attention(q, k, v, causal=True)
    blind = lq - lk
    assert np.all(got[:, :, :blind] == 0.0)
    assert np.all(np.isfinite(got))
    want = dense_attention(q[:, :, blind:], k, v, causal=True)
    assert rel_err(got[:, :, blind:], want) <= RTOL64


@given(S.cases(np.float64, batch=1))
def test_dense_3d_inputs_are_batch_one(case):
    p = case.problem
    got3 = dense_attention(case.q[0], case.k[0], case.v[0], causal=p.causal)
    got4 = dense_attention(case.q, case.k, case.v, causal=p.causal)
    assert got3.shape == p.out_shape[1:]
    np.testing.assert_array_equal(got3, got4[0])


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_dense_computes_in_float64(dtype):
    """The oracle returns float64 computed from the inputs' exact values, whatever their dtype."""
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((1, 2, 20, 8)).astype(dtype) for _ in range(3))
    got = dense_attention(q, k, v, causal=True)
    assert got.dtype == np.float64
    want = dense_attention(*(x.astype(np.float64) for x in (q, k, v)), causal=True)
    np.testing.assert_array_equal(got, want)


@given(S.seeds(), st.floats(50.0, 1e4))
def test_dense_is_stable_for_huge_scores(seed, gain):
    """Max subtraction: scores of size ~1e4 neither overflow nor underflow to NaN, and the
    result is still a convex combination of the value rows (each coordinate within the
    values' range)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, 1, 24, 8)) * gain
    k = rng.standard_normal((1, 1, 30, 8))
    v = rng.standard_normal((1, 1, 30, 5))
    for causal in (False, True):
        out = dense_attention(q, k, v, causal=causal)
        assert np.all(np.isfinite(out))
        assert np.all(out <= v.max(axis=2, keepdims=True) + 1e-12)
        assert np.all(out >= v.min(axis=2, keepdims=True) - 1e-12)


@given(S.cases(np.float64, peaked=True), S.thresholds())
def test_reference_margin_decides_the_tile(case, thresh):
    """``blasst_attention_reference(...).margin``: a tile is skipped iff its margin is negative,
    and the margin is NaN exactly where the tile was never visited."""
    p = case.problem
    res = reference.blasst_attention_reference(
        case.q, case.k, case.v, thresh, causal=p.causal, **p.blocks
    )
    assert res.decode == p.decode
    assert res.margin.shape == res.tile_map.shape
    visited = res.tile_map != reference.NOT_VISITED
    np.testing.assert_array_equal(np.isnan(res.margin), ~visited)
    np.testing.assert_array_equal(
        res.tile_map[visited] == reference.SKIPPED, res.margin[visited] < 0
    )
