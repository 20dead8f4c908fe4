"""``blasst_ref.graph`` at the edges: what each call returns, inputs no graph was built for,
and arguments that compile but could not run.

Each case here once went wrong: two outputs of one call shared memory, a broadcasting mask
changed the fused attention's output shape, a NaN calibration sample made an int8 graph
all NaN, a float16 graph compiled and then failed on every call, a big-endian feed reached
a kernel, a shape of 2.5 was truncated, ``attention_block=(0, 0)`` failed only when called,
and a tensor of 2**64 bytes reported 0."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_outputs_close, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import random_graphs

from blasst_ref import graph as bg

# ---------------------------------------------------------------------------------------
# outputs are independent arrays


def _check_outputs_are_independent(run, feeds, other_feeds):
    """Writing into any output of ``run(**feeds)`` changes no other output and no input,
    and a later call changes none of them (so none shares memory with an arena)."""
    feeds_before = {n: x.copy() for n, x in feeds.items()}
    outs = run(**feeds)
    for name, arr in outs.items():
        assert arr.flags.writeable, name
        before = {n: o.copy() for n, o in outs.items() if n != name}
        arr[...] = 7 if arr.dtype.kind in "iu" else -123.25
        for other, value in before.items():
            np.testing.assert_array_equal(outs[other], value, err_msg=f"{name} -> {other}")
        for n, x in feeds.items():
            np.testing.assert_array_equal(x, feeds_before[n], err_msg=f"{name} -> input {n}")
    kept = {n: o.copy() for n, o in outs.items()}
    run(**other_feeds)
    for n, o in outs.items():
        np.testing.assert_array_equal(o, kept[n], err_msg=f"a later call changed {n}")


def _double_transpose_graph():
    g = bg.Graph("tt")
    a = g.relu(g.input("x", (3, 4)))
    g.output("a", a)
    g.output("b", g.transpose(g.transpose(a, (1, 0)), (1, 0)))  # merged into a view of a
    return g


def _same_tensor_twice_graph():
    g = bg.Graph("twice")
    y = g.tanh(g.input("x", (2, 5)))
    g.output("y1", y)
    g.output("y2", y)
    return g


def _reshape_of_output_graph():
    g = bg.Graph("reshape")
    y = g.exp(g.tanh(g.input("x", (4, 6))))
    g.output("y", y)
    g.output("flat", g.reshape(y, (24,)))
    g.output("flat2", g.reshape(y, (6, 4)))
    return g


def _input_passed_through_graph():
    g = bg.Graph("through")
    x = g.input("x", (2, 3))
    g.output("x_again", x)
    g.output("x_view", g.reshape(x, (3, 2)))
    g.output("y", g.relu(x))
    return g


ALIASING_GRAPHS = {"transpose-transpose": _double_transpose_graph,
                   "same-tensor-twice": _same_tensor_twice_graph,
                   "reshape-of-output": _reshape_of_output_graph,
                   "input-passed-through": _input_passed_through_graph}


@pytest.mark.parametrize("switches", [dict(), dict(fuse=False), dict(plan_memory=False)])
@pytest.mark.parametrize("name", sorted(ALIASING_GRAPHS))
def test_outputs_never_share_memory(name, switches):
    g = ALIASING_GRAPHS[name]()
    cg = bg.compile(g, **switches)
    feeds = bg.models.example_inputs(g, seed=1)
    other = bg.models.example_inputs(g, seed=2)
    assert_outputs_close(cg(**feeds), bg.interpret(g, **feeds))
    _check_outputs_are_independent(cg, feeds, other)
    _check_outputs_are_independent(lambda **f: bg.interpret(g, **f), feeds, other)


@settings(max_examples=20)
@given(data=random_graphs(), again=st.booleans(), view=st.booleans(),
       switches=st.sampled_from([dict(), dict(matmul_kernel="blas"), dict(fuse=False)]))
def test_outputs_of_random_graphs_never_share_memory(data, again, view, switches):
    g, feeds = data
    first = next(iter(g.outputs.values()))
    if again:  # one tensor under two names
        g.output("again", first)
    if view:  # a view of an output, as an output
        g.output("view", g.reshape(first, (-1,)))
    other = {n: (x * 0.5 - 0.25).astype(x.dtype) for n, x in feeds.items()}
    cg = bg.compile(g, **switches)
    assert_outputs_close(cg(**feeds), bg.interpret(g, **feeds), tol=1e-4)
    _check_outputs_are_independent(cg, feeds, other)


# ---------------------------------------------------------------------------------------
# attention fusion keeps the graph's shapes


def _attention_pattern(lq, lk, d, mask_shape, mask_causal, scale_shape, heads=2):
    """``softmax(Q Kt * scale + mask) V`` with a constant mask and scale of the given
    shapes (either may broadcast the scores)."""
    g = bg.Graph("attn")
    q = g.input("q", (1, heads, lq, d))
    k = g.input("k", (1, heads, lk, d))
    v = g.input("v", (1, heads, lk, d))
    s = g.matmul(q, g.transpose(k, (0, 1, 3, 2)))
    s = g.mul(s, g.constant("scale", np.full(scale_shape, 1 / np.sqrt(d), np.float32)))
    if mask_shape is not None:
        rows = mask_shape[-2]
        mask = np.zeros((rows, lk), np.float32)
        if mask_causal:  # bottom-right causal for `rows` query rows
            allowed = np.arange(lk)[None, :] <= np.arange(rows)[:, None] + (lk - rows)
            mask[~allowed] = -1e9
        s = g.add(s, g.constant("mask", np.broadcast_to(mask, mask_shape).copy()))
    g.output("o", g.matmul(g.softmax(s, -1), v))
    return g


def test_a_mask_with_more_rows_than_q_is_not_fused_into_fewer_rows():
    g = _attention_pattern(1, 8, 4, (1, 1, 4, 8), False, ())
    cg = bg.compile(g)
    feeds = bg.models.example_inputs(g, seed=3)
    want = bg.interpret(g, **feeds)
    got = cg(**feeds)
    assert got["o"].shape == want["o"].shape == (1, 2, 4, 4)
    assert_outputs_close(got, want)


def test_a_scale_of_higher_rank_is_not_fused_into_a_lower_rank():
    g = _attention_pattern(6, 8, 4, None, False, (1, 1, 1, 1, 1))
    feeds = bg.models.example_inputs(g, seed=4)
    want = bg.interpret(g, **feeds)
    assert want["o"].shape == (1, 1, 2, 6, 4)
    assert_outputs_close(bg.compile(g)(**feeds), want)


@settings(max_examples=30)
@given(lq=st.one_of(st.just(1), st.integers(1, 6)), lk=st.integers(1, 9),
       d=st.sampled_from([2, 4]),
       heads=st.integers(1, 2), mask=st.sampled_from(["none", "zeros", "causal"]),
       mask_dims=st.lists(st.booleans(), min_size=4, max_size=4),
       extra_rows=st.integers(0, 3), scale_rank=st.integers(0, 5), seed=st.integers(0, 99))
def test_fused_attention_equals_interpret_for_any_broadcast(lq, lk, d, heads, mask,
                                                            mask_dims, extra_rows, scale_rank,
                                                            seed):
    """Masks and scales of any shape that broadcasts against the scores: fused where the
    fused op computes the same thing, left alone elsewhere, always the interpreter's
    outputs."""
    mask_shape = None
    if mask != "none":
        full = (1, heads, lq, lk)
        mask_shape = tuple(n if keep else 1 for n, keep in zip(full, mask_dims))
        if lq == 1 and extra_rows:  # rows that Q does not have: the scores broadcast
            mask_shape = mask_shape[:2] + (1 + extra_rows, lk)
        mask_shape = mask_shape[:-1] + (lk,)
    g = _attention_pattern(lq, lk, d, mask_shape, mask == "causal", (1,) * scale_rank,
                           heads)
    feeds = bg.models.example_inputs(g, seed=seed)
    want = bg.interpret(g, **feeds)
    got = bg.compile(g)(**feeds)
    assert_outputs_close(got, want, tol=1e-5)


# ---------------------------------------------------------------------------------------
# calibration samples of quantize_graph


@settings(max_examples=20)
@given(bad=st.sampled_from([np.nan, np.inf, -np.inf]), n_samples=st.integers(1, 3),
       which=st.integers(0, 2), at=st.integers(0, 8 * 13 - 1),
       bias_correction=st.booleans())
def test_non_finite_calibration_samples_are_rejected(bad, n_samples, which, at,
                                                     bias_correction):
    g = bg.models.mlp([13, 16, 8], 8)
    samples = [bg.models.example_inputs(g, seed=s) for s in range(n_samples)]
    which = which % n_samples
    samples[which]["x"].reshape(-1)[at] = bad
    kind = "NaN" if np.isnan(bad) else "inf"
    with pytest.raises(bg.GraphError, match=rf"samples\[{which}\]: input 'x' holds {kind}"), \
            np.errstate(invalid="ignore", over="ignore"):  # the sample is traced first
        bg.quantize_graph(g, samples, bias_correction=bias_correction)


def test_an_intermediate_that_overflows_in_a_sample_is_named():
    g = bg.Graph("overflow")
    x = g.input("x", (4, 3))
    h = g.exp(x)  # finite input, inf activation
    g.output("y", g.matmul(h, g.constant("w", np.ones((3, 2), np.float32))))
    feeds = {"x": np.array([[1, 2, 3]] * 3 + [[100, 0, 0]], np.float32)}
    with pytest.raises(bg.GraphError, match=r"samples\[0\]: tensor 'exp_0' \(Exp exp_0\) "
                                            r"holds inf"), np.errstate(all="ignore"):
        bg.quantize_graph(g, feeds)


# ---------------------------------------------------------------------------------------
# NaN into Quantize: the interpreter's rule, the compiled kernels', ONNX Runtime's


def _quantize_graph_of(dtype, zero_point):
    g = bg.Graph("q")
    q = g.quantize(g.input("x", (1, 6)), 0.5, zero_point, dtype=dtype)
    g.output("q", q)
    g.output("back", g.dequantize(q, 0.5, zero_point))
    return g


_SPECIAL = np.array([[np.nan, np.inf, -np.inf, 1.0, -np.nan, 1e30]], np.float32)


@pytest.mark.parametrize("dtype,zero_point,lo,hi", [("uint8", 100, 0, 255),
                                                     ("int8", 3, -128, 127)])
def test_nan_quantizes_to_the_zero_point_in_the_interpreter_and_the_kernels(dtype, zero_point,
                                                                             lo, hi):
    """NaN quantizes as 0.0 does (to the zero point, and back to 0.0); +-inf saturate."""
    g = _quantize_graph_of(dtype, zero_point)
    want = bg.interpret(g, x=_SPECIAL)
    np.testing.assert_array_equal(want["q"], [[zero_point, hi, lo, zero_point + 2,
                                               zero_point, hi]])
    assert want["back"][0, 0] == 0.0 and want["back"][0, 4] == 0.0
    for switches in (dict(), dict(fuse=False)):
        got = bg.compile(g, **switches)(x=_SPECIAL)
        np.testing.assert_array_equal(got["q"], want["q"])


@pytest.mark.parametrize("dtype,zero_point,lo", [("uint8", 100, 0), ("int8", 3, -128)])
def test_onnxruntime_quantizes_nan_to_the_lowest_value(dtype, zero_point, lo):
    """The documented difference: ONNX leaves NaN undefined for 8-bit outputs, and ONNX
    Runtime gives the type's lowest value; everything else agrees. (If this fails, ONNX
    Runtime changed: update ``quantize_array``'s docstring.)"""
    pytest.importorskip("onnxruntime", reason="optional extra: pip install 'blasst_ref[onnx]'")
    from blasst_ref.graph.onnx_export import run_onnxruntime

    g = _quantize_graph_of(dtype, zero_point)
    ort = run_onnxruntime(g, {"x": _SPECIAL})["q"]
    ours = bg.interpret(g, x=_SPECIAL)["q"]
    nan = np.isnan(_SPECIAL)
    np.testing.assert_array_equal(ort[nan], lo)
    np.testing.assert_array_equal(ort[~nan], ours[~nan])


# ---------------------------------------------------------------------------------------
# float16 graphs run (their ops' numpy meaning where a Numba kernel takes float32/64 only)


def _float16_layer():
    rng = np.random.default_rng(5)
    g = bg.Graph("f16")
    x = g.input("x", (6, 8), "float16")
    w = g.constant("w", (rng.standard_normal((8, 8)) / 3).astype(np.float16))
    b = g.constant("b", rng.standard_normal(8).astype(np.float16))
    h = g.gelu(g.add(g.matmul(x, w), b))
    h = g.layernorm(g.add(h, x), g.constant("gamma", np.ones(8, np.float16)), b)
    g.output("p", g.softmax(g.matmul(h, g.transpose(h, (1, 0)))))
    g.output("h", g.relu(h))
    return g


@pytest.mark.parametrize("switches", [dict(), dict(matmul_kernel="blas"), dict(fuse=False)])
def test_a_float16_layer_compiles_and_runs(switches):
    g = _float16_layer()
    feeds = bg.models.example_inputs(g, seed=1)
    got = bg.compile(g, **switches)(**feeds)
    assert all(o.dtype == np.float16 for o in got.values())
    assert_outputs_close(got, bg.interpret(g, **feeds), tol=2e-3)


@settings(max_examples=15)
@given(data=random_graphs(dtype="float16"),
       switches=st.sampled_from([dict(), dict(matmul_kernel="blas"), dict(fuse=False)]))
def test_float16_random_graphs_equal_interpret(data, switches):
    g, feeds = data
    want = bg.interpret(g, **feeds)
    assert_outputs_close(bg.compile(g, **switches)(**feeds), want, tol=1e-2)


def test_float16_attention_pattern_is_fused_and_runs():
    g = bg.Graph("attn16")
    q, k, v = (g.input(n, (1, 2, 24, 8), "float16") for n in "qkv")
    s = g.mul(g.matmul(q, g.transpose(k, (0, 1, 3, 2))), 1 / np.sqrt(8))
    g.output("o", g.matmul(g.softmax(s), v))
    cg = bg.compile(g)
    assert cg.graph.count_ops().get("Attention") == 1
    feeds = bg.models.example_inputs(g, seed=2)
    got = cg(**feeds)["o"]
    assert got.dtype == np.float16
    want = bg.interpret(g, **feeds)["o"]
    assert rel_err(got, want) < 3e-3


# ---------------------------------------------------------------------------------------
# feeds in any byte order


@settings(max_examples=15)
@given(data=random_graphs(), order=st.sampled_from([">", "<", "="]),
       switches=st.sampled_from([dict(), dict(matmul_kernel="blas"), dict(fuse=False)]))
def test_feeds_in_any_byte_order_give_the_native_result(data, order, switches):
    g, feeds = data
    swapped = {n: x.astype(x.dtype.newbyteorder(order)) for n, x in feeds.items()}
    cg = bg.compile(g, **switches)
    want = cg(**feeds)
    got = cg(**swapped)
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype  # native byte order out
        np.testing.assert_array_equal(got[name], want[name])
    interpreted = bg.interpret(g, **swapped)
    assert_outputs_close(interpreted, bg.interpret(g, **feeds), tol=0.0)


def test_a_big_endian_int8_graph_feed():
    g = bg.models.mlp([13, 16, 8], 4)
    qg = bg.quantize_graph(g, [bg.models.example_inputs(g, seed=s) for s in range(2)])
    x = bg.models.example_inputs(g, seed=3)["x"]
    cg = bg.compile(qg)
    np.testing.assert_array_equal(cg(x=x.astype(">f4"))["y"], cg(x=x)["y"])


# ---------------------------------------------------------------------------------------
# shapes and sizes


@pytest.mark.parametrize("shape", [(2.5, 2), (2, 2.0), (True, 3), ("2", 2), (2, None),
                                   (np.float64(3), 1)], ids=repr)
def test_input_shapes_must_be_integers(shape):
    g = bg.Graph("shapes")
    with pytest.raises(bg.GraphError, match=r"input 'x': shape must be a tuple of integers"):
        g.input("x", shape)


def test_numpy_integer_shapes_are_accepted():
    g = bg.Graph("shapes")
    x = g.input("x", (np.int64(2), np.uint8(3)))
    assert x.shape == (2, 3) and all(type(s) is int for s in x.shape)


@pytest.mark.parametrize("op,attrs,message", [
    ("Reshape", {"shape": (2.5, 4)}, r"shape must hold integers"),
    ("Reshape", {"shape": (5.0, 2)}, r"shape must hold integers"),
    ("Transpose", {"perm": (0.5, 1)}, r"perm must hold integers"),
    ("Transpose", {"perm": (1.0, 0)}, r"perm must hold integers"),
])
def test_layout_attributes_must_be_integers(op, attrs, message):
    g = bg.Graph("attrs")
    x = g.input("x", (2, 5))
    with pytest.raises(bg.GraphError, match=rf"{op} .*: {message}"):
        g.op(op, x, **attrs)


def test_nbytes_and_size_do_not_wrap():
    info = bg.TensorInfo("t", (2**32, 2**32), "float32", "input")
    assert info.size == 2**64
    assert info.nbytes == 2**66


def test_reshape_of_a_huge_tensor_checks_its_true_size():
    g = bg.Graph("huge")
    x = g.input("x", (2**32, 2**32))
    with pytest.raises(bg.GraphError, match=r"cannot reshape"):
        g.reshape(x, (1,))  # 2**64 elements wrapped to 0 in int64 once
    assert g.reshape(x, (2**16, -1)).shape == (2**16, 2**48)


# ---------------------------------------------------------------------------------------
# compile() arguments


@pytest.mark.parametrize("block,exc", [((0, 0), ValueError), ((16, 0), ValueError),
                                       ((-1, None), ValueError), ((16.5, 16), TypeError),
                                       ((True, 16), TypeError), ((16,), ValueError),
                                       (16, TypeError), ("16x16", TypeError)],
                         ids=repr)
def test_attention_block_is_checked_at_compile(block, exc):
    g = bg.models.llm_block(1, 24, 32, 2, 1)
    with pytest.raises(exc, match=r"attention_block must be \(block_q, block_k\)"):
        bg.compile(g, attention_block=block)


def test_attention_block_takes_numpy_integers_and_none():
    g = bg.models.llm_block(1, 24, 32, 2, 1, seed=3)
    feeds = bg.models.example_inputs(g, seed=4)
    want = bg.compile(g, attention_block=(8, 16))(**feeds)
    got = bg.compile(g, attention_block=(np.int16(8), np.uint64(16)))(**feeds)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    bg.compile(g, attention_block=(None, 8))(**feeds)
