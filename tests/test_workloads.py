"""blasst_ref.workloads: LLM-like inputs have the structure they claim (docs/DESIGN.md §6)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import blasst_ref
from blasst_ref.workloads import attention_map, head_temperatures, llm_like, skip_map


def test_shapes_dtypes_and_determinism():
    for dtype in ("float32", "float16", np.float64):
        q, k, v = llm_like(2, 8, 2, 40, 40, 32, v_dim=24, seed=5, dtype=dtype)
        assert q.shape == (2, 8, 40, 32) and k.shape == (2, 2, 40, 32) and v.shape == (2, 2, 40, 24)
        assert q.dtype == k.dtype == v.dtype == np.dtype(dtype)
        assert all(np.isfinite(x).all() for x in (q, k, v))
    a = llm_like(1, 4, 1, 1, 300, 16, seed=3)  # MQA decode
    b = llm_like(1, 4, 1, 1, 300, 16, seed=3)
    c = llm_like(1, 4, 1, 1, 300, 16, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    q, k, v = llm_like(1, 2, 1, 1, 64, 576, v_dim=512)  # MLA, absorbed
    assert q.shape == (1, 2, 1, 576) and v.shape == (1, 1, 64, 512)


def test_float16_matches_float32():
    q32, k32, v32 = llm_like(1, 2, 1, 256, 256, 64, seed=1)
    q16, k16, v16 = llm_like(1, 2, 1, 256, 256, 64, seed=1, dtype="float16")
    assert np.allclose(q16.astype(np.float32), q32, rtol=2e-3, atol=2e-3)
    p32 = attention_map(q32, k32, head=1)
    p16 = attention_map(q16, k16, head=1)
    # The log-probabilities agree to a few hundredths of a nat where they matter.
    big = p32 > 1e-6
    assert np.max(np.abs(np.log(p16[big]) - np.log(p32[big]))) < 0.1


def _mean_rows(p, rows):
    return p[rows].mean(axis=0)


def test_attention_map_shows_sinks_window_and_heavy_hitters():
    L, sinks = 1024, 4
    q, k, _ = llm_like(1, 4, 1, L, L, 64, seed=2, sink_tokens=sinks, heavy_hitters=4.0, noise=0.2)
    for h in range(4):
        p = attention_map(q, k, head=h)
        assert p.shape == (L, L)
        assert np.allclose(p.sum(axis=1), 1.0)
        assert np.all(np.triu(p, 1) == 0)  # causal
        rows = np.arange(L // 2, L)
        # Sinks: each of the first keys gets more attention than any ordinary key.
        col = _mean_rows(p, rows)
        assert col[:sinks].min() > 10 * np.median(col[sinks:])
        # Window: in each late row, the 16 most recent keys outweigh 16 keys 256 back. The
        # design ratio is ((1 + 263/64) / (1 + 7/64)) ** T_h, 2.5 for the flattest head
        # (T = e^-0.5) and 12 for the sharpest; a map without a window gives ~1.
        near = np.array([p[i, i - 15:i + 1].sum() for i in rows])
        far = np.array([p[i, i - 271:i - 255].sum() for i in rows])
        assert np.median(near / far) > 2
        # Heavy hitters: columns (beyond sinks and window) that every late row attends to
        # far more than to its neighbours. Count them from the map itself.
        early = p[L - 1, sinks:L - 256]
        hits = np.flatnonzero(early > 20 * np.median(early))
        assert 1 <= len(hits) <= 12, len(hits)
    # Heads differ in how peaked they are: the sink mass of the sharpest head is larger.
    temps = head_temperatures(4, seed=2)
    masses = [attention_map(q, k, head=h)[L // 2:, :sinks].sum(axis=1).mean() for h in range(4)]
    assert np.argmax(masses) == np.argmax(temps) and np.argmin(masses) == np.argmin(temps)


def test_gaussian_is_flat_but_llm_like_skips():
    """The point of the module: at the same threshold, LLM-like prefill skips tiles and
    random Gaussian inputs skip (almost) none."""
    rng = np.random.default_rng(0)
    L = 512
    g = tuple(rng.standard_normal(s).astype(np.float32) for s in ((1, 2, L, 64), (1, 1, L, 64), (1, 1, L, 64)))
    w = llm_like(1, 2, 1, L, L, 64, seed=0)
    t = blasst_ref.threshold_for(L, 10.0)
    _, sg = blasst_ref.attention(*g, t, causal=True, backend="reference", return_stats=True)
    _, sw = blasst_ref.attention(*w, t, causal=True, backend="reference", return_stats=True)
    assert sg.sparsity < 0.05
    assert sw.sparsity > 0.3


def test_sparsity_grows_with_length_at_fixed_threshold():
    t = 2e-3
    sp = []
    for L in (256, 1024):
        q, k, v = llm_like(1, 2, 1, L, L, 64, seed=0)
        _, stt = blasst_ref.attention(q, k, v, t, causal=True, backend="reference", return_stats=True)
        sp.append(stt.sparsity)
    assert sp[1] > sp[0] + 0.05, sp


def test_peakedness_knob_raises_sparsity():
    L, t = 1024, blasst_ref.threshold_for(1024, 1.0)
    sp = []
    for pk in (0.5, 1.0, 2.0):
        q, k, v = llm_like(1, 4, 1, L, L, 64, seed=1, peakedness=pk)
        _, stt = blasst_ref.attention(q, k, v, t, causal=True, backend="reference", return_stats=True)
        sp.append(stt.sparsity)
    assert sp[0] + 0.1 < sp[1] < sp[2] - 0.1, sp


def test_decode_gqa_group_skips():
    q, k, v = llm_like(1, 8, 2, 1, 2048, 64, seed=0)
    m = skip_map(q, k, v, blasst_ref.threshold_for(2048, 100.0), head=5, backend="reference")
    assert m.shape == (1, 2048 // 64)
    assert m[0, 0] == 1  # the first tile is always computed
    assert (m == 2).mean() > 0.3


def test_skip_map_matches_stats():
    q, k, v = llm_like(1, 4, 2, 256, 256, 32, seed=0)
    t = 0.01
    _, stt = blasst_ref.attention(q, k, v, t, causal=True, backend="reference", block_q=64,
                                  block_k=32, return_stats=True)
    for h in range(4):
        m = skip_map(q, k, v, t, head=h, causal=True, block_q=64, block_k=32, backend="reference")
        assert np.array_equal(m, stt.tile_map[0, h])
    # causal: tiles above the diagonal are never visited
    assert np.all(m[0, 2:] == 0)


@settings(deadline=None)
@given(seed=st.integers(0, 2**16), group=st.sampled_from([1, 2, 4]),
       q_len=st.sampled_from([1, 3, 33]), extra=st.integers(0, 70),
       dtype=st.sampled_from(["float32", "float16"]))
def test_any_shape_is_finite_and_runs(seed, group, q_len, extra, dtype):
    kv_len = q_len + extra
    q, k, v = llm_like(1, 2 * group, 2, q_len, kv_len, 16, seed=seed, dtype=dtype)
    assert q.shape == (1, 2 * group, q_len, 16) and k.shape == (1, 2, kv_len, 16)
    out = blasst_ref.attention(q, k, v, 0.0, causal=True, backend="reference")
    ref = blasst_ref.dense_attention(q, k, v, causal=True)
    assert np.all(np.isfinite(out))
    tol = 1e-2 if dtype == "float16" else 1e-5
    assert np.linalg.norm(out - ref) <= tol * np.linalg.norm(ref)


@pytest.mark.parametrize("kw, match", [
    (dict(peakedness=0.0), "peakedness"),
    (dict(peakedness=float("nan")), "peakedness"),
    (dict(head_spread=-1.0), "head_spread"),
    (dict(sink_tokens=-1), "sink_tokens"),
    (dict(sink_strength=float("inf")), "sink_strength"),
    (dict(window=0), "window"),
    (dict(decay=-0.5), "decay"),
    (dict(heavy_hitters=-1), "heavy_hitters"),
    (dict(heavy_hitters=2000), "heavy_hitters"),
    (dict(noise=-0.1), "noise"),
    (dict(seed=-1), "seed"),
])
def test_bad_knobs_name_themselves(kw, match):
    with pytest.raises(ValueError, match=match):
        llm_like(1, 2, 1, 8, 8, 16, **kw)


def test_bad_shapes_and_types():
    with pytest.raises(ValueError, match="kv_heads"):
        llm_like(1, 6, 4, 8, 8, 16)
    with pytest.raises(ValueError, match="head_dim"):
        llm_like(1, 2, 1, 8, 8, 4)
    with pytest.raises(ValueError, match="q_len"):
        llm_like(1, 2, 1, 0, 8, 16)
    with pytest.raises(TypeError, match="sink_tokens"):
        llm_like(1, 2, 1, 8, 8, 16, sink_tokens=1.5)
    with pytest.raises(TypeError, match="dtype"):
        llm_like(1, 2, 1, 8, 8, 16, dtype="int8")
    with pytest.raises(TypeError, match="unknown_knob"):
        llm_like(1, 2, 1, 8, 8, 16, unknown_knob=1)
    q, k, _ = llm_like(1, 2, 1, 8, 8, 16)
    with pytest.raises(ValueError, match="head"):
        attention_map(q, k, head=2)
    big = np.zeros((1, 1, 9000, 16), np.float32)
    with pytest.raises(ValueError, match="entries"):
        attention_map(big, big)
