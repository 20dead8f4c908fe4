"""Tensor cores: the fragment layouts, the PTX intrinsics and the v3 prefill kernel.

Three levels, each able to fail on its own:

1. **Layouts in numpy** (no CUDA at all): an mma emulated lane by lane over the layouts of
   :mod:`blasst_ref.cuda.fragments` equals ``A @ B``; an ``ldmatrix`` emulated over the
   addresses the kernels give each lane delivers exactly the A / B fragments the mma
   expects; the S accumulators reinterpreted as P's A operand are the right elements.
2. **The intrinsics in a kernel**: ``cp.async`` -> ``ldmatrix`` (plain and ``.trans``) ->
   ``mma.sync`` (fp16 and bf16) on one warp equals numpy. On the simulator these are the
   twins of :mod:`blasst_ref.cuda.mma`; on a GPU the PTX instructions.
3. **The v3 prefill kernel** against the tile-by-tile reference: output within dtype
   tolerance, *and the same tile map* (skip decisions), on causal / ragged / GQA / Lq > Lk /
   BLASST-skipping inputs. The output is poisoned (NaN bits) before each launch.

On the simulator the sizes are tiny (one or two warps, a few tiles: every warp-level
instruction is a Python barrier there). On a GPU, ``BLASST_CUDA_TEST_SCALE=gpu`` runs real
sizes (L up to 2k, D 64/128, block_q 64/128).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from blasst_ref import blasst_attention_reference, workloads
from blasst_ref.cuda import fragments as F

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
GPU_SCALE = os.environ.get("BLASST_CUDA_TEST_SCALE", "") == "gpu"

# the simulator evaluates -inf - -inf (a row that saw nothing yet) in numpy: harmless there
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _bf16_bits(x) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (no NaN in these inputs)."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _bf16_values(bits) -> np.ndarray:
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def _bits(x, bf16: bool):
    """(16-bit array of the values' bits, the float32 values they stand for)."""
    if bf16:
        b = _bf16_bits(x)
        return b, _bf16_values(b)
    h = np.asarray(x, np.float16)
    return h.view(np.uint16), h.astype(np.float32)


# ---- 1. layouts in numpy ------------------------------------------------------------------


def test_fragment_layouts_cover_each_element_once():
    a = {F.a_coords(ln, e) for ln in range(32) for e in range(8)}
    b = {F.b_coords(ln, e) for ln in range(32) for e in range(4)}
    c = {F.c_coords(ln, e) for ln in range(32) for e in range(4)}
    assert a == {(r, k) for r in range(16) for k in range(16)}
    assert b == {(k, n) for k in range(16) for n in range(8)}
    assert c == {(r, n) for r in range(16) for n in range(8)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_emulated_mma_equals_matmul(seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((16, 16)).astype(np.float16).astype(np.float32)
    b = rng.standard_normal((16, 8)).astype(np.float16).astype(np.float32)
    c = rng.standard_normal((16, 8)).astype(np.float32)
    d = F.mma_emulate(F.a_fragments(a), F.b_fragments(b), F.c_fragments(c))
    np.testing.assert_allclose(F.c_from_fragments(d), a @ b + c, rtol=1e-5, atol=1e-5)


def _flat_tile(rows, cols, row_stride, rng):
    """A (rows x cols) tile of distinct values in a flat smem with padded rows."""
    smem = np.full(rows * row_stride, -1.0, np.float32)
    tile = rng.permutation(rows * cols).reshape(rows, cols).astype(np.float32)
    for r in range(rows):
        smem[r * row_stride:r * row_stride + cols] = tile[r]
    return smem, tile


def test_ldmatrix_addresses_give_the_a_fragment():
    rng = np.random.default_rng(3)
    stride = 24  # padded rows, as the kernels lay them out
    smem, tile = _flat_tile(16, 16, stride, rng)
    addr = [F.a_tile_address(ln)[0] * stride + F.a_tile_address(ln)[1] for ln in range(32)]
    regs = F.ldmatrix_emulate(smem, addr)  # (32, 4, 2)
    np.testing.assert_array_equal(regs.reshape(32, 8), F.a_fragments(tile))


def test_ldmatrix_addresses_give_b_fragments_of_a_key_tile():
    """K tile [key, dim] (N-major B): registers 0-1 / 2-3 are the fragments of keys 0-7 / 8-15."""
    rng = np.random.default_rng(4)
    stride = 24
    smem, ktile = _flat_tile(16, 16, stride, rng)  # 16 keys x 16 dims
    addr = [F.b_pair_address(ln)[0] * stride + F.b_pair_address(ln)[1] for ln in range(32)]
    regs = F.ldmatrix_emulate(smem, addr).reshape(32, 8)
    np.testing.assert_array_equal(regs[:, :4], F.b_fragments(ktile[:8].T))  # B = K^T
    np.testing.assert_array_equal(regs[:, 4:], F.b_fragments(ktile[8:].T))


def test_ldmatrix_trans_addresses_give_b_fragments_of_a_value_tile():
    """V tile [key, dim] (K-major B) through .trans: fragments of dims 0-7 / 8-15."""
    rng = np.random.default_rng(5)
    stride = 24
    smem, vtile = _flat_tile(16, 16, stride, rng)  # 16 keys x 16 dims
    addr = [F.bt_pair_address(ln)[0] * stride + F.bt_pair_address(ln)[1] for ln in range(32)]
    regs = F.ldmatrix_emulate(smem, addr, trans=True).reshape(32, 8)
    np.testing.assert_array_equal(regs[:, :4], F.b_fragments(vtile[:, :8]))
    np.testing.assert_array_equal(regs[:, 4:], F.b_fragments(vtile[:, 8:]))


def test_s_accumulators_are_the_a_operand_of_pv():
    """P's A fragment for keys 16j..16j+15 is built from the C fragments of n-tiles 2j, 2j+1."""
    rng = np.random.default_rng(6)
    p = rng.standard_normal((16, 16)).astype(np.float32)
    c_even, c_odd = F.c_fragments(p[:, :8]), F.c_fragments(p[:, 8:])
    recipe = F.p_as_a_operand(0, 1)
    a = np.empty((32, 8), np.float32)
    for reg, (tile, first) in enumerate(recipe):
        src = c_even if tile == 0 else c_odd
        a[:, 2 * reg] = src[:, first]
        a[:, 2 * reg + 1] = src[:, first + 1]
    np.testing.assert_array_equal(a, F.a_fragments(p))


# ---- 2. the intrinsics in a kernel ----------------------------------------------------------

cuda = pytest.importorskip("numba.cuda")
from blasst_ref.cuda import mma as X  # noqa: E402
from blasst_ref.cuda import prefill_v3 as P  # noqa: E402


def _intrinsics_kernel(bf16: bool):
    from numba import float32, uint16

    mma = X.mma_bf16 if bf16 else X.mma_f16

    @cuda.jit
    def kernel(a, kt, vt, s_out, o_out):
        """S = A @ K^T (16 x 16) and O = A @ V (16 x 16) with K, V tiles of 16 keys."""
        lane = cuda.threadIdx.x
        sm = cuda.shared.array(0, uint16)
        for i in range(3):  # three 16 x 16 tiles, rows padded to 24 elements
            for j in range(2):
                ch = lane + 32 * j  # 64 chunks of 8 elements per tile... 32 used
                if ch < 32:
                    r, c8 = ch // 2, (ch % 2) * 8
                    src = a if i == 0 else (kt if i == 1 else vt)
                    X.cp_async16(sm, i * 384 + r * 24 + c8, src, r * 16 + c8, 16)
        X.cp_async_commit()
        X.cp_async_wait_all()
        cuda.syncthreads()
        ar, ac = X.a_tile_address(lane)
        a0, a1, a2, a3 = X.ldmatrix_x4(sm, ar * 24 + ac)
        br, bc = X.b_pair_address(lane)
        b0, b1, b2, b3 = X.ldmatrix_x4(sm, 384 + br * 24 + bc)
        vr, vc = X.bt_pair_address(lane)
        v0, v1, v2, v3 = X.ldmatrix_x4_trans(sm, 768 + vr * 24 + vc)
        z = float32(0.0)
        s_lo = mma(a0, a1, a2, a3, b0, b1, z, z, z, z)
        s_hi = mma(a0, a1, a2, a3, b2, b3, z, z, z, z)
        o_lo = mma(a0, a1, a2, a3, v0, v1, z, z, z, z)
        o_hi = mma(a0, a1, a2, a3, v2, v3, z, z, z, z)
        for e in range(4):
            row, col = X.c_coords(lane, e)
            s_out[row, col] = s_lo[e]
            s_out[row, col + 8] = s_hi[e]
            o_out[row, col] = o_lo[e]
            o_out[row, col + 8] = o_hi[e]

    return kernel


@pytest.mark.parametrize("bf16", [False, True], ids=["fp16", "bf16"])
def test_intrinsics_kernel_equals_numpy(bf16):
    rng = np.random.default_rng(7)
    (ab, af), (kb, kf), (vb, vf) = (_bits(rng.standard_normal((16, 16)), bf16) for _ in range(3))
    s = np.full((16, 16), np.nan, np.float32)
    o = np.full((16, 16), np.nan, np.float32)
    s_d, o_d = cuda.to_device(s), cuda.to_device(o)
    _intrinsics_kernel(bf16)[1, 32, 0, 3 * 384 * 2](
        cuda.to_device(ab.ravel()), cuda.to_device(kb.ravel()), cuda.to_device(vb.ravel()),
        s_d, o_d)
    np.testing.assert_allclose(s_d.copy_to_host(), af @ kf.T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(o_d.copy_to_host(), af @ vf, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp16", "bf16"])
def test_pack_rounds_to_nearest_even(bf16):
    from numba import float32

    pack = X.pack_bf16x2 if bf16 else X.pack_f16x2

    @cuda.jit
    def kernel(x, out):
        i = cuda.threadIdx.x
        out[i] = pack(float32(x[2 * i]), float32(x[2 * i + 1]))

    rng = np.random.default_rng(8)
    x = (rng.standard_normal(64) * 10).astype(np.float32)
    out = cuda.to_device(np.zeros(32, np.uint32))
    kernel[1, 32](cuda.to_device(x), out)
    w = out.copy_to_host()
    lo, hi = (w & 0xFFFF).astype(np.uint16), (w >> 16).astype(np.uint16)
    expect = _bf16_bits(x) if bf16 else x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(lo, expect[0::2])
    np.testing.assert_array_equal(hi, expect[1::2])


# ---- 3. the v3 prefill kernel ---------------------------------------------------------------

# (B, Hq, Hkv, Lq, Lk, D, causal, block_q, block_k, thresh, llm_like)
if GPU_SCALE:
    CASES = {
        "dense-d128": (2, 8, 8, 1024, 1024, 128, False, 64, 64, 0.0, False),
        "causal-gqa-d64": (1, 8, 2, 1000, 1000, 64, True, 128, 64, 0.0, False),
        "ragged-lq<lk": (1, 4, 4, 333, 1111, 128, True, 64, 64, 0.0, False),
        "lq>lk": (1, 4, 2, 900, 500, 64, True, 64, 64, 0.0, False),
        "blasst-causal": (1, 8, 2, 2048, 2048, 128, True, 128, 64, 0.05, True),
        "blasst-d64-bq64": (1, 4, 4, 1500, 1500, 64, False, 64, 32, 0.1, True),
    }
else:
    CASES = {
        "causal-gqa": (1, 2, 1, 40, 56, 64, True, 16, 32, 0.0, False),
        "lq>lk": (1, 1, 1, 40, 24, 64, True, 32, 32, 0.0, False),
        "blasst": (1, 2, 1, 32, 96, 64, False, 16, 32, 0.3, True),
        "blasst-causal-d128": (1, 1, 1, 48, 64, 128, True, 16, 32, 0.2, True),
    }
TOL = {False: 3e-3, True: 2e-2}  # fp16, bf16 operands (P rounded to 16 bits too)


def _inputs(case, seed, bf16):
    b, hq, hkv, lq, lk, d, causal, bq, bk, thresh, llm = case
    if llm:
        q, k, v = workloads.llm_like(b, hq, hkv, lq, lk, d, seed=seed)
    else:
        rng = np.random.default_rng(seed)
        q, k, v = (rng.standard_normal(s) for s in
                   ((b, hq, lq, d), (b, hkv, lk, d), (b, hkv, lk, d)))
    return [_bits(x, bf16) for x in (q, k, v)]


# every case in fp16 and bf16 on a GPU; on the simulator (one Python thread per GPU thread)
# bf16 runs on the skipping case only
V3_PARAMS = [(name, bf16) for name in CASES for bf16 in (False, True)
             if not (SIM and bf16 and name != "blasst")]


@pytest.mark.parametrize("name,bf16", V3_PARAMS,
                         ids=[f"{n}-{'bf16' if b else 'fp16'}" for n, b in V3_PARAMS])
def test_v3_prefill_matches_reference(name, bf16):
    case = CASES[name]
    b, hq, hkv, lq, lk, d, causal, bq, bk, thresh, _ = case
    (qb, qf), (kb, kf), (vb, vf) = _inputs(case, seed=len(name), bf16=bf16)
    out = np.full((b, hq, lq, d), 0x7FC0 if bf16 else 0x7E00, np.uint16)  # NaN bits
    n_map = (b, hq, -(-lq // bq), -(-lk // bk))
    tile_map = np.zeros(n_map, np.int8)
    lse = np.full((b, hq, lq), np.nan, np.float32)
    d_out, d_map, d_lse = (cuda.to_device(x) for x in (out, tile_map, lse))
    log_thresh = -math.inf if thresh == 0 else math.log(thresh)
    P.launch(*(cuda.to_device(x) for x in (qb, kb, vb)), d_out, d_map, log_thresh, causal,
             1 / math.sqrt(d), bq, bk, bf16=bf16, lse=d_lse)
    got = d_out.copy_to_host()
    got = _bf16_values(got) if bf16 else got.view(np.float16).astype(np.float32)
    ref = blasst_attention_reference(qf, kf, vf, thresh, causal=causal, block_q=bq, block_k=bk)
    got_map = d_map.copy_to_host()
    # same decisions, except where the reference's margin is within rounding of the threshold
    differ = got_map != ref.tile_map
    assert not np.any(differ & ~(np.abs(ref.margin) < 1e-2)), "skip decisions differ"
    if thresh > 0:
        assert np.any(ref.tile_map == 2), "the case is meant to skip tiles"
    if np.any(differ):
        pytest.skip("a decision within rounding of the threshold differs; outputs not comparable")
    assert not np.isnan(got).any(), "an output element was not written"
    assert _rel(got, ref.out) < TOL[bf16]
    # log-sum-exp of the kept scores (natural log, scaled scores), per row
    got_lse = d_lse.copy_to_host()
    want = _kept_lse(qf, kf, ref.tile_map, causal, bq, bk)
    np.testing.assert_array_equal(np.isneginf(got_lse), np.isneginf(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got_lse[fin], want[fin], rtol=0, atol=2e-3 if not bf16 else 2e-2)


def _kept_lse(q, k, tile_map, causal, bq, bk):
    """float64 log-sum-exp over the keys of kept tiles each query row sees."""
    b_, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    s = np.einsum("bhid,bhjd->bhij", q.astype(np.float64),
                  np.repeat(k.astype(np.float64), hq // hkv, axis=1)) / math.sqrt(d)
    i, j = np.arange(lq)[:, None], np.arange(lk)[None, :]
    visible = (j <= i + lk - lq) if causal else np.ones((lq, lk), bool)
    kept = np.repeat(np.repeat(tile_map == 1, bq, axis=2)[:, :, :lq], bk, axis=3)[..., :lk]
    s = np.where(visible & kept, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        lse = m[..., 0] + np.log(np.exp(s - np.where(np.isfinite(m), m, 0)).sum(-1))
    return np.where(np.isfinite(m[..., 0]), lse, -np.inf)


# ---- 4. the v3 decode kernel (one warp per split-KV chunk) ---------------------------------

from blasst_ref import tiling  # noqa: E402
from blasst_ref.cuda import decode_v3 as DV3  # noqa: E402
from blasst_ref.cuda.combine import merge_kernel  # noqa: E402

# (B, Hq, Hkv, Lq, Lk, D, causal, block_k, split_tiles, thresh, llm_like)
if GPU_SCALE:
    DECODE_CASES = {
        "gqa4-d128": (4, 32, 8, 1, 4000, 128, False, 64, 8, 0.0, False),
        "gqa16-lq1-d64": (2, 16, 1, 1, 3000, 64, False, 64, 5, 0.0, False),
        "lq4-causal": (2, 8, 2, 4, 2500, 128, True, 32, 7, 0.0, False),
        "blasst-gqa4": (2, 32, 8, 1, 8192, 128, False, 64, 32, 0.02, True),
    }
else:
    DECODE_CASES = {
        "gqa4": (1, 4, 1, 1, 200, 64, False, 32, 2, 0.0, False),
        "lq2-causal": (1, 4, 2, 2, 150, 64, True, 32, 2, 0.0, False),
        "blasst": (1, 4, 1, 1, 256, 64, False, 32, 2, 0.3, True),
    }


@pytest.fixture
def split_tiles(monkeypatch):
    """Force the split-KV chunk length (the reference and the kernel read it from tiling),
    so that small inputs have several chunks and some chunks skip everything."""
    def use(n):
        monkeypatch.setattr(tiling, "decode_split_tiles", lambda lk, bk: n)
        monkeypatch.setattr(tiling, "decode_num_splits",
                            lambda lk, bk: -(-tiling.num_tiles(lk, bk) // n))
    return use


#: (case, seeded): every case unseeded; the seeded test (decode_seed="sink") where thresh > 0
#: (at thresh = 0 nothing votes, and the kernel scores no seed)
_V3_DECODE_PARAMS = [pytest.param(n, False, id=f"{n}-none") for n in DECODE_CASES] + [
    pytest.param(n, True, id=f"{n}-sink") for n, c in DECODE_CASES.items() if c[9] > 0]


@pytest.mark.parametrize("name, seeded", _V3_DECODE_PARAMS)
def test_v3_decode_matches_reference(name, seeded, split_tiles):
    b, hq, hkv, lq, lk, d, causal, bk, st, thresh, llm = DECODE_CASES[name]
    split_tiles(st)
    bf16 = False
    (qb, qf), (kb, kf), (vb, vf) = _inputs((b, hq, hkv, lq, lk, d, causal, 0, bk, thresh, llm),
                                           seed=len(name), bf16=bf16)
    n_kt = tiling.num_tiles(lk, bk)
    ns = tiling.decode_num_splits(lk, bk)
    k_tiles = tiling.causal_k_tiles(0, lq, lq, lk, bk) if causal else n_kt
    rows = hq // hkv * lq
    part = [cuda.to_device(np.full(s, np.nan, np.float32))
            for s in ((b * hkv * ns, rows), (b * hkv * ns, rows), (b * hkv * ns, rows, d))]
    d_map = cuda.to_device(np.zeros((b, hkv, 1, n_kt), np.int8))
    d_out = cuda.to_device(np.full((b, hq, lq, d), np.nan, np.float16))
    log_thresh = -math.inf if thresh == 0 else math.log(thresh)
    DV3.prepare(*(cuda.to_device(x) for x in (qb, kb, vb)), *part, d_map, log_thresh, causal,
                1 / math.sqrt(d), bk, k_tiles, st, ns, seeded=seeded)()
    merge_kernel[b * hkv * rows, 32](*part, causal, lk, ns, d_out)
    ref = blasst_attention_reference(qf, kf, vf, thresh, causal=causal, block_k=bk,
                                     decode_seed="sink" if seeded else "none")
    got_map = d_map.copy_to_host()
    differ = got_map != ref.tile_map
    assert not np.any(differ & ~(np.abs(ref.margin) < 1e-2)), "skip decisions differ"
    if thresh > 0:
        assert np.any(ref.tile_map == 2), "the case is meant to skip tiles"
    if np.any(differ):
        pytest.skip("a decision within rounding of the threshold differs; outputs not comparable")
    got = d_out.copy_to_host().astype(np.float32)
    assert not np.isnan(got).any(), "an output element was not written"
    assert _rel(got, ref.out) < TOL[bf16]


def test_v3_decode_seeded_skips_more_within_the_bound(split_tiles):
    """The seeded test skips at least every tile the unseeded test skips (its reference
    ``max(m, s0)`` is never below ``m``), strictly more on LLM-like inputs, and the output
    stays within the error bound of dense attention."""
    b, hq, hkv, lq, lk, d, bk, st = (1, 4, 1, 1, 256, 64, 32, 2) if SIM else \
        (4, 32, 8, 1, 8192, 128, 64, 16)
    split_tiles(st)
    (qb, qf), (kb, kf), (vb, vf) = _inputs((b, hq, hkv, lq, lk, d, False, 0, bk, 0.3, True),
                                           seed=11, bf16=False)
    n_kt = tiling.num_tiles(lk, bk)
    ns = tiling.decode_num_splits(lk, bk)
    rows = hq // hkv
    maps, outs = {}, {}
    for seeded in (False, True):
        part = [cuda.to_device(np.full(s, np.nan, np.float32))
                for s in ((b * hkv * ns, rows), (b * hkv * ns, rows), (b * hkv * ns, rows, d))]
        d_map = cuda.to_device(np.zeros((b, hkv, 1, n_kt), np.int8))
        d_out = cuda.to_device(np.full((b, hq, lq, d), np.nan, np.float16))
        DV3.prepare(*(cuda.to_device(x) for x in (qb, kb, vb)), *part, d_map, math.log(0.3),
                    False, 1 / math.sqrt(d), bk, n_kt, st, ns, seeded=seeded)()
        merge_kernel[b * hkv * rows, 32](*part, False, lk, ns, d_out)
        maps[seeded], outs[seeded] = d_map.copy_to_host(), d_out.copy_to_host()
    assert np.all((maps[False] == 2) <= (maps[True] == 2)), "seeding must not un-skip a tile"
    assert (maps[True] == 2).sum() > (maps[False] == 2).sum()
    from blasst_ref import dense_attention

    dense = dense_attention(qf, kf, vf)
    vmax = np.abs(vf).max()
    # the error bound per row: 2 max|v| thresh n_skipped / l_kept, with l_kept >= 1
    n_skipped = (maps[True] == 2).sum(axis=(2, 3)) * bk  # (B, Hkv): per kv group
    bound = 2 * vmax * 0.3 * np.repeat(n_skipped, hq // hkv, axis=1)[..., None, None]
    err = np.abs(outs[True].astype(np.float64) - dense)
    assert np.all(err <= bound + 2e-3)
