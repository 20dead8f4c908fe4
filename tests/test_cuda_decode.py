"""The split-KV decode kernels (``blasst_ref.cuda.decode_v1/v2``) against the numpy specification.

Runs on Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, set before ``numba.cuda`` is
first imported) at tiny sizes, and on a real GPU at the same tiny sizes by default.
``BLASST_CUDA_TEST_SCALE=gpu`` switches to realistic decode shapes (Lk = 4096..32768,
D = 128, Hq = 32 / Hkv = 8, and MLA 576 / 512): use it on a GPU only, the simulator would
take hours.

The kernels are called directly (``launch_decode``), with device arrays made by
``numba.cuda.to_device``; the expected results come from :func:`dense_attention` (float64)
for ``thresh = 0`` and from :func:`blasst_attention_reference` (same tiles, same split-KV
chunks, same skip rule) for ``thresh > 0``. At tiny sizes the tiling's minimum of
``MIN_TILES_PER_SPLIT`` tiles per chunk would leave a single chunk, so the tests lower it
(``monkeypatch``) for both the reference and the kernel: several chunks are merged.
"""

from __future__ import annotations

import math
import os

import numba
import numpy as np
import pytest
from helpers import random_qkv, rel_err

from blasst_ref import reference, tiling, workloads
from blasst_ref.rule import log_threshold

cuda = pytest.importorskip("numba.cuda")
if not cuda.is_available():
    pytest.skip("no CUDA GPU and NUMBA_ENABLE_CUDASIM is not set", allow_module_level=True)

from blasst_ref.cuda import decode_v1, decode_v2  # noqa: E402
from blasst_ref.cuda.launch import launch_decode  # noqa: E402

pytestmark = [
    # the simulator computes -inf - -inf (a row that has seen nothing) with numpy scalars
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    # tiny grids on a real GPU
    pytest.mark.filterwarnings("ignore:.*Grid size"),
]

SIM = bool(numba.config.ENABLE_CUDASIM)
GPU_SCALE = os.environ.get("BLASST_CUDA_TEST_SCALE", "").lower() == "gpu"
#: threads per block of the split kernel: fewer under the simulator (one Python thread each);
#: on a GPU each version's default
THREADS = 32 if SIM else None
#: kernel versions: 1 (any shape), 2 (windows, vector loads, warp shuffles on a GPU; shared
#: memory reductions on the simulator), tested where ``decode_v2.plan`` accepts the shape
VERSIONS = [1, 2]
#: relative L2 tolerance of out vs the float64 oracle / the float32 reference
TOL = {np.float32: 1e-5, np.float16: 2e-3}


@pytest.fixture
def split_tiles(monkeypatch, request):
    """Set the tiling's minimum tiles per split-KV chunk (``None``: the library's value)."""
    value = getattr(request, "param", None)
    if value is not None:
        monkeypatch.setattr(tiling, "MIN_TILES_PER_SPLIT", value)
    return value


def _v2_applies(q, k, v, block_k):
    b, hq, lq, dqk = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    return decode_v2.plan((hq // hkv) * lq, block_k, dqk, dv, q.dtype.itemsize,
                          THREADS or decode_v2.THREADS,
                          tiling.decode_split_tiles(lk, block_k)) is not None


def _assert_v2_refused(q, k, v, causal, block_k):
    """v1 serves this shape: asking for v2 must be refused, not computed."""
    with pytest.raises(ValueError, match="v2 does not apply"):
        run_decode(q, k, v, 0.0, causal, block_k, version=2)


def run_decode(q, k, v, thresh, causal, block_k, *, scale=None, threads=THREADS, chunk=None,
               version=None, seeded=True):
    """Launch the CUDA decode kernels on host arrays; returns ``(out, tile_map)`` on the host.

    The split-KV chunking comes from ``tiling`` (as the backend's caller passes it); ``out``
    is poisoned with NaN first, so that every element must be written."""
    b, hq, lq, dqk = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    scale = 1.0 / math.sqrt(dqk) if scale is None else scale
    n_kt = tiling.num_tiles(lk, block_k)
    out = cuda.to_device(np.full((b, hq, lq, dv), np.nan, q.dtype))
    tile_map = cuda.to_device(np.zeros((b, hkv, 1, n_kt), np.int8))
    log_thresh = log_threshold(thresh)
    launch_decode(
        cuda.to_device(q), cuda.to_device(k), cuda.to_device(v), out, tile_map, log_thresh,
        causal, scale, block_k, tiling.decode_split_tiles(lk, block_k),
        tiling.decode_num_splits(lk, block_k), threads=threads, chunk=chunk, version=version,
        seeded=seeded,
    )
    return out.copy_to_host(), tile_map.copy_to_host()


def _assert_maps_agree(got, ref):
    """tile maps equal, except tiles whose reference margin lies within rounding of 0."""
    near = np.abs(np.nan_to_num(ref.margin, nan=np.inf)) < 1e-3
    bad = (got != ref.tile_map) & ~near
    assert not bad.any(), f"tile maps differ at {np.argwhere(bad)[:10]}"
    return bool(((got != ref.tile_map) & near).any())


# ---------------------------------------------------------------------------------------
# thresh = 0: exact attention against the float64 oracle
# ---------------------------------------------------------------------------------------

if GPU_SCALE:
    DENSE_CASES = [  # (B, Hq, Hkv, Lq, Lk, Dqk, Dv, block_k, causal, dtype, min_split)
        (1, 32, 8, 1, 4096, 128, 128, 64, False, np.float32, None),
        (2, 32, 8, 1, 32768, 128, 128, 64, True, np.float16, None),
        (1, 32, 8, 4, 8191, 128, 128, 64, True, np.float32, None),
        (1, 8, 8, 1, 16384, 64, 64, 64, False, np.float16, None),
        (1, 16, 1, 1, 4096, 576, 512, 64, True, np.float16, None),  # MLA (absorbed)
        (1, 16, 1, 2, 8192, 576, 512, 32, True, np.float32, None),
    ]
else:
    DENSE_CASES = [
        (1, 4, 2, 1, 77, 16, 16, 8, False, np.float32, 4),  # GQA, partial last tile
        (2, 2, 2, 3, 50, 8, 8, 8, True, np.float16, 2),  # MHA, Lq = 3 causal
        (1, 4, 1, 1, 40, 12, 8, 8, True, np.float32, 2),  # MLA-like Dqk != Dv, one kv head
        (1, 4, 2, 1, 77, 16, 16, 16, False, np.float32, 2),  # v2: GQA, partial last tile
        (1, 8, 2, 2, 150, 32, 32, 16, True, np.float16, 2),  # v2: 8 rows, Lq = 2 causal
    ]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: f"{c[:8]}-{np.dtype(c[9]).name}")
def test_dense_matches_oracle(case, version, monkeypatch):
    b, hq, hkv, lq, lk, dqk, dv, bk, causal, dtype, min_split = case
    if min_split is not None:
        monkeypatch.setattr(tiling, "MIN_TILES_PER_SPLIT", min_split)
    assert tiling.decode_num_splits(lk, bk) > 1  # the merge is exercised
    q, k, v = random_qkv(lk + lq, b, hq, hkv, lq, lk, dqk, dv, dtype=dtype)
    if version == 2 and not _v2_applies(q, k, v, bk):
        return _assert_v2_refused(q, k, v, causal, bk)
    out, tile_map = run_decode(q, k, v, 0.0, causal, bk, version=version)
    expect = reference.dense_attention(q, k, v, causal=causal)
    assert out.dtype == dtype and not np.isnan(out).any()
    assert rel_err(out, expect) < TOL[dtype]
    k_tiles = tiling.causal_k_tiles(0, lq, lq, lk, bk) if causal else tiling.num_tiles(lk, bk)
    assert (tile_map[..., :k_tiles] == reference.COMPUTED).all()
    assert (tile_map[..., k_tiles:] == reference.NOT_VISITED).all()


def test_head_dim_chunks_and_streamed_q(monkeypatch):
    """Several head-dim chunks (DC = 8 < D), and Q re-staged per chunk instead of resident."""
    monkeypatch.setattr(tiling, "MIN_TILES_PER_SPLIT", 2)
    if GPU_SCALE:
        shape = (1, 16, 1, 1, 2048, 576, 512, 64)
    else:
        shape = (1, 2, 1, 2, 35, 20, 12, 8)
    b, hq, hkv, lq, lk, dqk, dv, bk = shape
    q, k, v = random_qkv(1, b, hq, hkv, lq, lk, dqk, dv, dtype=np.float32)
    expect = reference.dense_attention(q, k, v, causal=True)
    out, _ = run_decode(q, k, v, 0.0, True, bk, chunk=8)  # v1: Q resident, 3 chunks of 8
    assert rel_err(out, expect) < 1e-5
    monkeypatch.setattr(decode_v1, "plan", lambda *a, **kw: (8, 8))
    out, _ = run_decode(q, k, v, 0.0, True, bk, version=1)  # v1: Q re-staged per chunk
    assert rel_err(out, expect) < 1e-5


# ---------------------------------------------------------------------------------------
# thresh > 0: the same tiles skipped as the reference, the same output
# ---------------------------------------------------------------------------------------

def _peaked(rng, b, hq, hkv, lq, lk, d, dtype, period):
    """Random q, k, v plus a bright key at the start of every ``period`` keys (each split-KV
    chunk's first, dense, tile then holds a large running max), and a dimmer one mid-way."""
    q, k, v = random_qkv(rng, b, hq, hkv, lq, lk, d)
    group = hq // hkv
    k *= 0.3
    for g in range(hkv):
        direction = q[:, g * group:(g + 1) * group].sum(axis=(1, 2))  # (B, D)
        direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
        for j in range(0, lk, period):
            k[:, g, j] = 4.0 * math.sqrt(d) * direction / max(1.0, math.sqrt(group * lq) / 2)
        for j in range(period // 2, lk, period):
            k[:, g, j] = 1.5 * math.sqrt(d) * direction
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


if GPU_SCALE:
    SPARSE_CASES = [  # (B, Hq, Hkv, Lq, Lk, D, block_k, causal, dtype, min_split, thresh)
        (1, 32, 8, 1, 32768, 128, 64, True, np.float32, None, 1e-3),
        (2, 32, 8, 4, 8192, 128, 64, True, np.float16, None, 1e-3),
    ]
else:
    SPARSE_CASES = [
        (1, 4, 2, 1, 96, 16, 8, False, np.float32, 4, 0.05),  # GQA: the group votes
        (1, 3, 3, 3, 80, 8, 8, True, np.float16, 3, 0.05),  # MHA, Lq = 3 causal
        (1, 4, 2, 1, 192, 16, 16, False, np.float32, 3, 0.05),  # v2: GQA group votes
        (1, 4, 4, 2, 200, 32, 16, True, np.float16, 2, 0.05),  # v2: Lq = 2 causal, partial
    ]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", SPARSE_CASES, ids=lambda c: f"{c[:8]}-{np.dtype(c[8]).name}")
def test_skips_like_reference(case, version, monkeypatch):
    b, hq, hkv, lq, lk, d, bk, causal, dtype, min_split, thresh = case
    if min_split is not None:
        monkeypatch.setattr(tiling, "MIN_TILES_PER_SPLIT", min_split)
    rng = np.random.default_rng(7)
    if GPU_SCALE:
        q, k, v = workloads.llm_like(b, hq, hkv, lq, lk, d, seed=3, dtype=dtype)
    else:
        q, k, v = _peaked(rng, b, hq, hkv, lq, lk, d, dtype, bk * tiling.decode_split_tiles(lk, bk))
    if version == 2 and not _v2_applies(q, k, v, bk):
        return _assert_v2_refused(q, k, v, causal, bk)
    out, tile_map = run_decode(q, k, v, thresh, causal, bk, version=version)
    ref = reference.blasst_attention_reference(q, k, v, thresh, causal=causal, block_k=bk)
    assert ref.decode
    n_skipped = int((ref.tile_map == reference.SKIPPED).sum())
    assert 0 < n_skipped < int((ref.tile_map == reference.COMPUTED).sum()) * 10
    excused = _assert_maps_agree(tile_map, ref)
    assert not np.isnan(out).any()
    tol = TOL[dtype] if not excused else 1e-2
    assert rel_err(out, ref.out) < tol


# ---------------------------------------------------------------------------------------
# NaN, rows that see no key, splits that see nothing
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_nan_score_never_skips_and_propagates(version, monkeypatch):
    monkeypatch.setattr(tiling, "MIN_TILES_PER_SPLIT", 4)
    b, hq, hkv, lq, lk, d, bk = (1, 4, 2, 1, 64, 8, 8) if version == 1 else \
        (1, 4, 2, 1, 128, 16, 16)
    q, k, v = _peaked(np.random.default_rng(3), b, hq, hkv, lq, lk, d, np.float32, 4 * bk)
    if version == 2 and not _v2_applies(q, k, v, bk):
        return _assert_v2_refused(q, k, v, False, bk)
    k[0, 1, 2 * bk + 4, 3] = np.nan  # kv head 1, tile 2: would be skipped, must be computed
    out, tile_map = run_decode(q, k, v, 0.05, False, bk, version=version)
    ref = reference.blasst_attention_reference(q, k, v, 0.05, causal=False, block_k=bk)
    assert ref.tile_map[0, 1, 0, 2] == reference.COMPUTED
    assert (ref.tile_map[0, 0] == reference.SKIPPED).any()  # the clean group still skips
    np.testing.assert_array_equal(tile_map, ref.tile_map)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref.out))
    assert np.isnan(out[0, 2:]).all() and not np.isnan(out[0, :2]).any()
    assert rel_err(out[0, :2], ref.out[0, :2]) < 1e-5


def test_rows_without_keys_are_zero(monkeypatch):
    """Causal with Lq > Lk: the first rows see no key (zeros); with one tile per split, a
    row sees nothing of the splits past its causal horizon (weight 0 in the merge)."""
    monkeypatch.setattr(tiling, "MIN_TILES_PER_SPLIT", 1)
    b, hq, hkv, lq, lk, d, bk = 1, 2, 1, 5, 3, 8, 2
    q, k, v = random_qkv(5, b, hq, hkv, lq, lk, d, dtype=np.float32)
    out, tile_map = run_decode(q, k, v, 0.0, True, bk)
    expect = reference.dense_attention(q, k, v, causal=True)
    assert (out[:, :, :2] == 0).all()  # rows 0, 1: i + Lk - Lq < 0
    assert rel_err(out, expect) < 1e-5
    ref = reference.blasst_attention_reference(q, k, v, 0.0, causal=True, block_k=bk)
    np.testing.assert_array_equal(tile_map, ref.tile_map)


# ---------------------------------------------------------------------------------------
# the seeded skip test (docs/DESIGN.md §3.5): both seeds, every version, as the reference
# ---------------------------------------------------------------------------------------

def _far_from_the_sink(lk, d, block_k, dtype):
    """GQA 4/1: a strong sink at key 0, weak keys elsewhere, one bright key in tile 9.
    With chunks of 4 tiles, the seeded test skips all of chunk 1 and chunk 2's first tile;
    the unseeded one computes every chunk's first tile."""
    rng = np.random.default_rng(11)
    q, k, v = random_qkv(rng, 1, 4, 1, 1, lk, d, dtype=np.float64)
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    q = 2.0 * u + 0.3 * q
    k *= 0.2
    k[0, 0, 0] = 4.0 * math.sqrt(d) * u
    k[0, 0, 9 * block_k + 3] = 3.5 * math.sqrt(d) * u
    return tuple(np.ascontiguousarray(x.astype(dtype)) for x in (q, k, v))


SEED_CASES = [  # (lk, d, block_k, dtype, causal)
    (96, 8, 8, np.float32, False),  # v1 only (v2 needs 16-byte rows over whole rounds)
    (96, 16, 8, np.float32, True),  # v1 and v2
    (93, 16, 8, np.float16, False),  # v1 and v2, partial last tile
]


@pytest.mark.parametrize("seeded", [True, False], ids=["sink", "none"])
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", SEED_CASES, ids=lambda c: f"{c[:3]}-{np.dtype(c[3]).name}")
def test_seeded_decode_like_reference(case, version, seeded, monkeypatch):
    """Both seeds, every SIMT version: the reference's tile map (a chunk that skips every
    tile, a chunk whose first tile is skipped) and its output (zero-weight partials)."""
    lk, d, bk, dtype, causal = case
    monkeypatch.setattr(tiling, "MIN_TILES_PER_SPLIT", 4)
    q, k, v = _far_from_the_sink(lk, d, bk, dtype)
    if version == 2 and not _v2_applies(q, k, v, bk):
        return _assert_v2_refused(q, k, v, causal, bk)
    seed = "sink" if seeded else "none"
    ref = reference.blasst_attention_reference(q, k, v, 1e-2, causal=causal, block_k=bk,
                                               decode_seed=seed)
    codes = ref.tile_map[0, 0, 0]
    if seeded:
        assert (codes[4:8] == reference.SKIPPED).all() and codes[8] == reference.SKIPPED
    else:
        assert codes[4] == codes[8] == reference.COMPUTED
    out, tile_map = run_decode(q, k, v, 1e-2, causal, bk, version=version, seeded=seeded)
    excused = _assert_maps_agree(tile_map, ref)
    assert not np.isnan(out).any()
    assert rel_err(out, ref.out) < (TOL[dtype] if not excused else 1e-2)


@pytest.mark.parametrize("version", VERSIONS)
def test_seed_skips_a_superset_on_the_gpu(version, monkeypatch):
    """Same data and threshold: every tile the unseeded kernel skips, the seeded one skips."""
    monkeypatch.setattr(tiling, "MIN_TILES_PER_SPLIT", 3)
    q, k, v = random_qkv(5, 1, 4, 2, 1, 192, 16, dtype=np.float32, q_scale=1.5, sink=12.0)
    maps = {s: run_decode(q, k, v, 0.05, False, 16, version=version, seeded=s)[1]
            for s in (False, True)}
    assert ((maps[False] == reference.SKIPPED) <= (maps[True] == reference.SKIPPED)).all()
    assert (maps[True] == reference.SKIPPED).sum() > (maps[False] == reference.SKIPPED).sum()
