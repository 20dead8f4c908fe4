"""The skip rule of ``blasst_ref.rule``: its truth table, and that the three compilations of
the same source (Python/numpy, ``numba.njit``, ``numba.cuda.jit`` on the simulator or a GPU)
give the same answers, special values included.

The rule's functions are what every backend decides with (docs/DESIGN.md §3.3), so a difference
between targets here would be a difference in skip decisions between backends.
"""

from __future__ import annotations

import itertools
import math
import pathlib
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numba import njit

from blasst_ref import rule, tiling
from blasst_ref.cpu import online as cpu_rule

cuda = pytest.importorskip("numba.cuda")

# the simulator computes -inf - -inf on numpy scalars, which warns (on a GPU it is just NaN)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

INF, NAN = math.inf, math.nan


# ---------------------------------------------------------------------------------------
# the truth table
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "tile_max, m_ref, thresh, votes, why",
    [
        (-3.0, 0.0, 0.1, True, "exp(-3) = 0.050 < 0.1"),
        (-2.0, 0.0, 0.1, False, "exp(-2) = 0.135 >= 0.1"),
        (5.0, 8.0, 0.1, True, "only the gap counts: exp(-3) < 0.1"),
        (1.0, 0.0, 0.5, False, "a tile above the reference never votes"),
        (-100.0, 0.0, 0.0, False, "thresh = 0: nothing is below log(0) = -inf"),
        (-INF, 0.0, 0.0, False, "thresh = 0, even a fully masked row"),
        (0.0, -INF, 0.5, False, "a row that has seen nothing (first tile)"),
        (-INF, -INF, 0.5, False, "nothing seen and nothing visible: -inf - -inf is NaN"),
        (-INF, 0.0, 0.5, True, "every key of the tile masked for this row: nothing to add"),
        (-INF, 0.0, 1e-30, True, "... for any thresh > 0"),
        (NAN, 0.0, 0.5, False, "a NaN score is never skipped away"),
        (NAN, -INF, 0.5, False, "a NaN score in the first tile"),
        (-3.0, NAN, 0.5, False, "a row that folded a NaN in"),
        (INF, 0.0, 0.5, False, "an infinite score"),
        (INF, INF, 0.5, False, "inf - inf is NaN"),
    ],
)
def test_truth_table(tile_max, m_ref, thresh, votes, why):
    lt = rule.log_threshold(thresh)
    assert rule.row_votes_skip(tile_max, m_ref, lt) is votes, why
    # the same in the float32 the kernels compute in (gap in float32, compared in float64)
    got = rule.row_votes_skip(np.float32(tile_max), np.float32(m_ref), np.float64(lt))
    assert bool(got) is votes, why


def test_the_comparison_is_strict():
    assert not rule.row_votes_skip(-2.0, 0.0, -2.0)
    assert rule.row_votes_skip(np.nextafter(-2.0, -3.0), 0.0, -2.0)


def test_log_threshold():
    assert rule.log_threshold(0) == -INF and rule.log_threshold(0.0) == -INF
    assert rule.log_threshold(0.5) == math.log(0.5)
    assert isinstance(rule.log_threshold(0.25), float)


@given(st.floats(-50, 50), st.floats(-50, 50), st.floats(1e-6, 0.999))
def test_log_form_is_the_exp_form(tile_max, m_ref, thresh):
    """``m~ - m < log(thresh)`` is docs/DESIGN.md §3.3's ``exp(m~ - m) < thresh``, away from rounding
    at the boundary."""
    gap = tile_max - m_ref
    if abs(gap - math.log(thresh)) < 1e-9:
        return
    assert rule.row_votes_skip(tile_max, m_ref, rule.log_threshold(thresh)) == \
        (math.exp(gap) < thresh)


def test_the_gap_is_float32_in_float32_kernels():
    """float32 inputs: the gap is rounded to float32 before the float64 comparison, in
    every target, so every backend takes the same decision (here the float64 gap would
    vote, the float32 one does not)."""
    t, m, lt = np.float32(-1.0), np.float32(1e-8), -1.000000005
    assert t - m == np.float32(-1.0)  # the float32 gap
    assert float(t) - float(m) < lt  # the float64 gap would vote
    assert not rule.row_votes_skip(t, m, np.float64(lt))


@pytest.mark.parametrize(
    "a, b, want",
    [(1.0, 2.0, 2.0), (2.0, 1.0, 2.0), (-INF, -3.0, -3.0), (-3.0, -INF, -3.0),
     (NAN, 1.0, NAN), (1.0, NAN, NAN), (NAN, -INF, NAN), (-INF, NAN, NAN), (INF, 1.0, INF)],
)
def test_max_nan(a, b, want):
    got = rule.max_nan(a, b)
    assert (math.isnan(got) and math.isnan(want)) or got == want


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_len, kv_len", [(1, 1), (5, 17), (17, 5), (16, 16), (40, 24),
                                           (3, 64), (33, 100)])
@pytest.mark.parametrize("block_k", [1, 4, 8, 16])
def test_horizons_match_the_mask(q_len, kv_len, block_k, causal):
    """``last_visible_key`` and ``visited_k_tiles`` against the mask of docs/DESIGN.md §3.2 (row
    ``i`` sees key ``j`` iff ``j <= i + Lk - Lq`` under the causal mask)."""
    i = np.arange(q_len)[:, None]
    j = np.arange(kv_len)[None, :]
    mask = (j <= i + kv_len - q_len) if causal else np.ones((q_len, kv_len), bool)
    for row in range(q_len):
        last = rule.last_visible_key(row, q_len, kv_len, causal)
        np.testing.assert_array_equal(j[0] <= last, mask[row])
        assert rule.row_sees_keys(row, q_len, kv_len, causal) == mask[row].any()
        assert [rule.key_visible(row, key, q_len, kv_len, causal) for key in range(kv_len + 2)] \
            == list(mask[row]) + [False, False]  # keys past Lk are never visible
    for q_stop in range(1, q_len + 1):
        seen = mask[:q_stop].any(axis=0)
        want = int(np.nonzero(seen)[0].max()) // block_k + 1 if seen.any() else 0
        got = rule.visited_k_tiles(q_stop, q_len, kv_len, block_k, causal)
        assert got == want
        assert tiling.visited_k_tiles(q_stop, q_len, kv_len, block_k, causal) == want
        if causal:
            assert tiling.causal_k_tiles(0, q_stop, q_len, kv_len, block_k) == want


# ---------------------------------------------------------------------------------------
# one source, three targets
# ---------------------------------------------------------------------------------------

SPECIAL = [-INF, -5.0, -3.0, -2.0, -1.0, 1e-8, 0.0, 3.0, INF, NAN]
LOG_THRESH = [-INF, math.log(0.1), -2.0, -1.000000005, 0.0]


def _grid():
    """Every (tile_max, m_ref, log_thresh) of the special values: float32 scores, float64
    thresholds, as the kernels take them."""
    rows = list(itertools.product(SPECIAL, SPECIAL, LOG_THRESH))
    t, m, lt = (np.array(c) for c in zip(*rows))
    return t.astype(np.float32), m.astype(np.float32), lt.astype(np.float64)


def _python(t, m, lt):
    with np.errstate(invalid="ignore"):
        votes = np.array([rule.row_votes_skip(a, b, c) for a, b, c in zip(t, m, lt)], bool)
        maxes = np.array([rule.max_nan(a, b) for a, b in zip(t, m)], np.float32)
    return votes, maxes


@njit
def _cpu(t, m, lt, votes, maxes):
    for i in range(t.shape[0]):
        votes[i] = cpu_rule.row_votes_skip(t[i], m[i], lt[i])
        maxes[i] = cpu_rule.max_nan(t[i], m[i])


def _same_floats(a, b):
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_array_equal(a[~np.isnan(a)], b[~np.isnan(b)])


def test_numba_cpu_compilation_agrees_with_python():
    t, m, lt = _grid()
    want_votes, want_max = _python(t, m, lt)
    votes, maxes = np.zeros(t.size, np.bool_), np.zeros(t.size, np.float32)
    _cpu(t, m, lt, votes, maxes)
    np.testing.assert_array_equal(votes, want_votes)
    _same_floats(maxes, want_max)
    assert want_votes.any() and not want_votes.all()  # the grid has both answers


def _cuda_kernel():
    from blasst_ref.cuda import rule as gpu_rule

    @cuda.jit
    def kernel(t, m, lt, votes, maxes):
        i = cuda.grid(1)
        if i < t.shape[0]:
            votes[i] = 1 if gpu_rule.row_votes_skip(t[i], m[i], lt[i]) else 0
            maxes[i] = gpu_rule.max_nan(t[i], m[i])

    return kernel


def test_cuda_compilation_agrees_with_python():
    """The device functions of ``blasst_ref.cuda.rule`` (the simulator in CI, a GPU where
    there is one) against the Python functions, on every special value."""
    t, m, lt = _grid()
    want_votes, want_max = _python(t, m, lt)
    votes = cuda.to_device(np.full(t.size, -1, np.int8))  # poisoned
    maxes = cuda.to_device(np.full(t.size, 7.0, np.float32))
    _cuda_kernel()[(t.size + 63) // 64, 64](cuda.to_device(t), cuda.to_device(m),
                                             cuda.to_device(lt), votes, maxes)
    np.testing.assert_array_equal(votes.copy_to_host(), want_votes.astype(np.int8))
    _same_floats(maxes.copy_to_host(), want_max)


@njit
def _cpu_horizons(q_len, kv_len, block_k, causal, last, sees, tiles, vis):
    for r in range(q_len):
        for j in range(vis.shape[1]):
            vis[r, j] = cpu_rule.key_visible(r, j, q_len, kv_len, causal)
        last[r] = cpu_rule.last_visible_key(r, q_len, kv_len, causal)
        sees[r] = cpu_rule.row_sees_keys(r, q_len, kv_len, causal)
        tiles[r] = cpu_rule.visited_k_tiles(r + 1, q_len, kv_len, block_k, causal)


def _cuda_horizons():
    from blasst_ref.cuda import rule as gpu_rule

    @cuda.jit
    def kernel(q_len, kv_len, block_k, causal, last, sees, tiles, vis):
        r = cuda.grid(1)
        if r < q_len:
            for j in range(vis.shape[1]):
                vis[r, j] = 1 if gpu_rule.key_visible(r, j, q_len, kv_len, causal) else 0
            last[r] = gpu_rule.last_visible_key(r, q_len, kv_len, causal)
            sees[r] = 1 if gpu_rule.row_sees_keys(r, q_len, kv_len, causal) else 0
            tiles[r] = gpu_rule.visited_k_tiles(r + 1, q_len, kv_len, block_k, causal)

    return kernel


@pytest.mark.parametrize("q_len, kv_len, causal", [(40, 24, True), (24, 40, True),
                                                   (24, 40, False)])
def test_horizons_agree_across_targets(q_len, kv_len, causal):
    block_k = 8
    rows = range(q_len)
    want_last = [rule.last_visible_key(r, q_len, kv_len, causal) for r in rows]
    want_sees = [rule.row_sees_keys(r, q_len, kv_len, causal) for r in rows]
    want_tiles = [rule.visited_k_tiles(r + 1, q_len, kv_len, block_k, causal) for r in rows]
    want_vis = np.array([[rule.key_visible(r, j, q_len, kv_len, causal)
                          for j in range(kv_len + 3)] for r in rows])
    assert all(want_sees) == (not causal or q_len <= kv_len)  # Lq > Lk: rows without keys
    last, tiles = np.full(q_len, 99, np.int64), np.full(q_len, 99, np.int64)
    sees = np.zeros(q_len, np.bool_)
    vis = np.zeros(want_vis.shape, np.bool_)
    _cpu_horizons(q_len, kv_len, block_k, causal, last, sees, tiles, vis)
    np.testing.assert_array_equal(vis, want_vis)
    np.testing.assert_array_equal(last, want_last)
    np.testing.assert_array_equal(sees, want_sees)
    np.testing.assert_array_equal(tiles, want_tiles)
    d_last, d_tiles = (cuda.to_device(np.full(q_len, 99, np.int64)) for _ in range(2))
    d_sees = cuda.to_device(np.full(q_len, -1, np.int8))
    d_vis = cuda.to_device(np.full(want_vis.shape, -1, np.int8))
    _cuda_horizons()[1, 64](q_len, kv_len, block_k, causal, d_last, d_sees, d_tiles, d_vis)
    np.testing.assert_array_equal(d_vis.copy_to_host(), want_vis.astype(np.int8))
    np.testing.assert_array_equal(d_last.copy_to_host(), want_last)
    np.testing.assert_array_equal(d_sees.copy_to_host(), np.array(want_sees, np.int8))
    np.testing.assert_array_equal(d_tiles.copy_to_host(), want_tiles)


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_each_target_compiles_every_kernel_function_under_its_name(target):
    """``rule.KERNEL_FUNCTIONS`` is unpacked by position into names: each name must hold
    the compilation of the function of that name."""
    if target == "cpu":
        mod = cpu_rule
    else:
        from blasst_ref.cuda import rule as mod
    for f in rule.KERNEL_FUNCTIONS:
        assert getattr(mod, f.__name__).py_func is f
    if target == "cuda":
        assert {f.__name__ for f in rule.KERNEL_FUNCTIONS} <= set(mod.NAMESPACE)


def test_no_other_module_restates_the_rule():
    """The vote's comparison against ``log_thresh`` is written once, in ``rule.py``: every
    other module of the package calls ``row_votes_skip`` (generated sources included, which
    are built from these files)."""
    root = pathlib.Path(rule.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "rule.py" and path.parent == root:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"<\s*log_thresh\b", code):
                offenders.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
