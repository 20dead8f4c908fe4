"""The backward of BLASST attention (docs/DESIGN.md §11), for every backend.

The function BLASST computes is softmax attention over the keys of the tiles each row kept,
so its gradient (tile decisions held fixed) is the gradient of the dense formula with an
explicit key mask. The oracle, :func:`blasst_ref.dense_attention_backward` with
``keep=saved.kept_keys(Lk)``, is float64 and differentiates that formula the way autograd
does (softmax Jacobian ``P * (dP - rowsum(P * dP))``); it is itself checked against torch's
autograd and against finite differences of the BLASST forward below.

Tolerances: relative L2 norm per gradient, with a floor of ``FLOOR`` times the norm of all
three oracle gradients together (``dK`` vanishes exactly when every row keeps a single key:
``dS = P (dP - D) = 0``; the kernels then return rounding noise, not zero).

* float64: measured <= 3.4e-14 (300 problems of :func:`grad_cases`, CPU); 1e-10.
* float32: S, P recomputed in float32 from scores up to ~50 on peaked inputs, and ``dP - D``
  cancels where a row's mass sits on few keys; measured <= 7.4e-6 over the same 300
  problems; 1e-4.
* float16: inputs, ``out`` and gradients rounded to float16 (2**-11 relative each); 1e-2.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import strategies as S
from conftest import HOST_BACKENDS
from hypothesis import event, given, note, settings
from hypothesis import strategies as st

import blasst_ref as br
from blasst_ref import reference, tiling, workloads
from blasst_ref.reference_backward import attention_backward_reference, kept_keys

GRAD_TOL = {np.float64: 1e-10, np.float32: 1e-4, np.float16: 1e-2}
FLOOR = 0.1


# ---------------------------------------------------------------------------------------
# helpers


def grad_errors(got, want):
    """Relative L2 error of each gradient, floored by ``FLOOR`` x the joint oracle norm."""
    want = [np.asarray(w, np.float64) for w in want]
    joint = math.sqrt(sum(np.linalg.norm(w) ** 2 for w in want))
    return [np.linalg.norm(np.asarray(g, np.float64) - w)
            / max(np.linalg.norm(w), FLOOR * joint, 1e-300) for g, w in zip(got, want)]


@st.composite
def grad_cases(draw, dtype, **problem_kwargs):
    """A :class:`strategies.Case` whose inputs make BLASST skip: half of them
    ``workloads.llm_like`` (sinks, a local window, heavy hitters), half the suite's peaked or
    plain Gaussian inputs."""
    if draw(st.booleans()):
        dqk = draw(st.sampled_from([8, 16, 24, 32]))
        p = draw(S.problems(dqk=dqk, **problem_kwargs))
        seed = draw(S.seeds())
        q, k, v = workloads.llm_like(
            p.batch, p.hq, p.hkv, p.lq, p.lk, p.dqk, v_dim=p.dv, seed=seed,
            dtype=np.dtype(dtype).name, peakedness=draw(st.floats(0.5, 2.0)),
            window=draw(st.sampled_from([4.0, 16.0, 64.0])),
        )
        return S.Case(p, q, k, v, seed, 1.0, 0.0)
    return draw(S.cases(dtype, **problem_kwargs))


def fresh_dout(case, dtype):
    rng = np.random.default_rng(case.seed ^ 0x5EED)
    return rng.standard_normal(case.problem.out_shape).astype(dtype)


def check_against_oracle(case, dout, thresh, backend, dtype):
    """Forward + backward on ``backend``; compare with the masked dense oracle."""
    p = case.problem
    out, saved = br.attention_forward(case.q, case.k, case.v, thresh, causal=p.causal,
                                      backend=backend, **p.blocks)
    grads = br.attention_backward(dout, case.q, case.k, case.v, out, saved)
    for g, x in zip(grads, (case.q, case.k, case.v)):
        assert g.shape == x.shape and g.dtype == x.dtype
    keep = saved.kept_keys(p.lk)
    want = br.dense_attention_backward(dout, case.q, case.k, case.v, causal=p.causal,
                                       keep=keep)
    errs = grad_errors(grads, want)
    assert max(errs) < GRAD_TOL[dtype], f"sparsity {saved.sparsity:.2f}, dq/dk/dv errors {errs}"
    # keys that no row of their kv group kept: exactly zero dK and dV rows
    group_keep = keep.reshape(p.batch, p.hkv, p.group * p.lq, p.lk).any(axis=2)
    for g in grads[1:]:
        assert np.all(np.asarray(g)[~group_keep] == 0)
    return saved


# ---------------------------------------------------------------------------------------
# the oracle is autograd's gradient


def test_oracle_equals_torch_autograd_of_masked_dense():
    torch = pytest.importorskip("torch", reason="the torch cross-check needs torch")
    p = S.Problem(2, 4, 2, 21, 30, 16, 8, True, 8, 8)
    q, k, v = workloads.llm_like(p.batch, p.hq, p.hkv, p.lq, p.lk, p.dqk, v_dim=p.dv,
                                 dtype="float64", seed=3)
    dout = np.random.default_rng(4).standard_normal(p.out_shape)
    _, saved = br.attention_forward(q, k, v, 0.1, causal=True, backend="reference", **p.blocks)
    keep = saved.kept_keys(p.lk)
    assert 0.2 < saved.sparsity < 0.95
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    s = torch.einsum("bhid,bhjd->bhij", tq, tk.repeat_interleave(p.group, 1)) / math.sqrt(p.dqk)
    s = s.masked_fill(~torch.tensor(keep), -math.inf)
    o = torch.einsum("bhij,bhjd->bhid", torch.softmax(s, -1), tv.repeat_interleave(p.group, 1))
    o.backward(torch.tensor(dout))
    want = br.dense_attention_backward(dout, q, k, v, causal=True, keep=keep)
    assert max(grad_errors([t.grad.numpy() for t in (tq, tk, tv)], want)) < 1e-12


def test_torch_autograd_wrapping_passes_gradcheck():
    """The ``torch.autograd.Function`` of blasst_ref.backward's docstring, verbatim but for
    the tile sizes and the backend (the numpy reference: gradcheck runs the forward ~800
    times, and a kernel launch costs more than this whole problem), passes ``gradcheck`` in
    float64 at 2/3 tile sparsity."""
    torch = pytest.importorskip("torch", reason="the autograd wrapping needs torch")

    class BlasstAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, thresh, causal):
            arrays = (t.detach().numpy() for t in (q, k, v))
            out, ctx.saved = br.attention_forward(*arrays, thresh, causal=causal, block_q=4,
                                                  block_k=4, backend="reference")
            out = torch.from_numpy(out)
            ctx.save_for_backward(q, k, v, out)
            return out

        @staticmethod
        def backward(ctx, dout):
            arrays = (t.detach().numpy() for t in (dout.contiguous(), *ctx.saved_tensors))
            grads = br.attention_backward(*arrays, ctx.saved)
            return (*map(torch.from_numpy, grads), None, None)

    q, k, v = workloads.llm_like(1, 2, 1, 12, 12, 8, dtype="float64", seed=5, window=4.0)
    leaves = tuple(torch.tensor(x, requires_grad=True) for x in (q, k, v))
    _, saved = br.attention_forward(q, k, v, 0.05, causal=True, block_q=4, block_k=4)
    assert saved.sparsity > 0.5
    assert torch.autograd.gradcheck(lambda a, b, c: BlasstAttention.apply(a, b, c, 0.05, True),
                                    leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
def test_finite_differences_of_the_blasst_forward(decode):
    """The directional derivative of what BLASST computes (the reference forward, float64,
    its tile decisions unchanged by the step) equals ``<grad, direction>``, for the gradients
    of every host backend."""
    if decode:
        p = S.Problem(1, 4, 2, 3, 70, 8, 6, True, 128, 4)
    else:
        p = S.Problem(1, 4, 2, 19, 23, 8, 6, True, 8, 4)
    q, k, v = workloads.llm_like(p.batch, p.hq, p.hkv, p.lq, p.lk, p.dqk, v_dim=p.dv,
                                 dtype="float64", seed=5, window=4.0)
    rng = np.random.default_rng(6)
    dout = rng.standard_normal(p.out_shape)
    thresh = 0.05
    dirs = [rng.standard_normal(x.shape) for x in (q, k, v)]

    def loss_and_map(eps):
        r = br.blasst_attention_reference(*(x + eps * d for x, d in zip((q, k, v), dirs)),
                                          thresh, causal=True, **p.blocks)
        return float(np.sum(r.out * dout)), r.tile_map

    eps = 1e-6
    (lp, mp), (lm, mm), (_, m0) = loss_and_map(eps), loss_and_map(-eps), loss_and_map(0.0)
    assert np.array_equal(mp, m0) and np.array_equal(mm, m0), "the step moved a decision"
    assert np.any(m0 == reference.SKIPPED)
    fd = (lp - lm) / (2 * eps)
    for backend in HOST_BACKENDS:
        out, saved = br.attention_forward(q, k, v, thresh, causal=True, backend=backend,
                                          **p.blocks)
        grads = br.attention_backward(dout, q, k, v, out, saved)
        analytic = sum(float(np.sum(g * d)) for g, d in zip(grads, dirs))
        assert abs(analytic - fd) <= 1e-7 * max(1.0, abs(fd)), (backend, analytic, fd)


# ---------------------------------------------------------------------------------------
# every host backend against the oracle


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@given(data=st.data())
def test_gradients_equal_masked_dense_gradient(backend, dtype, data):
    case = data.draw(grad_cases(dtype), label="case")
    thresh = data.draw(st.one_of(st.just(0.0), S.thresholds()), label="thresh")
    saved = check_against_oracle(case, fresh_dout(case, dtype), thresh, backend, dtype)
    event(f"sparsity {round(saved.sparsity, 1)}")


@given(data=st.data())
def test_thresh_zero_is_the_dense_gradient(backend, data):
    """At ``thresh = 0`` BLASST is dense attention, and so is its gradient."""
    case = data.draw(S.cases(np.float64), label="case")
    p = case.problem
    dout = fresh_dout(case, np.float64)
    out, saved = br.attention_forward(case.q, case.k, case.v, 0.0, causal=p.causal,
                                      backend=backend, **p.blocks)
    assert saved.sparsity == 0.0
    grads = br.attention_backward(dout, case.q, case.k, case.v, out, saved)
    want = br.dense_attention_backward(dout, case.q, case.k, case.v, causal=p.causal)
    assert max(grad_errors(grads, want)) < GRAD_TOL[np.float64]


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("lq,thresh,lo,hi", [(96, 1e-3, 0.3, 0.6), (96, 0.05, 0.8, 0.95),
                                             (4, 0.01, 0.7, 0.9), (4, 0.1, 0.85, 0.95)],
                         ids=["prefill-half", "prefill-90", "decode-80", "decode-90"])
def test_llm_like_at_real_sparsity(backend, lq, thresh, lo, hi):
    """Prefill and decode problems where BLASST skips a known share of the tiles."""
    p = S.Problem(1, 4, 2, lq, 192, 32, 16, True, 16, 16)
    q, k, v = workloads.llm_like(1, 4, 2, lq, 192, 32, v_dim=16, seed=lq, dtype="float32")
    case = S.Case(p, q, k, v, lq, 1.0, 0.0)
    saved = check_against_oracle(case, fresh_dout(case, np.float32), thresh, backend,
                                 np.float32)
    assert lo <= saved.sparsity <= hi, saved.sparsity


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_float16_and_three_d_inputs(backend):
    p = S.Problem(1, 2, 1, 24, 40, 16, 16, True, 8, 8)
    q, k, v = workloads.llm_like(1, 2, 1, 24, 40, 16, dtype="float16", seed=7)
    dout = np.random.default_rng(8).standard_normal((2, 24, 16)).astype(np.float16)
    out, saved = br.attention_forward(q[0], k[0], v[0], 0.05, causal=True, backend=backend,
                                      **p.blocks)
    assert out.dtype == np.float16 and out.shape == (2, 24, 16)
    assert saved.lse.shape == (2, 24)
    grads = br.attention_backward(dout, q[0], k[0], v[0], out, saved)
    assert [g.shape for g in grads] == [(2, 24, 16), (1, 40, 16), (1, 40, 16)]
    assert all(g.dtype == np.float16 for g in grads)
    want = br.dense_attention_backward(dout, q[0], k[0], v[0], causal=True,
                                       keep=saved.kept_keys(40)[0])
    assert max(grad_errors(grads, want)) < GRAD_TOL[np.float16]


def test_cpu_fused_and_two_pass_agree_with_the_reference():
    """Both CPU work layouts against the numpy spec, with the same saved forward."""
    from blasst_ref import cpu

    q, k, v = workloads.llm_like(2, 4, 2, 77, 90, 24, v_dim=12, seed=9, dtype="float64")
    res = br.blasst_attention_reference(q, k, v, 0.02, causal=True, block_q=16, block_k=8)
    dout = np.random.default_rng(10).standard_normal(res.out.shape)
    scale = 1 / math.sqrt(24)
    want = attention_backward_reference(dout, q, k, v, res.out, res.lse, res.tile_map,
                                        causal=True, scale=scale, block_q=16, block_k=8)
    for method in ("fused", "two_pass"):
        got = tuple(np.full_like(x, np.nan) for x in (q, k, v))  # poisoned: all written?
        cpu.blasst_attention_backward(dout, q, k, v, res.out, res.lse, res.tile_map, True,
                                      scale, 16, 8, method=method, grads=got)
        assert max(grad_errors(got, want)) < 1e-12, method


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_forward_lse_is_the_kept_log_sum_exp(backend):
    """``saved.lse`` is ``log sum exp`` of each row's kept scaled scores; rows that see no
    key (causal, ``Lq > Lk``) get ``-inf``."""
    q, k, v = workloads.llm_like(1, 4, 2, 40, 30, 16, seed=11, dtype="float64")
    for thresh in (0.0, 0.05):
        out, saved = br.attention_forward(q, k, v, thresh, causal=True, backend=backend,
                                          block_q=8, block_k=8)
        keep = saved.kept_keys(30)
        s = np.einsum("bhid,bhjd->bhij", q, np.repeat(k, 2, axis=1)) / 4.0
        with np.errstate(divide="ignore"):
            want = np.log(np.sum(np.where(keep, np.exp(s), 0.0), axis=-1))
        np.testing.assert_allclose(saved.lse, want, rtol=1e-12)
        assert np.all(np.isneginf(saved.lse[:, :, :10]))  # rows 0..9 see no key


# ---------------------------------------------------------------------------------------
# errors


def test_backward_errors_name_the_argument():
    q, k, v = workloads.llm_like(1, 2, 1, 20, 20, 8, seed=12)
    out, saved = br.attention_forward(q, k, v, 0.1, causal=True, block_q=8, block_k=8)
    dout = np.ones_like(out)
    with pytest.raises(ValueError, match="dout must have the output's shape"):
        br.attention_backward(dout[:, :, :5], q, k, v, out, saved)
    with pytest.raises(TypeError, match="saved must be the SavedForBackward"):
        br.attention_backward(dout, q, k, v, out, saved.lse)
    with pytest.raises(ValueError, match="saved belongs to another forward call"):
        br.attention_backward(dout[:, :, :10], q[:, :, :10], k, v, out[:, :, :10], saved)
    with pytest.raises(TypeError, match="backend='cuda' cannot take numpy arrays"):
        br.attention_backward(dout, q, k, v, out, saved, backend="cuda")
    with pytest.raises(ValueError, match="thresh must be in"):
        br.attention_forward(q, k, v, 1.5)


# ---------------------------------------------------------------------------------------
# CUDA (Numba's simulator in CI: a few small problems)


@st.composite
def cuda_problems(draw):
    phase = draw(st.sampled_from(["prefill", "decode"]))
    b, hkv, group = 1, draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 4]))
    dqk = draw(st.sampled_from([8, 16]))
    dv = draw(st.sampled_from([dqk, 4]))
    causal = draw(st.booleans())
    if phase == "prefill":
        lq = draw(st.integers(17, 24))
        lk = draw(st.integers(4, 24))
        bq = draw(st.sampled_from([8, 12]))
    else:
        lq = draw(st.integers(1, 3))
        lk = draw(st.integers(8, 40))
        bq = 128
    bk = draw(st.sampled_from([4, 8]))
    return S.Problem(b, hkv * group, hkv, lq, lk, dqk, dv, causal, bq, bk)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
@settings(max_examples=4)
@given(p=cuda_problems(), seed=S.seeds(), thresh=st.sampled_from([0.0, 0.02, 0.2]))
def test_cuda_gradients_equal_masked_dense_gradient(dtype, p, seed, thresh):
    from numba import cuda

    q, k, v = workloads.llm_like(p.batch, p.hq, p.hkv, p.lq, p.lk, p.dqk, v_dim=p.dv,
                                 seed=seed % 1000, dtype=np.dtype(dtype).name, window=4.0)
    dout = np.random.default_rng(seed).standard_normal(p.out_shape).astype(dtype)
    dq_, dk_, dv_, ddo = (cuda.to_device(x) for x in (q, k, v, dout))
    out, saved = br.attention_forward(dq_, dk_, dv_, thresh, causal=p.causal, **p.blocks)
    assert saved.backend == "cuda"
    # the forward's decisions and lse are the reference's
    ref = br.blasst_attention_reference(q, k, v, thresh, causal=p.causal, **p.blocks)
    np.testing.assert_array_equal(saved.tile_map.copy_to_host(), ref.tile_map)
    lse = saved.lse.copy_to_host()
    finite = np.isfinite(ref.lse)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref.lse))
    np.testing.assert_allclose(lse[finite], ref.lse[finite], rtol=1e-5, atol=1e-5)
    grads = br.attention_backward(ddo, dq_, dk_, dv_, out, saved)
    host = [g.copy_to_host() for g in grads]
    assert all(g.dtype == dtype for g in host)
    want = br.dense_attention_backward(dout, q, k, v, causal=p.causal,
                                       keep=saved.kept_keys(p.lk))
    errs = grad_errors(host, want)
    note(f"sparsity {saved.sparsity:.2f}, errors {errs}")
    assert max(errs) < GRAD_TOL[dtype], errs


def test_cuda_matches_cpu_on_a_decode_gqa_problem():
    """Decode (split-KV tile map per kv group), GQA 4, Dv != Dqk, several skipped tiles:
    the CUDA gradients equal the CPU ones computed from the same decisions."""
    from numba import cuda

    q, k, v = workloads.llm_like(1, 4, 1, 2, 48, 8, v_dim=4, seed=13, window=4.0)
    dout = np.random.default_rng(14).standard_normal((1, 4, 2, 4)).astype(np.float32)
    out, saved = br.attention_forward(*(cuda.to_device(x) for x in (q, k, v)), 0.05,
                                      causal=True, block_k=4)
    assert saved.phase == "decode" and saved.sparsity > 0.3
    grads = br.attention_backward(cuda.to_device(dout), *(cuda.to_device(x) for x in (q, k, v)),
                                  out, saved)
    out_c, saved_c = br.attention_forward(q, k, v, 0.05, causal=True, block_k=4, backend="cpu")
    np.testing.assert_array_equal(saved.tile_map.copy_to_host(), saved_c.tile_map)
    want = br.attention_backward(dout, q, k, v, out_c, saved_c)
    assert max(grad_errors([g.copy_to_host() for g in grads], want)) < 1e-5


@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") == "1",
                    reason="real sizes need a GPU (the simulator would take hours)")
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "no-mask"])
def test_cuda_real_size_on_the_gpu(dtype, causal):
    """B=1, Hq=8, Hkv=2, L=1024, D=128 on the GPU, torch tensors (the path a training loop
    takes): the gradients against the float64 oracle of the kept keys."""
    torch = pytest.importorskip("torch", reason="the GPU check uses torch CUDA tensors")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device here")
    b, hq, hkv, length, d = 1, 8, 2, 1024, 128
    q, k, v = workloads.llm_like(b, hq, hkv, length, length, d, seed=15)
    dout = np.random.default_rng(16).standard_normal(q.shape).astype(np.float32)
    tdt = getattr(torch, dtype)
    tq, tk, tv, tdo = (torch.from_numpy(x).to("cuda", tdt) for x in (q, k, v, dout))
    out, saved = br.attention_forward(tq, tk, tv, 1e-3, causal=causal)
    grads = br.attention_backward(tdo, tq, tk, tv, out, saved)
    assert all(g.dtype == tdt and g.is_cuda for g in grads)
    host = [x.float().cpu().numpy() for x in (tq, tk, tv, tdo)]
    want = br.dense_attention_backward(host[3], *host[:3], causal=causal,
                                       keep=saved.kept_keys(length))
    errs = grad_errors([g.float().cpu().numpy() for g in grads], want)
    tol = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}[dtype]
    assert max(errs) < tol, (saved.sparsity, errs)
    assert 0.2 < saved.sparsity < 0.98


# ---------------------------------------------------------------------------------------
# the benchmark subcommand (a smoke test at a toy size; the numbers are in BENCHMARKS.md)


def test_bench_backward_table_and_json(capsys):
    import json

    from blasst_ref.bench import __main__ as bench_main

    tiny = ["backward", "--L", "160", "--H", "4", "--Hkv", "2", "--D", "16", "--repeat", "1",
            "--quiet", "--thresh", "0", "auto:0.5", "--block-q", "32", "--block-k", "16"]
    assert bench_main.main(tiny) == 0
    out = capsys.readouterr().out
    assert out.startswith("machine: ")
    header = next(ln for ln in out.splitlines() if ln.startswith("variant"))
    for col in ("sparsity", "ms", "GFLOP/s", "x torch", "x dense", "grad diff"):
        assert col in header
    assert "blasst cpu fused bwd @ 0 " in out and "blasst cpu two-pass bwd @ 0 " in out
    assert bench_main.main([*tiny, "--json", "--methods", "fused"]) == 0
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()][1:]
    ours = [r for r in rows if r["variant"].startswith("blasst cpu")]
    assert len(ours) == 2 and ours[0]["sparsity"] == 0.0 and 0.3 < ours[1]["sparsity"] < 0.7
    assert ours[0]["vs_own_dense"] == 1.0
    if any(r["variant"] == "torch SDPA bwd" for r in rows):
        assert ours[0]["grad_diff"] < 1e-5  # our dense gradient is torch's
