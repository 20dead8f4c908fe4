"""int8 in the graph: Quantize/Dequantize semantics, post-training quantization, the
``QMatMul`` lowering, and int8 model graphs against their float originals (docs/DESIGN.md §7.4)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import record_calls, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

from blasst_ref import graph as bg
from blasst_ref.graph import ops
from blasst_ref.graph.quantize import activation_params, quantize_graph, weight_params


# ----------------------------------------------------------------------------- Q/DQ semantics
def test_quantize_rounds_half_to_even_and_saturates():
    x = np.array([-1.0, 0.0, 0.5, 1.5, 2.5, -0.5, -1.5, 300.0, -300.0, np.nan], np.float32)
    got = ops.quantize_array(x, 1.0, 10, "uint8")
    np.testing.assert_array_equal(got, [9, 10, 10, 12, 12, 10, 8, 255, 0, 10])
    got = ops.quantize_array(x, 1.0, 0, "int8")
    np.testing.assert_array_equal(got, [-1, 0, 0, 2, 2, 0, -2, 127, -128, 0])
    assert ops.quantize_array(x, 1.0, 0, "int8").dtype == np.int8


def test_per_channel_quantize_uses_one_scale_per_channel():
    x = np.array([[1.0, 10.0], [-2.0, -20.0]], np.float32)
    q = ops.quantize_array(x, np.array([1.0, 10.0]), np.array([0, 0]), "int8", axis=1)
    np.testing.assert_array_equal(q, [[1, 1], [-2, -2]])
    back = ops.dequantize_array(q, np.array([1.0, 10.0]), np.array([0, 0]), axis=1)
    np.testing.assert_array_equal(back, x)


@settings(max_examples=60)
@given(seed=st.integers(0, 2**31 - 1), lo=st.floats(-50, 0), width=st.floats(1e-3, 100))
def test_quantize_dequantize_round_trip_error_is_at_most_half_a_step(seed, lo, width):
    rng = np.random.default_rng(seed)
    x = rng.uniform(lo, lo + width, size=257).astype(np.float32)
    scale, zp = activation_params(x.min(), x.max())
    back = ops.dequantize_array(ops.quantize_array(x, scale, zp, "uint8"), scale, zp)
    # half a step, plus float32 rounding of x / scale
    assert np.max(np.abs(back.astype(np.float64) - x)) <= scale / 2 * (1 + 1e-5) + 1e-6 * \
        np.abs(x).max()


def test_weight_params_are_symmetric_per_channel():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 5)).astype(np.float32) * np.array([1, 10, 0.1, 3, 1e-3],
                                                                    np.float32)
    q, scale = weight_params(w)
    assert q.dtype == np.int8 and scale.shape == (5,)
    assert np.all(np.abs(q).max(axis=0) == 127)  # every channel uses its full range
    assert np.max(np.abs(q * scale - w) / scale) <= 0.5 + 1e-5


def test_graph_quantize_and_dequantize_ops():
    g = bg.Graph("qdq")
    x = g.input("x", (4, 3))
    q = g.quantize(x, 0.1, 128)
    g.output("q", q)
    g.output("y", g.dequantize(q, 0.1, 128))
    assert g.tensors[q.name].dtype == "uint8"
    xv = np.array([[0.05, 0.15, -0.05], [1, 2, 3], [-20, 20, 0], [0.25, 0.35, 0.45]],
                  np.float32)
    out = bg.interpret(g, x=xv)
    np.testing.assert_array_equal(out["q"], ops.quantize_array(xv, 0.1, 128, "uint8"))
    np.testing.assert_allclose(out["y"], (out["q"].astype(np.float32) - 128) * 0.1,
                               rtol=1e-6)
    assert_outputs = bg.compile(g)(x=xv)
    np.testing.assert_array_equal(assert_outputs["q"], out["q"])


@pytest.mark.parametrize("scale", [0.0, -1.0, np.nan, np.inf])
def test_bad_scales_are_rejected(scale):
    g = bg.Graph("bad")
    x = g.input("x", (2, 2))
    with pytest.raises(bg.GraphError, match="scale must be finite and > 0"):
        g.quantize(x, scale)
    with pytest.raises(bg.GraphError, match="scale must be finite and > 0"):
        g.dequantize(g.quantize(x, 1.0), scale)


def test_bad_quantization_arguments_are_rejected():
    g = bg.Graph("bad")
    x = g.input("x", (2, 3))
    with pytest.raises(bg.GraphError, match="dtype must be 'uint8' or 'int8'"):
        g.quantize(x, 1.0, dtype="int16")
    with pytest.raises(bg.GraphError, match="zero_point outside the int8 range"):
        g.quantize(x, 1.0, 200, dtype="int8")
    with pytest.raises(bg.GraphError, match="must be uint8, int8 or int32"):
        g.dequantize(x, 1.0)
    with pytest.raises(bg.GraphError, match="need an axis"):
        g.quantize(x, [1.0, 2.0, 3.0])
    with pytest.raises(bg.GraphError, match="must have 3 entries"):
        g.quantize(x, [1.0, 2.0], axis=1)
    q = g.quantize(x, 1.0)
    with pytest.raises(bg.GraphError, match="must be a float tensor"):
        g.quantize(q, 1.0)
    with pytest.raises(ValueError, match="weights must be"):
        quantize_graph(bg.models.mlp([4, 4], 2), {"x": np.ones((2, 4), np.float32)},
                       weights="per_row")
    with pytest.raises(ValueError, match="samples"):
        quantize_graph(bg.models.mlp([4, 4], 2), [])


# ----------------------------------------------------------------------------- PTQ + lowering
def _samples(g, n=4):
    return [bg.models.example_inputs(g, seed=100 + i) for i in range(n)]


def test_quantize_graph_makes_every_constant_matmul_qdq():
    g = bg.models.mlp([13, 32, 16, 8], 16)
    qg = quantize_graph(g, _samples(g))
    counts = qg.count_ops()
    assert counts["MatMul"] == 3 and counts["Dequantize"] == 6 and counts["Quantize"] == 3
    assert g.count_ops().get("Quantize") is None  # the float graph is unchanged
    assert all(qg.constants[n].dtype == np.int8 for n in qg.constants if n.endswith(".s8_0")
               or ".s8" in n)


def test_lowering_makes_one_qmatmul_per_matmul_with_requantization_between_layers():
    g = bg.models.mlp([13, 32, 16, 8], 16, final_activation="relu")
    qg = quantize_graph(g, _samples(g))
    cg = bg.compile(qg)
    assert cg.graph.count_ops() == {"Quantize": 1, "QMatMul": 3}
    q_nodes = [n for n in cg.graph.nodes if n.op == "QMatMul"]
    # hidden layers write u8 for the next layer; the last writes float
    assert [n.attrs["out_scale"] is not None for n in q_nodes] == [True, True, False]
    assert all(n.attrs["act"] == "relu" and n.attrs["has_bias"] for n in q_nodes)
    assert cg.graph.tensors[q_nodes[0].outputs[0]].dtype == "uint8"


def _one_layer(bias: bool):
    """y = relu(x) @ W (+ b): the MatMul's input has a large mean, as after any ReLU."""
    g = bg.Graph("one-layer")
    x = g.input("x", (64, 96))
    rng = np.random.default_rng(5)
    h = g.matmul(g.relu(x), g.constant("w", rng.standard_normal((96, 48)).astype(np.float32)))
    if bias:
        h = g.add(h, g.constant("b", (0.1 * rng.standard_normal(48)).astype(np.float32)))
    g.output("y", h)
    return g


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_bias_correction_removes_the_mean_output_shift_of_weight_rounding(bias):
    g = _one_layer(bias)
    samples = _samples(g, 8)
    want = np.concatenate([bg.interpret(g, **f)["y"] for f in samples])
    shift = {}
    for bc in (False, True):
        qg = quantize_graph(g, samples, bias_correction=bc)
        got = np.concatenate([bg.interpret(qg, **f)["y"] for f in samples])
        shift[bc] = np.linalg.norm((got - want).mean(axis=0))
        cg = bg.compile(qg)
        # the correction rides in the QMatMul's bias: still one kernel, nothing in float
        assert cg.graph.count_ops().get("QMatMul") == 1 and "Add" not in cg.graph.count_ops()
        assert [n.attrs["has_bias"] for n in cg.graph.nodes if n.op == "QMatMul"] == [
            bias or bc]
    # what is left of the shift is the activations' rounding and saturation, a few percent
    assert shift[True] < 0.2 * shift[False], shift


def test_int8_lowering_can_be_switched_off():
    g = bg.models.mlp([13, 32, 8], 4)
    qg = quantize_graph(g, _samples(g))
    assert "QMatMul" not in bg.compile(qg, int8=False).graph.count_ops()


INT8_MODELS = {
    "dlrm-bottom": lambda: bg.models.dlrm_bottom_mlp(64),
    "dlrm-top": lambda: bg.models.dlrm_top_mlp(64),
    "bert": lambda: bg.models.bert_layer(2, 32, hidden=64, heads=4),
    "llm": lambda: bg.models.llm_block(1, 32, 64, 8, 2),
}


@pytest.mark.parametrize("model", sorted(INT8_MODELS))
def test_compiled_int8_graph_equals_its_qdq_interpretation(model):
    g = INT8_MODELS[model]()
    qg = quantize_graph(g, _samples(g))
    feeds = bg.models.example_inputs(g, seed=7)
    want = bg.interpret(qg, **feeds)
    cg = bg.compile(qg, check=True)
    assert cg.graph.count_ops().get("QMatMul", 0) >= 2
    got = cg(**feeds)
    for k in want:
        # the same integers; float rounding of the rescale may move a requantized value
        # by one step, which later layers carry
        assert rel_err(got[k], want[k]) < 1e-3, k


def test_int8_weights_are_packed_once_at_compile_time(monkeypatch):
    from blasst_ref.graph import int8_kernels as Q8

    calls = record_calls(monkeypatch, Q8, "pack_int8_weight")
    g = bg.models.mlp([13, 32, 16, 8], 16)
    cg = bg.compile(quantize_graph(g, _samples(g)))
    assert sorted(args[0].shape for args in calls) == sorted([(13, 32), (32, 16), (16, 8)])
    feeds = bg.models.example_inputs(g, seed=1)
    for _ in range(3):
        cg(**feeds)
    assert len(calls) == 3
    assert "QMatMul" in cg.report()


# Issue #6 asks for 1e-2. Measured (models' N(0, 1/fan_in) weights, Gaussian inputs, min/max
# calibration on 4 samples, bias correction): 1.1% (BERT) to 1.9% (DLRM bottom MLP). The
# activations' u8 rounding alone -- float weights kept -- already costs 0.9% (BERT), 1.2%
# (LLM block) and 1.4-1.5% (DLRM MLPs): static per-tensor u8 activations cannot meet 1e-2 on
# these graphs, whatever is done to the weights (docs/BENCHMARKS.md has the split). This
# bound guards the level reached; the 1e-2 target is open.
INT8_VS_FLOAT = 2.5e-2


@pytest.mark.parametrize("model", sorted(INT8_MODELS))
def test_int8_model_graphs_stay_close_to_float(model):
    g = INT8_MODELS[model]()
    qg = quantize_graph(g, _samples(g))
    feeds = bg.models.example_inputs(g, seed=11)
    want = bg.interpret(g, **feeds)["y"]
    got = bg.compile(qg)(**feeds)["y"]
    err = rel_err(got, want)
    assert 1e-4 < err < INT8_VS_FLOAT  # really quantized, and close
