"""``blasst_ref.graph.compile``: every pass and the executor against the interpreter.

The interpreter (:func:`blasst_ref.graph.interpret`) is the oracle: a compiled graph must
give its outputs (float32 tolerances) on random graphs and on the model graphs, with any
combination of passes switched on. The passes must also *do* what they claim -- fuse the
MatMul chains, find the attention pattern, pack each weight once -- so those are counted.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import blasst_ref
from blasst_ref import graph as bg
from blasst_ref.graph import kernels, passes

from helpers import assert_outputs_close, assert_saved_figure_keeps_its_text, record_calls, rel_err
from strategies import random_graphs


def mlp_graph(batch=8, sizes=(13, 24, 16), seed=0, relu_last=True) -> bg.Graph:
    rng = np.random.default_rng(seed)
    g = bg.Graph("mlp")
    h = g.input("x", (batch, sizes[0]))
    for i, (k, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = g.constant(f"w{i}", (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32))
        b = g.constant(f"b{i}", rng.standard_normal(n).astype(np.float32))
        h = g.add(g.matmul(h, w), b)
        if relu_last or i < len(sizes) - 2:
            h = g.relu(h)
    g.output("y", h)
    return g


def feeds_for(g: bg.Graph, seed=1) -> dict:
    return bg.models.example_inputs(g, seed=seed)


SWITCHES = [dict(), dict(fuse=False), dict(fold_constants=False),
            dict(matmul_kernel="blas"), dict(plan_memory=False), dict(inplace=False),
            dict(fuse=False, fold_constants=False, plan_memory=False),
            dict(fuse=False, matmul_kernel="blas")]


@settings(max_examples=25)
@given(data=random_graphs(), switches=st.sampled_from(SWITCHES))
def test_compiled_equals_interpret_on_random_graphs(data, switches):
    g, feeds = data
    want = bg.interpret(g, **feeds)
    cg = bg.compile(g, check=True, **switches)
    assert_outputs_close(cg(**feeds), want, tol=1e-4)
    # a second call on fresh inputs reuses the arena: stale data must not leak through
    feeds2 = {n: (v * 0.5 + 0.25).astype(v.dtype) for n, v in feeds.items()}
    assert_outputs_close(cg(**feeds2), bg.interpret(g, **feeds2), tol=1e-4)


@pytest.mark.parametrize("switches", SWITCHES)
def test_compiled_mlp_equals_interpret(switches):
    g = mlp_graph()
    x = feeds_for(g)
    assert_outputs_close(bg.compile(g, **switches)(**x), bg.interpret(g, **x))


def test_each_pass_keeps_the_interpreter_result():
    g = mlp_graph()
    x = feeds_for(g)
    want = bg.interpret(g, **x)
    cg = bg.compile(g)
    names = [s.name for s in cg.stages]
    assert names == ["input", "prune", "fold_constants", "fuse_gelu_erf", "fuse_layernorm",
                     "fuse_export_attention", "fuse_attention", "fuse_matmul", "lower_int8",
                     "merge_layout_ops", "pack_weights"]
    cg = bg.compile(g, matmul_kernel="blas")
    assert cg.stages[-1].name == "merge_layout_ops"
    for stage in cg.stages:
        assert_outputs_close(bg.interpret(stage.graph, **x), want)


# ----------------------------------------------------------------------------- passes
def _int8_graph() -> bg.Graph:
    g = bg.models.mlp([13, 32, 16, 8], 6)
    return bg.quantize_graph(g, [bg.models.example_inputs(g, seed=100 + i) for i in range(2)])


#: graphs on which every pass finds something to do: MLP chains (folding, MatMul fusion,
#: packing), attention (attention fusion leaves a K transpose to merge), a QDQ MLP (int8)
PASS_GRAPHS = {
    "mlp": lambda: mlp_graph(sizes=(13, 24, 16, 8)),
    "bert": lambda: MODEL_GRAPHS["bert"](),
    "llm-gqa": lambda: MODEL_GRAPHS["llm-gqa"](),
    "int8-mlp": _int8_graph,
}


def test_pass_order_is_one_list():
    """The passes run in the order of passes.PIPELINE, which the module docstring lists."""
    documented = re.findall(r"^\d+\. :func:`(\w+)`", passes.__doc__, re.M)
    assert documented == list(passes.PIPELINE)
    assert [s.name for s in bg.compile(mlp_graph()).stages] == ["input", "prune",
                                                                 *passes.PIPELINE]


@pytest.mark.parametrize("graph", sorted(PASS_GRAPHS))
@pytest.mark.parametrize("name", passes.PIPELINE)
def test_each_pass_can_be_switched_off(graph, name):
    g = PASS_GRAPHS[graph]()
    feeds = bg.models.example_inputs(g, seed=5)
    want = bg.interpret(g, **feeds)
    cg = bg.compile(g, passes={name: False}, check=True)
    assert name not in [s.name for s in cg.stages]
    assert [s.name for s in cg.stages][2:] == [p for p in passes.PIPELINE if p != name]
    tol = 1e-3 if graph == "int8-mlp" else 5e-5  # a requantized value may move one step
    assert_outputs_close(cg(**feeds), want, tol=tol)


def test_switching_a_pass_off_changes_the_kernels():
    g = MODEL_GRAPHS["bert"]()
    assert "Attention" in bg.compile(g).graph.count_ops()
    ops = bg.compile(g, passes={"fuse_attention": False}).graph.count_ops()
    assert "Attention" not in ops and "Softmax" in ops
    assert "QMatMul" not in bg.compile(_int8_graph(), passes={"lower_int8": False}) \
        .graph.count_ops()
    # a single switch wins over the group switch it belongs to
    ops = bg.compile(g, fuse=False, passes={"fuse_attention": True}).graph.count_ops()
    assert "Attention" in ops and ops["Add"] == bg.compile(g, fuse=False).graph \
        .count_ops()["Add"]  # the bias and residual adds stay unfused


def test_unknown_pass_names_are_a_clear_error():
    g = mlp_graph()
    with pytest.raises(ValueError, match="unknown pass 'fuse_atention'.*fuse_attention"):
        bg.compile(g, passes={"fuse_atention": False})
    with pytest.raises(TypeError, match=r"passes\['fuse_matmul'\] must be True or False"):
        bg.compile(g, passes={"fuse_matmul": "no"})
    with pytest.raises(TypeError, match="passes must be a mapping"):
        bg.compile(g, passes=["fuse_matmul"])


# ----------------------------------------------------------------------------- the op table
def test_an_op_is_described_once_by_its_opdef(monkeypatch):
    """A new op needs one OpDef: its shape rule, numpy meaning and compiled kernel live
    there, and compile() uses that kernel with no other change."""
    from blasst_ref.graph import ops

    calls = []

    def square_kernel(node, graph, options):
        x, out = node.inputs[0], node.outputs[0]

        def step(env):
            calls.append(node.name)
            np.multiply(env[x], env[x], out=env[out])
        return step

    relu = ops.get("Relu")
    square = ops.OpDef("Square", (1, 1), relu.infer_fn,
                       lambda arrays, attrs: [arrays[0] * arrays[0]], elementwise=True,
                       kernel=square_kernel, onnx=None)
    monkeypatch.setitem(ops.OPS, "Square", square)
    g = bg.Graph("square")
    g.output("y", g.exp(g.op("Square", g.input("x", (4, 8)))))
    feeds = feeds_for(g)
    cg = bg.compile(g)
    assert_outputs_close(cg(**feeds), bg.interpret(g, **feeds))
    assert calls == [n.name for n in cg.graph.nodes if n.op == "Square"] and calls
    # without a kernel the op runs its numpy meaning, copied into its planned buffer
    monkeypatch.setitem(ops.OPS, "Square", ops.OpDef("Square", (1, 1), relu.infer_fn,
                                                     square.evaluate, elementwise=True))
    calls.clear()
    assert_outputs_close(bg.compile(g)(**feeds), bg.interpret(g, **feeds))
    assert not calls


@pytest.mark.parametrize("kernel,op", [("blas", "FusedMatMul"), ("packed", "PackedMatMul")])
def test_matmul_chains_become_fused_kernels(kernel, op):
    g = mlp_graph(sizes=(13, 24, 16, 8))
    cg = bg.compile(g, matmul_kernel=kernel)
    assert cg.graph.count_ops() == {op: 3}
    assert all(n.attrs["act"] == "relu" and n.attrs["has_bias"] for n in cg.graph.nodes)
    assert bg.compile(g, fuse=False, matmul_kernel="blas").graph.count_ops() == \
        {"MatMul": 3, "Add": 3, "Relu": 3}


def test_residual_and_gelu_fuse_into_one_matmul():
    rng = np.random.default_rng(3)
    g = bg.Graph("res")
    x = g.input("x", (2, 5, 16))
    w = g.constant("w", rng.standard_normal((16, 16)).astype(np.float32) * 0.2)
    b = g.constant("b", rng.standard_normal(16).astype(np.float32))
    y = g.add(x, g.gelu(g.add(b, g.matmul(x, w))))  # operands in either order
    g.output("y", y)
    for kernel in ("blas", "packed"):
        cg = bg.compile(g, matmul_kernel=kernel)
        (node,) = cg.graph.nodes
        assert node.op == {"blas": "FusedMatMul", "packed": "PackedMatMul"}[kernel]
        assert {k: node.attrs[k] for k in ("act", "has_bias", "has_residual")} == \
            {"act": "gelu", "has_bias": True, "has_residual": True}
        feeds = feeds_for(g)
        assert_outputs_close(cg(**feeds), bg.interpret(g, **feeds))


def test_a_matmul_result_read_twice_is_not_fused_away():
    rng = np.random.default_rng(4)
    g = bg.Graph("shared")
    x = g.input("x", (4, 8))
    h = g.matmul(x, g.constant("w", rng.standard_normal((8, 8)).astype(np.float32)))
    g.output("a", g.relu(h))
    g.output("b", g.tanh(h))
    cg = bg.compile(g)
    assert "Relu" in cg.graph.count_ops() and "Tanh" in cg.graph.count_ops()
    feeds = feeds_for(g)
    assert_outputs_close(cg(**feeds), bg.interpret(g, **feeds))


def test_weights_are_packed_once_at_compile_time_never_per_call(monkeypatch):
    calls = record_calls(monkeypatch, passes, "default_pack")
    g = mlp_graph(sizes=(13, 24, 16, 8))
    cg = bg.compile(g, matmul_kernel="packed")
    assert sorted(args[0].shape for args in calls) == sorted([(13, 24), (24, 16), (16, 8)])
    x = feeds_for(g)
    for _ in range(3):
        cg(**x)
    assert len(calls) == 3


def test_constant_subgraphs_are_folded():
    rng = np.random.default_rng(5)
    g = bg.Graph("fold")
    x = g.input("x", (4, 6))
    wt = g.constant("wt", rng.standard_normal((5, 6)).astype(np.float32))
    w = g.transpose(g.mul(wt, 0.5), (1, 0))  # a weight stored transposed, then scaled
    g.output("y", g.matmul(x, w))
    folded = passes.fold_constants(g)
    assert folded.count_ops() == {"MatMul": 1}
    assert "Transpose" in g.count_ops()  # the pass did not change the graph it was given
    feeds = feeds_for(g)
    assert_outputs_close(bg.compile(g)(**feeds), bg.interpret(g, **feeds))


def test_outputs_are_fresh_arrays_on_every_call():
    g = mlp_graph()
    cg = bg.compile(g)
    x1, x2 = feeds_for(g, 1), feeds_for(g, 2)
    y1 = cg(**x1)["y"]
    keep = y1.copy()
    cg(**x2)
    np.testing.assert_array_equal(y1, keep)


def test_output_that_views_an_input_is_a_copy():
    g = bg.Graph("view")
    x = g.input("x", (4, 6))
    g.output("y", g.reshape(x, (6, 4)))
    x_val = feeds_for(g)["x"]
    y = bg.compile(g)(x=x_val)["y"]
    y[...] = 7.0
    assert not np.any(x_val == 7.0)


# ----------------------------------------------------------------------------- attention
def attention_graph(b, h, l, d, *, causal=False, hkv=None, scale_op="Mul") -> bg.Graph:
    """The MHA pattern over q (B,H,L,D), k (B,Hkv,L,D), v inputs, k transposed in-graph."""
    hkv = hkv or h
    g = bg.Graph("attn")
    q = g.input("q", (b, h, l, d))
    k = g.input("k", (b, hkv, l, d))
    v = g.input("v", (b, hkv, l, d))
    s = g.matmul(q, g.transpose(k, (0, 1, 3, 2)))
    s = g.mul(s, 1 / np.sqrt(d)) if scale_op == "Mul" else g.div(s, float(np.sqrt(d)))
    if causal:
        mask = np.where(np.tri(l, dtype=bool), 0.0, -1e9).astype(np.float32)
        s = g.add(s, g.constant("mask", mask))
    g.output("o", g.matmul(g.softmax(s, -1), v))
    return g


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale_op", ["Mul", "Div"])
@pytest.mark.parametrize("hkv", [4, 1])
def test_attention_pattern_runs_through_blasst(causal, scale_op, hkv):
    g = attention_graph(1, 4, 40, 16, causal=causal, hkv=hkv, scale_op=scale_op)
    cg = bg.compile(g)
    assert cg.graph.count_ops().get("Attention") == 1
    assert "Softmax" not in cg.graph.count_ops()
    node = next(n for n in cg.graph.nodes if n.op == "Attention")
    assert node.attrs["causal"] is causal
    assert node.attrs["scale"] == pytest.approx(1 / 4)
    feeds = feeds_for(g)
    got = cg(**feeds)["o"]
    assert_outputs_close({"o": got}, bg.interpret(g, **feeds), tol=2e-5)
    dense = blasst_ref.dense_attention(feeds["q"], feeds["k"], feeds["v"], causal=causal)
    assert rel_err(got, dense) < 2e-5


def test_an_unknown_mask_is_not_fused():
    g = bg.Graph("padmask")
    q = g.input("q", (1, 2, 8, 4))
    k = g.input("k", (1, 2, 4, 8))
    v = g.input("v", (1, 2, 8, 4))
    mask = np.zeros((8, 8), np.float32)
    mask[:, 5:] = -1e9  # padding, not causal: BLASST cannot express it
    s = g.add(g.mul(g.matmul(q, k), 0.5), g.constant("mask", mask))
    g.output("o", g.matmul(g.softmax(s), v))
    cg = bg.compile(g)
    assert "Attention" not in cg.graph.count_ops()
    feeds = feeds_for(g)
    assert_outputs_close(cg(**feeds), bg.interpret(g, **feeds))


def test_attention_threshold_stays_within_the_error_bound():
    q, k, v = blasst_ref.workloads.llm_like(1, 4, 4, 512, 512, 32, seed=7)
    q, k, v = (a.astype(np.float32) for a in (q, k, v))
    g = attention_graph(1, 4, 512, 32, causal=True)
    thresh = 1e-3
    cg = bg.compile(g, attention_thresh=thresh)
    got = cg(q=q, k=k, v=v)["o"]
    (stats,) = cg.attention_stats.values()
    assert stats.sparsity > 0.2  # the threshold really skipped tiles
    want = blasst_ref.attention(q, k, v, thresh, causal=True, scale=1 / np.sqrt(32),
                                backend="reference")
    assert rel_err(got, want) < 1e-5  # the same BLASST semantics as attention()
    dense = blasst_ref.dense_attention(q, k, v, causal=True)
    # §3 bound with l_kept >= 1 and at most Lk keys skipped per row
    bound = 2 * np.abs(v).max() * thresh * 512
    assert np.abs(got - dense).max() <= bound
    assert "sparsity" in cg.report()


# ----------------------------------------------------------------------------- errors
def test_call_time_errors_name_the_tensor():
    g = mlp_graph()
    cg = bg.compile(g)
    x = feeds_for(g)["x"]
    with pytest.raises(bg.GraphError, match="missing input.*x"):
        cg()
    with pytest.raises(bg.GraphError, match="unexpected input.*z"):
        cg(x=x, z=x)
    with pytest.raises(bg.GraphError, match="'x' has shape"):
        cg(x=x[:, :5])
    with pytest.raises(bg.GraphError, match="'x' has dtype float64"):
        cg(x=x.astype(np.float64))
    with pytest.raises(bg.GraphError, match="'x' must be a numpy array"):
        cg(x=x.tolist())


def test_build_time_errors_name_the_op_and_operands():
    g = bg.Graph("bad")
    x = g.input("x", (4, 6))
    w = g.constant("w", np.ones((5, 3), np.float32))
    with pytest.raises(bg.GraphError, match=r"MatMul .*inner dimensions differ.*x float32\[4, 6\]"):
        g.matmul(x, w)
    with pytest.raises(bg.GraphError, match="Add .*do not broadcast"):
        g.add(x, w)
    with pytest.raises(bg.GraphError, match="unknown op 'Conv'"):
        g.op("Conv", x)
    with pytest.raises(bg.GraphError, match="Reshape .*cannot reshape"):
        g.reshape(x, (5, 5))
    with pytest.raises(bg.GraphError, match="not a permutation"):
        g.transpose(x, (0, 0))
    with pytest.raises(bg.GraphError, match="different dtypes"):
        g.add(x, g.constant("d", np.ones(6, np.float64)))
    with pytest.raises(bg.GraphError, match="LayerNorm .*must have shape \\(6,\\)"):
        g.layernorm(x, w, w)
    with pytest.raises(bg.GraphError, match="defined twice"):
        g.input("x", (1,))


def test_cycles_unknown_tensors_and_ops_are_rejected():
    inputs = {"x": ((2, 2), "float32")}
    with pytest.raises(bg.GraphError, match="cycle"):
        bg.Graph.from_nodes("c", inputs, {}, [("Add", ["x", "b"], ["a"]),
                                              ("Relu", ["a"], ["b"])], {"y": "b"})
    with pytest.raises(bg.GraphError, match="'nope'"):
        bg.Graph.from_nodes("u", inputs, {}, [("Relu", ["nope"], ["a"])], {"y": "a"})
    with pytest.raises(bg.GraphError, match="unknown op 'Frobnicate'"):
        bg.Graph.from_nodes("o", inputs, {}, [("Frobnicate", ["x"], ["a"])], {"y": "a"})
    g = bg.Graph.from_nodes("ok", inputs, {}, [("Tanh", ["a"], ["b"]), ("Relu", ["x"], ["a"])],
                            {"y": "b"})
    assert [n.op for n in g.nodes] == ["Relu", "Tanh"]


def test_compile_rejects_bad_arguments():
    g = mlp_graph()
    with pytest.raises(ValueError, match="attention_thresh"):
        bg.compile(g, attention_thresh=1.0)
    with pytest.raises(ValueError, match="matmul_kernel"):
        bg.compile(g, matmul_kernel="fast")
    with pytest.raises(TypeError, match="Graph"):
        bg.compile("not a graph")
    with pytest.raises(bg.GraphError, match="no outputs"):
        empty = bg.Graph("empty")
        empty.input("x", (2,))
        bg.compile(empty)


def test_report_and_memory_plot(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    g = mlp_graph(sizes=(13, 64, 64, 64, 8))
    cg = bg.compile(g)
    cg(**feeds_for(g))
    text = cg.report()
    assert "PackedMatMul" in text and "memory reduced from" in text and "ms" in text
    assert cg.memory.peak_bytes <= cg.memory.naive_bytes
    # the share of the naive size, and the change: "to 33% (-67%)", not "(33%)"
    share = round(100 * cg.memory.peak_bytes / cg.memory.naive_bytes)
    assert f", to {share}% ({share - 100:+d}%), in " in text
    ax = cg.plot_memory()
    assert len(ax.patches) == len(cg.memory.buffers)
    assert "PackedMatMul" in {t.get_text() for t in ax.get_xticklabels()}  # long, rotated
    assert_saved_figure_keeps_its_text(ax.figure, tmp_path / "arena.png")


def test_report_times_leave_out_the_first_call():
    # the first call JIT-compiles the kernels: in the mean it would swamp every later call
    g = mlp_graph(sizes=(13, 64, 8))
    cg = bg.compile(g)
    assert "call it to see" in cg.report()
    feeds = feeds_for(g)
    cg(**feeds)
    assert "first call only" in cg.report() and not cg.total_times.any()
    first = cg.first_times.copy()
    cg(**feeds)
    cg(**feeds)
    assert "mean of the 2 calls after the first" in cg.report()
    np.testing.assert_array_equal(cg.first_times, first)
    assert cg.total_times.sum() > 0


# ----------------------------------------------------------------------------- model graphs
MODEL_GRAPHS = {
    "dlrm-bottom": lambda: bg.models.mlp([13, 64, 32, 16], 8, final_activation="relu"),
    "dlrm-top": lambda: bg.models.mlp([47, 64, 64, 32, 1], 8),
    "bert": lambda: bg.models.bert_layer(2, 48, hidden=64, heads=4),
    "llm-gqa": lambda: bg.models.llm_block(2, 40, 64, 8, 2),
    "llm-mqa": lambda: bg.models.llm_block(1, 40, 64, 4, 1),
}


@pytest.mark.parametrize("model", sorted(MODEL_GRAPHS))
@pytest.mark.parametrize("switches", [dict(), dict(fuse=False), dict(plan_memory=False)])
def test_compiled_model_graphs_equal_interpret(model, switches):
    g = MODEL_GRAPHS[model]()
    feeds = bg.models.example_inputs(g, seed=2)
    kept = {k: v.copy() for k, v in feeds.items()}
    cg = bg.compile(g, check=True, **switches)
    assert_outputs_close(cg(**feeds), bg.interpret(g, **feeds), tol=5e-5)
    for k in feeds:  # inputs are never written to
        np.testing.assert_array_equal(feeds[k], kept[k])


@pytest.mark.parametrize("model,causal", [("bert", False), ("llm-gqa", True),
                                          ("llm-mqa", True)])
def test_attention_is_found_in_the_model_graphs(model, causal):
    g = MODEL_GRAPHS[model]()
    cg = bg.compile(g)
    ops = cg.graph.count_ops()
    assert ops.get("Attention") == 1 and "Softmax" not in ops
    (node,) = [n for n in cg.graph.nodes if n.op == "Attention"]
    assert node.attrs["causal"] is causal
    # every bias, residual and GELU runs inside a packed matmul kernel
    assert "Add" not in ops and "Gelu" not in ops and "MatMul" not in ops
    assert ops["PackedMatMul"] == 6
    assert cg.memory.peak_bytes <= 0.5 * cg.memory.naive_bytes


def _attention_output(g: bg.Graph) -> str:
    """Mark the attention's ``P @ V`` product (the pattern's last tensor) as an output."""
    sm = next(n for n in g.nodes if n.op == "Softmax")
    pv = next(n for n in g.nodes if n.op == "MatMul" and n.inputs[0] == sm.outputs[0])
    g.output("ctx", pv.outputs[0])
    return pv.outputs[0]


PEAKED_MODELS = {
    "bert": lambda: bg.models.bert_layer(1, 128, hidden=64, heads=4),
    "llm-gqa": lambda: bg.models.llm_block(1, 128, 64, 8, 2),
}


@pytest.mark.parametrize("model", sorted(PEAKED_MODELS))
def test_model_attention_with_threshold_stays_within_the_bound(model):
    g = PEAKED_MODELS[model]()
    # random weights give flat attention, where nothing is negligible: sharpen the queries
    g.constants["attn.wq"] = (g.constants["attn.wq"] * 8).astype(np.float32)
    ctx = _attention_output(g)
    feeds = bg.models.example_inputs(g, seed=3)
    dense = bg.interpret(g, **feeds)["ctx"].astype(np.float64)
    thresh, block = 0.5, (16, 16)
    cg = bg.compile(g, attention_thresh=thresh, attention_block=block, check=True)
    got = cg(**feeds)["ctx"]
    (stats,) = cg.attention_stats.values()
    assert stats.skipped_tiles > 0
    # the fused node computes exactly blasst_ref.attention on its q, k, v ...
    node = next(n for n in cg.graph.nodes if n.op == "Attention")
    probe = cg.graph.copy()
    probe.outputs = {"q": node.inputs[0], "k": node.inputs[1], "v": node.inputs[2]}
    q, k, v = bg.interpret(probe, **feeds).values()
    want = blasst_ref.attention(q, k, v, thresh, causal=node.attrs["causal"],
                                scale=node.attrs["scale"], block_q=block[0], block_k=block[1],
                                backend="reference")
    assert rel_err(got.reshape(want.shape), want) < 1e-5
    # ... so it is within the §3 bound of the dense graph (n_skipped <= Lk, l_kept >= 1)
    assert np.abs(got - dense).max() <= 2 * np.abs(v).max() * thresh * k.shape[2]
    assert rel_err(got, dense) > 1e-6  # and the skipped tiles did change the result
    assert ctx in cg.graph.outputs.values()
