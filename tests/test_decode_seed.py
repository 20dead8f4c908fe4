"""The seeded split-KV decode test (docs/DESIGN.md §3.5): ``attention(..., decode_seed=...)``.

``decode_seed="sink"`` (the default) makes every split-KV chunk test its tiles against
``max(m_r, s0_r)``, ``s0_r`` row ``r``'s max scaled score over key tile 0; ``"none"`` keeps
each chunk's own running max. What is checked here, against float64 recomputations and an
independent numpy model of the unseeded rule:

* the §3.4 error bound holds per row with the seed, on decode shapes with several chunks
  (chunks that skip everything, a chunk whose first tile is skipped, ``Lk`` not a multiple
  of the tile, GQA groups of 1 / 4 / 8, MLA's 576 / 512);
* the seeded test skips every tile the unseeded one skips (same data, same threshold): its
  reference is never lower, and a float subtraction is monotone in it;
* ``"none"`` reproduces the unseeded tile maps (an independent model of the old rule), and
  with a single chunk the two seeds are the same rule;
* the reference, the CPU kernel and the CUDA kernels (simulator in CI) take the same
  decisions, both seeds;
* a bad ``decode_seed`` is a ``ValueError`` that names the allowed values.

At the test sizes the tiling's minimum of ``MIN_TILES_PER_SPLIT`` tiles per chunk would leave
one chunk, so the tests lower it (``MonkeyPatch.context()``; Hypothesis rejects
function-scoped fixtures).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
from conftest import HOST_BACKENDS
from helpers import assert_error_bound, random_qkv, rel_err
from hypothesis import event, given, target
from hypothesis import strategies as st

from blasst_ref import attention, dense_attention, reference, rule, tiling
from blasst_ref.reference import COMPUTED, NOT_VISITED, SKIPPED

DTYPES = [pytest.param(np.float64, id="float64"), pytest.param(np.float32, id="float32"),
          pytest.param(np.float16, id="float16")]
SEEDS = list(rule.DECODE_SEEDS)


# ---------------------------------------------------------------------------------------
# inputs: decode shapes with several chunks


@st.composite
def decode_cases(draw, dtype, mla: bool = False):
    """``(q, k, v, causal, block_k, min_split)``: a decode problem with 2 to 6 split-KV
    chunks of ``min_split`` tiles, peaked inputs (an attention sink in key tile 0, so that
    the seed has something to say), GQA groups of 1, 4 or 8 (MLA: one kv head, 576 / 512)."""
    if mla:
        hkv, group, dqk, dv = 1, draw(st.sampled_from([1, 4])), 576, 512
        lq = 1
        block_k = draw(st.sampled_from([8, 13, 16]))
        min_split = draw(st.integers(1, 2))
    else:
        hkv = draw(st.integers(1, 2))
        group = draw(st.sampled_from([1, 4, 8]))
        lq = draw(st.sampled_from([1, 1, 2, 3]))
        dqk = draw(st.sampled_from([8, 16, 32, 5]))
        dv = draw(st.sampled_from([dqk, 12]))
        block_k = draw(st.sampled_from([3, 4, 5, 8, 16]))
        min_split = draw(st.integers(1, 4))
    n_chunks = draw(st.integers(2, 6))
    n_tiles = min_split * (n_chunks - 1) + draw(st.integers(1, min_split))
    lk = max(1, (n_tiles - 1) * block_k + draw(st.integers(1, block_k)))  # partial last tile
    causal = draw(st.booleans())
    b = draw(st.integers(1, 2)) if not mla else 1
    seed = draw(st.integers(0, 2**32 - 1))
    q_scale = draw(st.floats(1.0, 3.0))
    sink = draw(st.floats(6.0, 24.0))
    q, k, v = random_qkv(seed, b, hkv * group, hkv, lq, lk, dqk, dv, dtype=dtype,
                         q_scale=q_scale, sink=sink)
    return q, k, v, causal, block_k, min_split


@contextlib.contextmanager
def _chunks(min_split):
    """A context that sets the tiling's minimum tiles per split-KV chunk."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiling, "MIN_TILES_PER_SPLIT", min_split)
        yield


def _scores(q, k, causal):
    """``(B, Hq, Lq, Lk)`` float64 scaled scores, masked ``-inf``."""
    b, hq, lq, dqk = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    kk = np.repeat(k.astype(np.float64), hq // hkv, axis=1)
    s = np.einsum("bhid,bhjd->bhij", q.astype(np.float64), kk) / math.sqrt(dqk)
    if causal:
        vis = np.arange(lk)[None, :] <= np.arange(lq)[:, None] + (lk - lq)
        s = np.where(vis, s, -np.inf)
    return s


def _key_codes(tile_map, hq, lq, lk, block_k):
    """``(B, Hq, Lq, Lk)`` tile code of every (row, key) from a decode tile map."""
    b, hkv = tile_map.shape[:2]
    per_group = tile_map[:, :, 0][..., np.arange(lk) // block_k]  # (B, Hkv, Lk)
    per_head = np.repeat(per_group, hq // hkv, axis=1)[:, :, None, :]
    return np.broadcast_to(per_head, (b, hq, lq, lk))


def _assert_bound(out, q, k, v, causal, thresh, tile_map, block_k, dtype):
    """§3.4 per row: ``|out - dense| <= 2 max|v| thresh n_skipped / l_kept`` (+ dtype
    tolerance), and its lemma: every skipped key is below ``thresh`` relative to the row's
    final max (the seed's reference is a kept score: never above it)."""
    hq, lq, lk = q.shape[1], q.shape[2], k.shape[2]
    assert_error_bound(out, dense_attention(q, k, v, causal=causal), _scores(q, k, causal),
                       _key_codes(tile_map, hq, lq, lk, block_k),
                       np.repeat(v.astype(np.float64), hq // k.shape[1], axis=1), thresh, dtype)


def _chunk_skips_everything(tile_map, split_tiles) -> bool:
    """Whether some chunk after the first skipped every tile it visited."""
    n_kt = tile_map.shape[-1]
    for c0 in range(split_tiles, n_kt, split_tiles):
        codes = tile_map[..., c0:c0 + split_tiles]
        visited = codes != NOT_VISITED
        full = np.all(~visited | (codes == SKIPPED), axis=-1) & visited.any(axis=-1)
        if full.any():
            return True
    return False


# ---------------------------------------------------------------------------------------
# the error bound, with the seed


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@given(data=st.data())
def test_seeded_error_bound_per_row(backend, dtype, data):
    """The §3.4 bound holds per row under the seeded test, on decode shapes with several
    chunks (some of which skip every tile, or their first one)."""
    q, k, v, causal, bk, min_split = data.draw(decode_cases(dtype))
    thresh = data.draw(st.floats(math.log(1e-4), math.log(0.5)).map(math.exp), label="thresh")
    with _chunks(min_split):
        assert tiling.decode_num_splits(k.shape[2], bk) > 1
        out, stats = attention(q, k, v, thresh, causal=causal, block_k=bk, backend=backend,
                               return_stats=True)
        split_tiles = tiling.decode_split_tiles(k.shape[2], bk)
    assert stats.phase == "decode"
    target(stats.sparsity, label="sparsity")
    first = stats.tile_map[..., split_tiles::split_tiles]
    event("a chunk's first tile skipped" if (first == SKIPPED).any() else "no first tile skipped")
    event("a chunk skips everything" if _chunk_skips_everything(stats.tile_map, split_tiles)
          else "every chunk keeps a tile")
    _assert_bound(out, q, k, v, causal, thresh, stats.tile_map, bk, dtype)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@given(data=st.data())
def test_seeded_error_bound_mla(backend, data):
    """MLA in its absorbed form (one latent kv head, ``Dqk = 576``, ``Dv = 512``)."""
    q, k, v, causal, bk, min_split = data.draw(decode_cases(np.float32, mla=True))
    thresh = data.draw(st.sampled_from([1e-3, 1e-2, 0.1]), label="thresh")
    with _chunks(min_split):
        out, stats = attention(q, k, v, thresh, causal=causal, block_k=bk, backend=backend,
                               return_stats=True)
    _assert_bound(out, q, k, v, causal, thresh, stats.tile_map, bk, np.float32)


# ---------------------------------------------------------------------------------------
# the seed only ever adds skips; "none" is the old rule


def _unseeded_tile_map(q, k, causal, thresh, block_k):
    """An independent numpy model of the unseeded split-KV rule (each chunk against its own
    running max of kept tiles), in float64: the tile maps before the seed existed."""
    s = _scores(q, k, causal)  # (B, Hq, Lq, Lk)
    b, hq, lq, lk = s.shape
    hkv = k.shape[1]
    group = hq // hkv
    n_kt = tiling.num_tiles(lk, block_k)
    split = tiling.decode_split_tiles(lk, block_k)
    k_tiles = tiling.visited_k_tiles(lq, lq, lk, block_k, causal)
    out = np.zeros((b, hkv, 1, n_kt), np.int8)
    log_t = math.log(thresh)
    for bi in range(b):
        for g in range(hkv):
            rows = s[bi, g * group:(g + 1) * group].reshape(group * lq, lk)
            for c0 in range(0, k_tiles, split):
                m = np.full(group * lq, -np.inf)
                for kt in range(c0, min(k_tiles, c0 + split)):
                    tmax = rows[:, kt * block_k:(kt + 1) * block_k].max(axis=1)
                    with np.errstate(invalid="ignore"):
                        skip = np.all(tmax - m < log_t)
                    out[bi, g, 0, kt] = SKIPPED if skip else COMPUTED
                    if not skip:
                        m = np.maximum(m, tmax)
    return out


def _excused(margin):
    """Tiles whose reference margin lies within float32 rounding of the threshold."""
    return np.abs(np.nan_to_num(margin, nan=np.inf)) < 1e-4


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@given(data=st.data())
def test_seed_skips_a_superset_and_none_is_the_old_rule(backend, data):
    """Same data, same threshold: every tile ``"none"`` skips, ``"sink"`` skips too (exactly,
    in floating point: ``max(m, s0) >= m`` at every tile, by induction over the chunk, and
    ``tile_max - ref`` is monotone in ``ref``); ``"none"`` makes the decisions of an
    independent float64 model of the unseeded rule (up to tiles within rounding of the
    threshold); a single chunk is the same for both seeds."""
    q, k, v, causal, bk, min_split = data.draw(decode_cases(np.float32))
    thresh = data.draw(st.sampled_from([1e-3, 1e-2, 0.05, 0.3]), label="thresh")
    with _chunks(min_split):
        maps, outs = {}, {}
        for seed in SEEDS:
            outs[seed], st_ = attention(q, k, v, thresh, causal=causal, block_k=bk,
                                        backend=backend, return_stats=True, decode_seed=seed)
            maps[seed] = st_.tile_map
        ref_none = reference.blasst_attention_reference(q, k, v, thresh, causal=causal,
                                                        block_k=bk, decode_seed="none")
        old = _unseeded_tile_map(q, k, causal, thresh, bk)
    np.testing.assert_array_equal(maps["none"] != NOT_VISITED, maps["sink"] != NOT_VISITED)
    assert not np.any((maps["none"] == SKIPPED) & (maps["sink"] != SKIPPED))
    event("the seed skips more" if (maps["sink"] != maps["none"]).any() else "same decisions")
    bad = (maps["none"] != old) & ~_excused(ref_none.margin)
    assert not bad.any(), np.argwhere(bad)[:5]
    # one chunk: chunk 0's running max already covers tile 0, the seed changes nothing
    with _chunks(tiling.num_tiles(k.shape[2], bk)):
        one = [attention(q, k, v, thresh, causal=causal, block_k=bk, backend=backend,
                         return_stats=True, decode_seed=seed) for seed in SEEDS]
    np.testing.assert_array_equal(one[0][1].tile_map, one[1][1].tile_map)
    np.testing.assert_array_equal(one[0][0], one[1][0])


@pytest.mark.parametrize("seed", SEEDS)
@given(data=st.data())
def test_cpu_and_reference_decide_alike(seed, data):
    """The CPU kernel takes the reference's decisions (both seeds), up to tiles within
    rounding of the threshold, and then gives its output."""
    q, k, v, causal, bk, min_split = data.draw(decode_cases(np.float32))
    thresh = data.draw(st.sampled_from([1e-3, 1e-2, 0.05, 0.3]), label="thresh")
    with _chunks(min_split):
        ref = reference.blasst_attention_reference(q, k, v, thresh, causal=causal, block_k=bk,
                                                   decode_seed=seed)
        out, stats = attention(q, k, v, thresh, causal=causal, block_k=bk, backend="cpu",
                               return_stats=True, decode_seed=seed)
    differ = stats.tile_map != ref.tile_map
    assert not (differ & ~_excused(ref.margin)).any()
    if not differ.any():
        assert rel_err(out, ref.out) < 1e-5


# ---------------------------------------------------------------------------------------
# deterministic corner cases: a chunk that skips everything merges as zero weight


def _far_from_the_sink(dtype=np.float32):
    """GQA 4/1, 12 tiles of 8 keys in 3 chunks of 4: a strong sink at key 0, weak keys
    elsewhere except one bright key in chunk 2. Unseeded, chunks 1 and 2 keep their first
    tiles; seeded, chunk 1 skips every tile, and chunk 2 keeps only its bright tile."""
    rng = np.random.default_rng(11)
    q, k, v = random_qkv(rng, 1, 4, 1, 1, 96, 16, dtype=np.float64)
    u = rng.standard_normal(16)
    u /= np.linalg.norm(u)
    q = 2.0 * u + 0.3 * q  # every query row near u: q.u ~ 2
    k *= 0.2  # background scaled scores ~ 0.2 |q| / 4: well below 0
    k[0, 0, 0] = 16.0 * u  # the sink: scaled score ~ 8
    k[0, 0, 9 * 8 + 3] = 14.0 * u  # a bright key in chunk 2 (tile 9): ~ 7
    return tuple(np.ascontiguousarray(x.astype(dtype)) for x in (q, k, v))


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_a_chunk_that_skips_everything_merges_as_zero_weight(backend):
    q, k, v = _far_from_the_sink()
    with _chunks(4):
        assert tiling.decode_num_splits(96, 8) == 3
        res = {s: attention(q, k, v, 1e-2, block_k=8, backend=backend, return_stats=True,
                            decode_seed=s) for s in SEEDS}
    sink_map = res["sink"][1].tile_map[0, 0, 0]
    none_map = res["none"][1].tile_map[0, 0, 0]
    assert (sink_map[4:8] == SKIPPED).all(), sink_map  # chunk 1: everything skipped
    assert sink_map[8] == SKIPPED and sink_map[9] == COMPUTED  # a first tile skipped
    assert none_map[4] == COMPUTED and none_map[8] == COMPUTED  # unseeded: first tiles dense
    assert res["sink"][1].sparsity > res["none"][1].sparsity
    for s in SEEDS:
        out, stats = res[s]
        assert np.isfinite(out).all()
        _assert_bound(out, q, k, v, False, 1e-2, stats.tile_map, 8, np.float32)


# ---------------------------------------------------------------------------------------
# arguments


@pytest.mark.parametrize("bad", ["Sink", "", "first", None, 1, True, ("sink",)])
@pytest.mark.parametrize("lq", [1, 20])
def test_bad_decode_seed_is_a_clear_error(bad, lq):
    q, k, v = random_qkv(0, 1, 2, 1, lq, 24, 8, dtype=np.float32)
    with pytest.raises(ValueError, match=r"decode_seed must be one of 'sink', 'none'"):
        attention(q, k, v, 0.1, decode_seed=bad)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_prefill_ignores_decode_seed(backend):
    q, k, v = random_qkv(1, 1, 2, 1, 40, 60, 8, dtype=np.float32, sink=12.0)
    a = attention(q, k, v, 0.05, causal=True, block_q=16, block_k=8, backend=backend,
                  return_stats=True, decode_seed="sink")
    b = attention(q, k, v, 0.05, causal=True, block_q=16, block_k=8, backend=backend,
                  return_stats=True, decode_seed="none")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1].tile_map, b[1].tile_map)
