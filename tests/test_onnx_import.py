"""``blasst_ref.graph.from_onnx``: every imported op equals ONNX Runtime; bad models fail clearly.

Each op is checked on a small hand-written ONNX graph with Hypothesis-drawn shapes and fresh
random data: the imported graph, run by the interpreter and compiled, must give what ONNX
Runtime gives on the same model (bit for bit for integers and booleans, within float32
rounding for floats). Operands are drawn both as run-time inputs and as initializers, so
that both the import-time folding and the emitted IR op are exercised; the imported graph
is also exported again (``to_onnx``) and run in ONNX Runtime. The imported tiny
BERT (a randomly initialised ``transformers.BertModel`` exported with ``torch.onnx.export``)
is in ``tests/test_onnx_bert.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

onnx = pytest.importorskip("onnx", reason="optional extra: pip install 'blasst_ref[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="optional extra: pip install 'blasst_ref[onnx]'")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from blasst_ref import graph as bg  # noqa: E402
from blasst_ref.graph.onnx_export import run_onnxruntime  # noqa: E402
from blasst_ref.graph.onnx_import import SUPPORTED_OPS, OnnxImportError  # noqa: E402

_ELEM = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64, "bool": TensorProto.BOOL}


@dataclass
class Case:
    """One ONNX graph: nodes, run-time inputs ``{name: array}``, initializers, outputs
    ``{name: dtype}``; ``dynamic`` makes every input dimension a ``dim_param``."""

    nodes: list
    feeds: dict
    outputs: dict
    inits: dict = field(default_factory=dict)
    opset: int = 17
    dynamic: bool = False

    def model(self):
        inputs = [helper.make_tensor_value_info(
            n, _ELEM[a.dtype.name],
            [f"{n}_d{i}" for i in range(a.ndim)] if self.dynamic else list(a.shape))
            for n, a in self.feeds.items()]
        for v in inputs:  # a rank-0 input still declares its (empty) shape
            v.type.tensor_type.shape.SetInParent()
        outputs = [helper.make_tensor_value_info(n, _ELEM[d], None)
                   for n, d in self.outputs.items()]
        inits = [numpy_helper.from_array(np.asarray(v), n) for n, v in self.inits.items()]
        graph = helper.make_graph(self.nodes, "case", inputs, outputs, initializer=inits)
        return with_output_shapes(graph, self.opset)


def with_output_shapes(graph, opset=17):
    """A model of ``graph`` whose outputs get their types from ONNX shape inference (the
    checker wants a shape on every output)."""
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets,
                              ir_version=helper.find_min_ir_version_for(opsets))
    return onnx.shape_inference.infer_shapes(model)


def check(case: Case, tol: float = 1e-6, atol: float = 0.0):
    """The imported graph (interpreted and compiled) equals ONNX Runtime on ``case``:
    integers exactly, floats within ``tol`` relative L2 error -- plus ``atol`` per element
    where the result may cancel (a mean of values of both signs)."""
    model = case.model()
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = dict(zip(case.outputs, sess.run(None, case.feeds)))
    shapes = {n: a.shape for n, a in case.feeds.items()} if case.dynamic else None
    g = bg.from_onnx(model, input_shapes=shapes)
    # and back: the imported graph exported again runs the same in ONNX Runtime
    again = run_onnxruntime(g, case.feeds)
    for how, got in (("interpret", bg.interpret(g, **case.feeds)),
                     ("compiled", bg.compile(g)(**case.feeds)),
                     ("re-exported", again)):
        for name, w in want.items():
            v = got[name]
            assert v.shape == w.shape, (how, name, v.shape, w.shape)
            assert v.dtype == w.dtype, (how, name, v.dtype, w.dtype)
            if w.dtype.kind in "biu":
                np.testing.assert_array_equal(v, w, err_msg=f"{how} {name}")
            else:
                err = np.linalg.norm((v - w).astype(np.float64)) / \
                    max(np.linalg.norm(w.astype(np.float64)), 1e-30)
                assert err <= tol + atol * np.sqrt(w.size) / \
                    max(np.linalg.norm(w.astype(np.float64)), 1e-30), (how, name, err)
    return g


# ---------------------------------------------------------------------------- strategies
shapes = st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple)


def rand(rng, shape, dtype="float32", positive=False):
    x = np.asarray(rng.standard_normal(shape), dtype=dtype)
    return np.asarray(np.abs(x) + np.float32(0.1), dtype=dtype) if positive else x


def broadcast_partner(draw, shape):
    """A shape that broadcasts with ``shape`` (dims dropped from the left or set to 1)."""
    keep = draw(st.integers(0, len(shape)))
    tail = shape[len(shape) - keep:]
    return tuple(1 if draw(st.booleans()) else s for s in tail)


def operand(draw, rng, name, shape, case_inits, case_feeds, **kw):
    """Put an operand either among the run-time inputs or among the initializers."""
    value = rand(rng, shape, **kw)
    (case_inits if draw(st.booleans()) else case_feeds)[name] = value
    return name


seeds = st.integers(0, 2**32 - 1)


# ---------------------------------------------------------------------------- element-wise
@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Pow"])
@given(data=st.data(), seed=seeds)
def test_binary_ops(op, data, seed):
    rng = np.random.default_rng(seed)
    sa = data.draw(shapes)
    sb = broadcast_partner(data.draw, sa)
    feeds = {"a": rand(rng, sa, positive=op == "Pow")}
    inits = {}
    operand(data.draw, rng, "b", sb, inits, feeds, positive=op == "Pow")
    if op == "Div":
        (inits if "b" in inits else feeds)["b"] += np.float32(3.0)  # away from 0
    if data.draw(st.booleans()):  # the broadcast operand first
        node = helper.make_node(op, ["b", "a"], ["y"])
    else:
        node = helper.make_node(op, ["a", "b"], ["y"])
    check(Case([node], feeds, {"y": "float32"}, inits))


@pytest.mark.parametrize("op", ["Sqrt", "Erf", "Neg", "Tanh", "Exp", "Relu", "Gelu"])
@given(shape=shapes, seed=seeds, as_init=st.booleans())
def test_unary_ops(op, shape, seed, as_init):
    rng = np.random.default_rng(seed)
    x = rand(rng, shape, positive=op == "Sqrt")
    nodes = [helper.make_node(op, ["x"], ["u"])]
    feeds, inits = {"p": rand(rng, shape)}, {}
    (inits if as_init else feeds)["x"] = x
    nodes.append(helper.make_node("Add", ["u", "p"], ["y"]))  # a run-time output either way
    # ONNX Runtime's tanh, erf and exp are fast approximations (a few float32 ulps)
    check(Case(nodes, feeds, {"y": "float32"}, inits, opset=20 if op == "Gelu" else 17),
          tol=1e-5)


@pytest.mark.parametrize("op", ["Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"])
@given(data=st.data(), seed=seeds)
def test_comparisons_and_where(op, data, seed):
    rng = np.random.default_rng(seed)
    sa = data.draw(shapes)
    sb = broadcast_partner(data.draw, sa)
    a = rng.integers(-2, 3, sa).astype(np.float32)  # small integers: ties happen
    b = rng.integers(-2, 3, sb).astype(np.float32)
    nodes = [helper.make_node(op, ["a", "b"], ["c"]),
             helper.make_node("Where", ["c", "a", "b"], ["y"]),
             helper.make_node("Not", ["c"], ["nc"]),
             helper.make_node("And", ["c", "nc"], ["never"]),
             helper.make_node("Or", ["c", "nc"], ["always"]),
             helper.make_node("IsNaN", ["y"], ["nan"])]
    check(Case(nodes, {"a": a, "b": b}, {"c": "bool", "y": "float32", "never": "bool",
                                         "always": "bool", "nan": "bool"}))


# ---------------------------------------------------------------------------- reductions
@pytest.mark.parametrize("opset", [17, 18])
@given(shape=shapes, seed=seeds, data=st.data())
def test_reduce_mean(opset, shape, seed, data):
    rng = np.random.default_rng(seed)
    axes = sorted(data.draw(st.sets(st.integers(-len(shape), len(shape) - 1), min_size=1,
                                    max_size=len(shape))))
    axes = sorted({a % len(shape) for a in axes})
    keepdims = int(data.draw(st.booleans()))
    inits = {}
    if opset >= 18:
        inits["axes"] = np.asarray(axes, np.int64)
        node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=keepdims)
    else:
        node = helper.make_node("ReduceMean", ["x"], ["y"], axes=axes, keepdims=keepdims)
    x = rand(rng, shape)
    # float32 sums in another order: an absolute error of a few ulps of max|x|
    check(Case([node], {"x": x}, {"y": "float32"}, inits, opset=opset),
          atol=4e-7 * float(np.abs(x).max()))


@given(shape=shapes, seed=seeds, data=st.data())
def test_softmax(shape, seed, data):
    rng = np.random.default_rng(seed)
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    node = helper.make_node("Softmax", ["x"], ["y"], axis=axis)
    check(Case([node], {"x": 3 * rand(rng, shape)}, {"y": "float32"}))


@given(shape=shapes, seed=seeds, bias=st.booleans())
def test_layer_normalization(shape, seed, bias):
    rng = np.random.default_rng(seed)
    n = shape[-1]
    inits = {"gamma": 1 + 0.1 * rand(rng, (n,)), "beta": 0.1 * rand(rng, (n,))}
    ins = ["x", "gamma"] + (["beta"] if bias else [])
    node = helper.make_node("LayerNormalization", ins, ["y"], axis=-1, epsilon=1e-5)
    check(Case([node], {"x": 2 + rand(rng, shape)}, {"y": "float32"}, inits), tol=2e-6)


# ---------------------------------------------------------------------------- matmul
@given(data=st.data(), seed=seeds)
def test_matmul_batched(data, seed):
    rng = np.random.default_rng(seed)
    m, k, n = (data.draw(st.integers(1, 6)) for _ in range(3))
    batch = data.draw(st.lists(st.integers(1, 3), max_size=2).map(tuple))
    b_batch = broadcast_partner(data.draw, batch) if batch else ()
    feeds, inits = {"a": rand(rng, batch + (m, k))}, {}
    operand(data.draw, rng, "b", b_batch + (k, n), inits, feeds)
    check(Case([helper.make_node("MatMul", ["a", "b"], ["y"])], feeds, {"y": "float32"},
               inits), tol=1e-5)


@given(data=st.data(), seed=seeds)
def test_gemm(data, seed):
    rng = np.random.default_rng(seed)
    m, k, n = (data.draw(st.integers(1, 6)) for _ in range(3))
    ta, tb = data.draw(st.booleans()), data.draw(st.booleans())
    alpha = data.draw(st.sampled_from([1.0, 0.5, -2.0]))
    beta = data.draw(st.sampled_from([1.0, 0.25]))
    feeds, inits = {"a": rand(rng, (k, m) if ta else (m, k))}, {}
    operand(data.draw, rng, "b", (n, k) if tb else (k, n), inits, feeds)
    ins = ["a", "b"]
    if data.draw(st.booleans()):
        operand(data.draw, rng, "c", data.draw(st.sampled_from([(n,), (1, n), (m, n)])),
                inits, feeds)
        ins.append("c")
    node = helper.make_node("Gemm", ins, ["y"], alpha=alpha, beta=beta, transA=int(ta),
                            transB=int(tb))
    check(Case([node], feeds, {"y": "float32"}, inits), tol=1e-5)


# ---------------------------------------------------------------------------- layout ops
@given(shape=shapes, seed=seeds, data=st.data())
def test_transpose(shape, seed, data):
    rng = np.random.default_rng(seed)
    perm = data.draw(st.permutations(range(len(shape))))
    node = helper.make_node("Transpose", ["x"], ["y"], perm=list(perm))
    check(Case([node], {"x": rand(rng, shape)}, {"y": "float32"}))


@given(shape=shapes, seed=seeds, data=st.data())
def test_reshape_flatten_squeeze_unsqueeze(shape, seed, data):
    rng = np.random.default_rng(seed)
    x = rand(rng, shape)
    # Reshape to a random factorisation with a 0 (copy the dimension) and a -1
    target = [0] + [-1] if len(shape) > 1 else [-1]
    unsq_axes = sorted(data.draw(st.sets(st.integers(0, len(shape)), min_size=1, max_size=2)))
    flat_axis = data.draw(st.integers(0, len(shape)))
    nodes = [helper.make_node("Reshape", ["x", "target"], ["r"]),
             helper.make_node("Flatten", ["x"], ["f"], axis=flat_axis),
             helper.make_node("Unsqueeze", ["x", "uaxes"], ["u"]),
             helper.make_node("Squeeze", ["u", "uaxes"], ["s"])]
    inits = {"target": np.asarray(target, np.int64), "uaxes": np.asarray(unsq_axes, np.int64)}
    check(Case(nodes, {"x": x}, {"r": "float32", "f": "float32", "u": "float32",
                                 "s": "float32"}, inits))


@given(data=st.data(), seed=seeds)
def test_gather(data, seed):
    rng = np.random.default_rng(seed)
    shape = data.draw(shapes)
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    n = shape[axis]
    idx_shape = data.draw(st.sampled_from([(), (2,), (2, 3)]))
    idx = rng.integers(-n, n, idx_shape).astype(np.int64)
    feeds, inits = {}, {}
    operand(data.draw, rng, "data", shape, inits, feeds)
    (feeds if data.draw(st.booleans()) or not feeds else inits)["idx"] = idx
    node = helper.make_node("Gather", ["data", "idx"], ["g"], axis=axis)
    nodes = [node, helper.make_node("Identity", ["g"], ["y"])]
    if not feeds:  # everything constant: add a run-time input so the graph has one
        feeds["p"] = rand(rng, (1,))
        nodes = [node, helper.make_node("Add", ["g", "p"], ["y"])]
    check(Case(nodes, feeds, {"y": "float32"}, inits))


@given(shape=shapes, seed=seeds, data=st.data())
def test_slice(shape, seed, data):
    rng = np.random.default_rng(seed)
    rank = len(shape)
    axes = data.draw(st.lists(st.integers(-rank, rank - 1), min_size=1, max_size=rank,
                              unique_by=lambda a: a % rank))
    starts, ends, steps = [], [], []
    for a in axes:
        n = shape[a]
        step = data.draw(st.sampled_from([1, 1, 2, -1]))
        if step > 0:
            s = data.draw(st.integers(-n, n - 1))
            e = data.draw(st.sampled_from([n, 2**63 - 1, (s % n) + 1]))
        else:
            s = data.draw(st.sampled_from([n - 1, -1, 2**63 - 1]))
            e = data.draw(st.sampled_from([-(2**63), -n - 1]))
        starts.append(s)
        ends.append(e)
        steps.append(step)
    inits = {k: np.asarray(v, np.int64) for k, v in
             (("starts", starts), ("ends", ends), ("axes", axes), ("steps", steps))}
    node = helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["y"])
    check(Case([node], {"x": rand(rng, shape)}, {"y": "float32"}, inits))


@given(shape=shapes, seed=seeds, data=st.data())
def test_concat_expand(shape, seed, data):
    rng = np.random.default_rng(seed)
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    other = list(shape)
    other[axis] = data.draw(st.integers(1, 3))
    feeds, inits = {"a": rand(rng, shape)}, {}
    operand(data.draw, rng, "b", tuple(other), inits, feeds)
    small = tuple(1 if data.draw(st.booleans()) else s for s in shape)
    target = [data.draw(st.integers(1, 3))] + list(shape)
    nodes = [helper.make_node("Concat", ["a", "b"], ["c"], axis=axis),
             helper.make_node("Expand", ["e_in", "shape"], ["e"])]
    feeds["e_in"] = rand(rng, small)
    inits["shape"] = np.asarray(target, np.int64)
    check(Case(nodes, feeds, {"c": "float32", "e": "float32"}, inits))


@given(shape=shapes, seed=seeds)
def test_cast(shape, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(-3, 4, shape).astype(np.int64)
    nodes = [helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["ids"], ["b"], to=TensorProto.BOOL),
             helper.make_node("Cast", ["b"], ["f2"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["f", "f2"], ["m"]),
             helper.make_node("Cast", ["m"], ["i"], to=TensorProto.INT64)]
    check(Case(nodes, {"ids": ids}, {"f": "float32", "b": "bool", "m": "float32",
                                     "i": "int64"}))


# ---------------------------------------------------------------------------- folding
@given(b=st.integers(1, 3), s=st.integers(1, 6), heads=st.sampled_from([1, 2, 4]),
       seed=seeds)
def test_shape_subgraph_folds_at_import(b, s, heads, seed):
    """The head split of an attention export: ``Shape -> Gather -> Unsqueeze -> Concat ->
    Reshape`` on dynamic dims, plus ``ConstantOfShape`` and ``Range``; with input_shapes
    every shape op folds and only the computation on ``x`` remains."""
    rng = np.random.default_rng(seed)
    d = 2
    x = rand(rng, (b, s, heads * d))
    c = {"i0": np.asarray(0, np.int64), "i1": np.asarray(1, np.int64),
         "ax0": np.asarray([0], np.int64), "heads": np.asarray([heads], np.int64),
         "d": np.asarray([d], np.int64), "one": np.asarray(1, np.int64),
         "ax1": np.asarray([1], np.int64)}
    nodes = [helper.make_node("Shape", ["x"], ["sh"]),
             helper.make_node("Gather", ["sh", "i0"], ["B"], axis=0),
             helper.make_node("Gather", ["sh", "i1"], ["S"], axis=0),
             helper.make_node("Unsqueeze", ["B", "ax0"], ["Bu"]),
             helper.make_node("Unsqueeze", ["S", "ax0"], ["Su"]),
             helper.make_node("Concat", ["Bu", "Su", "heads", "d"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1, 3]),
             helper.make_node("Range", ["i0", "S", "one"], ["pos"]),
             helper.make_node("Cast", ["pos"], ["posf0"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["posf0", "ax1"], ["posf"]),
             helper.make_node("ConstantOfShape", ["sh"], ["zeros"],
                              value=numpy_helper.from_array(np.asarray([2.0], np.float32))),
             helper.make_node("Mul", ["t", "posf"], ["tp"]),
             helper.make_node("Transpose", ["tp"], ["tq"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["tq", "sh"], ["back"]),
             helper.make_node("Add", ["back", "zeros"], ["bz"]),
             # Size, Constant, Dropout (inference: the identity) and Div on int64 (C-style
             # truncation, folded): size / size = 1, a scalar factor
             helper.make_node("Size", ["x"], ["n"]),
             helper.make_node("Constant", [], ["minus_n"],
                              value=numpy_helper.from_array(np.asarray(-b * s * heads * d,
                                                                       np.int64))),
             helper.make_node("Div", ["n", "minus_n"], ["neg_one"]),
             helper.make_node("Cast", ["neg_one"], ["neg_onef"], to=TensorProto.FLOAT),
             helper.make_node("Dropout", ["bz"], ["bd"]),
             helper.make_node("Mul", ["bd", "neg_onef"], ["y"])]
    g = check(Case(nodes, {"x": x}, {"y": "float32"}, c, dynamic=True))
    assert set(g.count_ops()) <= {"Reshape", "Transpose", "Mul", "Add"}, g.count_ops()


def test_supported_ops_are_documented():
    import blasst_ref.graph.onnx_import as mod

    for op in SUPPORTED_OPS:
        assert op in mod.__doc__, op


# ---------------------------------------------------------------------------- bad models
def tiny_model(dims=(2, 3), op="Relu", domain=""):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node(op, ["x"], ["y"], name="the_node", domain=domain)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(dims))
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=opsets,
                             ir_version=helper.find_min_ir_version_for(opsets[:1]))


def test_unsupported_op_names_node_and_op():
    with pytest.raises(OnnxImportError, match=r"node 'the_node' is op 'Hardmax'.*not supported"):
        bg.from_onnx(tiny_model(op="Hardmax"))


def test_custom_domain_is_refused():
    with pytest.raises(OnnxImportError, match=r"'the_node'.*domain 'com.example'"):
        bg.from_onnx(tiny_model(op="MyOp", domain="com.example"))


def test_dynamic_dimension_needs_input_shapes():
    model = tiny_model(dims=("batch", 3))
    with pytest.raises(OnnxImportError, match=r"input 'x'.*axis 0 \('batch'\).*input_shapes"):
        bg.from_onnx(model)
    g = bg.from_onnx(model, input_shapes={"x": (5, 3)})
    assert g.tensors["x"].shape == (5, 3)
    with pytest.raises(OnnxImportError, match=r"axis 1 is fixed to 3"):
        bg.from_onnx(model, input_shapes={"x": (5, 4)})
    with pytest.raises(OnnxImportError, match=r"no input of.*inputs: x"):
        bg.from_onnx(model, input_shapes={"y": (5, 3)})


def test_runtime_value_where_a_constant_is_needed():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    shape = helper.make_tensor_value_info("shape", TensorProto.INT64, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape_it")
    model = with_output_shapes(helper.make_graph([node], "g", [x, shape], [y]))
    with pytest.raises(OnnxImportError, match=r"'reshape_it' \(Reshape\).*target shape.*run "
                                              r"time"):
        bg.from_onnx(model)


def test_truncated_file(tmp_path):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = with_output_shapes(
        helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y],
                          initializer=[w]))
    data = model.SerializeToString()
    path = tmp_path / "m.onnx"
    for cut in (len(data) // 2, len(data) - 7, 10):
        path.write_bytes(data[:cut])
        with pytest.raises(OnnxImportError, match=r"truncated"):
            bg.from_onnx(path)
    with pytest.raises(FileNotFoundError, match="no ONNX file"):
        bg.from_onnx(tmp_path / "missing.onnx")
    with pytest.raises(TypeError, match="ModelProto"):
        bg.from_onnx(42)
