"""Compiler passes: each a pure function ``Graph -> Graph`` (docs/DESIGN.md §7.2).

In the order :func:`blasst_ref.graph.compile` runs them, which :data:`PIPELINE` defines
(each can be switched off: ``compile(g, passes={"fuse_attention": False})``):

1. :func:`fold_constants` -- a node whose inputs are all constants is evaluated once, now,
   and becomes a constant (e.g. a weight transposed in the model definition).
2. :func:`fuse_gelu_erf` -- the erf form of GELU that exports write becomes ``Gelu``
   (:mod:`.export_fusion`, as the next two).
3. :func:`fuse_layernorm` -- a LayerNorm written as ``ReduceMean/Sub/Pow/.../Div`` becomes
   ``LayerNorm``.
4. :func:`fuse_export_attention` -- attention as exports write it (the scale split over Q
   and K, an additive padding mask computed at run time, SDPA's NaN guard) becomes one
   ``MaskedAttention``: BLASST over each sequence's unmasked keys.
5. :func:`fuse_attention` -- ``MatMul(Q, Kᵀ) -> scale -> (causal mask add) -> Softmax ->
   MatMul(·, V)`` becomes one ``Attention`` node: one call of :func:`blasst_ref.attention`
   with the compile-time threshold, instead of a ``(B, H, L, L)`` score tensor.
6. :func:`fuse_matmul` -- ``MatMul`` and its post-op chain (bias add, activation, residual
   add) become one ``FusedMatMul``: the post-ops run on the product while it is in cache.
7. :func:`lower_int8` -- ``Dequantize -> MatMul -> post-ops -> Quantize`` with u8
   activations and constant s8 weights becomes one ``QMatMul`` (u8 x s8 -> s32,
   docs/DESIGN.md §7.4); with per-row dynamic activations, one ``QMatMulDynamic``.
8. :func:`merge_layout_ops` -- ``Transpose∘Transpose`` and ``Reshape∘Reshape`` collapse
   into one (attention fusion leaves such pairs on the K path).
9. :func:`pack_weights` -- constant-weight preprocessing: a ``FusedMatMul`` on a constant
   ``(K, N)`` weight becomes a ``PackedMatMul`` on the weight packed into column panels,
   once, at compile time (:func:`default_pack`).

Every pass leaves a graph the interpreter can run (fused ops have a numpy meaning in
:mod:`.ops`), which is how each is tested. A pass that finds nothing returns an equal graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from . import ops as _ops
from .export_fusion import fuse_export_attention, fuse_gelu_erf, fuse_layernorm
from .ir import Graph, Node

__all__ = ["PIPELINE", "fold_constants", "fuse_attention", "fuse_export_attention",
           "fuse_gelu_erf", "fuse_layernorm", "fuse_matmul", "lower_int8",
           "default_pack", "merge_layout_ops", "pack_weights", "rewrite", "single_consumer"]

#: The passes, by function name, in the order :func:`blasst_ref.graph.compile` runs them
#: (the module docstring lists them in this order; a test checks that the two agree).
PIPELINE = ("fold_constants", "fuse_gelu_erf", "fuse_layernorm", "fuse_export_attention",
            "fuse_attention", "fuse_matmul", "lower_int8",
            "merge_layout_ops", "pack_weights")

ACTIVATION_OPS = {"Relu": "relu", "Tanh": "tanh", "Exp": "exp"}


def rewrite(g: Graph, replace: dict[str, list[Node] | None],
            new_constants: dict[str, np.ndarray] | None = None) -> Graph:
    """A new graph: ``g`` with node ``name`` replaced by ``replace[name]`` (a list of nodes
    put at its place, or ``None`` to drop it), ``new_constants`` added, and everything no
    output needs pruned. The building block of every pass."""
    out = g.rebuild()
    new_constants = new_constants or {}
    for name, value in g.constants.items():
        out.constant(name, value)
    for name, value in new_constants.items():
        out.constant(name, value)
    for node in g.nodes:
        for n in (replace[node.name] or []) if node.name in replace else [node]:
            out.append(n)
    for pub, t in g.outputs.items():
        out.output(pub, t)
    return out.prune()


def single_consumer(g: Graph, users, tensor: str) -> Node | None:
    """The only node that reads ``tensor``, if exactly one does and it is not a graph output
    (``users`` is ``g.consumers()``): the condition for fusing that node into its producer."""
    if tensor in g.outputs.values() or len(users[tensor]) != 1:
        return None
    return users[tensor][0]


# ----------------------------------------------------------------------------- 1. folding
def fold_constants(g: Graph) -> Graph:
    """Evaluate every node whose inputs are all constants; its outputs become constants."""
    constants = dict(g.constants)
    replace: dict[str, list[Node] | None] = {}
    new: dict[str, np.ndarray] = {}
    for node in g.nodes:
        # Quantized weights stay quantized: Dequantize(constant) is what the int8 lowering
        # looks for, and folding it would bring the float weight back.
        if node.op == "Dequantize":
            continue
        if node.inputs and all(i in constants for i in node.inputs):
            values = _ops.get(node.op).evaluate([constants[i] for i in node.inputs], node.attrs)
            for name, value in zip(node.outputs, values):
                info = g.tensors[name]
                value = np.ascontiguousarray(value, dtype=info.dtype).reshape(info.shape)
                constants[name] = new[name] = value
            replace[node.name] = None
    return rewrite(g, replace, new) if replace else g


# ----------------------------------------------------------------------------- 2. attention
def _scalar_constant(g: Graph, name: str) -> float | None:
    value = g.constants.get(name)
    if value is None or value.size != 1:
        return None
    return float(value.reshape(()))


def _causal_from_mask(mask: np.ndarray, lq: int, lk: int) -> bool | None:
    """``False`` for an all-zero mask, ``True`` for a bottom-right causal mask (0 where
    ``j <= i + lk - lq``, at most -1e4 elsewhere: exp underflows to 0 in float32 and
    float64 alike is not needed, only negligible), ``None`` for anything else."""
    if mask.ndim < 2 or mask.shape[-2:] != (lq, lk) or \
            any(s != 1 for s in mask.shape[:-2]):
        return None
    m = mask.reshape(lq, lk).astype(np.float64)
    if not np.any(m):
        return False
    allowed = np.arange(lk)[None, :] <= np.arange(lq)[:, None] + (lk - lq)
    if lk >= lq and np.all(m[allowed] == 0) and np.all(m[~allowed] <= -1e4):
        return True
    return None


def fuse_attention(g: Graph, thresh: float = 0.0, block_q: int | None = None,
                   block_k: int | None = None) -> Graph:
    """Replace ``MatMul(Q, Kt) -> [Mul|Div scalar] -> [Add causal-or-zero mask] ->
    Softmax(last axis) -> MatMul(P, V)`` by one ``Attention`` node with ``thresh``.

    Layouts it understands (``Kt`` is the keys transposed, ``(..., D, Lk)``):

    * 4-D MHA/MQA: ``Q (B, Hq, Lq, D)``, ``Kt (B, Hkv, D, Lk)``, ``V (B, Hkv, Lk, Dv)``
      with ``Hkv == Hq`` or ``Hkv == 1`` (numpy broadcasting);
    * 5-D GQA: ``Q (B, Hkv, G, Lq, D)``, ``Kt (B, Hkv, 1, D, Lk)``, ``V (B, Hkv, 1, Lk, Dv)``:
      query head ``kvh * G + g``, exactly :func:`blasst_ref.attention`'s head mapping.

    The mask must be a constant that is all zeros or exactly bottom-right causal; any other
    mask (or layout) leaves the pattern unfused, and so does a mask or scale that
    broadcasts the scores to another shape (more rows than Q, a higher rank): the fused op
    computes one output row per query. The intermediates must have no other reader.
    ``block_q``/``block_k`` are the attention's tile sizes (``None``: its defaults).
    """
    users = g.consumers()
    producers = g.producers()
    fresh = g.name_generator()
    replace: dict[str, list[Node] | None] = {}
    for sm in g.nodes:
        if sm.op != "Softmax" or sm.attrs["axis"] != len(g.tensors[sm.inputs[0]].shape) - 1:
            continue
        pv = single_consumer(g, users, sm.outputs[0])
        if pv is None or pv.op != "MatMul" or pv.inputs[0] != sm.outputs[0]:
            continue
        chain = [pv, sm]  # walked backwards from the output; chain[-1] reads t
        t, causal, scale = sm.inputs[0], False, 1.0
        node = producers.get(t)
        if node is not None and node.op == "Add" and single_consumer(g, users, t) is sm:
            masks = [i for i in node.inputs if i in g.constants]
            if len(masks) != 1:
                continue
            other = node.inputs[1] if node.inputs[0] == masks[0] else node.inputs[0]
            shape = g.tensors[t].shape
            causal = _causal_from_mask(g.constants[masks[0]], shape[-2], shape[-1])
            if causal is None:
                continue
            chain.append(node)
            t, node = other, producers.get(other)
        if node is not None and node.op in ("Mul", "Div") and \
                single_consumer(g, users, t) is chain[-1]:
            consts = [i for i in node.inputs if _scalar_constant(g, i) is not None]
            if not consts or (node.op == "Div" and node.inputs[1] != consts[0]):
                continue
            s = _scalar_constant(g, consts[0])
            scale = s if node.op == "Mul" else 1.0 / s
            other = node.inputs[1] if node.inputs[0] == consts[0] else node.inputs[0]
            chain.append(node)
            t, node = other, producers.get(other)
        if node is None or node.op != "MatMul" or single_consumer(g, users, t) is not chain[-1]:
            continue
        chain.append(node)
        # the mask and the scale must not broadcast the scores (a mask with more rows
        # than Q, a scale of higher rank): the fused op's output has Q's shape
        scores = g.tensors[node.outputs[0]].shape
        if any(g.tensors[n.outputs[0]].shape != scores for n in chain[1:]):
            continue
        q, kt = node.inputs
        v = pv.inputs[1]
        nodes = _attention_nodes(g, fresh, q, kt, v, pv.outputs[0],
                                 {"scale": scale, "causal": causal, "thresh": thresh,
                                  "block_q": block_q, "block_k": block_k})
        if nodes is None or not math.isfinite(scale) or scale <= 0:
            continue
        for n in chain:
            replace[n.name] = None
        replace[pv.name] = nodes
    return rewrite(g, replace) if replace else g


def _attention_nodes(g: Graph, fresh, q: str, kt: str, v: str, out: str,
                     attrs: dict) -> list[Node] | None:
    """Nodes computing ``out`` with one Attention call, or None for an unknown layout."""
    qs, ks, vs = g.tensors[q].shape, g.tensors[kt].shape, g.tensors[v].shape
    name = fresh("attention")

    def t(suffix):
        return f"{name}.{suffix}"

    if len(qs) == len(ks) == len(vs) == 4:
        (b, hq, lq, d), (bk, hkv, dk, lk), (bv, hv, lv, dv) = qs, ks, vs
        if not (b == bk == bv and hkv == hv and lk == lv and (hkv == hq or hkv == 1)):
            return None
        return [Node("Transpose", (kt,), (t("k"),), {"perm": (0, 1, 3, 2)}, t("k")),
                Node("Attention", (q, t("k"), v), (out,), attrs, name)]
    if len(qs) == len(ks) == len(vs) == 5:
        (b, hkv, grp, lq, d), (bk, hk, one, _dk, lk), (bv, hv, onev, lv, dv) = qs, ks, vs
        if not (b == bk == bv and hkv == hk == hv and one == onev == 1 and lk == lv):
            return None
        return [Node("Reshape", (q,), (t("q4"),), {"shape": (b, hkv * grp, lq, d)}, t("q4")),
                Node("Reshape", (kt,), (t("kt4"),), {"shape": (b, hkv, d, lk)}, t("kt4")),
                Node("Transpose", (t("kt4"),), (t("k"),), {"perm": (0, 1, 3, 2)}, t("k")),
                Node("Reshape", (v,), (t("v4"),), {"shape": (b, hkv, lk, dv)}, t("v4")),
                Node("Attention", (t("q4"), t("k"), t("v4")), (t("o4"),), attrs, name),
                Node("Reshape", (t("o4"),), (out,), {"shape": (b, hkv, grp, lq, dv)},
                     t("o"))]
    return None


# ----------------------------------------------------------------------------- 3. matmul
def _bias_operand(g: Graph, add: Node, y: str) -> str | None:
    other = add.inputs[1] if add.inputs[0] == y else add.inputs[0]
    n = g.tensors[y].shape[-1]
    if other in g.constants and g.tensors[other].shape in ((n,), (1, n)) and other != y:
        return other
    return None


def _residual_operand(g: Graph, add: Node, y: str) -> str | None:
    other = add.inputs[1] if add.inputs[0] == y else add.inputs[0]
    if other != y and g.tensors[other].shape == g.tensors[y].shape:
        return other
    return None


def fuse_matmul(g: Graph) -> Graph:
    """``MatMul -> [Add bias] -> [Relu|Gelu|Tanh|Exp] -> [Add residual]`` -> ``FusedMatMul``.

    A bias is a constant of shape ``(N,)`` or ``(1, N)``; a residual is any tensor of the
    output's shape. Each step is taken only if the tensor before it has no other reader
    and is not a graph output (its value must not be needed on its own).
    """
    users = g.consumers()
    fresh = g.name_generator()
    replace: dict[str, list[Node] | None] = {}
    for mm in g.nodes:
        if mm.op != "MatMul" or mm.name in replace:
            continue
        y, chain = mm.outputs[0], [mm]
        bias = residual = None
        act = "none"
        nxt = single_consumer(g, users, y)
        if nxt is not None and nxt.op == "Add" and (bias := _bias_operand(g, nxt, y)):
            chain.append(nxt)
            y = nxt.outputs[0]
            nxt = single_consumer(g, users, y)
        if nxt is not None and (nxt.op in ACTIVATION_OPS or nxt.op == "Gelu"):
            act = ACTIVATION_OPS.get(nxt.op) or \
                ("gelu" if nxt.attrs["approximate"] == "none" else "gelu_tanh")
            chain.append(nxt)
            y = nxt.outputs[0]
            nxt = single_consumer(g, users, y)
        if nxt is not None and nxt.op == "Add" and (residual := _residual_operand(g, nxt, y)):
            chain.append(nxt)
            y = nxt.outputs[0]
        if len(chain) == 1:
            continue
        inputs = list(mm.inputs) + ([bias] if bias else []) + ([residual] if residual else [])
        fused = Node("FusedMatMul", tuple(inputs), (y,),
                     {"act": act, "has_bias": bias is not None,
                      "has_residual": residual is not None}, fresh("fused_matmul"))
        for n in chain[:-1]:
            replace[n.name] = None
        replace[chain[-1].name] = [fused]
    return rewrite(g, replace) if replace else g


# ----------------------------------------------------------------------------- 5. layout
def merge_layout_ops(g: Graph) -> Graph:
    """``Transpose(Transpose(x, p1), p2)`` -> ``Transpose(x, p1[p2])`` and
    ``Reshape(Reshape(x))`` -> ``Reshape(x)`` when the inner result has no other reader:
    one copy (or none) instead of two."""
    users = g.consumers()
    producers = g.producers()
    replace: dict[str, list[Node] | None] = {}
    for node in g.nodes:
        if node.op not in ("Transpose", "Reshape"):
            continue
        inner = producers.get(node.inputs[0])
        if inner is None or inner.op != node.op or inner.name in replace or \
                single_consumer(g, users, inner.outputs[0]) is not node:
            continue
        if node.op == "Transpose":
            p1, p2 = inner.attrs["perm"], node.attrs["perm"]
            perm = tuple(p1[i] for i in p2)
            # the identity permutation is a free view, not a copy
            op, attrs = ("Reshape", {"shape": g.tensors[node.outputs[0]].shape}) \
                if perm == tuple(range(len(perm))) else ("Transpose", {"perm": perm})
        else:
            op, attrs = "Reshape", {"shape": node.attrs["shape"]}
        replace[inner.name] = None
        replace[node.name] = [Node(op, inner.inputs, node.outputs, attrs, node.name)]
    return rewrite(g, replace) if replace else g


# ----------------------------------------------------------------------------- 6. packing
def default_pack(w: np.ndarray):
    """The packing :func:`pack_weights` uses for ``w``: ``(P, K, NR)`` panels of
    :mod:`.f32_gemm` (whose FMA micro-kernel then runs the product) for a float32 weight on
    an AVX2/AVX-512 CPU, else :func:`blasst_ref.graph.kernels.pack_weight` (blocks of
    BLAS calls). Both are column panels: ``PackedMatMul`` means the same with either."""
    from . import f32_gemm
    from .kernels import pack_weight

    if f32_gemm.available() and w.dtype == np.float32:
        return f32_gemm.pack(w)
    return pack_weight(w)


def pack_weights(g: Graph, pack: Callable | None = None) -> Graph:
    """Constant-weight preprocessing: ``FusedMatMul(a, W)`` with ``W`` a constant ``(K, N)``
    becomes ``PackedMatMul(a, panels)`` with ``panels = pack(W).panels``, computed here,
    once. ``pack`` defaults to :func:`default_pack`: the FMA micro-kernel's panels
    (:func:`blasst_ref.graph.f32_gemm.pack`) for float32 weights where the CPU has it, else
    :func:`blasst_ref.graph.kernels.pack_weight`'s. A plain ``MatMul`` on a constant weight
    is first made a ``FusedMatMul`` with no post-ops."""
    if pack is None:
        pack = default_pack
    fresh = g.name_generator()
    replace: dict[str, list[Node] | None] = {}
    new: dict[str, np.ndarray] = {}
    packed: dict[str, str] = {}  # a weight read by several matmuls is packed once
    for node in g.nodes:
        if node.op not in ("FusedMatMul", "MatMul"):
            continue
        w = node.inputs[1]
        if w not in g.constants or len(g.tensors[w].shape) != 2 or \
                g.tensors[w].dtype not in ("float32", "float64"):
            continue
        if w not in packed:
            pw = pack(g.constants[w])
            packed[w] = fresh(f"{w}.packed")
            new[packed[w]] = pw.panels
        attrs = dict(node.attrs) if node.op == "FusedMatMul" else \
            {"act": "none", "has_bias": False, "has_residual": False}
        attrs["n"] = g.tensors[w].shape[1]
        replace[node.name] = [Node("PackedMatMul", (node.inputs[0], packed[w], *node.inputs[2:]),
                                   node.outputs, attrs, node.name)]
    return rewrite(g, replace, new) if replace else g


# ----------------------------------------------------------------------------- 4. int8
def _dequantized_activation(g: Graph, producers, t: str):
    """``(u8 tensor, scale, zero point)`` if ``t = Dequantize(u8, per tensor)``, else None."""
    node = producers.get(t)
    if node is None or node.op != "Dequantize" or node.attrs["axis"] is not None or \
            g.tensors[node.inputs[0]].dtype != "uint8" or node.attrs["dtype"] != "float32":
        return None
    return node.inputs[0], float(node.attrs["scale"]), int(node.attrs["zero_point"])


def _dynamic_activation(g: Graph, producers, t: str):
    """``x`` if ``t = DequantizeRows(*DynamicQuantizeRows(x))`` (float32 ``x``), else None."""
    node = producers.get(t)
    if node is None or node.op != "DequantizeRows":
        return None
    quant = producers.get(node.inputs[0])
    if quant is None or quant.op != "DynamicQuantizeRows" or quant.outputs != node.inputs:
        return None
    return quant.inputs[0]


def _dequantized_weight(g: Graph, producers, t: str):
    """``(s8 constant (K, N), per-column scales)`` if ``t`` is a symmetric Dequantize of a
    constant int8 ``(K, N)`` weight, per tensor or per output channel (axis 1), else None."""
    node = producers.get(t)
    if node is None or node.op != "Dequantize" or node.inputs[0] not in g.constants:
        return None
    w = g.constants[node.inputs[0]]
    axis = node.attrs["axis"]
    if w.dtype != np.int8 or w.ndim != 2 or np.any(node.attrs["zero_point"] != 0) or \
            axis not in (None, 1):
        return None
    return node.inputs[0], np.broadcast_to(node.attrs["scale"], (w.shape[1],))


def lower_int8(g: Graph) -> Graph:
    """The int8 lowering (docs/DESIGN.md §7.4): ``Dequantize(u8 activation) x Dequantize(s8
    constant weight) -> MatMul -> post-ops [-> Quantize(u8)]`` becomes one ``QMatMul``.

    Runs after :func:`fuse_matmul`, so the post-ops are already gathered in a
    ``FusedMatMul``; a following per-tensor u8 ``Quantize`` that is the product's only
    reader is folded in too (the kernel requantizes before the store). The Dequantize
    nodes left without readers are pruned away: the float weights never exist at run time.

    Dynamic activations: ``DequantizeRows(DynamicQuantizeRows(x)) x Dequantize(s8 constant
    weight) -> MatMul -> post-ops`` becomes one ``QMatMulDynamic`` on the float ``x``.
    """
    users = g.consumers()
    producers = g.producers()
    replace: dict[str, list[Node] | None] = {}
    for node in g.nodes:
        if node.op not in ("MatMul", "FusedMatMul"):
            continue
        act = _dequantized_activation(g, producers, node.inputs[0])
        wq = _dequantized_weight(g, producers, node.inputs[1])
        dyn = _dynamic_activation(g, producers, node.inputs[0])
        if dyn is not None and wq is not None:
            attrs = dict(node.attrs) if node.op == "FusedMatMul" else \
                {"act": "none", "has_bias": False, "has_residual": False}
            attrs["w_scale"] = np.array(wq[1])
            replace[node.name] = [Node("QMatMulDynamic", (dyn, wq[0], *node.inputs[2:]),
                                       node.outputs, attrs, node.name)]
            continue
        if act is None or wq is None:
            continue
        a_u8, a_scale, a_zp = act
        w_s8, w_scale = wq
        attrs = dict(node.attrs) if node.op == "FusedMatMul" else \
            {"act": "none", "has_bias": False, "has_residual": False}
        attrs.update(a_scale=a_scale, a_zero_point=a_zp, w_scale=np.array(w_scale),
                     out_scale=None, out_zero_point=0)
        out = node.outputs[0]
        quant = single_consumer(g, users, out)
        if quant is not None and quant.op == "Quantize" and quant.attrs["axis"] is None and \
                quant.attrs["dtype"] == "uint8":
            attrs.update(out_scale=float(quant.attrs["scale"]),
                         out_zero_point=int(quant.attrs["zero_point"]))
            replace[quant.name] = None
            out = quant.outputs[0]
        replace[node.name] = [Node("QMatMul", (a_u8, w_s8, *node.inputs[2:]), (out,), attrs,
                                   node.name)]
    return rewrite(g, replace) if replace else g
