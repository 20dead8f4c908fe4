"""Tests of the int8 kernels of the graph executor (``blasst_ref/graph/int8_kernels.py``).

* The integer kernel (u8 x s8 -> s32) equals a numpy int64 product *exactly*, on every
  backend this CPU has (the detected one and the portable one at least), over Hypothesis
  shapes (K not a multiple of 4, M or N of 1) and fills with the extreme values 0/255 and
  -128/127; the SIMD (VNNI, or AVX2's exact vpmaddwd emulation of vpdpbusd) and portable
  paths agree bit for bit, serial and parallel.
* Zero-point compensation is exact (unit scales: the float output is the exact integer
  ``(a - za) @ w``), the float output matches a float64 computation of the dequantised
  product, and the u8 output is ``ops.quantize_array`` of the float output exactly (and of
  the float64 reference except at rounding ties).
* On a VNNI CPU the compiled kernel's assembly contains ``vpdpbusd`` (``vpmaddwd`` on
  AVX2).
* K tails (K % 4 != 0) run on the caller's rows without padding and read no byte past
  them (a guard page); every thread count (1 = the serial driver, 2, capped, auto) gives
  the same bytes.
* :func:`IK.quantize` (the compiled graph's float32 -> u8/s8 step) is bit for bit
  ``ops.quantize_array``.
* Bad scales, dtypes, shapes and thread counts give ValueErrors that name the argument.

Outputs are poisoned before each call, so an element a kernel forgets to write shows up.
The strategies of this file live here: nothing else in the suite uses them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.special
from hypothesis import given
from hypothesis import strategies as st

from blasst_ref.graph import int8_kernels as IK
from blasst_ref.graph import kernels as K
from blasst_ref.graph import ops

BACKENDS = list(IK.available_int8_backends())
#: the micro-kernel backends (VNNI and AVX2): every one this CPU has
VNNI_BACKENDS = [b for b in BACKENDS if b != "portable"]
#: The parallel driver is tested on the detected backend and the portable one (each
#: backend's drivers compile in ~5-8 s the first time; the other VNNI width shares all
#: the code but the micro-kernel, which the serial tests cover).
PAR_BACKENDS = sorted({IK.int8_backend(), "portable"})
FILLS = ("random", "max_magnitude", "extremes", "zeros_a", "small")


# ---------------------------------------------------------------------------------------
# Strategies and helpers
# ---------------------------------------------------------------------------------------


def _fill(fill, rng, m, k, n):
    """Operands ``a`` (m, k) u8 and ``w`` (k, n) s8 of one kind."""
    if fill == "random":
        a = rng.integers(0, 256, (m, k), dtype=np.uint8)
        w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    elif fill == "max_magnitude":  # every product is 255 * -128: the largest sums
        a = np.full((m, k), 255, np.uint8)
        w = np.full((k, n), -128, np.int8)
    elif fill == "extremes":  # only 0/255 and -128/127, mixed
        a = rng.choice(np.array([0, 255], np.uint8), (m, k))
        w = rng.choice(np.array([-128, 127], np.int8), (k, n))
    elif fill == "zeros_a":
        a = np.zeros((m, k), np.uint8)
        w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    else:  # small values near the zero point
        a = rng.integers(120, 136, (m, k), dtype=np.uint8)
        w = rng.integers(-3, 4, (k, n), dtype=np.int8)
    return a, w


@st.composite
def int8_problems(draw, max_m=20, max_k=70, max_n=80):
    """``(a, w)`` with M, K, N drawn so that M = 1, N = 1 and K % 4 != 0 come up often
    (N up to 80 spans several column panels and a partial last one; M up to 20 spans full
    and partial row strips) and a fill from :data:`FILLS`."""
    m = draw(st.one_of(st.just(1), st.integers(1, max_m)))
    k = draw(st.one_of(st.integers(1, 9), st.integers(1, max_k)))
    n = draw(st.one_of(st.just(1), st.integers(1, max_n)))
    fill = draw(st.sampled_from(FILLS))
    seed = draw(st.integers(0, 2**32 - 1))
    return _fill(fill, np.random.default_rng(seed), m, k, n)


@st.composite
def quant_cases(draw):
    """A :func:`qmatmul` call: operands, scales, zero points, post-ops."""
    a, w = draw(int8_problems(max_m=12, max_k=40, max_n=40))
    n = w.shape[1]
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    per_channel = draw(st.booleans())
    w_scale = (rng.uniform(1e-3, 5e-2, n).astype(np.float32) if per_channel
               else np.float32(rng.uniform(1e-3, 5e-2)))
    return dict(
        a=a, w=w, w_scale=w_scale,
        a_scale=np.float32(draw(st.sampled_from([1e-3, 0.02, 0.1]))),
        a_zp=draw(st.sampled_from([0, 1, 128, 200, 255])),
        bias=rng.standard_normal(n).astype(np.float32) if draw(st.booleans()) else None,
        residual=(rng.standard_normal((a.shape[0], n)).astype(np.float32)
                  if draw(st.booleans()) else None),
        act=draw(st.sampled_from([K.ACT_NONE, K.ACT_RELU, K.ACT_GELU])),
        out_scale=np.float32(draw(st.sampled_from([0.01, 0.05, 0.3]))),
        out_zp=draw(st.sampled_from([0, 7, 128, 255])),
    )


def _ref_s32(a, w):
    return a.astype(np.int64) @ w.astype(np.int64)


def _poisoned(shape, dtype):
    if np.dtype(dtype) == np.float32:
        return np.full(shape, np.nan, np.float32)
    if np.dtype(dtype) == np.uint8:
        return np.full(shape, 0xA5, np.uint8)
    return np.full(shape, -123456789, dtype)


def _ref_float(c):
    """The float64 meaning of :func:`IK.qmatmul`'s float output, and the magnitude of its
    terms (for the rounding tolerance)."""
    a, w, za = c["a"], c["w"], c["a_zp"]
    n = w.shape[1]
    ws = np.broadcast_to(np.asarray(c["w_scale"], np.float64), (n,))
    t = float(c["a_scale"]) * ws * ((a.astype(np.int64) - za) @ w.astype(np.int64))
    mag = np.abs(t)
    if c["bias"] is not None:
        t = t + c["bias"].astype(np.float64)
        mag = mag + np.abs(c["bias"])
    if c["act"] == K.ACT_RELU:
        t = np.maximum(t, 0.0)
    elif c["act"] == K.ACT_GELU:
        t = 0.5 * t * scipy.special.erfc(-t / np.sqrt(2.0))
    if c["residual"] is not None:
        t = t + c["residual"].astype(np.float64)
        mag = mag + np.abs(c["residual"])
    return t, mag


# ---------------------------------------------------------------------------------------
# Backend detection
# ---------------------------------------------------------------------------------------


def test_backend_detection():
    assert IK.int8_backend() in IK.BACKENDS
    assert IK.int8_backend() == BACKENDS[0] or os.environ.get("BLASST_INT8_BACKEND")
    assert "portable" in BACKENDS
    assert IK.available_int8_backends(set()) == ("portable",)
    assert IK.available_int8_backends({"avxvnni"}) == ("avx_vnni", "portable")
    assert IK.available_int8_backends({"avx512f", "avx512vnni", "avx512vl"}) == (
        "avx512_vnni", "avx_vnni", "portable")
    assert IK.available_int8_backends({"avx512f", "avx512vnni"}) == ("avx512_vnni", "portable")
    assert IK.available_int8_backends({"avx2", "fma"}) == ("avx2", "portable")
    assert IK.available_int8_backends({"avx2", "avxvnni"}) == ("avx_vnni", "avx2", "portable")


@pytest.mark.parametrize("value, ok", [("portable", True), ("sse9", False)])
def test_backend_env_var(value, ok):
    code = "from blasst_ref.graph import int8_kernels as ik; print(ik.int8_backend())"
    env = dict(os.environ, BLASST_INT8_BACKEND=value)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120, check=False)
    if ok:
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == value
    else:
        assert r.returncode != 0
        assert "BLASST_INT8_BACKEND" in r.stderr


def test_asm_contains_vpdpbusd():
    if IK.int8_backend() == "portable":
        pytest.skip("this CPU has neither AVX2 nor VNNI: the portable path runs and no "
                    "vpdpbusd is emitted")
    for backend in VNNI_BACKENDS:
        asm = IK.asm_of_kernel(backend)
        # AVX2 has no vpdpbusd: the kernel emulates it with vpmaddwd on int16 halves
        ins = "vpmaddwd" if backend == "avx2" else "vpdpbusd"
        lines = [ln for ln in asm.splitlines() if ins in ln]
        assert lines, f"no {ins} in the {backend} kernel"
        reg = "zmm" if backend == "avx512_vnni" else "ymm"
        assert any(reg in ln for ln in lines), f"{backend}: no {reg} {ins}: {lines[:3]}"


# ---------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_layout(backend):
    rng = np.random.default_rng(3)
    k, n = 13, 37
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    pw = IK.pack_int8_weight(w, 0.5, backend=backend)
    nb = pw.nb
    assert nb == (8 if backend in ("avx_vnni", "avx2") else 16)
    assert pw.data.dtype == np.int8 and pw.data.flags.c_contiguous
    assert pw.data.shape == (-(-n // nb), 4, nb, 4)  # Kp = 16
    assert (pw.k, pw.n, pw.backend) == (k, n, backend)
    padded = np.zeros((16, pw.data.shape[0] * nb), np.int64)
    padded[:k, :n] = w
    b, q, j, t = np.indices(pw.data.shape)
    np.testing.assert_array_equal(pw.data, padded[4 * q + t, b * nb + j])
    np.testing.assert_array_equal(pw.col_sums, w.astype(np.int64).sum(0))
    assert pw.col_sums.dtype == np.int32
    np.testing.assert_array_equal(pw.scale, np.full(n, 0.5, np.float32))


# ---------------------------------------------------------------------------------------
# The integer kernel
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@given(problem=int8_problems())
def test_s32_exact(backend, problem):
    a, w = problem
    pw = IK.pack_int8_weight(w, 1.0, backend=backend)
    out = _poisoned((a.shape[0], w.shape[1]), np.int32)
    got = IK.qmatmul_s32(a, pw, out=out)
    assert got is out
    np.testing.assert_array_equal(got, _ref_s32(a, w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_s32_every_row_tail(backend):
    """Every row count 1..13 (full micro-tiles plus each tail of 4, 2 and 1 rows) against
    N = 16*5 + 3 (full panels, a partial panel, a partial block)."""
    rng = np.random.default_rng(7)
    w = rng.integers(-128, 128, (35, 83), dtype=np.int8)
    pw = IK.pack_int8_weight(w, 1.0, backend=backend)
    for m in range(1, 14):
        a = rng.integers(0, 256, (m, 35), dtype=np.uint8)
        np.testing.assert_array_equal(IK.qmatmul_s32(a, pw), _ref_s32(a, w))


@pytest.mark.parametrize("backend", PAR_BACKENDS)
def test_s32_parallel_and_vs_portable(backend):
    """A problem above the serial threshold (the parallel driver) with a strided input,
    equal to the int64 reference and, bit for bit, to the portable path."""
    rng = np.random.default_rng(11)
    m, k, n = 75, 301, 131
    assert m * k * n >= IK.SERIAL_MACS
    a = rng.integers(0, 256, (m, 2 * k), dtype=np.uint8)[:, ::2]  # not contiguous
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    w[:5] = -128
    a[:3] = 255
    got = IK.qmatmul_s32(a, IK.pack_int8_weight(w, 1.0, backend=backend),
                         out=_poisoned((m, n), np.int32))
    np.testing.assert_array_equal(got, _ref_s32(a, w))
    port = IK.qmatmul_s32(a, IK.pack_int8_weight(w, 1.0, backend="portable"))
    assert got.tobytes() == port.tobytes()


@pytest.mark.skipif(not VNNI_BACKENDS, reason="no VNNI backend on this CPU")
@given(problem=int8_problems(max_m=30, max_k=90, max_n=100))
def test_vnni_equals_portable(problem):
    a, w = problem
    ref = IK.qmatmul_s32(a, IK.pack_int8_weight(w, 1.0, backend="portable"))
    for backend in VNNI_BACKENDS:
        got = IK.qmatmul_s32(a, IK.pack_int8_weight(w, 1.0, backend=backend))
        assert got.tobytes() == ref.tobytes(), backend


def test_s32_large_k_extremes():
    """K = 4099 of 255 x -128: sums near -1.3e8, exact."""
    k = 4099
    a = np.full((3, k), 255, np.uint8)
    w = np.full((k, 5), -128, np.int8)
    w[:, 1] = 127
    for backend in BACKENDS:
        got = IK.qmatmul_s32(a, IK.pack_int8_weight(w, 1.0, backend=backend))
        np.testing.assert_array_equal(got, _ref_s32(a, w))


def test_empty_m():
    w = np.ones((5, 3), np.int8)
    pw = IK.pack_int8_weight(w, 1.0)
    assert IK.qmatmul_s32(np.zeros((0, 5), np.uint8), pw).shape == (0, 3)
    assert IK.qmatmul(np.zeros((0, 5), np.uint8), 1.0, 0, pw).shape == (0, 3)


# ---------------------------------------------------------------------------------------
# Compensation, rescale, post-ops, requantisation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@given(problem=int8_problems(max_m=12, max_k=60, max_n=40),
       za=st.sampled_from([0, 1, 77, 128, 254, 255]))
def test_compensation_exact(backend, problem, za):
    """With unit scales the float output is the integer ``(a - za) @ w`` itself (exact in
    float32 here: |.| < 2**24): the compensation ``za * col_sums`` is exact."""
    a, w = problem
    pw = IK.pack_int8_weight(w, 1.0, backend=backend)
    out = _poisoned((a.shape[0], w.shape[1]), np.float32)
    got = IK.qmatmul(a, 1.0, za, pw, out=out)
    assert got is out
    ref = (a.astype(np.int64) - za) @ w.astype(np.int64)
    np.testing.assert_array_equal(got, ref.astype(np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=quant_cases())
def test_qmatmul_matches_float64(backend, case):
    c = case
    m, n = c["a"].shape[0], c["w"].shape[1]
    pw = IK.pack_int8_weight(c["w"], c["w_scale"], backend=backend)
    kw = dict(bias=c["bias"], act=c["act"], residual=c["residual"])
    y = IK.qmatmul(c["a"], c["a_scale"], c["a_zp"], pw, **kw, out=_poisoned((m, n), np.float32))
    ref, mag = _ref_float(c)
    # float32 rounding of a_scale * w_scale, of the product, of each add: a few ulps of
    # the terms' magnitudes (GELU adds a few ulps of its own)
    tol = 1e-6 * (mag + np.abs(ref)) + 1e-30
    err = np.abs(y.astype(np.float64) - ref)
    assert np.all(err <= tol), f"max err/tol {np.max(err / tol)}"

    q = IK.qmatmul(c["a"], c["a_scale"], c["a_zp"], pw, **kw, out_scale=c["out_scale"],
                   out_zero_point=c["out_zp"], out=_poisoned((m, n), np.uint8))
    assert q.dtype == np.uint8
    # exactly ops.quantize_array of the kernel's own float output ...
    np.testing.assert_array_equal(q, ops.quantize_array(y, c["out_scale"], c["out_zp"], "uint8"))
    # ... and of the float64 reference, except where y / out_scale is within rounding of a
    # tie (x.5), where the two may round to neighbours
    qref = ops.quantize_array(ref.astype(np.float32), c["out_scale"], c["out_zp"], "uint8")
    x = ref / float(c["out_scale"])
    near_tie = np.abs(np.abs(x - np.floor(x)) - 0.5) <= (tol / float(c["out_scale"]) + 1e-6)
    diff = np.abs(q.astype(np.int32) - qref.astype(np.int32))
    assert np.all(diff[~near_tie] == 0)
    assert np.all(diff <= 1)


def test_requantize_saturation_nan_and_ties():
    """Saturation at 0 and 255, round-half-to-even at exact ties, NaN (from a NaN
    residual) to the zero point, as ops.quantize_array."""
    a = np.array([[1, 2, 3, 4, 5, 6, 250]], np.uint8).T  # (7, 1)
    w = np.array([[1]], np.int8)
    pw = IK.pack_int8_weight(w, 1.0)
    # y = a - 2 + residual: -1, 0, 1, 2, 3, 4, 248 (+ residual)
    res = np.array([[0.5], [0.5], [0.5], [0.5], [np.nan], [-300.0], [100.0]], np.float32)
    q = IK.qmatmul(a, 1.0, 2, pw, residual=res, out_scale=1.0, out_zero_point=3)
    y = IK.qmatmul(a, 1.0, 2, pw, residual=res)
    np.testing.assert_array_equal(q, ops.quantize_array(y, 1.0, 3, "uint8"))
    # -0.5 -> 0 (even), 0.5 -> 0, 1.5 -> 2, 2.5 -> 2 (+3); NaN -> zp; saturation
    np.testing.assert_array_equal(q[:, 0], [3, 3, 5, 5, 3, 0, 255])


def test_plan_equals_qmatmul():
    rng = np.random.default_rng(17)
    a = rng.integers(0, 256, (10, 30), dtype=np.uint8)
    w = rng.integers(-128, 128, (30, 20), dtype=np.int8)
    pw = IK.pack_int8_weight(w, rng.uniform(0.01, 0.02, 20).astype(np.float32))
    bias = rng.standard_normal(20).astype(np.float32)
    r = rng.standard_normal((10, 20)).astype(np.float32)
    for out_scale, ozp in [(None, 0), (0.05, 17)]:
        plan = IK.QMatMulPlan(pw, 0.03, 140, bias, K.ACT_RELU, out_scale, ozp)
        for res in (None, r):
            expect = IK.qmatmul(a, 0.03, 140, pw, bias, K.ACT_RELU, res, out_scale, ozp)
            assert plan(a, res).tobytes() == expect.tobytes()
    with pytest.raises(ValueError, match="a_zero_point"):
        IK.QMatMulPlan(pw, 0.03, 300)
    with pytest.raises(ValueError, match="a_u8"):
        IK.QMatMulPlan(pw, 0.03, 3)(a[:, :29])


def test_residual_may_be_out():
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, (9, 21), dtype=np.uint8)
    w = rng.integers(-128, 128, (21, 19), dtype=np.int8)
    pw = IK.pack_int8_weight(w, 0.01)
    r = rng.standard_normal((9, 19)).astype(np.float32)
    expect = IK.qmatmul(a, 0.1, 9, pw, act=K.ACT_RELU, residual=r.copy())
    got = IK.qmatmul(a, 0.1, 9, pw, act=K.ACT_RELU, residual=r, out=r)
    assert got is r
    np.testing.assert_array_equal(got, expect)


@pytest.mark.parametrize("backend", PAR_BACKENDS)
def test_qmatmul_parallel_all_post_ops(backend):
    """The parallel driver with bias, GELU, residual and requantisation, against the
    portable backend (bit for bit) and float64."""
    rng = np.random.default_rng(13)
    m, k, n = 70, 210, 140
    c = dict(a=rng.integers(0, 256, (m, k), dtype=np.uint8),
             w=rng.integers(-128, 128, (k, n), dtype=np.int8),
             w_scale=rng.uniform(1e-3, 1e-2, n).astype(np.float32), a_scale=np.float32(0.02),
             a_zp=131, bias=rng.standard_normal(n).astype(np.float32), act=K.ACT_GELU,
             residual=rng.standard_normal((m, n)).astype(np.float32))
    kw = dict(bias=c["bias"], act=c["act"], residual=c["residual"])
    outs = {}
    for b in (backend, "portable"):
        pw = IK.pack_int8_weight(c["w"], c["w_scale"], backend=b)
        outs[b] = (IK.qmatmul(c["a"], c["a_scale"], c["a_zp"], pw, **kw),
                   IK.qmatmul(c["a"], c["a_scale"], c["a_zp"], pw, **kw, out_scale=0.02,
                              out_zero_point=100))
    assert outs[backend][0].tobytes() == outs["portable"][0].tobytes()
    assert outs[backend][1].tobytes() == outs["portable"][1].tobytes()
    ref, mag = _ref_float(c)
    assert np.all(np.abs(outs[backend][0] - ref) <= 1e-6 * (mag + np.abs(ref)))


# ---------------------------------------------------------------------------------------
# K tails without padding, thread counts, the serial path
# ---------------------------------------------------------------------------------------

_GUARD_PAGE_SCRIPT = r"""
import ctypes, mmap, sys
import numpy as np
from blasst_ref.graph import int8_kernels as IK
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
page = mmap.PAGESIZE
buf = mmap.mmap(-1, 2 * page)
base = np.frombuffer(buf, np.uint8)
addr = base.ctypes.data
assert addr % page == 0
checked = 0
for backend in IK.available_int8_backends():
    for k in range(1, 12):
        w = np.arange(k * 21, dtype=np.int64).reshape(k, 21) % 255 - 127
        w = w.astype(np.int8)
        pw = IK.pack_int8_weight(w, 1.0, backend=backend)
        for m in (1, 2, 3, 5, 7, 13):
            # a (m, k) ends exactly at the end of the first page; the second is unreadable
            a = base[page - m * k: page].reshape(m, k)
            a[:] = (np.arange(m * k).reshape(m, k) * 37 + 11) % 256
            ref = a.astype(np.int64) @ w.astype(np.int64)
            assert libc.mprotect(addr + page, page, 0) == 0, ctypes.get_errno()  # PROT_NONE
            try:
                got = IK.qmatmul_s32(a, pw, threads=1)
                got_par = IK.qmatmul_s32(a, pw, threads=2)
            finally:
                assert libc.mprotect(addr + page, page, 3) == 0  # PROT_READ | PROT_WRITE
            assert (got == ref).all() and (got_par == ref).all(), (backend, k, m)
            checked += 1
print("ok", checked)
"""


def test_k_tail_reads_nothing_past_the_rows():
    """K = 1..11 (every K % 4) with ``a`` ending exactly at a page whose successor is
    unreadable (``mprotect``): the micro-kernel reads the K tail byte by byte, never past
    the last row (no padding copy of the activations). Run in a subprocess: a read past
    the end would be a segfault, not an assertion."""
    if not sys.platform.startswith("linux"):
        pytest.skip("mprotect through ctypes: Linux only")
    r = subprocess.run([sys.executable, "-c", _GUARD_PAGE_SCRIPT], capture_output=True,
                       text=True, timeout=600, check=False)
    assert r.returncode == 0, f"rc {r.returncode}: {r.stderr[-2000:]}"
    assert r.stdout.startswith("ok")


@pytest.mark.parametrize("backend", PAR_BACKENDS)
@pytest.mark.parametrize("k", [13, 479, 480])
def test_k_tail_no_copy_equals_padded(backend, k):
    """The DLRM widths K = 13 and 479 (K % 4 = 1 and 3) straight from the caller's array
    equal the same product on rows zero-padded to K = 16 / 480, and int64."""
    rng = np.random.default_rng(k)
    m, n = 37, 70
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    kp = -(-k // 4) * 4
    ap = np.zeros((m, kp), np.uint8)
    ap[:, :k] = a
    wp = np.zeros((kp, n), np.int8)
    wp[:k] = w
    got = IK.qmatmul_s32(a, IK.pack_int8_weight(w, 1.0, backend=backend))
    padded = IK.qmatmul_s32(ap, IK.pack_int8_weight(wp, 1.0, backend=backend))
    assert got.tobytes() == padded.tobytes()
    np.testing.assert_array_equal(got, _ref_s32(a, w))


@pytest.mark.parametrize("backend", PAR_BACKENDS)
def test_thread_counts_bit_exact(backend):
    """threads = 1 (the serial driver), 2, a count above the pool (capped), and None (auto)
    give the same bytes for s32, float and u8 outputs, above and below the serial
    threshold."""
    rng = np.random.default_rng(23)
    for m, k, n in [(5, 13, 40), (130, 479, 200)]:
        a = rng.integers(0, 256, (m, k), dtype=np.uint8)
        w = rng.integers(-128, 128, (k, n), dtype=np.int8)
        pw = IK.pack_int8_weight(w, rng.uniform(1e-3, 1e-2, n).astype(np.float32),
                                 backend=backend)
        bias = rng.standard_normal(n).astype(np.float32)
        ref = _ref_s32(a, w)
        outs = []
        for threads in (1, 2, 1000, None):
            s32 = IK.qmatmul_s32(a, pw, out=_poisoned((m, n), np.int32), threads=threads)
            np.testing.assert_array_equal(s32, ref)
            f = IK.qmatmul(a, 0.02, 9, pw, bias, K.ACT_RELU, threads=threads,
                           out=_poisoned((m, n), np.float32))
            q = IK.qmatmul(a, 0.02, 9, pw, bias, K.ACT_RELU, out_scale=0.03,
                           out_zero_point=5, threads=threads, out=_poisoned((m, n), np.uint8))
            outs.append((f.tobytes(), q.tobytes()))
        assert all(o == outs[0] for o in outs[1:])


def test_auto_threads():
    """All or one: serial below SERIAL_MACS of work, else every thread (a team of one
    size for every layer of a graph stays awake between them)."""
    assert IK.auto_threads(1, 1, 1, 16) == 1
    assert IK.auto_threads(128, 1, 256, 16) == 1           # DLRM's 256 -> 1 layer
    assert IK.auto_threads(128, 512, 13, 16) == 16         # 2.9 M: every thread
    assert IK.auto_threads(4096, 4096, 4096, 3) == 3
    counts = [IK.auto_threads(m, 256, 256, 16) for m in (1, 8, 14, 15, 64, 2048)]
    assert set(counts) == {1, 16} and counts == sorted(counts)
    plan = IK.QMatMulPlan(IK.pack_int8_weight(np.ones((8, 4), np.int8), 1.0), 1.0, 0)
    rb, cb, nt, cap = plan.schedule(3)
    assert nt == 1 and cap >= 1 and plan.schedule(3) == (rb, cb, nt, cap)


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_bad_threads(threads):
    pw = IK.pack_int8_weight(np.ones((8, 4), np.int8), 1.0)
    a = np.ones((2, 8), np.uint8)
    with pytest.raises(ValueError, match="threads"):
        IK.qmatmul_s32(a, pw, threads=threads)
    with pytest.raises(ValueError, match="threads"):
        IK.QMatMulPlan(pw, 1.0, 0, threads=threads)
    with pytest.raises(ValueError, match="threads"):
        IK.quantize(np.ones(3, np.float32), 1.0, 0, threads=threads)


# ---------------------------------------------------------------------------------------
# quantize (float32 -> u8 / s8)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, zp", [("uint8", 0), ("uint8", 131), ("int8", 0),
                                       ("int8", -7)])
def test_quantize_equals_ops(dtype, zp):
    """Bit for bit ops.quantize_array: ties (round half to even), saturation both ways,
    NaN -> the zero point, +-inf, -0.0; serial and parallel, 1-D to 3-D."""
    rng = np.random.default_rng(3)
    scale = np.float32(0.0123)
    ties = (np.arange(-300, 300) + 0.5).astype(np.float32) * scale
    special = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1e30, -1e30, 1e-30],
                       np.float32)
    for x in (ties, special, rng.standard_normal((3, 7, 13)).astype(np.float32) * 3,
              rng.standard_normal((300, 479)).astype(np.float32)):
        ref = ops.quantize_array(x, scale, zp, dtype)
        for threads in (1, 2, None):
            got = IK.quantize(x, scale, zp, dtype, threads=threads)
            assert got.dtype == np.dtype(dtype) and got.shape == x.shape
            assert got.tobytes() == ref.tobytes(), threads
    out = np.empty((3, 4), np.dtype(dtype))
    assert IK.quantize(np.ones((3, 4), np.float32), 1.0, zp, dtype, out=out) is out


def test_quantize_bad_args():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="dtype"):
        IK.quantize(x, 1.0, 0, "int32")
    with pytest.raises(ValueError, match="float32"):
        IK.quantize(x.astype(np.float64), 1.0, 0)
    with pytest.raises(ValueError, match="scale"):
        IK.quantize(x, 0.0, 0)
    with pytest.raises(ValueError, match="zero_point"):
        IK.quantize(x, 1.0, 256)
    with pytest.raises(ValueError, match="zero_point"):
        IK.quantize(x, 1.0, 200, "int8")
    with pytest.raises(ValueError, match="out"):
        IK.quantize(x, 1.0, 0, out=np.empty((3, 2), np.uint8))


def test_compiled_quantize_step_equals_interpreter():
    """A graph whose int8 entry (Quantize, float32 -> u8 and -> s8) the compiled executor
    runs with :func:`IK.quantize`: the same bytes as the interpreter (ops.quantize_array)."""
    from blasst_ref import graph as bg

    g = bg.Graph("q")
    x = g.input("x", (64, 479), "float32")
    g.output("qu", g.quantize(x, 0.021, 77, "uint8"))
    g.output("qs", g.quantize(x, 0.021, -3, "int8"))
    x = np.random.default_rng(0).standard_normal((64, 479)).astype(np.float32) * 2
    x[0, :4] = [np.nan, np.inf, -np.inf, 0.5 * 0.021]
    c = bg.compile(g)
    assert c.graph.count_ops() == {"Quantize": 2}
    got, ref = c(x=x), bg.interpret(g, x=x)
    for name in ("qu", "qs"):
        assert got[name].dtype == ref[name].dtype
        assert got[name].tobytes() == ref[name].tobytes()


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


W = np.ones((8, 4), np.int8)


@pytest.mark.parametrize("scale", [0.0, -1.0, np.nan, np.inf, [1.0, 0.0, 1.0, 1.0],
                                   [1.0, 1.0, np.nan, 1.0], [1.0, 2.0]])
def test_bad_weight_scale(scale):
    with pytest.raises(ValueError, match="scale"):
        IK.pack_int8_weight(W, scale)


@pytest.mark.parametrize("w", [W.astype(np.float32), W.astype(np.uint8), W.astype(np.int32),
                               np.ones(8, np.int8), np.ones((0, 4), np.int8), W.tolist()])
def test_bad_weight(w):
    with pytest.raises(ValueError, match="w_s8"):
        IK.pack_int8_weight(w, 1.0)


def test_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        IK.pack_int8_weight(W, 1.0, backend="avx9000")


def test_weight_k_too_large():
    with pytest.raises(ValueError, match="K=65794"):
        IK.pack_int8_weight(np.zeros((IK.MAX_K + 1, 1), np.int8), 1.0)


PW = IK.pack_int8_weight(W, 1.0)
A = np.ones((3, 8), np.uint8)


@pytest.mark.parametrize("a", [A.astype(np.float32), A.astype(np.int8), A.astype(np.int32),
                               np.ones((3, 7), np.uint8), np.ones(8, np.uint8), A.tolist()])
def test_bad_activations(a):
    with pytest.raises(ValueError, match="a_u8"):
        IK.qmatmul_s32(a, PW)
    with pytest.raises(ValueError, match="a_u8"):
        IK.qmatmul(a, 1.0, 0, PW)


def test_bad_packed_weight():
    with pytest.raises(ValueError, match="pw"):
        IK.qmatmul_s32(A, W)
    with pytest.raises(ValueError, match="pw"):
        IK.qmatmul(A, 1.0, 0, K.pack_weight(W.astype(np.float32)))


@pytest.mark.parametrize("kwargs, name", [
    (dict(a_scale=0.0), "a_scale"), (dict(a_scale=-0.5), "a_scale"),
    (dict(a_scale=np.nan), "a_scale"), (dict(a_scale=np.inf), "a_scale"),
    (dict(a_scale=np.ones(2, np.float32)), "a_scale"), (dict(a_scale="x"), "a_scale"),
    (dict(a_zero_point=256), "a_zero_point"), (dict(a_zero_point=-1), "a_zero_point"),
    (dict(a_zero_point=1.5), "a_zero_point"),
    (dict(out_scale=0.0), "out_scale"), (dict(out_scale=-2.0), "out_scale"),
    (dict(out_scale=np.nan), "out_scale"),
    (dict(out_scale=1.0, out_zero_point=300), "out_zero_point"),
    (dict(out_zero_point=5), "out_zero_point"),  # a zero point without out_scale
    (dict(bias=np.ones(3, np.float32)), "bias"), (dict(bias=np.ones(4, np.float64)), "bias"),
    (dict(residual=np.ones((3, 5), np.float32)), "residual"),
    (dict(residual=np.ones((3, 4), np.int32)), "residual"),
    (dict(act=17), "act"), (dict(act=True), "act"),
    (dict(out=np.empty((3, 4), np.uint8)), "out"),  # float output wanted
    (dict(out_scale=1.0, out=np.empty((3, 4), np.float32)), "out"),  # u8 output wanted
    (dict(out=np.empty((4, 3), np.float32)), "out"),
    (dict(out=np.empty((3, 8), np.float32)[:, ::2]), "out"),
])
def test_bad_qmatmul_args(kwargs, name):
    args = dict(a_scale=0.1, a_zero_point=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        IK.qmatmul(A, args.pop("a_scale"), args.pop("a_zero_point"), PW, **args)


def test_bad_s32_out():
    with pytest.raises(ValueError, match="out"):
        IK.qmatmul_s32(A, PW, out=np.empty((3, 4), np.int64))
