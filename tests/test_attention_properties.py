"""Properties of ``attention()`` against the float64 oracle ``dense_attention``
(docs/DESIGN.md §3, §9), for every host backend and dtype.

Tolerances (``REL_TOL``: relative L2 norm of ``out - dense`` over ``dense``, both compared in
float64, the oracle computed from the very values the backend got):

* float64: the backends accumulate in float64; the only difference from the oracle is the
  order of summation and online-softmax rescaling, ~1e-15 measured. 1e-11 leaves room for
  longer sums (MLA's ``Dqk = 576``) and still catches any real error.
* float32: accumulation in float32 (eps 6e-8); measured <= 7e-7 over a few hundred problems,
  including peaked ones whose scores reach ~50 (an absolute score error ``e`` becomes a
  relative error ``e`` in ``exp``). 1e-5 is a 15x margin.
* float16: computed in float32, then the output is rounded to float16, which alone costs up to
  2**-11 = 4.9e-4 relative per element (measured <= 3.3e-4 in L2). 2e-3 is a 4x margin.

``helpers.ABS_TOL_V`` is the same budget as an absolute error per output element, in units of the
row's ``max|v|`` (the output is a convex combination of value rows, so ``|out| <= max|v|``);
it is added to the §3 error bound, which holds exactly in exact arithmetic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import strategies as S
from conftest import HOST_BACKENDS
from helpers import assert_error_bound, random_qkv, rel_err
from hypothesis import event, given, note, target
from hypothesis import strategies as st

from blasst_ref import attention, dense_attention, tiling
from blasst_ref.reference import COMPUTED, NOT_VISITED, SKIPPED

REL_TOL = {np.float64: 1e-11, np.float32: 1e-5, np.float16: 2e-3}

DTYPES = [pytest.param(d, id=np.dtype(d).name) for d in S.HOST_DTYPES]


# ---------------------------------------------------------------------------------------
# helpers: everything below is recomputed in float64 from the inputs, independently of the
# backends (only the tile decisions are taken from the backend, through stats.tile_map)


def run(backend, case, thresh, **kw):
    p = case.problem
    return attention(
        case.q, case.k, case.v, thresh, causal=p.causal, backend=backend,
        return_stats=True, **p.blocks, **kw,
    )


def oracle(case):
    p = case.problem
    return dense_attention(case.q, case.k, case.v, causal=p.causal)


def visible_keys(lq, lk, causal):
    """``(Lq, Lk)``: query row ``i`` sees key ``j`` (bottom-right causal alignment)."""
    if not causal:
        return np.ones((lq, lk), bool)
    return np.arange(lk)[None, :] <= np.arange(lq)[:, None] + (lk - lq)


def scaled_scores(case):
    """``(B, Hq, Lq, Lk)`` float64 scaled scores, masked scores ``-inf``."""
    p = case.problem
    q, k = (x.astype(np.float64) for x in (case.q, case.k))
    k = np.repeat(k, p.group, axis=1)
    s = np.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(p.dqk)
    return np.where(visible_keys(p.lq, p.lk, p.causal), s, -np.inf)


def key_codes(problem, tile_map):
    """``(B, Hq, Lq, Lk)``: the tile code of every (row, key) pair, from ``stats.tile_map``.

    prefill: ``tile_map[b, h, i // block_q, j // block_k]``; decode: the tile rows are all query
    rows of the kv group, ``tile_map[b, h // group, 0, j // block_k]``."""
    p = problem
    qt = np.arange(p.lq) // p.block_q
    kt = np.arange(p.lk) // p.block_k
    if p.decode:
        per_group = tile_map[:, :, 0][:, :, None, :][..., kt]  # (B, Hkv, 1, Lk)
        per_head = np.repeat(per_group, p.group, axis=1)  # (B, Hq, 1, Lk)
        return np.broadcast_to(per_head, (p.batch, p.hq, p.lq, p.lk))
    return tile_map[:, :, qt][:, :, :, kt]


def expected_visited(problem):
    """Tiles with at least one visible (row, key) pair: exactly the tiles that are visited."""
    p = problem
    vis = visible_keys(p.lq, p.lk, p.causal)
    n_kt = tiling.num_tiles(p.lk, p.block_k)
    if p.decode:
        rows = [vis]
    else:
        rows = [vis[i:i + p.block_q] for i in range(0, p.lq, p.block_q)]
    return np.array(
        [[r[:, j:j + p.block_k].any() for j in range(0, n_kt * p.block_k, p.block_k)] for r in rows]
    )


# ---------------------------------------------------------------------------------------
# thresh = 0 is dense attention


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@given(data=st.data())
def test_thresh0_equals_dense(backend, dtype, data):
    """Every shape, causal or not, MHA/GQA/MQA, ``Dv != Dqk``, prefill and decode, any tiles."""
    case = data.draw(S.cases(dtype))
    p = case.problem
    event(f"{'decode' if p.decode else 'prefill'} causal={p.causal} group={p.group}")
    out, stats = run(backend, case, 0.0)
    assert out.dtype == dtype and out.shape == p.out_shape
    assert rel_err(out, oracle(case)) <= REL_TOL[dtype]
    assert stats.skipped_tiles == 0 and stats.sparsity == 0.0
    assert np.all(stats.tile_map != SKIPPED)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@given(data=st.data())
def test_mla_shapes_equal_dense(backend, dtype, data):
    """MLA in absorbed form: one latent kv head, ``Dqk = 576``, ``Dv = 512`` (any number of
    query heads, so in decode one group holds them all); prefill and decode, ``thresh = 0``."""
    case = data.draw(S.cases(dtype, hkv=1, dqk=576, dv=512, max_lq=40, max_lk=48, max_tiles=48))
    out, _ = run(backend, case, 0.0)
    assert out.shape == case.problem.out_shape and out.dtype == dtype
    assert rel_err(out, oracle(case)) <= REL_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("lq_kind", ["lq=1", "1<lq<=16"])
@given(data=st.data())
def test_decode_causal_equals_dense(backend, dtype, lq_kind, data):
    """Decode: ``Lq = 1``, and ``1 < Lq <= 16`` causal with ``Lq < Lk`` (speculative decoding /
    chunked prefill against a KV cache), at ``thresh = 0``."""
    lq = 1 if lq_kind == "lq=1" else data.draw(st.integers(2, tiling.DECODE_MAX_Q_LEN))
    causal = data.draw(st.booleans()) if lq == 1 else True
    problem = S.problems(phase="decode", lq=lq, causal=causal).filter(lambda p: p.lk > p.lq)
    case = data.draw(S.cases(dtype, problem=problem))
    out, stats = run(backend, case, 0.0)
    assert stats.phase == "decode"
    assert rel_err(out, oracle(case)) <= REL_TOL[dtype]


# ---------------------------------------------------------------------------------------
# thresh > 0: the error bound of §3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@given(data=st.data())
def test_error_bound(backend, dtype, data):
    """Per row: ``|out - dense| <= 2 max|v| thresh n_skipped / l_kept`` (+ dtype tolerance).

    ``n_skipped``: keys the row sees that lie in tiles the backend skipped (from
    ``stats.tile_map``); ``l_kept = sum over kept visible keys of exp(s - m)`` with ``m`` the
    row's final max over all visible keys, in float64. The bound rests on a lemma that is
    checked too: every key the row sees in a skipped tile has ``exp(s - m) < thresh`` (the
    tile was negligible next to a running max ``<= m``); so the tile holding the row's max is
    never skipped and ``l_kept >= 1``."""
    case = data.draw(S.cases(dtype, peaked=True))
    thresh = data.draw(S.thresholds(), label="thresh")
    p = case.problem
    out, stats = run(backend, case, thresh)
    target(stats.sparsity, label="sparsity")
    event("sparsity > 0" if stats.skipped_tiles else "sparsity == 0")

    v = np.repeat(case.v.astype(np.float64), p.group, axis=1)  # (B, Hq, Lk, Dv)
    worst = assert_error_bound(out, oracle(case), scaled_scores(case),
                               key_codes(p, stats.tile_map), v, thresh, dtype)
    note(f"sparsity={stats.sparsity:.3f} worst err/bound={worst:.3g}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@given(data=st.data())
def test_skipping_is_monotone_in_thresh(backend, dtype, data):
    """A larger threshold skips a superset of the tiles, so sparsity is non-decreasing.

    Why this holds exactly, even in floating point: a tile is skipped only when every row has
    ``m~_r < m_r + log(thresh) < m_r``, so keeping it would not have raised the running max
    either. The running max after any tile is therefore ``max(m, m~)`` whatever was decided, it
    does not depend on ``thresh``, and each tile's test ``max_r(m~_r - m_r) < log(thresh)``
    compares the same numbers against a larger bound. (Same in each split-KV chunk of decode.)
    So the tile-wise inclusion below is checked, not just the counts."""
    case = data.draw(S.cases(dtype, peaked=True))
    t1 = data.draw(S.thresholds(), label="t1")
    t2 = data.draw(S.thresholds(min_value=t1, max_value=0.95), label="t2")
    _, lo = run(backend, case, t1)
    _, hi = run(backend, case, t2)
    np.testing.assert_array_equal(lo.tile_map != NOT_VISITED, hi.tile_map != NOT_VISITED)
    assert not np.any((lo.tile_map == SKIPPED) & (hi.tile_map != SKIPPED))
    assert lo.sparsity <= hi.sparsity
    assert np.all(lo.per_head <= hi.per_head)


# ---------------------------------------------------------------------------------------
# GQA, zero rows, NaN/inf


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@given(data=st.data())
def test_gqa_equals_mha_with_repeated_kv_heads_prefill(backend, dtype, data):
    """Prefill decides per query head, so GQA equals MHA on repeated kv heads at any thresh:
    the same outputs and the same tile decisions."""
    case = data.draw(S.cases(dtype, phase="prefill", group=data.draw(st.sampled_from([2, 3, 4]))))
    thresh = data.draw(st.one_of(st.just(0.0), S.thresholds()), label="thresh")
    p = case.problem
    out, stats = run(backend, case, thresh)
    k_rep, v_rep = (np.repeat(x, p.group, axis=1) for x in (case.k, case.v))
    out_mha, stats_mha = attention(
        case.q, k_rep, v_rep, thresh, causal=p.causal, backend=backend, return_stats=True,
        **p.blocks,
    )
    np.testing.assert_array_equal(stats.tile_map, stats_mha.tile_map)
    assert rel_err(out, out_mha) <= REL_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@given(data=st.data())
def test_gqa_equals_mha_with_repeated_kv_heads_decode_thresh0(backend, dtype, data):
    """Decode: at ``thresh = 0`` GQA equals MHA on repeated kv heads. (At ``thresh > 0`` it does
    not in general: in decode the whole kv group decides together, while in MHA each head
    decides alone.)"""
    case = data.draw(S.cases(dtype, phase="decode", group=data.draw(st.sampled_from([2, 3, 4]))))
    p = case.problem
    out, _ = run(backend, case, 0.0)
    k_rep, v_rep = (np.repeat(x, p.group, axis=1) for x in (case.k, case.v))
    out_mha = attention(case.q, k_rep, v_rep, 0.0, causal=p.causal, backend=backend, **p.blocks)
    assert rel_err(out, out_mha) <= REL_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@given(data=st.data())
def test_rows_that_see_no_key_are_zeros(backend, dtype, data):
    """Causal with ``Lq > Lk``: the first ``Lq - Lk`` rows see no key and return exact zeros
    (FlashAttention's rule), at any threshold, in prefill and decode; the other rows are dense
    within tolerance at ``thresh = 0``."""
    phase = data.draw(st.sampled_from(["prefill", "decode"]))
    max_decode = tiling.DECODE_MAX_Q_LEN
    lq = data.draw(st.integers(2, max_decode) if phase == "decode" else st.integers(17, 120))
    problem = S.problems(phase=phase, lq=lq, causal=True, max_lk=lq - 1).filter(
        lambda p: p.lk < p.lq
    )
    case = data.draw(S.cases(dtype, problem=problem))
    thresh = data.draw(st.one_of(st.just(0.0), S.thresholds()), label="thresh")
    p = case.problem
    out, _ = run(backend, case, thresh)
    blind = p.lq - p.lk
    assert np.all(out[:, :, :blind] == 0)
    assert np.all(np.isfinite(out))
    if thresh == 0.0:
        assert rel_err(out, oracle(case)) <= REL_TOL[dtype]


def _poison(case, data, arrays):
    """A copy of the case's inputs with one element of one of ``arrays`` set to NaN or +-inf."""
    which = data.draw(st.sampled_from(arrays), label="poisoned")
    value = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]), label="value")
    q, k, v = (x.copy() for x in (case.q, case.k, case.v))
    x = {"q": q, "k": k, "v": v}[which]
    idx = tuple(data.draw(st.integers(0, n - 1)) for n in x.shape)
    x[idx] = value
    note(f"{which}{list(idx)} = {value}")
    return q, k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@given(data=st.data())
def test_nan_inf_propagate_as_in_dense(backend, dtype, data):
    """A NaN/inf in q, k or v: at ``thresh = 0`` the output has dense attention's NaN pattern
    (and its +-inf pattern). Non-causal: with a causal mask, a NaN in ``v`` reaches rows that
    cannot see it through ``0 * NaN`` in ``p @ v``, which depends on the tiling (see
    ``test_nan_in_k_or_q_propagate_as_in_dense_causal`` for the causal case of q/k)."""
    case = data.draw(S.cases(dtype, causal=False))
    q, k, v = _poison(case, data, ["q", "k", "v"])
    p = case.problem
    out = attention(q, k, v, 0.0, causal=False, backend=backend, **p.blocks)
    want = dense_attention(q, k, v)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
    np.testing.assert_array_equal(np.isposinf(out), np.isposinf(want))
    np.testing.assert_array_equal(np.isneginf(out), np.isneginf(want))
    finite = np.isfinite(want)
    assert rel_err(out[finite], want[finite]) <= REL_TOL[dtype]


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("nan_key", [0, 17, 31])
@pytest.mark.parametrize("blocks", [(16, 16), (8, 32), (32, 8)])
def test_nan_in_v_causal_reaches_the_rows_whose_computed_tiles_hold_it(backend, nan_key, blocks):
    """A NaN in ``v`` under a causal mask, ``thresh = 0``: the documented tile-level rule.

    A row sees the NaN through ``p @ v`` in every tile it computes that holds the NaN key,
    even where that key is masked for the row (``p = 0``, but ``0 * NaN = NaN``): exactly as
    FlashAttention does. So the NaN rows are those whose row block computed the tile of the
    NaN key -- a superset of the rows that see the key, and a subset of what
    ``dense_attention`` shows (its full ``p @ v`` turns every row NaN). For NaN/inf in ``q``
    or ``k``, or without a mask, the pattern is dense attention's (tests below and above)."""
    block_q, block_k = blocks
    rng = np.random.default_rng(nan_key)
    q, k = (rng.standard_normal((1, 2, 32, 8)) for _ in range(2))
    v = rng.standard_normal((1, 2, 32, 4))
    v[0, 1, nan_key, 0] = np.nan
    out, stats = attention(q, k, v, 0.0, causal=True, backend=backend, block_q=block_q,
                           block_k=block_k, return_stats=True)
    rows = np.arange(32)
    computed = stats.tile_map[0, 1, rows // block_q, nan_key // block_k] == 1
    np.testing.assert_array_equal(np.isnan(out[0, 1, :, 0]), computed)
    assert not np.isnan(out[0, 0]).any()  # the other head never reads the NaN
    sees_key = rows >= nan_key
    assert computed[sees_key].all()  # every row that sees the key is NaN, as in dense
    assert np.isnan(dense_attention(q, k, v, causal=True)[0, 1, sees_key, 0]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@given(data=st.data())
def test_nan_in_k_or_q_propagate_as_in_dense_causal(backend, dtype, data):
    """A NaN/inf in q or k, causal or not, at any threshold: the NaN pattern of dense attention.
    A NaN score never lets a tile be skipped (its comparison is false), and a +inf score makes
    its row NaN as in dense, so skipping cannot hide a non-finite q or k."""
    case = data.draw(S.cases(dtype, peaked=True))
    thresh = data.draw(st.one_of(st.just(0.0), S.thresholds()), label="thresh")
    q, k, v = _poison(case, data, ["q", "k"])
    p = case.problem
    out = attention(q, k, v, thresh, causal=p.causal, backend=backend, **p.blocks)
    want = dense_attention(q, k, v, causal=p.causal)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(want))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@given(data=st.data())
def test_skipped_tiles_never_read_v(backend, dtype, data):
    """NaN/inf in ``v`` with ``thresh > 0``, causal or not: the call returns (no crash, no hang)
    with the right shape and dtype, the tile decisions are those of the clean input (they
    depend on q and k only), and a tile that was skipped or never visited never reads V: every
    row whose tile over the poisoned key was skipped or not visited is bit-identical to the
    clean run. (This is also why NaN in ``v`` need not propagate as in dense at ``thresh > 0``.)"""
    case = data.draw(S.cases(dtype, peaked=True))
    thresh = data.draw(S.thresholds(), label="thresh")
    p = case.problem
    q, k, v = _poison(case, data, ["v"])
    (b, g, j, _), = np.argwhere(~np.isfinite(v))
    out, stats = attention(q, k, v, thresh, causal=p.causal, backend=backend, return_stats=True,
                           **p.blocks)
    clean, clean_stats = run(backend, case, thresh)
    assert out.shape == p.out_shape and out.dtype == dtype
    np.testing.assert_array_equal(stats.tile_map, clean_stats.tile_map)
    codes = key_codes(p, stats.tile_map)[b, g * p.group:(g + 1) * p.group, :, j]  # (group, Lq)
    unread = codes != COMPUTED
    event(f"rows that never read the poisoned value: {'some' if unread.any() else 'none'}")
    heads = slice(g * p.group, (g + 1) * p.group)
    np.testing.assert_array_equal(out[b, heads][unread], clean[b, heads][unread])


# ---------------------------------------------------------------------------------------
# dtype, shape, stats


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@given(data=st.data())
def test_dtype_shape_and_3d(backend, dtype, data):
    """Output keeps the input dtype and has shape ``(B, Hq, Lq, Dv)``; 3-D inputs give the 3-D
    output of the same problem with ``B = 1`` (same values, same decisions)."""
    case = data.draw(S.cases(dtype, batch=1))
    thresh = data.draw(st.one_of(st.just(0.0), S.thresholds()), label="thresh")
    p = case.problem
    out4, st4 = run(backend, case, thresh)
    out3, st3 = attention(case.q[0], case.k[0], case.v[0], thresh, causal=p.causal,
                          backend=backend, return_stats=True, **p.blocks)
    assert out4.dtype == dtype and out3.dtype == dtype
    assert out4.shape == p.out_shape and out3.shape == p.out_shape[1:]
    assert isinstance(out3, np.ndarray) and isinstance(out4, np.ndarray)
    np.testing.assert_array_equal(out3, out4[0])
    np.testing.assert_array_equal(st3.tile_map, st4.tile_map)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@given(data=st.data())
def test_stats_are_consistent(backend, dtype, data):
    """``AttentionStats`` agrees with its own tile map, and the tile map with the geometry:

    * ``tile_map`` has shape ``(B, Hq, n_q_tiles, n_k_tiles)`` in prefill and
      ``(B, Hkv, 1, n_k_tiles)`` in decode, codes in {0, 1, 2};
    * a tile is visited iff some row of it sees some key of it (causally masked tiles are
      never visited and not counted);
    * ``visited_tiles``, ``skipped_tiles``, ``sparsity``, ``per_head`` (``(B, Hq)``; in decode
      the group's value for each of its heads) are the counts of the map;
    * the first tile a row block visits is never skipped -- in decode, key tile 0 (the
      seeded rule's sink tile), and with ``decode_seed="none"`` the first tile of every
      split-KV chunk (each chunk starts from its own running max);
    * ``block_q`` (decode: ``group * Lq``), ``block_k``, ``backend``, ``phase``."""
    case = data.draw(S.cases(dtype, peaked=True))
    thresh = data.draw(S.thresholds(), label="thresh")
    p = case.problem
    _, stats = run(backend, case, thresh)
    tm = stats.tile_map
    n_kt = tiling.num_tiles(p.lk, p.block_k)
    if p.decode:
        assert tm.shape == (p.batch, p.hkv, 1, n_kt)
    else:
        assert tm.shape == (p.batch, p.hq, tiling.num_tiles(p.lq, p.block_q), n_kt)
    assert set(np.unique(tm)) <= {NOT_VISITED, COMPUTED, SKIPPED}

    visited = tm != NOT_VISITED
    np.testing.assert_array_equal(visited, np.broadcast_to(expected_visited(p), tm.shape))
    assert stats.visited_tiles == int(visited.sum())
    assert stats.skipped_tiles == int((tm == SKIPPED).sum())
    assert stats.sparsity == (
        stats.skipped_tiles / stats.visited_tiles if stats.visited_tiles else 0.0
    )
    assert 0.0 <= stats.sparsity <= 1.0

    v_h, s_h = visited.sum(axis=(2, 3)), (tm == SKIPPED).sum(axis=(2, 3))
    per = np.divide(s_h, v_h, out=np.zeros(v_h.shape), where=v_h > 0)
    if p.decode:
        per = np.repeat(per, p.group, axis=1)
    assert stats.per_head.shape == (p.batch, p.hq)
    np.testing.assert_allclose(stats.per_head, per, rtol=1e-15, atol=0)

    # the first visited tile of every row block is computed (decode, seeded: tile 0; a
    # later chunk's first tile may be skipped against the sink tile's max)
    first = tm[..., :1]
    assert np.all(first[first != NOT_VISITED] == COMPUTED)
    if p.decode:  # unseeded: the first tile of every split-KV chunk
        _, unseeded = run(backend, case, thresh, decode_seed="none")
        firsts = unseeded.tile_map[..., ::tiling.decode_split_tiles(p.lk, p.block_k)]
        assert np.all(firsts[firsts != NOT_VISITED] == COMPUTED)

    assert stats.block_k == p.block_k
    assert stats.block_q == (p.group * p.lq if p.decode else p.block_q)
    assert stats.backend == backend
    assert stats.phase == ("decode" if p.decode else "prefill")


# ---------------------------------------------------------------------------------------
# the inputs themselves


def test_peaked_inputs_make_tiles_skip():
    """The peaked inputs of ``strategies`` must make ``thresh > 0`` skip tiles, or the properties
    above would test nothing about skipping. Deterministic: fixed problems and seeds, and a grid
    over the strategy's ranges of ``q_scale`` and ``sink`` (ends and middle)."""
    shapes = [
        S.Problem(1, 2, 1, 64, 64, 16, 16, False, 16, 16),
        S.Problem(1, 4, 2, 96, 128, 32, 24, True, 32, 16),
        S.Problem(2, 2, 2, 40, 33, 8, 8, True, 13, 7),
        S.Problem(1, 4, 1, 1, 300, 16, 16, False, 1, 4),  # decode, 3 split-KV chunks
        S.Problem(1, 6, 2, 8, 200, 64, 64, True, 1, 8),  # decode, GQA
    ]

    def sparsity(p, seed, **peak):
        q, k, v = random_qkv(seed, *p.sizes, dtype=np.float64, **peak)
        _, stats = attention(q, k, v, 0.05, causal=p.causal, backend="reference",
                             return_stats=True, **p.blocks)
        return stats.sparsity

    grid = [(a, s) for a in np.linspace(*S.PEAK_Q_SCALE, 3) for s in np.linspace(*S.PEAK_SINK, 3)]
    peaked = np.array([sparsity(p, 1000 * i, q_scale=a, sink=s)
                       for i, p in enumerate(shapes) for a, s in grid])
    assert np.mean(peaked > 0) >= 0.8, peaked
    assert np.mean(peaked) >= 0.3, peaked
    # ... while plain Gaussian inputs at the same threshold skip far less: peaking matters
    plain = np.array([sparsity(p, 1000 * i) for i, p in enumerate(shapes)])
    assert np.mean(plain) < 0.5 * np.mean(peaked), (plain, peaked)


def test_auto_backend_on_host_arrays_is_cpu():
    """``backend="auto"`` with numpy inputs runs the CPU kernels (docs/DESIGN.md §3)."""
    p = S.Problem(1, 2, 1, 40, 50, 16, 8, True, 16, 16)
    q, k, v = random_qkv(3, *p.sizes, dtype=np.float32)
    out, stats = attention(q, k, v, 0.01, causal=True, return_stats=True, **p.blocks)
    assert stats.backend == "cpu"
    out_cpu, stats_cpu = attention(q, k, v, 0.01, causal=True, backend="cpu", return_stats=True,
                                   **p.blocks)
    np.testing.assert_array_equal(out, out_cpu)
    np.testing.assert_array_equal(stats.tile_map, stats_cpu.tile_map)
