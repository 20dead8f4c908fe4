"""``blasst_ref.graph.models``: each model graph against an independent numpy forward pass.

The reference passes below are written from the models' definitions (DLRM's MLPs, a
post-norm BERT layer, a pre-norm causal GQA block) in float64 with numpy and einsum,
reading the weights from ``graph.constants`` by name; they share no code with the graph
builders or the interpreter. The interpreter runs the graphs in float32, so they agree to
float32 rounding (relative L2 error ~1e-6). The attention op form that the fusion pass
matches is checked node by node, since the lead's pass depends on it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import rel_err
from scipy.special import erf

import blasst_ref
from blasst_ref import graph as bg
from blasst_ref.graph import models

TOL = 1e-5


# ---------------------------------------------------------------------------- float64 refs
def c64(g: bg.Graph, name: str) -> np.ndarray:
    return g.constants[name].astype(np.float64)


def ln(x, gamma, beta, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gamma + beta


def gelu(x):
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ref_mlp(g, x, n_layers, final):
    h = x.astype(np.float64)
    for i in range(n_layers):
        h = h @ c64(g, f"l{i}.w") + c64(g, f"l{i}.b")
        act = "relu" if i < n_layers - 1 else final
        if act == "relu":
            h = np.maximum(h, 0.0)
        elif act == "tanh":
            h = np.tanh(h)
    return h


def ref_bert(g, x, heads):
    x = x.astype(np.float64)
    b, length, e = x.shape
    d = e // heads

    def heads_of(key):  # (B, H, L, D), head h = columns h*D .. h*D+D-1
        y = x @ c64(g, f"attn.w{key}") + c64(g, f"attn.b{key}")
        return y.reshape(b, length, heads, d).transpose(0, 2, 1, 3)

    q, k, v = heads_of("q"), heads_of("k"), heads_of("v")
    p = softmax(np.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(d))
    ctx = np.einsum("bhij,bhjd->bihd", p, v).reshape(b, length, e)
    attn = ctx @ c64(g, "attn.wo") + c64(g, "attn.bo")
    h = ln(attn + x, c64(g, "ln1.gamma"), c64(g, "ln1.beta"), 1e-12)
    f = gelu(h @ c64(g, "ffn.w1") + c64(g, "ffn.b1")) @ c64(g, "ffn.w2") + c64(g, "ffn.b2")
    return ln(f + h, c64(g, "ln2.gamma"), c64(g, "ln2.beta"), 1e-12)


def llm_qkv(g, x, heads, kv_heads):
    """q (B, H, L, D), k and v (B, Hkv, L, D) of the block, float64."""
    x = x.astype(np.float64)
    b, length, e = x.shape
    d = e // heads
    a = ln(x, c64(g, "ln1.gamma"), c64(g, "ln1.beta"), 1e-5)
    q = (a @ c64(g, "attn.wq")).reshape(b, length, heads, d).transpose(0, 2, 1, 3)
    k = (a @ c64(g, "attn.wk")).reshape(b, length, kv_heads, d).transpose(0, 2, 1, 3)
    v = (a @ c64(g, "attn.wv")).reshape(b, length, kv_heads, d).transpose(0, 2, 1, 3)
    return q, k, v


def llm_rest(g, x, ctx):
    """The block after the attention, from ctx (B, H, L, D)."""
    x = x.astype(np.float64)
    b, length, e = x.shape
    h = x + ctx.transpose(0, 2, 1, 3).reshape(b, length, e) @ c64(g, "attn.wo")
    a2 = ln(h, c64(g, "ln2.gamma"), c64(g, "ln2.beta"), 1e-5)
    return h + gelu(a2 @ c64(g, "ffn.w1")) @ c64(g, "ffn.w2")


def ref_llm(g, x, heads, kv_heads):
    """Explicit loops over heads and a boolean causal mask: query i sees keys j <= i."""
    q, k, v = llm_qkv(g, x, heads, kv_heads)
    b, _, length, d = q.shape
    group = heads // kv_heads
    ctx = np.empty_like(q)
    visible = np.tril(np.ones((length, length), dtype=bool))
    for bi in range(b):
        for h in range(heads):
            kvh = h // group
            s = q[bi, h] @ k[bi, kvh].T / math.sqrt(d)
            s = np.where(visible, s, -np.inf)
            ctx[bi, h] = softmax(s) @ v[bi, kvh]
    return llm_rest(g, x, ctx)


def run(g, seed=1):
    feeds = models.example_inputs(g, seed=seed)
    return feeds["x"], bg.interpret(g, **feeds)["y"]


# ---------------------------------------------------------------------------- MLP
@pytest.mark.parametrize("layers,batch,final", [
    ([13, 64, 32, 16], 8, "relu"),
    ([47, 64, 64, 32, 16, 1], 16, "none"),
    ([5, 3], 4, "tanh"),
    ([5, 7], 1, "none"),
])
def test_mlp_equals_numpy(layers, batch, final):
    g = models.mlp(layers, batch, seed=3, final_activation=final)
    x, y = run(g)
    assert y.shape == (batch, layers[-1]) and y.dtype == np.float32
    assert rel_err(y, ref_mlp(g, x, len(layers) - 1, final)) < TOL
    counts = g.count_ops()
    n = len(layers) - 1
    assert counts["MatMul"] == counts["Add"] == n
    assert counts.get("Relu", 0) == n - 1 + (final == "relu")
    assert counts.get("Tanh", 0) == (final == "tanh")


def test_mlp_layers_are_matmul_add_act():
    g = models.mlp([13, 32, 16], 4, final_activation="relu")
    assert [n.op for n in g.nodes] == ["MatMul", "Add", "Relu"] * 2
    assert g.nodes[0].inputs == ("x", "l0.w") and g.nodes[1].inputs[1] == "l0.b"
    assert g.constants["l1.w"].shape == (32, 16) and g.constants["l1.b"].shape == (16,)


def test_dlrm_mlps():
    bottom = models.dlrm_bottom_mlp(4)
    top = models.dlrm_top_mlp(4)
    assert bottom.tensors["x"].shape == (4, 13)
    assert bottom.tensors[bottom.outputs["y"]].shape == (4, 128)
    assert bottom.count_ops()["Relu"] == 3  # ReLU on every layer of the bottom MLP
    assert top.tensors["x"].shape == (4, 479)
    assert top.tensors[top.outputs["y"]].shape == (4, 1)
    assert top.count_ops()["Relu"] == 4  # none after the last layer (DLRM's sigmoid)
    x, y = run(top)
    assert rel_err(y, ref_mlp(top, x, 5, "none")) < TOL


def test_models_are_seeded():
    a, b = models.mlp([8, 4], 2, seed=5), models.mlp([8, 4], 2, seed=5)
    c = models.mlp([8, 4], 2, seed=6)
    assert np.array_equal(a.constants["l0.w"], b.constants["l0.w"])
    assert not np.array_equal(a.constants["l0.w"], c.constants["l0.w"])
    f1, f2 = models.example_inputs(a, seed=2), models.example_inputs(a, seed=2)
    assert np.array_equal(f1["x"], f2["x"])


# ---------------------------------------------------------------------------- BERT
@pytest.mark.parametrize("batch,seq,hidden,heads,ffn", [(2, 16, 32, 4, None),
                                                        (1, 24, 64, 2, 96)])
def test_bert_layer_equals_numpy(batch, seq, hidden, heads, ffn):
    g = models.bert_layer(batch, seq, hidden, heads, seed=2, ffn=ffn)
    x, y = run(g)
    assert y.shape == (batch, seq, hidden) and y.dtype == np.float32
    assert g.constants["ffn.w1"].shape == (hidden, ffn or 4 * hidden)
    assert rel_err(y, ref_bert(g, x, heads)) < TOL
    assert abs(float(y.std()) - 1.0) < 0.2  # LayerNorm output: O(1)


def _chain(g: bg.Graph, softmax_node: bg.Node):
    """The attention nodes around a Softmax: returns a dict of the matched nodes."""
    prod = g.producers()
    cons = g.consumers()
    out = {"softmax": softmax_node}
    node = prod[softmax_node.inputs[0]]
    if node.op == "Add":
        out["mask"] = node
        node = prod[node.inputs[0]]
    out["scale"] = node
    out["qk"] = prod[node.inputs[0]]
    (pv,) = cons[softmax_node.outputs[0]]
    out["pv"] = pv
    return out


def test_bert_attention_op_form():
    b, length, e, h = 2, 8, 32, 4
    d = e // h
    g = models.bert_layer(b, length, e, h)
    prod = g.producers()
    (sm,) = [n for n in g.nodes if n.op == "Softmax"]
    assert sm.attrs["axis"] == 3
    m = _chain(g, sm)
    assert "mask" not in m
    assert m["scale"].op == "Mul"
    assert float(g.constants[m["scale"].inputs[1]]) == pytest.approx(1 / math.sqrt(d))
    assert g.constants[m["scale"].inputs[1]].shape == ()
    qk, pv = m["qk"], m["pv"]
    assert qk.op == "MatMul" and pv.op == "MatMul" and pv.inputs[0] == sm.outputs[0]
    tq, tk, tv = prod[qk.inputs[0]], prod[qk.inputs[1]], prod[pv.inputs[1]]
    assert (tq.op, tq.attrs["perm"]) == ("Transpose", (0, 2, 1, 3))
    assert (tk.op, tk.attrs["perm"]) == ("Transpose", (0, 2, 3, 1))
    assert (tv.op, tv.attrs["perm"]) == ("Transpose", (0, 2, 1, 3))
    for t, key in ((tq, "q"), (tk, "k"), (tv, "v")):
        r = prod[t.inputs[0]]
        assert r.op == "Reshape" and r.attrs["shape"] == (b, length, h, d)
        add = prod[r.inputs[0]]
        assert add.op == "Add" and add.inputs[1] == f"attn.b{key}"
        assert prod[add.inputs[0]].inputs == ("x", f"attn.w{key}")
    assert g.tensors[qk.outputs[0]].shape == (b, h, length, length)
    (tc,) = g.consumers()[pv.outputs[0]]
    assert (tc.op, tc.attrs["perm"]) == ("Transpose", (0, 2, 1, 3))
    (rc,) = g.consumers()[tc.outputs[0]]
    assert rc.op == "Reshape" and rc.attrs["shape"] == (b, length, e)


# ---------------------------------------------------------------------------- LLM block
@pytest.mark.parametrize("batch,seq,hidden,heads,kv_heads", [
    (2, 16, 64, 8, 2),   # GQA
    (1, 32, 32, 4, 4),   # MHA
    (2, 24, 48, 4, 1),   # MQA
])
def test_llm_block_equals_numpy(batch, seq, hidden, heads, kv_heads):
    g = models.llm_block(batch, seq, hidden, heads, kv_heads, seed=4)
    x, y = run(g)
    assert y.shape == (batch, seq, hidden) and y.dtype == np.float32
    assert rel_err(y, ref_llm(g, x, heads, kv_heads)) < TOL
    # the same block through blasst_ref's own oracle: its head mapping and causal rule
    q, k, v = llm_qkv(g, x, heads, kv_heads)
    ctx = blasst_ref.dense_attention(q, k, v, causal=True)
    assert rel_err(y, llm_rest(g, x, ctx)) < TOL


def test_llm_block_is_causal():
    g = models.llm_block(1, 16, 32, 4, 2, seed=1)
    x = models.example_inputs(g, seed=0)["x"]
    y = bg.interpret(g, x=x)["y"]
    x2 = x.copy()
    x2[:, 10:] = 7.0  # change the future: rows 0..9 must not move
    y2 = bg.interpret(g, x=x2)["y"]
    np.testing.assert_array_equal(y[:, :10], y2[:, :10])
    assert not np.allclose(y[:, 10:], y2[:, 10:])


def test_llm_attention_op_form():
    b, length, e, h, hkv = 2, 8, 32, 4, 2
    d, grp = e // h, h // hkv
    g = models.llm_block(b, length, e, h, hkv)
    prod = g.producers()
    (sm,) = [n for n in g.nodes if n.op == "Softmax"]
    assert sm.attrs["axis"] == 4
    m = _chain(g, sm)
    mask = g.constants[m["mask"].inputs[1]]
    assert m["mask"].inputs[1] == "causal_mask"
    assert mask.shape == (length, length) and mask.dtype == np.float32
    np.testing.assert_array_equal(mask == 0, np.tril(np.ones((length, length), dtype=bool)))
    assert np.all(mask[mask != 0] == models.CAUSAL_MASK_VALUE)
    assert m["scale"].op == "Mul"
    assert float(g.constants[m["scale"].inputs[1]]) == pytest.approx(1 / math.sqrt(d))
    qk, pv = m["qk"], m["pv"]
    assert g.tensors[qk.outputs[0]].shape == (b, hkv, grp, length, length)
    tq = prod[qk.inputs[0]]
    assert (tq.op, tq.attrs["perm"]) == ("Transpose", (0, 2, 3, 1, 4))
    assert prod[tq.inputs[0]].attrs["shape"] == (b, length, hkv, grp, d)
    rk, rv = prod[qk.inputs[1]], prod[pv.inputs[1]]
    assert (rk.op, rk.attrs["shape"]) == ("Reshape", (b, hkv, 1, d, length))
    assert (rv.op, rv.attrs["shape"]) == ("Reshape", (b, hkv, 1, length, d))
    tk, tv = prod[rk.inputs[0]], prod[rv.inputs[0]]
    assert (tk.op, tk.attrs["perm"]) == ("Transpose", (0, 2, 3, 1))
    assert (tv.op, tv.attrs["perm"]) == ("Transpose", (0, 2, 1, 3))
    for t, key in ((tq, "q"), (tk, "k"), (tv, "v")):
        mm = prod[prod[t.inputs[0]].inputs[0]]
        assert mm.op == "MatMul" and mm.inputs[1] == f"attn.w{key}"
    (tc,) = g.consumers()[pv.outputs[0]]
    assert (tc.op, tc.attrs["perm"]) == ("Transpose", (0, 3, 1, 2, 4))
    (rc,) = g.consumers()[tc.outputs[0]]
    assert rc.op == "Reshape" and rc.attrs["shape"] == (b, length, e)


# ---------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("call,match", [
    (lambda: models.mlp([13], 4), "layers"),
    (lambda: models.mlp([], 4), "layers"),
    (lambda: models.mlp([13, 0, 4], 4), r"layers\[1\]"),
    (lambda: models.mlp([13, 4], 0), "batch"),
    (lambda: models.mlp([13, 4], 2.5), "batch"),
    (lambda: models.mlp(13, 4), "layers"),
    (lambda: models.mlp([13, 4], 4, final_activation="sigmoid"), "final_activation"),
    (lambda: models.bert_layer(1, 8, 30, 4), "hidden"),
    (lambda: models.bert_layer(0, 8, 32, 4), "batch"),
    (lambda: models.bert_layer(1, -8, 32, 4), "seq"),
    (lambda: models.bert_layer(1, 8, 32, 0), "heads"),
    (lambda: models.bert_layer(1, 8, 32, 4, ffn=0), "ffn"),
    (lambda: models.llm_block(1, 8, 32, 4, 3), "kv_heads"),
    (lambda: models.llm_block(1, 8, 30, 4, 2), "hidden"),
    (lambda: models.llm_block(1, 8, 32, 4, 0), "kv_heads"),
    (lambda: models.llm_block(1, 0, 32, 4, 2), "seq"),
])
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_example_inputs_match_declared_inputs():
    g = bg.Graph("ints")
    g.input("a", (3, 4), "float32")
    g.input("b", (2,), "uint8")
    g.input("c", (5,), "int8")
    feeds = models.example_inputs(g, seed=0)
    assert set(feeds) == {"a", "b", "c"}
    bg.check_feeds(g, feeds)  # shapes and dtypes as declared
