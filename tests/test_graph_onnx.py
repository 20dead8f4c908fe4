"""``blasst_ref.graph.onnx_export``: ONNX Runtime on the exported graph equals the interpreter.

``onnx`` and ``onnxruntime`` are an optional extra (``pip install 'blasst_ref[onnx]'``): the
whole module is skipped where they are not installed.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from helpers import assert_outputs_close, rel_err

pytest.importorskip("onnx", reason="optional extra: pip install 'blasst_ref[onnx]'")
pytest.importorskip("onnxruntime", reason="optional extra: pip install 'blasst_ref[onnx]'")

from blasst_ref import graph as bg  # noqa: E402
from blasst_ref.graph import models, onnx_export, tensor_ops  # noqa: E402
from blasst_ref.graph.onnx_export import (  # noqa: E402
    UnsupportedOpError,
    onnxruntime_session,
    run_onnxruntime,
    to_onnx,
)


MODELS = {
    "dlrm-bottom": lambda: models.mlp([13, 64, 32, 16], 8, final_activation="relu"),
    "dlrm-top": lambda: models.mlp([47, 64, 32, 1], 8),
    "mlp-tanh": lambda: models.mlp([6, 5], 3, final_activation="tanh"),
    "bert": lambda: models.bert_layer(2, 16, 32, 4),
    "llm": lambda: models.llm_block(2, 16, 64, 8, 2),
}


@pytest.mark.parametrize("opset", [17, 20])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_models_in_onnxruntime_equal_interpret(model, opset):
    g = MODELS[model]()
    feeds = models.example_inputs(g, seed=1)
    assert_outputs_close(run_onnxruntime(g, feeds, opset=opset), bg.interpret(g, **feeds),
                         tol=1e-5)


def every_op_graph(dtype="float32") -> bg.Graph:
    rng = np.random.default_rng(0)
    g = bg.Graph("every_op")
    x = g.input("x", (2, 3, 8), dtype)
    z = g.input("z", (2, 3, 8), dtype)
    w = g.constant("w", (rng.standard_normal((8, 8)) / 3).astype(dtype))
    gamma = g.constant("gamma", (1 + 0.1 * rng.standard_normal(8)).astype(dtype))
    beta = g.constant("beta", (0.1 * rng.standard_normal(8)).astype(dtype))
    h = g.matmul(x, w)                                   # (2, 3, 8)
    h = g.sub(h, z)
    h = g.div(h, g.add(g.exp(g.mul(z, 0.1)), 1.0))       # Python numbers: scalar constants
    a = g.relu(h)
    b = g.gelu(h)
    c = g.gelu(h, approximate="tanh")
    d = g.tanh(h)
    h = g.layernorm(g.add(g.add(a, b), g.sub(c, d)), gamma, beta, eps=1e-5)
    t = g.transpose(h, (1, 0, 2))                        # (3, 2, 8)
    r = g.reshape(t, (3, 4, 4))
    s = g.softmax(r, axis=1)
    s2 = g.softmax(r, axis=-1)
    bm = g.matmul(s, s2)                                 # batched (3, 4, 4)
    g.output("y", bm)
    g.output("p", s)                                     # a second output
    g.output("t", t)
    return g


@pytest.mark.parametrize("opset", [17, 20])
def test_every_supported_op_equals_interpret(opset):
    g = every_op_graph()
    ops = set(g.count_ops())
    # the ops that imported models add have their export checked by the round trip of
    # tests/test_onnx_import.py (ONNX -> from_onnx -> to_onnx -> ONNX Runtime)
    assert ops == set(onnx_export.SUPPORTED_OPS) - {"Quantize", "Dequantize"} - \
        set(tensor_ops.OP_NAMES)
    feeds = models.example_inputs(g, seed=3)
    assert_outputs_close(run_onnxruntime(g, feeds, opset=opset), bg.interpret(g, **feeds),
                         tol=1e-5)


@pytest.mark.parametrize("opset", [17, 20])
def test_float64_graph(opset):
    # float64 everywhere but the erf GELU, which ORT runs in float32 (no float64 Erf)
    g = every_op_graph("float64")
    feeds = models.example_inputs(g, seed=4)
    assert_outputs_close(run_onnxruntime(g, feeds, opset=opset), bg.interpret(g, **feeds),
                         tol=1e-6)


def test_quantize_dequantize():
    g = bg.Graph("qdq")
    x = g.input("x", (4, 16), "float32")
    q = g.quantize(x, 0.02, 128, dtype="uint8")
    qs = g.quantize(x, np.linspace(0.01, 0.03, 16), np.arange(16) - 8, dtype="int8", axis=1)
    g.output("q", q)
    g.output("x1", g.dequantize(q, 0.02, 128))
    g.output("x2", g.dequantize(qs, np.linspace(0.01, 0.03, 16), np.arange(16) - 8, axis=1))
    g.output("x3", g.dequantize(q, 0.02, 128, dtype="float64"))
    feeds = {"x": np.random.default_rng(0).uniform(-3, 3, (4, 16)).astype(np.float32)}
    got, want = run_onnxruntime(g, feeds), bg.interpret(g, **feeds)
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
    # identical up to a rare one-step difference where x / scale ties at a rounding point
    assert np.abs(got["q"].astype(int) - want["q"]).max() <= 1
    assert np.mean(got["q"] != want["q"]) < 0.02
    for k, step in (("x1", 0.02), ("x2", 0.03), ("x3", 0.02)):
        assert np.abs(got[k] - want[k]).max() <= step * 1.001


def test_output_names_and_identities():
    g = bg.Graph("names")
    x = g.input("x", (2, 2))
    h = g.relu(x)
    g.output("a", h)
    g.output("b", h)                  # one tensor, two outputs
    g.output(h.name, h)               # an output under its own tensor name
    g.output("x_again", x)            # an input as an output
    g.output(g.tensors[h.name].name + "_t", g.tanh(h))
    feeds = {"x": np.array([[-1.0, 2.0], [3.0, -4.0]], np.float32)}
    model = to_onnx(g)
    assert [o.name for o in model.graph.output] == list(g.outputs)
    assert [i.name for i in model.graph.input] == ["x"]
    assert_outputs_close(run_onnxruntime(g, feeds), bg.interpret(g, **feeds), tol=1e-6)


def test_public_name_that_an_internal_tensor_has():
    # the output "relu_0" is the tanh, while the Relu's own tensor is also called "relu_0"
    g = bg.Graph("clash")
    x = g.input("x", (3,))
    r = g.relu(x)
    assert r.name == "relu_0"
    g.output("relu_0", g.tanh(r))
    g.output("y", r)
    feeds = {"x": np.array([-1.0, 0.5, 2.0], np.float32)}
    assert_outputs_close(run_onnxruntime(g, feeds), bg.interpret(g, **feeds), tol=1e-6)


def test_model_proto():
    import onnx

    g = models.bert_layer(1, 8, 32, 4)
    model = to_onnx(g)
    onnx.checker.check_model(model)
    assert {i.name for i in model.graph.initializer} >= set(g.constants)
    ops = {n.op_type for n in model.graph.node}
    assert {"Gelu", "LayerNormalization", "Softmax", "Transpose", "Reshape"} <= ops
    assert "Erf" in {n.op_type for n in to_onnx(g, opset=17).graph.node}
    assert model.opset_import[0].version == onnx_export.DEFAULT_OPSET


def test_session_for_benchmarks():
    g = models.mlp([8, 16, 4], 5)
    sess, names = onnxruntime_session(g, threads=1)
    feeds = models.example_inputs(g)
    (y,) = sess.run(None, {names[k]: v for k, v in feeds.items()})
    assert rel_err(y, bg.interpret(g, **feeds)["y"]) < 1e-6


def test_unsupported_op_raises():
    g = bg.Graph("fused")
    x = g.input("x", (4, 8))
    w = g.constant("w", np.ones((8, 3), np.float32))
    b = g.constant("b", np.zeros(3, np.float32))
    g.output("y", g.op("FusedMatMul", x, w, b, act="relu", has_bias=True))
    with pytest.raises(UnsupportedOpError, match="FusedMatMul.*before compiling"):
        to_onnx(g)
    with pytest.raises(ValueError):  # UnsupportedOpError is a GraphError (a ValueError)
        run_onnxruntime(g, {"x": np.zeros((4, 8), np.float32)})


def test_an_ops_onnx_form_lives_with_its_opdef(monkeypatch):
    """to_onnx exports an op through the ONNX form of its OpDef and nothing else."""
    from blasst_ref.graph import ops

    def square_form(b, node, opset):
        x = b.tensor(node.inputs[0])
        b.node("Mul", [x, x], [b.tensor(node.outputs[0])], node.name)

    relu = ops.get("Relu")
    monkeypatch.setitem(ops.OPS, "Square", ops.OpDef(
        "Square", (1, 1), relu.infer_fn, lambda arrays, attrs: [arrays[0] * arrays[0]],
        elementwise=True, onnx=square_form))
    g = bg.Graph("square")
    g.output("y", g.tanh(g.op("Square", g.input("x", (3, 5)))))
    assert [n.op_type for n in to_onnx(g).graph.node][:2] == ["Mul", "Tanh"]
    feeds = models.example_inputs(g, seed=2)
    assert_outputs_close(run_onnxruntime(g, feeds), bg.interpret(g, **feeds), tol=1e-6)


def test_bad_arguments():
    g = models.mlp([4, 2], 2)
    with pytest.raises(ValueError, match="opset"):
        to_onnx(g, opset=16)
    with pytest.raises(ValueError, match="threads"):
        onnxruntime_session(g, threads=0)
    with pytest.raises(bg.GraphError, match="shape"):
        run_onnxruntime(g, {"x": np.zeros((3, 4), np.float32)})
    with pytest.raises(bg.GraphError, match="missing"):
        run_onnxruntime(g, {})


def test_missing_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install 'blasst_ref\[onnx\]'"):
        onnxruntime_session(models.mlp([4, 2], 2))
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"pip install 'blasst_ref\[onnx\]'"):
        to_onnx(models.mlp([4, 2], 2))
