"""The passes that fuse what framework exports write op by op (``graph.export_fusion``).

Each idiom is written as ONNX, imported, and compiled: the pass must find it (the fused op
is in the compiled graph, the pieces are gone) and the result must equal ONNX Runtime on
the same model. The fused attention's kernel is checked against its numpy meaning on
key-padding masks (one BLASST call per sequence over its own keys) and on masks that are
not (the exact meaning runs), and the real export's attention is found in a tiny BERT.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from blasst_ref import graph as bg
from blasst_ref.graph import export_fusion as X

onnx = pytest.importorskip("onnx", reason="optional extra: pip install 'blasst_ref[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="optional extra: pip install 'blasst_ref[onnx]'")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

seeds = st.integers(0, 2**32 - 1)


def model_of(nodes, inputs: dict, inits: dict, opset=17):
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(a.shape))
           for n, a in inputs.items()]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "g", ins, outs,
                              initializer=[numpy_helper.from_array(np.asarray(v), n)
                                           for n, v in inits.items()])
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets,
                              ir_version=helper.find_min_ir_version_for(opsets))
    return onnx.shape_inference.infer_shapes(model)


def run_both(model, feeds):
    want = ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    cg = bg.compile(bg.from_onnx(model))
    return cg, cg(**feeds)["y"], want


def rel(a, b):
    return float(np.linalg.norm((a - b).astype(np.float64)) /
                 max(np.linalg.norm(b.astype(np.float64)), 1e-30))


# ---------------------------------------------------------------------------- GELU
GELU_FORMS = {
    # torch.onnx.export of transformers' gelu: x * (erf(x / sqrt2) + 1) * 0.5
    "x*(erf+1)*0.5": [("Div", ["h", "sqrt2"], "u"), ("Erf", ["u"], "e"),
                      ("Add", ["e", "one"], "a"), ("Mul", ["h", "a"], "m"),
                      ("Mul", ["m", "half"], "g")],
    "(x*0.5)*(1+erf)": [("Mul", ["h", "rsqrt2"], "u"), ("Erf", ["u"], "e"),
                        ("Add", ["one", "e"], "a"), ("Mul", ["half", "h"], "hh"),
                        ("Mul", ["hh", "a"], "g")],
    "((1+erf)*0.5)*x": [("Div", ["h", "sqrt2"], "u"), ("Erf", ["u"], "e"),
                        ("Add", ["e", "one"], "a"), ("Mul", ["a", "half"], "m"),
                        ("Mul", ["m", "h"], "g")],
}


@pytest.mark.parametrize("form", sorted(GELU_FORMS))
@given(seed=seeds, m=st.integers(1, 9), k=st.integers(1, 12), n=st.integers(1, 12))
def test_gelu_erf_forms_fuse_into_the_matmul(form, seed, m, k, n):
    rng = np.random.default_rng(seed)
    inits = {"w": rng.standard_normal((k, n)).astype(np.float32),
             "b": rng.standard_normal(n).astype(np.float32),
             "sqrt2": np.float32(math.sqrt(2.0)), "rsqrt2": np.float32(1 / math.sqrt(2.0)),
             "one": np.float32(1.0), "half": np.float32(0.5)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]),
             helper.make_node("Add", ["xw", "b"], ["h"])]
    nodes += [helper.make_node(op, ins, [out]) for op, ins, out in GELU_FORMS[form]]
    nodes.append(helper.make_node("Identity", ["g"], ["y"]))
    feeds = {"x": 2 * rng.standard_normal((m, k)).astype(np.float32)}
    cg, got, want = run_both(model_of(nodes, feeds, inits), feeds)
    ops = cg.graph.count_ops()
    assert "Erf" not in ops and "Gelu" not in ops, ops  # into the matmul's epilogue
    # absolute slack for the far negative tail, where the decomposed form's 1 + erf(x)
    # cancels to 0 and the fused GELU keeps its tiny true value (e.g. -4e-9 against -0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_gelu_pattern_needs_the_right_constants():
    """``x * (erf(x / 2) + 1) * 0.5`` is not GELU: left alone."""
    rng = np.random.default_rng(0)
    inits = {"two": np.float32(2.0), "one": np.float32(1.0), "half": np.float32(0.5)}
    nodes = [helper.make_node("Div", ["x", "two"], ["u"]), helper.make_node("Erf", ["u"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Mul", ["x", "a"], ["m"]),
             helper.make_node("Mul", ["m", "half"], ["y"])]
    feeds = {"x": rng.standard_normal((3, 4)).astype(np.float32)}
    cg, got, want = run_both(model_of(nodes, feeds, inits), feeds)
    assert "Erf" in cg.graph.count_ops()
    assert rel(got, want) <= 1e-6


# ---------------------------------------------------------------------------- LayerNorm
@pytest.mark.parametrize("square", ["Pow", "Mul"])
@given(seed=seeds, shape=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
       affine=st.booleans())
def test_decomposed_layernorm_fuses(square, seed, shape, affine):
    """The opset < 17 export of LayerNorm: ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div
    (* gamma + beta) -> one LayerNorm."""
    rng = np.random.default_rng(seed)
    n = shape[-1]
    inits = {"two": np.float32(2.0), "eps": np.float32(1e-5),
             "gamma": (1 + 0.1 * rng.standard_normal(n)).astype(np.float32),
             "beta": (0.1 * rng.standard_normal(n)).astype(np.float32)}
    sq = helper.make_node("Pow", ["d", "two"], ["d2"]) if square == "Pow" else \
        helper.make_node("Mul", ["d", "d"], ["d2"])
    nodes = [helper.make_node("ReduceMean", ["x"], ["u"], axes=[-1]),
             helper.make_node("Sub", ["x", "u"], ["d"]), sq,
             helper.make_node("ReduceMean", ["d2"], ["var"], axes=[-1]),
             helper.make_node("Add", ["var", "eps"], ["ve"]),
             helper.make_node("Sqrt", ["ve"], ["sd"]),
             helper.make_node("Div", ["d", "sd"], ["z" if affine else "y"])]
    if affine:
        nodes += [helper.make_node("Mul", ["z", "gamma"], ["zg"]),
                  helper.make_node("Add", ["zg", "beta"], ["y"])]
    feeds = {"x": (3 + rng.standard_normal(shape)).astype(np.float32)}
    cg, got, want = run_both(model_of(nodes, feeds, inits, opset=13), feeds)
    assert cg.graph.count_ops() == {"LayerNorm": 1}, cg.graph.count_ops()
    assert rel(got, want) <= 1e-5


# ---------------------------------------------------------------------------- attention
def padding_mask(rng, b, lk, dtype=np.float32, neg=-np.inf):
    keep = np.ones((b, lk), bool)
    for i in range(b):
        keep[i, rng.integers(1, lk + 1):] = False
    return np.where(keep, 0.0, neg).astype(dtype)[:, None, None, :], keep


@given(seed=seeds, b=st.integers(1, 3), h=st.integers(1, 3), lq=st.integers(1, 20),
       lk=st.integers(1, 40), neg=st.sampled_from([-np.inf, -3.4e38, -1e4]),
       zero_nan=st.booleans())
def test_masked_attention_kernel_on_padding_masks(seed, b, h, lq, lk, neg, zero_nan):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((b, h, n, 8)).astype(np.float32) for n in (lq, lk, lk))
    mask, keep = padding_mask(rng, b, lk, neg=neg)
    got, stats = X.masked_attention(q, k, v, mask, scale=0.35, zero_nan_rows=zero_nan)
    want = X.masked_attention_array(q.astype(np.float64), k.astype(np.float64),
                                    v.astype(np.float64), mask.astype(np.float64), 0.35,
                                    zero_nan)
    assert stats is not None  # the key-padding path ran
    assert rel(got, want) <= 1e-5


def test_masked_attention_other_masks_run_the_exact_meaning():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 2, 5, 4)).astype(np.float32) for _ in range(3))
    bias = rng.standard_normal((2, 1, 5, 5)).astype(np.float32)  # an additive bias: not padding
    got, stats = X.masked_attention(q, k, v, bias, scale=0.5)
    assert stats is None
    np.testing.assert_allclose(got, X.masked_attention_array(q, k, v, bias, 0.5, False),
                               rtol=1e-6)
    # a sequence with every key masked: softmax of -inf rows is NaN, zeroed by the guard
    mask = np.zeros((2, 1, 1, 5), np.float32)
    mask[1] = -np.inf
    got, stats = X.masked_attention(q, k, v, mask, scale=0.5, zero_nan_rows=True)
    assert stats is None and np.all(got[1] == 0)
    np.testing.assert_allclose(got[0], X.masked_attention_array(q, k, v, mask, 0.5, True)[0],
                               rtol=1e-6)


def test_key_padding_detection():
    m = np.zeros((2, 1, 3, 4), np.float32)
    m[1, ..., 2:] = -1e9
    np.testing.assert_array_equal(X.key_padding(m), [[1, 1, 1, 1], [1, 1, 0, 0]])
    m[1, 0, 0, 0] = -1e9  # one query differs: not key padding
    assert X.key_padding(m) is None
    m = np.full((1, 1, 1, 3), -5.0, np.float32)  # a soft bias, not a mask
    assert X.key_padding(m) is None


def test_tiny_bert_attention_is_one_blasst_call_per_layer(tmp_path):
    """The real export: each layer's attention (scale split over Q and K, padding mask from
    the attention-mask input, SDPA's NaN guard) is found and fused; LayerNorm and GELU too.
    With a threshold the report shows the skip statistics of each attention."""
    pytest.importorskip("torch", reason="needs torch (the dev extra installs it)")
    pytest.importorskip("transformers", reason="needs transformers (the dev extra installs it)")
    from blasst_ref.graph import bert_onnx

    path = bert_onnx.export(bert_onnx.tiny_bert(seed=2, layers=2), tmp_path / "b.onnx")
    b, s = 2, 32
    g = bg.from_onnx(path, input_shapes=bert_onnx.input_shapes(b, s))
    rng = np.random.default_rng(0)
    mask = np.ones((b, s), np.int64)
    mask[1, 20:] = 0
    feeds = {"input_ids": rng.integers(0, 100, (b, s)).astype(np.int64),
             "attention_mask": mask, "token_type_ids": np.zeros((b, s), np.int64)}
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    cg = bg.compile(g, attention_block=(16, 16))
    ops = cg.graph.count_ops()
    assert ops.get("MaskedAttention") == 2, ops
    assert not {"Softmax", "Erf", "IsNaN", "Gelu", "Div"} & set(ops), ops
    got = cg(**feeds)
    assert rel(got["last_hidden_state"], want[0]) <= 1e-5
    sparse = bg.compile(g, attention_thresh=0.3, attention_block=(16, 16))
    out = sparse(**feeds)["last_hidden_state"]
    report = sparse.report()
    assert report.count("attention ") >= 2 and "sparsity" in report
    assert np.all(np.isfinite(out))
