"""``attention()`` at the edges of its input space: tile sizes of any integer type and size,
byte orders, scalars that overflow the compute dtype, booleans, and the ``layout`` argument.

Each case here once gave a wrong answer or an unclear error: a huge ``block_q`` made the
CPU kernel visit no tile (uninitialised output), a big-endian float64 input was computed in
float32, ``scale=1e39`` turned float32 outputs into NaN, ``np.int8`` tile sizes reached a
Numba typing error."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import random_qkv, rel_err
from hypothesis import example, given
from hypothesis import strategies as st
from strategies import cases, problems

from blasst_ref import attention, dense_attention


def _qkv(b=1, hq=4, hkv=2, lq=20, lk=24, dqk=8, dv=8, dtype=np.float32, seed=0):
    return random_qkv(seed, b, hq, hkv, lq, lk, dqk, dv, dtype=dtype)


# ---------------------------------------------------------------------------------------
# tile sizes


def _huge_blocks():
    """Tile sizes up to 2**63 - 1, most of them far beyond any length."""
    return st.one_of(st.integers(1, 64), st.integers(2**20, 2**63 - 1),
                     st.sampled_from([10**9, 2**31, 2**32, 2**62, 2**63 - 1]))


@given(problem=problems(max_lq=40, max_lk=60, max_tiles=60), block_q=_huge_blocks(),
       block_k=_huge_blocks(), seed=st.integers(0, 2**32 - 1))
@example(problem=None, block_q=2**63 - 1, block_k=10**9, seed=0)
def test_any_tile_size_is_one_tile_past_the_length(backend, problem, block_q, block_k, seed):
    """A tile at least as long as what it tiles covers all of it: the output and the skip
    decisions are those of a tile of exactly that length, and nothing larger is allocated."""
    p = problem or _default_problem()
    q, k, v = random_qkv(seed, *p.sizes, dtype=np.float32, sink=8.0)
    kw = dict(causal=p.causal, backend=backend, return_stats=True)
    out, st_ = attention(q, k, v, 0.05, block_q=block_q, block_k=block_k, **kw)
    want, st_want = attention(q, k, v, 0.05, block_q=min(block_q, max(p.lq, 128)),
                              block_k=min(block_k, max(p.lk, 64)), **kw)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(st_.tile_map, st_want.tile_map)
    assert st_.block_k == block_k  # the stats report the sizes asked for
    exact = attention(q, k, v, 0.0, block_q=block_q, block_k=block_k, causal=p.causal,
                      backend=backend)
    assert rel_err(exact, dense_attention(q, k, v, causal=p.causal)) < 1e-5


def _default_problem():
    from strategies import Problem

    return Problem(1, 2, 1, 40, 50, 8, 8, True, 16, 16)


_INT_TYPES = (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
              np.uint64, np.intp)


@pytest.mark.parametrize("int_type", _INT_TYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("lq", [20, 3], ids=["prefill", "decode"])
def test_numpy_integer_tile_sizes_are_accepted(backend, int_type, lq):
    q, k, v = _qkv(lq=lq)
    out, st_ = attention(q, k, v, 0.1, causal=True, backend=backend, block_q=int_type(8),
                         block_k=int_type(8), return_stats=True)
    want, st_want = attention(q, k, v, 0.1, causal=True, backend=backend, block_q=8,
                              block_k=8, return_stats=True)
    np.testing.assert_array_equal(out, want)
    assert type(st_.block_k) is int and st_.block_k == 8
    np.testing.assert_array_equal(st_.tile_map, st_want.tile_map)


@pytest.mark.parametrize("value", [np.float32(8.0), np.bool_(True), "8", 8.5])
def test_non_integer_tile_sizes_are_rejected(value):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"block_q must be a positive integer or None"):
        attention(q, k, v, block_q=value)


def test_negative_numpy_tile_size_is_a_value_error():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"block_k must be >= 1, got -3"):
        attention(q, k, v, block_k=np.int8(-3))


# ---------------------------------------------------------------------------------------
# byte order


@given(case=cases(np.float64, max_lq=40, max_lk=60, max_tiles=60),
       order=st.sampled_from([">", "<", "="]), dtype=st.sampled_from(["f2", "f4", "f8"]))
def test_byte_order_does_not_change_the_result(backend, case, order, dtype):
    p = case.problem
    native = [x.astype(dtype) for x in (case.q, case.k, case.v)]
    swapped = [x.astype(order + dtype) for x in native]
    kw = dict(causal=p.causal, backend=backend, block_q=p.block_q, block_k=p.block_k)
    out = attention(*swapped, 0.05, **kw)
    want = attention(*native, 0.05, **kw)
    assert out.dtype == np.dtype(dtype)  # native order out, as numpy's ufuncs give
    np.testing.assert_array_equal(out, want)


def test_big_endian_float64_is_computed_in_float64(backend):
    q, k, v = _qkv(dtype=np.float64)
    out = attention(*(x.astype(">f8") for x in (q, k, v)), backend=backend)
    assert rel_err(out, dense_attention(q, k, v)) < 1e-13


def test_q_k_v_of_one_dtype_in_two_byte_orders_are_accepted(backend):
    q, k, v = _qkv(dtype=np.float32)
    out = attention(q, k.astype(">f4"), v, backend=backend)
    np.testing.assert_array_equal(out, attention(q, k, v, backend=backend))


# ---------------------------------------------------------------------------------------
# scalars


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("scale", [1e39, 1e300, 1e-46, 1e-300])
def test_scale_that_the_compute_dtype_cannot_hold(backend, dtype, scale):
    q, k, v = _qkv(dtype=dtype)
    with pytest.raises(ValueError, match=r"scale=.* is not a finite positive float32"):
        attention(q, k, v, scale=scale, backend=backend)


def test_scale_beyond_float32_is_fine_in_float64(backend):
    q, k, v = _qkv(dtype=np.float64)
    out = attention(q, k, v, scale=1e-40, backend=backend)
    assert rel_err(out, dense_attention(q, k, v, scale=1e-40)) < 1e-12


@pytest.mark.parametrize("name", ["thresh", "scale"])
@pytest.mark.parametrize("value", [10**400, -(10**400)], ids=["big", "-big"])
def test_integers_beyond_float_are_value_errors(name, value):
    q, k, v = _qkv()
    kw = {"thresh": 0.0, "scale": None}
    kw[name] = value
    with pytest.raises(ValueError, match=rf"{name} must be"):
        attention(q, k, v, kw["thresh"], scale=kw["scale"])


@pytest.mark.parametrize("value", ["no", 1, 0, None, "True", [True]])
def test_return_stats_must_be_a_bool(value):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"return_stats must be a bool"):
        attention(q, k, v, return_stats=value)


def test_numpy_bools_are_bools():
    q, k, v = _qkv()
    out, _ = attention(q, k, v, causal=np.bool_(True), return_stats=np.bool_(True))
    assert out.shape == (1, 4, 20, 8)


# ---------------------------------------------------------------------------------------
# layout


def _blhd(x):
    return np.ascontiguousarray(np.swapaxes(x, -3, -2))


@given(case=cases(np.float32, max_lq=40, max_lk=60, max_tiles=60),
       three_d=st.booleans())
def test_blhd_layout_equals_bhld_transposed(backend, case, three_d):
    p = case.problem
    q, k, v = (x[0] if three_d else x for x in (case.q, case.k, case.v))
    kw = dict(causal=p.causal, backend=backend, block_q=p.block_q, block_k=p.block_k,
              return_stats=True)
    out, st_ = attention(_blhd(q), _blhd(k), _blhd(v), 0.05, layout="blhd", **kw)
    want, st_want = attention(q, k, v, 0.05, layout="bhld", **kw)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, _blhd(want))
    np.testing.assert_array_equal(st_.tile_map, st_want.tile_map)
    np.testing.assert_array_equal(st_.per_head, st_want.per_head)


def test_layout_default_is_bhld():
    q, k, v = _qkv()
    np.testing.assert_array_equal(attention(q, k, v), attention(q, k, v, layout="bhld"))


@pytest.mark.parametrize("layout", ["BHLD", "bshd", "", None, 0])
def test_unknown_layout(layout):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"layout must be 'bhld' or 'blhd'"):
        attention(q, k, v, layout=layout)


def test_shape_errors_name_the_layout():
    q, k, v = _qkv(hq=4, hkv=2, lq=20, lk=24)
    # (B, L, H, D) arrays read as (B, H, L, D): 20 query heads against 24 kv heads
    ql, kl, vl = _blhd(q), _blhd(k), _blhd(v)
    with pytest.raises(ValueError, match=r"Hq=20 .*Hkv=24.*layout='bhld'.*"
                                         r"q \(B, Hq, Lq, Dqk\)"):
        attention(ql, kl, vl)
    with pytest.raises(ValueError, match=r"q must be 4-D \(B, Lq, Hq, Dqk\) or 3-D "
                                         r"\(Lq, Hq, Dqk\).*layout='blhd'"):
        attention(q[0, 0], k, v, layout="blhd")
    with pytest.raises(ValueError, match=r"Hq=20 .*Hkv=24.*layout='blhd'.*"
                                         r"q \(B, Lq, Hq, Dqk\)"):
        attention(q, k, v, layout="blhd")  # bhld arrays read as blhd
    with pytest.raises(ValueError, match=r"k and v must have the same length Lk.*"
                                         r"layout='blhd'"):
        attention(ql, kl, vl[:, :23], layout="blhd")


def test_blhd_arrays_read_as_bhld_are_told_apart_only_by_layout():
    """The defect that motivated ``layout``: (B, L, H, D) arrays passed as (B, H, L, D)
    with Hq = Hkv are shape-consistent, so only ``layout`` can say what they are."""
    q, k, v = _qkv(hq=8, hkv=8, lq=20, lk=20)
    wrong = attention(_blhd(q), _blhd(k), _blhd(v))  # 20 "heads" of length 8
    right = attention(_blhd(q), _blhd(k), _blhd(v), layout="blhd")
    np.testing.assert_allclose(right, _blhd(dense_attention(q, k, v)), rtol=1e-4, atol=1e-5)
    assert not np.allclose(wrong, right, atol=1e-3)


def test_scale_of_inf_string_is_still_a_type_error():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"scale must be a positive real number or None"):
        attention(q, k, v, scale="inf")


# ---------------------------------------------------------------------------------------
# layout and byte order on the CUDA backend


def test_blhd_numba_device_arrays_are_refused_with_a_clear_error():
    from numba import cuda

    q, k, v = (cuda.to_device(_blhd(x)) for x in _qkv(lq=20, lk=24))
    with pytest.raises(TypeError, match=r"layout='blhd' on the CUDA backend needs torch "
                                        r"tensors or CuPy arrays.*q is a .*'bhld'"):
        attention(q, k, v, layout="blhd")


def test_big_endian_cuda_arrays_are_refused():
    class BigEndianCudaArray:  # only the interface is read: the pointer is never used
        def __init__(self, shape):
            self.__cuda_array_interface__ = dict(shape=tuple(shape), typestr=">f4",
                                                 data=(0, False), version=3)

    q, k, v = (BigEndianCudaArray(x.shape) for x in _qkv())
    with pytest.raises(TypeError, match=r"CUDA arrays must be in the GPU's \(little-endian\)"):
        attention(q, k, v, backend="cuda")


@pytest.mark.parametrize("lq", [1, 40], ids=["decode", "prefill"])
def test_blhd_torch_cuda_tensors_equal_bhld_transposed(lq):
    torch = pytest.importorskip("torch", reason="torch not installed: run on the GPU machine")
    import os

    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" or not torch.cuda.is_available():
        pytest.skip("torch CUDA tensors need a real GPU: run on the GPU machine")
    q, k, v = random_qkv(3, 2, 8, 2, lq, 300, 64, 64, dtype=np.float16, sink=8.0)
    tq, tk, tv = (torch.from_numpy(x).cuda() for x in (q, k, v))
    out, st_ = attention(*(t.transpose(1, 2).contiguous() for t in (tq, tk, tv)), 0.05,
                         causal=True, layout="blhd", return_stats=True)
    want, st_want = attention(tq, tk, tv, 0.05, causal=True, return_stats=True)
    assert out.is_contiguous() and tuple(out.shape) == (2, lq, 8, 64)
    torch.testing.assert_close(out, want.transpose(1, 2), rtol=0, atol=0)
    np.testing.assert_array_equal(st_.tile_map, st_want.tile_map)
