"""The Numba CPU kernels called directly: poisoned outputs, the vectorised exp, K packing.

The API-level properties live in test_attention_properties.py; here the kernels are driven
below the API so that the output buffer can be poisoned first (an element the kernel forgets
to write stays NaN and fails the comparison) and their building blocks checked alone.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import random_qkv, rel_err

from blasst_ref import dense_attention, tiling
from blasst_ref.cpu import blasst_attention, pack_k_tiles
from blasst_ref.numba_utils import exp_array_f32
from blasst_ref.reference import blasst_attention_reference

TOL = {np.float32: 2e-5, np.float64: 1e-12}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "shape",
    [
        # (B, Hq, Hkv, Lq, Lk, D, Dv, block_q, block_k): partial last tiles, GQA, Dv != D
        (2, 4, 2, 70, 100, 16, 8, 32, 16),
        (1, 3, 1, 33, 33, 8, 12, 8, 8),
        (1, 2, 2, 200, 37, 8, 8, 64, 16),  # Lq > Lk: causal rows that see nothing
        (1, 8, 2, 1, 300, 16, 16, 128, 16),  # decode, several split-KV chunks
        (2, 4, 4, 5, 77, 8, 4, 128, 8),  # decode with 1 < Lq
    ],
)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("thresh", [0.0, 0.05])
def test_poisoned_output_is_fully_written_and_matches_reference(shape, causal, thresh, dtype):
    b, hq, hkv, lq, lk, d, dv, bq, bk = shape
    rng = np.random.default_rng(abs(hash((shape, causal, thresh))) % 2**32)
    q, k, v = random_qkv(rng, b, hq, hkv, lq, lk, d, dv, dtype=dtype, q_scale=2.0, k_scale=2.0)
    scale = 1 / math.sqrt(d)
    out = np.full((b, hq, lq, dv), np.nan, dtype)
    got, tile_map = blasst_attention(q, k, v, thresh, causal, scale, bq, bk, out=out)
    assert got is out
    assert not np.isnan(out).any(), "the kernel left elements of its output unwritten"

    ref = blasst_attention_reference(q, k, v, thresh, causal=causal, scale=scale,
                                     block_q=bq, block_k=bk)
    np.testing.assert_array_equal(tile_map, ref.tile_map)
    assert rel_err(out, ref.out.astype(np.float64)) < TOL[dtype]
    if thresh == 0.0:
        assert rel_err(out, dense_attention(q, k, v, causal=causal)) < TOL[dtype]


@pytest.mark.parametrize("lq", [1, 3, 100])
def test_skip_test_compiled_out_equals_thresh_zero(lq):
    rng = np.random.default_rng(lq)
    q, k, v = random_qkv(rng, 1, 4, 2, lq, 150, 16, dtype=np.float32)
    a, map_a = blasst_attention(q, k, v, 0.0, True, 0.25, 32, 16)
    b_, map_b = blasst_attention(q, k, v, 0.0, True, 0.25, 32, 16, skip_test=False)
    np.testing.assert_array_equal(a, b_)
    np.testing.assert_array_equal(map_a, map_b)
    assert (map_a != 2).all()


def test_skip_test_compiled_out_never_skips():
    rng = np.random.default_rng(7)
    q, k, v = random_qkv(rng, 1, 2, 2, 64, 256, 16, dtype=np.float32, q_scale=3.0,
                         k_scale=3.0)
    _, with_test = blasst_attention(q, k, v, 0.5, False, 0.25, 32, 16)
    out, without = blasst_attention(q, k, v, 0.5, False, 0.25, 32, 16, skip_test=False)
    assert (with_test == 2).any(), "the input should let thresh=0.5 skip something"
    assert (without == 1).all()
    assert rel_err(out, dense_attention(q, k, v)) < TOL[np.float32]


def test_exp_f32_accuracy_and_special_values():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-87.0, 0.0, 200_000), rng.uniform(0.0, 88.0, 1000)])
    x = x.astype(np.float32)
    got = np.empty_like(x)
    exp_array_f32(x, got)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - want) / want) < 5e-7
    special = np.array([np.nan, -np.inf, np.inf, -88.5, -1e30, 0.0, 89.0], np.float32)
    out = np.empty_like(special)
    exp_array_f32(special, out)
    assert np.isnan(out[0])
    np.testing.assert_array_equal(out[1:], [0.0, np.inf, 0.0, 0.0, 1.0, np.inf])


@pytest.mark.parametrize("lk,block_k", [(64, 64), (100, 32), (5, 16)])
def test_pack_k_tiles_transposes_and_pads(lk, block_k):
    k = np.random.default_rng(lk).standard_normal((2, 3, lk, 8)).astype(np.float32)
    packed = pack_k_tiles(k, block_k)
    n_kt = tiling.num_tiles(lk, block_k)
    assert packed.shape == (2, 3, n_kt, 8, block_k)
    padded = np.zeros((2, 3, n_kt * block_k, 8), np.float32)
    padded[:, :, :lk] = k
    want = padded.reshape(2, 3, n_kt, block_k, 8).transpose(0, 1, 2, 4, 3)
    np.testing.assert_array_equal(packed, want)


def test_kernel_rejects_wrong_arrays():
    q = np.ones((1, 2, 8, 4), np.float32)
    with pytest.raises(TypeError, match="k"):
        blasst_attention(q, q.astype(np.float64), q, 0.0, False, 0.5, 8, 8)
    with pytest.raises(TypeError, match="q"):
        blasst_attention(q[:, :, ::2], q, q, 0.0, False, 0.5, 8, 8)
    with pytest.raises(ValueError, match="out"):
        blasst_attention(q, q, q, 0.0, False, 0.5, 8, 8, out=np.empty((1, 2, 8, 5), np.float32))


def test_nan_hidden_by_the_causal_mask_does_not_block_a_skip():
    """A NaN score at a key that the causal mask hides from every row of a visited tile takes
    no part in that tile's max (docs/DESIGN.md §3.3: masked scores take no part in m~), so it
    does not stop the tile from being skipped, exactly as in the reference.

    Lq=24 (prefill: more than 16 rows), Lk=56, tiles 8 x 16: rows 0..7 see keys j <= i + 32,
    so in their diagonal tile (keys 32..47) keys 40..47 are hidden from all of them; key 45
    holds the NaN. Rows 8..15 see it."""
    rng = np.random.default_rng(11)
    d = 16
    u = rng.standard_normal(d)
    q = 3.0 * u + 0.3 * rng.standard_normal((1, 2, 24, d))
    k = 0.3 * rng.standard_normal((1, 2, 56, d))
    v = rng.standard_normal((1, 2, 56, d))
    k[:, :, 0] = 3.0 * u  # an attention sink that every row sees: later tiles are negligible
    k[0, 1, 45, 0] = np.nan
    ref = blasst_attention_reference(q, k, v, 0.5, causal=True, block_q=8, block_k=16)
    out, tile_map = blasst_attention(q, k, v, 0.5, True, 1 / math.sqrt(d), 8, 16)
    np.testing.assert_array_equal(tile_map, ref.tile_map)
    assert tile_map[0, 1, 0, 2] == 2, "the tile holding the hidden NaN should be skipped"
    assert tile_map[0, 1, 1, 2] == 1, "rows 8..15 see the NaN key: their tile is kept"
    sees_nan = np.arange(24) + 32 >= 45  # rows 13.. see key 45 (a NaN in k, not in v)
    np.testing.assert_array_equal(np.isnan(out[0, 1]).any(axis=1), sees_nan)
    assert not np.isnan(out[0, 0]).any()
