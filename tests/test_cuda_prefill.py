"""The Numba CUDA prefill kernel, driven directly (below the API).

Runs on Numba's CUDA simulator where there is no GPU (tests/conftest.py sets
``NUMBA_ENABLE_CUDASIM=1`` before numba.cuda is imported; by hand:
``NUMBA_ENABLE_CUDASIM=1 python -m pytest -q tests/test_cuda_prefill.py``). The simulator runs
every thread as a Python thread, so the default sizes are tiny, and the launch plan
(threads per row, D chunk) is forced small so that padding rows, several threads per row and
several D chunks are all exercised.

On a GPU, ``BLASST_CUDA_TEST_SCALE=gpu`` switches to real sizes (L = 300..1024, D = 64/128,
the MLA pair Dqk = 576 / Dv = 512) with the default launch plan and tiles.

Every kernel test runs each kernel version (``version=1``: the SIMT kernel, any shape;
``version=2``: register-tiled, where ``plan_v2`` accepts the shape, else skipped). Under the
simulator v2 runs with a small thread layout (4 row groups x 1-4 lanes) and shared-memory
reductions in place of the warp shuffles.

The output buffer is poisoned with NaN before the launch: an element the kernel forgets to
write stays NaN and fails the comparison.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from helpers import random_qkv, rel_err

from blasst_ref import dense_attention, tiling
from blasst_ref.reference import _log_thresh, blasst_attention_reference

cuda = pytest.importorskip("numba.cuda")
from blasst_ref.cuda.prefill import launch_prefill, plan_prefill, plan_v2  # noqa: E402

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
GPU_SCALE = os.environ.get("BLASST_CUDA_TEST_SCALE", "") == "gpu"
if GPU_SCALE and SIM:
    raise RuntimeError("BLASST_CUDA_TEST_SCALE=gpu needs a real GPU, not the CUDA simulator")

TOL = {np.float32: 1e-5, np.float16: 2e-3}
#: kernel versions (see the module docstring)
VERSIONS = [1, 2]

# The simulator runs the kernel as Python code on numpy scalars: -inf - -inf (a row that has
# seen nothing yet, in the skip vote) warns there; on the GPU it is just NaN.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

# (B, Hq, Hkv, Lq, Lk, Dqk, Dv, block_q, block_k, threads_per_row, d_chunk)
if GPU_SCALE:
    SHAPES = {
        "gqa-d128": (1, 8, 2, 512, 1024, 128, 128, 128, 64, None, None),
        "d64-64x64": (2, 4, 4, 300, 300, 64, 64, 64, 64, None, None),
        "lq>lk-d64": (1, 4, 2, 1024, 700, 64, 64, 128, 64, None, None),
        "mla": (1, 4, 1, 300, 400, 576, 512, 64, 64, None, None),
    }
    SINK_SHAPES = {
        "gqa-d128": (1, 8, 2, 1024, 1024, 128, 128, 128, 64, None, None),
        "mla": (1, 2, 1, 384, 384, 576, 512, 64, 64, None, None),
    }
else:
    SHAPES = {
        # GQA, Dv != Dqk, Lq < Lk, two D chunks (the second V chunk partial), padding rows
        # (8 rows x 2 threads = 16 threads, rounded up to a warp)
        "gqa-dv12": (1, 2, 1, 24, 32, 16, 12, 8, 8, 2, 8),
        # Lq > Lk: causal rows that see no key; one thread per row
        "lq>lk": (1, 2, 2, 40, 24, 16, 16, 16, 8, 1, 16),
        # partial last q and k tiles, 4 threads per row, B = 2
        "partial": (2, 2, 1, 25, 25, 8, 8, 16, 8, 4, None),
        # v2 with two 4-column chunks per thread (D = 32, 4 lanes per row), GQA, partial tiles
        "d32": (1, 2, 1, 20, 36, 32, 32, 8, 8, 2, None),
    }
    SINK_SHAPES = {
        "gqa-dv12": (1, 2, 1, 24, 40, 16, 12, 8, 8, 2, 8),
        "partial": (1, 2, 2, 33, 41, 8, 8, 16, 8, 4, None),
        "d32": (1, 2, 1, 20, 36, 32, 32, 8, 8, 2, None),
    }


def _inputs(rng, shape, dtype, sink=0.0):
    """:func:`helpers.random_qkv`'s q, k, v; ``sink > 0`` adds this file's own attention sink
    (the first keys share a large first component with every query) so that later tiles
    are far below the running max and get skipped. Its own, not random_qkv's: the cases
    below were chosen so that on these inputs no tile lies within rounding of the
    threshold."""
    d = shape[5]
    q, k, v = random_qkv(rng, *shape[:7])
    if sink:
        q[..., 0] = np.abs(q[..., 0]) + sink
        k[:, :, :3, 0] += sink * math.sqrt(d / 16)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _v2_refuses(version, shape, dtype) -> bool:
    """True for version 2 on a shape v2 does not take (v1 serves it): the test then checks
    that asking for v2 is refused, instead of computing anything."""
    d, dv, bq, bk = shape[5:9]
    return version == 2 and plan_v2(bq, bk, d, dv, np.dtype(dtype).itemsize) is None


def _assert_v2_refused(q, k, v, causal, shape):
    with pytest.raises(ValueError, match="v2 does not apply"):
        _run(q, k, v, 0.0, causal, shape, version=2)


def _run(q, k, v, thresh, causal, shape, version=1):
    """Launch on device copies; return (out, tile_map) on the host. ``version=1`` uses the
    shape's launch plan (threads per row, D chunk); ``version=2`` its default layout."""
    b, hq, hkv, lq, lk, d, dv, bq, bk, tpr, dc = shape
    if version == 2:
        tpr = dc = None
    scale = 1 / math.sqrt(d)
    out = np.full((b, hq, lq, dv), np.nan, q.dtype)  # poison: unwritten elements show
    tile_map = np.zeros((b, hq, tiling.num_tiles(lq, bq), tiling.num_tiles(lk, bk)), np.int8)
    d_q, d_k, d_v, d_out, d_map = (cuda.to_device(x) for x in (q, k, v, out, tile_map))
    launch_prefill(d_q, d_k, d_v, d_out, d_map, _log_thresh(thresh), causal, scale, bq, bk,
                   threads_per_row=tpr, d_chunk=dc, version=version)
    return d_out.copy_to_host(), d_map.copy_to_host()


def _reference(q, k, v, thresh, causal, shape):
    bq, bk = shape[7], shape[8]
    return blasst_attention_reference(q, k, v, thresh, causal=causal, scale=1 / math.sqrt(q.shape[3]),
                                      block_q=bq, block_k=bk)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "name, causal, dtype",
    [("gqa-d128", False, np.float32), ("gqa-d128", True, np.float16),
     ("d64-64x64", False, np.float16), ("d64-64x64", True, np.float32),
     ("lq>lk-d64", True, np.float32), ("mla", True, np.float32), ("mla", False, np.float16)]
    if GPU_SCALE else
    [("gqa-dv12", False, np.float32), ("gqa-dv12", True, np.float32),
     ("lq>lk", True, np.float32), ("partial", True, np.float16), ("d32", True, np.float32),
     ("d32", False, np.float16)],
)
def test_thresh0_is_dense_attention(name, causal, dtype, version):
    shape = SHAPES[name]
    rng = np.random.default_rng(1)
    q, k, v = _inputs(rng, shape, dtype)
    if _v2_refuses(version, shape, dtype):
        return _assert_v2_refused(q, k, v, causal, shape)
    out, tile_map = _run(q, k, v, 0.0, causal, shape, version)
    assert not np.isnan(out).any(), "the kernel left elements of its output unwritten"
    want = dense_attention(q, k, v, causal=causal, scale=1 / math.sqrt(q.shape[3]))
    assert rel_err(out, want) < TOL[dtype]
    ref = _reference(q, k, v, 0.0, causal, shape)
    np.testing.assert_array_equal(tile_map, ref.tile_map)
    assert not (tile_map == 2).any()
    if causal and q.shape[2] > k.shape[2]:
        # rows that see no key are zeros (and the tiles masked entirely are not visited)
        np.testing.assert_array_equal(out[:, :, : q.shape[2] - k.shape[2]], 0)
        assert (tile_map == 0).any()


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "name, causal, dtype",
    [("gqa-d128", True, np.float32), ("gqa-d128", False, np.float16),
     ("mla", True, np.float32)]
    if GPU_SCALE else
    [("gqa-dv12", True, np.float32), ("partial", False, np.float32),
     ("partial", True, np.float16), ("d32", True, np.float32)],
)
def test_skipping_matches_reference(name, causal, dtype, version):
    shape = SINK_SHAPES[name]
    rng = np.random.default_rng(7)
    q, k, v = _inputs(rng, shape, dtype, sink=5.0)
    if _v2_refuses(version, shape, dtype):
        return _assert_v2_refused(q, k, v, causal, shape)
    thresh = 0.05
    ref = _reference(q, k, v, thresh, causal, shape)
    # Decisions must agree exactly away from the threshold; within rounding of it (a
    # different summation order in Q K^T) a decision may flip. The small simulator inputs
    # have no such tile, so there the comparison is exact everywhere.
    near = (ref.tile_map > 0) & (np.abs(ref.margin) < 1e-3)
    if not GPU_SCALE:
        assert not near.any(), "test inputs have a tile within rounding of the threshold"
    out, tile_map = _run(q, k, v, thresh, causal, shape, version)
    assert not np.isnan(out).any(), "the kernel left elements of its output unwritten"
    np.testing.assert_array_equal(tile_map[~near], ref.tile_map[~near])
    assert (tile_map == 2).any(), "the inputs were meant to make tiles skippable"
    assert (tile_map == 1).any()
    if (tile_map == ref.tile_map).all():  # same decisions: same numbers up to rounding
        assert rel_err(out, ref.out) < TOL[dtype]


@pytest.mark.parametrize("version", VERSIONS)
def test_nan_and_inf_semantics(version):
    """A NaN score keeps its tile (and poisons only the rows that see it), a row whose visible
    scores are all -inf is NaN (as dense), causal rows that see no key are zeros."""
    shape = (1, 2, 1, 24, 16, 8, 8, 8, 8, 2, None) if not GPU_SCALE else \
        (1, 4, 2, 300, 280, 64, 64, 64, 64, None, None)
    b, hq, hkv, lq, lk, d = shape[:6]
    rng = np.random.default_rng(3)
    q, k, v = _inputs(rng, shape, np.float32, sink=5.0)
    if _v2_refuses(version, shape, np.float32):
        return _assert_v2_refused(q, k, v, True, shape)
    # key lk-3 is NaN: rows that see it (causal: the last rows) become NaN, and its tile must
    # never be skipped
    k[0, 0, lk - 3, 1] = np.nan
    # query row lq-1 of head 1: every score -inf (q and all keys have a huge component)
    q[0, 1, lq - 1] = 0.0
    q[0, 1, lq - 1, 2] = -np.inf
    k[0, :, :, 2] = np.abs(k[0, :, :, 2]) + 1.0
    for causal in (True, False):
        ref = _reference(q, k, v, 0.05, causal, shape)
        out, tile_map = _run(q, k, v, 0.05, causal, shape, version)
        np.testing.assert_array_equal(tile_map, ref.tile_map)
        nan_tile = (lk - 3) // shape[8]
        heads0 = slice(0, hq // hkv)  # the query heads that read kv head 0 (the NaN key)
        assert ((tile_map[0, heads0, :, nan_tile] == 1) |
                (tile_map[0, heads0, :, nan_tile] == 0)).all()
        np.testing.assert_array_equal(np.isnan(out), np.isnan(ref.out))
        assert np.isnan(out[0, 1, lq - 1]).all()  # all -inf -> NaN, as dense attention
        want = dense_attention(q, k, v, causal=causal, scale=1 / math.sqrt(d))
        np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
        ok = ~np.isnan(want)
        np.testing.assert_allclose(out[ok], ref.out[ok], rtol=1e-4, atol=1e-5)
        if causal:  # Lq > Lk: the first rows see no key
            np.testing.assert_array_equal(out[:, :, : lq - lk], 0)


@pytest.mark.parametrize(
    "bq, bk, dqk, dv",
    [(128, 64, 64, 64), (128, 64, 128, 128), (64, 64, 576, 512), (128, 64, 576, 512),
     (64, 128, 128, 128), (16, 16, 64, 64), (256, 32, 128, 128)],
)
def test_launch_plan_fits(bq, bk, dqk, dv):
    """The default plan fits the 48 KB of static shared memory and 1024 threads for the tile
    sizes and head dims the GPU will see (pure arithmetic: no launch)."""
    plan = plan_prefill(bq, bk, dqk, dv)
    assert plan["shared_bytes"] <= 48 * 1024
    assert plan["threads"] <= 1024 and plan["threads"] % 32 == 0
    assert plan["rows"] >= bq and plan["dc"] >= 4


def test_launch_plan_rejects_oversized_tile():
    with pytest.raises(ValueError, match="shared memory"):
        plan_prefill(256, 128, 64, 64)


@pytest.mark.parametrize(
    "bq, bk, d, itemsize, ok",
    [(128, 64, 128, 2, True), (128, 64, 64, 2, True), (64, 64, 128, 4, True),
     (128, 64, 576, 2, False), (256, 64, 128, 2, False), (128, 128, 128, 2, False),
     (128, 64, 96, 2, False), (128, 60, 128, 2, False)],
)
def test_v2_plan_gpu_layout(bq, bk, d, itemsize, ok):
    """Which shapes v2 takes with the GPU layout (16 x 16 threads), and that its shared memory
    fits the H100's 227 KB (pure arithmetic: no launch)."""
    plan = plan_v2(bq, bk, d, d, itemsize, layout=(16, 16))
    assert (plan is not None) == ok
    if plan is not None:
        assert plan["threads"] == 256 and plan["shared_bytes"] <= 227 * 1024
        assert plan["rpt"] * plan["kpt"] <= 32 and plan["rpt"] * plan["nch"] * 4 <= 64
    assert plan_v2(bq, bk, d, d + 64, itemsize, layout=(16, 16)) is None  # Dv != Dqk


def test_v2_rejects_unaligned_and_falls_back():
    """``version=2`` on a shape it does not take is an error; the default falls back to v1."""
    shape = (1, 2, 1, 24, 32, 16, 12, 8, 8, 2, 8)  # Dv != Dqk: v2 does not apply
    rng = np.random.default_rng(0)
    q, k, v = _inputs(rng, shape, np.float32)
    with pytest.raises(ValueError, match="v2 does not apply"):
        _run(q, k, v, 0.0, False, shape, version=2)
    out, _ = _run(q, k, v, 0.0, False, shape[:9] + (None, None), version=None)
    want = dense_attention(q, k, v, causal=False, scale=1 / math.sqrt(shape[5]))
    assert rel_err(out, want) < TOL[np.float32]
