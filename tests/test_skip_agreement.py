"""The ``cpu`` backend makes the skip decisions of the reference (docs/DESIGN.md §3.3: with
the same ``block_q``/``block_k``, every backend makes the same skip decisions except where a
tile's margin lies within rounding of the threshold).

The margin of a tile is ``max_r(m~_r - m_r) - log(thresh)`` as the reference computed it
(``blasst_attention_reference(...).margin``); the tile is skipped iff it is negative. A
disagreement is excused only on a tile whose margin is within ``MARGIN_TOL`` of zero, scaled by
the largest score magnitude (the margin is a difference of scores): float64 so small that in
practice the maps must be identical, float32 (also the compute type of float16) a few hundred
float32 ulps of a score. Since the running max does not depend on the decisions (a skipped
tile could not have raised it), one excused disagreement cannot cascade into others.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import strategies as S
from helpers import rel_err
from hypothesis import event, given, note, target
from hypothesis import strategies as st

from blasst_ref import attention, reference

MARGIN_TOL = {np.float64: 1e-9, np.float32: 1e-5, np.float16: 1e-5}
REL_TOL = {np.float64: 1e-11, np.float32: 1e-5, np.float16: 2e-3}  # see test_attention_properties

DTYPES = [pytest.param(d, id=np.dtype(d).name) for d in S.HOST_DTYPES]


def _score_magnitude(case):
    p = case.problem
    q, k = (x.astype(np.float64) for x in (case.q, case.k))
    k = np.repeat(k, p.group, axis=1)
    return float(np.abs(np.einsum("bhid,bhjd->bhij", q, k)).max() / math.sqrt(p.dqk))


def _check_agreement(case, thresh, dtype, block_q, block_k):
    p = case.problem
    out_c, st_c = attention(case.q, case.k, case.v, thresh, causal=p.causal, backend="cpu",
                            block_q=block_q, block_k=block_k, return_stats=True)
    out_r, st_r = attention(case.q, case.k, case.v, thresh, causal=p.causal,
                            backend="reference", block_q=block_q, block_k=block_k,
                            return_stats=True)
    assert st_c.backend == "cpu" and st_r.backend == "reference"
    assert (st_c.block_q, st_c.block_k, st_c.phase) == (st_r.block_q, st_r.block_k, st_r.phase)
    assert st_c.tile_map.shape == st_r.tile_map.shape
    assert st_c.tile_map.dtype == st_r.tile_map.dtype

    differ = st_c.tile_map != st_r.tile_map
    # never-visited tiles are geometry: they must agree exactly
    np.testing.assert_array_equal(
        st_c.tile_map == reference.NOT_VISITED, st_r.tile_map == reference.NOT_VISITED
    )
    if differ.any():
        compute = np.float64 if dtype == np.float64 else np.float32
        margin = reference.blasst_attention_reference(
            *(x.astype(compute) for x in (case.q, case.k, case.v)), thresh, causal=p.causal,
            block_q=block_q, block_k=block_k,
        ).margin
        tol = MARGIN_TOL[dtype] * (1.0 + _score_magnitude(case))
        note(f"disagreeing tiles: {np.argwhere(differ).tolist()}, margins {margin[differ]}")
        assert np.all(np.abs(margin[differ]) < tol), "cpu and reference disagree on a clear tile"
        event("excused near-threshold disagreement")
    else:
        assert (st_c.skipped_tiles, st_c.visited_tiles) == (st_r.skipped_tiles, st_r.visited_tiles)
        np.testing.assert_array_equal(st_c.per_head, st_r.per_head)
        assert rel_err(out_c, out_r) <= REL_TOL[dtype]
    target(st_r.sparsity, label="sparsity")  # steer towards inputs where tiles are skipped
    event("some tiles skipped" if st_r.skipped_tiles else "no tile skipped")


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_cpu_skips_the_tiles_reference_skips(dtype, data):
    """Prefill and decode (split-KV, group decides together), causal or not, MHA/GQA/MQA, tile
    sizes that do and do not divide the lengths, peaked inputs so that tiles are skipped."""
    case = data.draw(S.cases(dtype, peaked=True))
    thresh = data.draw(S.thresholds(), label="thresh")
    p = case.problem
    _check_agreement(case, thresh, dtype, p.block_q, p.block_k)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_cpu_skips_the_tiles_reference_skips_default_tiles(dtype, data):
    """Same, with the default tile sizes (``block_q = block_k = None``): both backends must
    resolve the defaults to the same tiles."""
    phase = data.draw(st.sampled_from(["prefill", "decode"]))
    problem = S.problems(phase=phase, batch=1, hkv=1, max_lq=300, max_lk=300)
    case = data.draw(S.cases(dtype, peaked=True, problem=problem))
    thresh = data.draw(S.thresholds(), label="thresh")
    _check_agreement(case, thresh, dtype, None, None)
