"""Bad input gets a clear ``ValueError``/``TypeError`` that names the argument and says what was
expected (docs/DESIGN.md §3, "Bad input"). Each case asserts the exception type *and* the message.

Validation happens before dispatch, so every host backend is checked (a backend that validated
on its own, differently, would show up here)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import HOST_BACKENDS
from helpers import random_qkv

import blasst_ref
from blasst_ref import attention, threshold_for


def _qkv(b=1, hq=4, hkv=2, lq=20, lk=24, dqk=8, dv=8, dtype=np.float32, seed=0):
    """A small valid problem (GQA 4/2) for the error tests to break one argument of."""
    return random_qkv(seed, b, hq, hkv, lq, lk, dqk, dv, dtype=dtype)


class FakeCudaArray:
    """Looks like a CUDA array to the API (CuPy, PyTorch CUDA tensors and Numba device arrays
    all expose ``__cuda_array_interface__``); the data pointer is never dereferenced."""

    def __init__(self, shape, typestr="<f4"):
        self.__cuda_array_interface__ = dict(
            shape=tuple(shape), typestr=typestr, data=(0, False), version=3
        )


@pytest.fixture(params=HOST_BACKENDS)
def host_backend(request):
    return request.param


def test_valid_input_is_accepted(host_backend):
    """The baseline the cases below perturb: it is valid, so each error is due to its change."""
    q, k, v = _qkv()
    out = attention(q, k, v, 0.1, causal=True, backend=host_backend, block_q=8, block_k=8)
    assert out.shape == (1, 4, 20, 8)


# ---------------------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize("shape", [(8,), (20, 8), (1, 1, 4, 20, 8)], ids=["1d", "2d", "5d"])
def test_q_of_wrong_rank(host_backend, shape):
    q, k, v = _qkv()
    bad = np.ones(shape, np.float32)
    with pytest.raises(ValueError, match=r"q must be 4-D \(B, Hq, Lq, Dqk\) or 3-D"):
        attention(bad, k, v, backend=host_backend)


@pytest.mark.parametrize("name", ["k", "v"])
def test_k_or_v_of_other_rank_than_q(host_backend, name):
    q, k, v = _qkv()
    args = {"q": q, "k": k, "v": v}
    args[name] = args[name][0]  # 3-D while q is 4-D
    expected = rf"{name} must have the same rank as q \(4-D\).*\(B, Hkv, Lk, D\)"
    with pytest.raises(ValueError, match=expected):
        attention(args["q"], args["k"], args["v"], backend=host_backend)


@pytest.mark.parametrize("name", ["k", "v"])
def test_mismatched_batch(host_backend, name):
    q, k, v = _qkv(b=2)
    args = {"q": q, "k": k, "v": v}
    args[name] = args[name][:1]
    with pytest.raises(ValueError, match=r"batch sizes differ: q 2, k \d, v \d"):
        attention(args["q"], args["k"], args["v"], backend=host_backend)


def test_mismatched_kv_heads(host_backend):
    q, k, v = _qkv(hkv=2)
    expected = r"k and v must have the same number of kv heads.*k 2, v 1"
    with pytest.raises(ValueError, match=expected):
        attention(q, k, v[:, :1], backend=host_backend)


@pytest.mark.parametrize("hq,hkv", [(4, 3), (3, 2), (2, 4)])
def test_hq_not_a_multiple_of_hkv(host_backend, hq, hkv):
    q, k, v = _qkv(hq=hq, hkv=hkv)
    with pytest.raises(ValueError, match=rf"Hq={hq} must be a multiple of .*Hkv={hkv}"):
        attention(q, k, v, backend=host_backend)


def test_mismatched_head_dim(host_backend):
    q, k, v = _qkv(dqk=8)
    with pytest.raises(ValueError, match=r"q and k must have the same head dim Dqk, got q 8, k 6"):
        attention(q, k[..., :6], v, backend=host_backend)


def test_mismatched_key_length(host_backend):
    q, k, v = _qkv(lk=24)
    with pytest.raises(ValueError, match=r"k and v must have the same length Lk, got k 24, v 23"):
        attention(q, k, v[:, :, :23], backend=host_backend)


@pytest.mark.parametrize(
    "dim,name",
    [("lq", "query length Lq"), ("lk", "key length Lk"), ("b", "batch B"),
     ("dqk", "head dim Dqk"), ("dv", "value dim Dv")],
)
def test_empty_dimensions(host_backend, dim, name):
    q, k, v = _qkv(**{dim: 0})
    with pytest.raises(ValueError, match=rf"{name} is 0.*must be >= 1"):
        attention(q, k, v, backend=host_backend)


def test_zero_query_heads(host_backend):
    q, k, v = _qkv(hq=0, hkv=1)
    with pytest.raises(ValueError, match=r"Hq|query heads"):
        attention(q, k, v, backend=host_backend)


# ---------------------------------------------------------------------------------------
# thresh and the other scalars


@pytest.mark.parametrize("thresh", [-1e-9, -0.5, 1.0, 1.5, math.inf, -math.inf, math.nan,
                                    np.float32(1.0), np.float64(math.nan)],
                         ids=repr)
def test_thresh_outside_unit_interval(host_backend, thresh):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"thresh must be in \[0, 1\)"):
        attention(q, k, v, thresh, backend=host_backend)


@pytest.mark.parametrize("thresh", ["0.1", None, True, [0.1], 0.1j], ids=repr)
def test_thresh_not_a_real_number(host_backend, thresh):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"thresh must be a real number in \[0, 1\)"):
        attention(q, k, v, thresh, backend=host_backend)


def test_thresh_edges_are_accepted(host_backend):
    q, k, v = _qkv()
    for thresh in (0, 0.0, np.float32(0.5), 1 - 1e-12):
        attention(q, k, v, thresh, backend=host_backend, block_q=8, block_k=8)


@pytest.mark.parametrize("causal", [1, "yes", None])
def test_causal_not_a_bool(host_backend, causal):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"causal must be a bool"):
        attention(q, k, v, causal=causal, backend=host_backend)


@pytest.mark.parametrize("scale", [0.0, -1.0, math.nan, math.inf])
def test_scale_not_positive_finite(host_backend, scale):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"scale must be finite and > 0"):
        attention(q, k, v, scale=scale, backend=host_backend)


@pytest.mark.parametrize("name", ["block_q", "block_k"])
@pytest.mark.parametrize("value,exc", [(0, ValueError), (-4, ValueError), (16.0, TypeError),
                                       (True, TypeError)])
def test_bad_tile_sizes(host_backend, name, value, exc):
    q, k, v = _qkv()
    with pytest.raises(exc, match=rf"{name} must be"):
        attention(q, k, v, backend=host_backend, **{name: value})


@pytest.mark.parametrize("backend", ["gpu", "CPU", "", None, "numpy"])
def test_unknown_backend(backend):
    q, k, v = _qkv()
    expected = r"backend must be one of 'auto', 'reference', 'cpu', 'cuda'"
    with pytest.raises(ValueError, match=expected):
        attention(q, k, v, backend=backend)


# ---------------------------------------------------------------------------------------
# dtypes and kinds of array


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex64, np.uint8],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_unsupported_dtype(host_backend, name, dtype):
    q, k, v = _qkv()
    args = {"q": q, "k": k, "v": v}
    args[name] = args[name].astype(dtype)
    expected = rf"{name} has unsupported dtype .*expected one of float16, float32, float64"
    with pytest.raises(TypeError, match=expected):
        attention(args["q"], args["k"], args["v"], backend=host_backend)


def test_mixed_dtypes(host_backend):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"q, k and v must share one dtype.*float32.*float64"):
        attention(q, k.astype(np.float64), v, backend=host_backend)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_not_an_array(host_backend, name):
    q, k, v = _qkv()
    args = {"q": q, "k": k, "v": v}
    args[name] = args[name].tolist()
    with pytest.raises(TypeError, match=rf"{name} must be a numpy array or a CUDA array"):
        attention(args["q"], args["k"], args["v"], backend=host_backend)


def test_cuda_arrays_given_to_a_host_backend(host_backend):
    q, k, v = (FakeCudaArray(x.shape) for x in _qkv())
    expected = rf"backend='{host_backend}' runs on the host, but q, k, v are CUDA arrays"
    with pytest.raises(TypeError, match=expected):
        attention(q, k, v, backend=host_backend)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_mixed_host_and_cuda_arrays(host_backend, name):
    args = dict(zip("qkv", _qkv()))
    args[name] = FakeCudaArray(args[name].shape)
    expected = rf"all be host \(numpy\) arrays or all CUDA arrays.*{name} on device"
    with pytest.raises(TypeError, match=expected):
        attention(args["q"], args["k"], args["v"], backend=host_backend)


def test_cuda_arrays_of_unsupported_dtype_name_the_argument():
    q, k, v = _qkv()
    fq, fk = FakeCudaArray(q.shape), FakeCudaArray(k.shape)
    fv = FakeCudaArray(v.shape, typestr="<f8")  # float64 is a CPU-only dtype
    expected = r"v has unsupported dtype float64; expected one of float16, float32"
    with pytest.raises(TypeError, match=expected):
        attention(fq, fk, fv, backend="cuda")


def test_cuda_backend_needs_cuda_arrays():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"backend='cuda' needs CUDA arrays"):
        attention(q, k, v, backend="cuda")


# ---------------------------------------------------------------------------------------
# threshold_for


@pytest.mark.parametrize("context_len", [0, -5, 2.5, "100"], ids=repr)
def test_threshold_for_bad_context_len(context_len):
    with pytest.raises(ValueError, match=r"context_len must be a positive integer"):
        threshold_for(context_len, 10.0)


@pytest.mark.parametrize("scale_factor", [-1.0, math.nan, math.inf, "3"], ids=repr)
def test_threshold_for_bad_scale_factor(scale_factor):
    with pytest.raises(ValueError, match=r"scale_factor must be a finite number >= 0"):
        threshold_for(100, scale_factor)


def test_threshold_for_result_outside_unit_interval():
    with pytest.raises(ValueError, match=r"scale_factor must be < context_len \(100\)"):
        threshold_for(100, 100.0)
    assert threshold_for(100, 50.0) == 0.5
    assert blasst_ref.threshold_for(2048, 0.0) == 0.0
