"""Dynamic int8 (per-row u8 activation scales computed at run time), docs/DESIGN.md §7.4.

* The row quantizer is ONNX's ``DynamicQuantizeLinear`` applied to each row: equal bit for
  bit to ONNX Runtime's operator run on that row alone, and to the numpy meaning of the op.
* The fused kernel (rows quantized, u8 x s8 -> s32, per-row scale and compensation in the
  epilogue) equals its numpy meaning: the integers exactly, hence the float output to
  rounding of the same float operations.
* ``quantize_graph(..., activations="dynamic")`` writes the QDQ form; compiled, it lowers
  to ``QMatMulDynamic`` kernels that equal the QDQ graph's interpretation. It is closer to
  the float graph than static quantization on the same samples, and within 1e-2 (relative
  L2) on a transformer layer. (On the random-weight DLRM MLPs the s8 weights alone cost
  about 1%: docs/BENCHMARKS.md.)
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from blasst_ref import graph as bg
from blasst_ref.graph import int8_kernels as Q8
from blasst_ref.graph import models
from blasst_ref.graph.ops_dynamic import qmatmul_dynamic_array, quantize_rows_array

seeds = st.integers(0, 2**32 - 1)


def rows_with_edge_cases(rng, m, k):
    """Gaussian rows of mixed scale, plus a zero row, an all-positive and an all-negative
    row and one with an outlier (when there are enough rows)."""
    x = (rng.standard_normal((m, k)) * rng.choice([0.01, 1.0, 30.0], (m, 1))).astype(np.float32)
    if m > 4:
        x[1] = 0.0
        x[2] = np.abs(x[2])
        x[3] = -np.abs(x[3])
        x[4, 0] = 1e3
    return x


@given(m=st.integers(1, 40), k=st.integers(1, 70), seed=seeds)
def test_quantize_rows_kernel_equals_numpy(m, k, seed):
    x = rows_with_edge_cases(np.random.default_rng(seed), m, k)
    q, s, z = Q8.quantize_rows(x)
    q_ref, s_ref, z_ref = quantize_rows_array(x)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(s, s_ref[:, 0])
    np.testing.assert_array_equal(z, z_ref[:, 0])
    # every row round-trips within half a step, and 0 is exact
    err = np.abs((q.astype(np.float32) - z[:, None]) * s[:, None] - x)
    assert np.all(err <= 0.5001 * s[:, None])


def test_quantize_rows_non_finite_and_extreme_rows():
    """Rows holding NaN, +-inf, values near the float32 limit (hi - lo overflows), -0.0 or
    one tiny value: the kernel (serial and parallel) equals the numpy meaning bit for bit
    (a non-finite row: scale 1, zero point 0, NaN -> 0)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((40, 67)).astype(np.float32)
    x[0, 3] = np.nan
    x[1, 0] = np.inf
    x[2, 66] = -np.inf
    x[3, :] = -np.nan
    x[4, :] = 3e38
    x[4, 1] = -3e38
    x[5, :] = -0.0
    x[6, :] = 0.0
    x[6, 9] = 1e-30
    x[7] = -np.abs(x[7])
    x[8] = np.abs(x[8]) * 1e6
    q_ref, s_ref, z_ref = quantize_rows_array(x)
    for threads in (1, 2):
        q, s, z = Q8.quantize_rows(x, threads=threads)
        np.testing.assert_array_equal(q, q_ref)
        np.testing.assert_array_equal(s, s_ref[:, 0])
        np.testing.assert_array_equal(z, z_ref[:, 0])


def test_quantize_rows_equals_onnxruntime_dynamic_quantize_linear():
    """Each row alone through ONNX Runtime's DynamicQuantizeLinear: same q, scale and zero
    point, bit for bit."""
    onnx = pytest.importorskip("onnx", reason="optional extra: pip install 'blasst_ref[onnx]'")
    ort = pytest.importorskip("onnxruntime", reason="optional extra: pip install "
                              "'blasst_ref[onnx]'")
    from onnx import TensorProto, helper

    k = 37
    x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])
    outs = [helper.make_tensor_value_info("q", TensorProto.UINT8, [1, k]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("z", TensorProto.UINT8, [])]
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])
    opsets = [helper.make_opsetid("", 17)]
    model = helper.make_model(helper.make_graph([node], "dql", [x_in], outs),
                              opset_imports=opsets,
                              ir_version=helper.find_min_ir_version_for(opsets))
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rows_with_edge_cases(np.random.default_rng(7), 24, k)
    x[1] = 0.0
    q, s, z = Q8.quantize_rows(x)
    for i in range(x.shape[0]):
        if not np.any(x[i]):
            continue  # ORT divides by a zero scale there; we define scale 1, zero point 0
        q_ort, s_ort, z_ort = sess.run(None, {"x": x[i:i + 1]})
        np.testing.assert_array_equal(q[i], q_ort[0], err_msg=f"row {i}")
        assert s[i] == s_ort and z[i] == z_ort, (i, s[i], s_ort, z[i], z_ort)


@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
@given(m=st.integers(1, 30), k=st.integers(1, 90), n=st.integers(1, 70), seed=seeds,
       bias=st.booleans(), residual=st.booleans())
def test_dynamic_kernel_equals_its_numpy_meaning(act, m, k, n, seed, bias, residual):
    from blasst_ref.graph import kernels as K

    rng = np.random.default_rng(seed)
    x = rows_with_edge_cases(rng, m, k)
    w = rng.integers(-127, 128, (k, n)).astype(np.int8)
    ws = (rng.random(n) * 0.02 + 1e-3).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    r = rng.standard_normal((m, n)).astype(np.float32) if residual else None
    pw = Q8.pack_int8_weight(w, ws)
    out = np.full((m, n), np.nan, np.float32)  # poisoned: every element must be written
    got = Q8.qmatmul_dynamic(x, pw, b, K.ACT_NAMES.index(act), r, out)
    want = qmatmul_dynamic_array(x, w, b, r, {"w_scale": ws, "act": act})
    if act == "gelu":  # erfc in the kernel, scipy's erf in numpy: a few ulps apart
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    else:  # same integers, same float operations in the same order
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("m, k, n, act, residual", [
    (101, 130, 70, "relu", True),   # rows not a multiple of any micro-kernel's
    (64, 384, 200, "none", False),
    (250, 61, 260, "gelu", True),   # more row blocks than threads x 1, columns > one block
])
def test_dynamic_one_region_driver_equals_numpy_and_two_region_path(m, k, n, act,
                                                                     residual):
    """Above the serial threshold the rows are quantized inside the kernel's parallel
    region (each task its own rows): the same integers as the numpy meaning (the float
    output equal, GELU to a few ulps) and bit for bit the serial two-pass path."""
    import numba

    from blasst_ref.graph import kernels as K

    rng = np.random.default_rng(m * 7 + k)
    x = rows_with_edge_cases(rng, m, k)
    x[m // 2, 3] = np.nan  # a non-finite row in a parallel task
    w = rng.integers(-127, 128, (k, n)).astype(np.int8)
    ws = (rng.random(n) * 0.02 + 1e-3).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    r = rng.standard_normal((m, n)).astype(np.float32) if residual else None
    pw = Q8.pack_int8_weight(w, ws)
    plan = Q8.DynamicQMatMulPlan(pw, b, K.ACT_NAMES.index(act))
    cap = numba.get_num_threads()
    if cap > 1:  # CI has 2 cores: the one-region driver is the one under test
        assert Q8.dynamic_row_blocks(m, pw, cap) is not None
        assert Q8.auto_threads(m, n, k) == cap
    out = np.full((m, n), np.nan, np.float32)
    got = plan(x, r, out)
    serial = Q8.DynamicQMatMulPlan(pw, b, K.ACT_NAMES.index(act), threads=1)(x, r)
    np.testing.assert_array_equal(got, serial)
    want = qmatmul_dynamic_array(x, w, b, r, {"w_scale": ws, "act": act})
    if act == "gelu":
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    else:
        np.testing.assert_array_equal(got, want)


#: graph -> the bound on the dynamic int8 result's relative L2 error against float (None:
#: only "better than static")
GRAPHS = {
    "dlrm-bottom": (lambda: models.dlrm_bottom_mlp(16), None),
    "bert": (lambda: models.bert_layer(2, 16, 64, 4), 1e-2),
}


@pytest.mark.parametrize("model", sorted(GRAPHS))
def test_quantize_graph_dynamic(model):
    build, bound = GRAPHS[model]
    g = build()
    calib = [models.example_inputs(g, seed=s) for s in range(2)]
    feeds = models.example_inputs(g, seed=5)
    qg = bg.quantize_graph(g, calib, activations="dynamic")
    ops = qg.count_ops()
    assert ops.get("DynamicQuantizeRows") == ops.get("DequantizeRows") > 0
    assert "Quantize" not in ops
    want_float = bg.interpret(g, **feeds)["y"]
    qdq = bg.interpret(qg, **feeds)["y"]
    cg = bg.compile(qg)
    assert "QMatMulDynamic" in cg.graph.count_ops()
    assert "DynamicQuantizeRows" not in cg.graph.count_ops()
    got = cg(**feeds)["y"]

    def rel(a, b):
        return np.linalg.norm((a - b).astype(np.float64)) / np.linalg.norm(b)

    assert rel(got, qdq) <= 1e-5
    static = bg.interpret(bg.quantize_graph(g, calib), **feeds)["y"]
    assert rel(got, want_float) < rel(static, want_float)
    if bound is not None:
        assert rel(got, want_float) <= bound


def test_activations_argument_is_checked():
    g = models.dlrm_bottom_mlp(4)
    with pytest.raises(ValueError, match="activations must be 'static' or 'dynamic'"):
        bg.quantize_graph(g, models.example_inputs(g), activations="per_token")
