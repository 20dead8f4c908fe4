"""Passes that recognise what framework exports write op by op, and fuse it (docs/DESIGN.md §7.2).

A model imported with :func:`~blasst_ref.graph.from_onnx` spells its layers in basic ops:
GELU as ``x * (erf(x / sqrt 2) + 1) * 0.5``, LayerNorm (before opset 17) as
``ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add``, and attention with the scale split
over Q and K and an additive padding mask computed at run time from the ``attention_mask``
input. Each pass here is a pure function ``Graph -> Graph`` that rewrites one idiom into
the IR's own op, so that the passes of :mod:`.passes` then fuse it further (a ``Gelu``
into the MatMul epilogue, ``LayerNorm`` into its kernel):

* :func:`fuse_gelu_erf` -- the erf form of GELU -> ``Gelu``;
* :func:`fuse_layernorm` -- the decomposed LayerNorm over the last axis -> ``LayerNorm``;
* :func:`fuse_export_attention` -- ``MatMul(Q [* c1], Kt [* c2]) [* c | / c] + mask ->
  Softmax [-> Where(IsNaN(p), 0, p)] -> MatMul(., V)`` with a run-time ``mask`` -> one
  ``MaskedAttention`` node: BLASST attention over each sequence's unmasked keys.

``MaskedAttention(q, k, v, mask)``: ``softmax(q k^T * scale + mask) v`` with ``mask``
broadcasting to ``(B, H, Lq, Lk)``; ``zero_nan_rows`` (the SDPA export's ``Where(IsNaN)``)
makes a row whose probabilities are NaN (every key masked with ``-inf``) zero. Its kernel
(:func:`masked_attention`) looks at the mask when it runs: a *key-padding* mask -- the same
for every head and query, each entry 0 (keep) or <= -1e4 (masked: its probability
underflows to exactly 0 in float32) -- is exactly attention over the kept keys, so each
sequence runs one :func:`blasst_ref.attention` call on its own keys (one call for the whole
batch when nothing is masked). Any other mask runs the op's numpy meaning.
"""

from __future__ import annotations

import math

import numpy as np

from .ir import Graph, Node
from .ops import OpDef, op_error, register, softmax_array

__all__ = ["MASKED", "fuse_export_attention", "fuse_gelu_erf", "fuse_layernorm",
           "key_padding", "masked_attention", "masked_attention_array",
           "masked_attention_step"]

#: Mask entries at or below this are "masked" for the key-padding path: exp(-1e4) is 0 in
#: float32 and float64 alike next to any kept score of a sane model.
MASKED = -1e4


# ---------------------------------------------------------------------------- helpers
def _only_reader(g: Graph, users, t: str) -> Node | None:
    # passes imports this module for its PIPELINE: import it at call time, not at import
    from .passes import single_consumer

    return single_consumer(g, users, t)


def _rewrite(g: Graph, replace: dict, new_constants: dict | None = None) -> Graph:
    from .passes import rewrite

    return rewrite(g, replace, new_constants)


def _scalar(g: Graph, name: str) -> float | None:
    value = g.constants.get(name)
    if value is None or value.size != 1:
        return None
    return float(value.reshape(()))


def _other(node: Node, t: str) -> str:
    return node.inputs[1] if node.inputs[0] == t else node.inputs[0]


def _scalar_operand(g: Graph, node: Node, target: float, tol: float = 1e-6):
    """The non-constant operand of a binary ``node`` whose other operand is the scalar
    ``target`` (relative tolerance ``tol``), else None."""
    for i, name in enumerate(node.inputs):
        v = _scalar(g, name)
        if v is not None and math.isclose(v, target, rel_tol=tol):
            return node.inputs[1 - i]
    return None


# ---------------------------------------------------------------------------- GELU
def fuse_gelu_erf(g: Graph) -> Graph:
    """``x * (erf(x / sqrt 2) + 1) * 0.5`` (any order of the products, ``x * (1/sqrt 2)``
    for the division) -> ``Gelu(x)``: the form ``torch.onnx.export`` writes for
    ``nn.GELU()`` / Hugging Face's ``gelu`` below opset 20."""
    users = g.consumers()
    producers = g.producers()
    replace: dict = {}
    for erf in g.nodes:
        if erf.op != "Erf":
            continue
        scaled = producers.get(erf.inputs[0])
        if scaled is None or _only_reader(g, users, erf.inputs[0]) is not erf:
            continue
        x = _scalar_operand(g, scaled, math.sqrt(2.0)) if scaled.op == "Div" and \
            _scalar(g, scaled.inputs[1]) is not None else \
            (_scalar_operand(g, scaled, 1 / math.sqrt(2.0)) if scaled.op == "Mul" else None)
        add = _only_reader(g, users, erf.outputs[0])
        if x is None or add is None or add.op != "Add" or \
                _scalar_operand(g, add, 1.0) != erf.outputs[0]:
            continue
        # (x * (1 + erf)) * 0.5, or (x * 0.5) * (1 + erf), or x * ((1 + erf) * 0.5)
        m1 = _only_reader(g, users, add.outputs[0])
        if m1 is None or m1.op != "Mul":
            continue
        chain = [scaled, erf, add, m1]
        other = _other(m1, add.outputs[0])
        if other == x:  # x * (1 + erf), then * 0.5
            m2 = _only_reader(g, users, m1.outputs[0])
            if m2 is None or m2.op != "Mul" or _scalar_operand(g, m2, 0.5) != m1.outputs[0]:
                continue
            chain.append(m2)
        elif other in producers and producers[other].op == "Mul" and \
                _scalar_operand(g, producers[other], 0.5) == x and \
                _only_reader(g, users, other) is m1:
            chain.append(producers[other])  # (x * 0.5) * (1 + erf)
        elif _scalar_operand(g, m1, 0.5) == add.outputs[0]:  # ((1 + erf) * 0.5) * x
            m2 = _only_reader(g, users, m1.outputs[0])
            if m2 is None or m2.op != "Mul" or _other(m2, m1.outputs[0]) != x:
                continue
            chain.append(m2)
        else:
            continue
        if g.tensors[x].dtype not in ("float32", "float64"):
            continue
        last = max(chain, key=g.nodes.index)
        for n in chain:
            replace[n.name] = None
        replace[last.name] = [Node("Gelu", (x,), last.outputs, {"approximate": "none"},
                                   last.name)]
    return _rewrite(g, replace) if replace else g


# ---------------------------------------------------------------------------- LayerNorm
def _last_axis_mean(g: Graph, node: Node | None) -> bool:
    if node is None or node.op != "ReduceMean" or not node.attrs["keepdims"]:
        return False
    rank = len(g.tensors[node.inputs[0]].shape)
    return tuple(node.attrs["axes"]) == (rank - 1,)


def fuse_layernorm(g: Graph) -> Graph:
    """``u = mean(x); d = x - u; y = d / sqrt(mean(d^2) + eps) * gamma + beta`` over the last
    axis (``Pow(d, 2)`` or ``d * d``; ``gamma``/``beta`` constants of the last axis' size,
    each optional) -> ``LayerNorm(x, gamma, beta, eps)``."""
    users = g.consumers()
    producers = g.producers()
    fresh = g.name_generator()
    replace: dict = {}
    new_constants: dict = {}
    for sub in g.nodes:
        if sub.op != "Sub":
            continue
        x, u = sub.inputs
        mean = producers.get(u)
        if not _last_axis_mean(g, mean) or mean.inputs[0] != x:
            continue
        d = sub.outputs[0]
        readers = list({n.name: n for n in users[d]}.values())  # d * d reads d twice
        if d in g.outputs.values() or len(readers) != 2:
            continue
        sq = next((n for n in readers if (n.op == "Pow" and n.inputs[0] == d and
                                          _scalar(g, n.inputs[1]) == 2.0) or
                   (n.op == "Mul" and n.inputs == (d, d))), None)
        div = next((n for n in readers if n.op == "Div" and n.inputs[0] == d), None)
        if sq is None or div is None:
            continue
        var = _only_reader(g, users, sq.outputs[0])
        if not _last_axis_mean(g, var):
            continue
        add = _only_reader(g, users, var.outputs[0])
        eps = None if add is None or add.op != "Add" else \
            _scalar(g, _other(add, var.outputs[0]))
        sqrt = _only_reader(g, users, add.outputs[0]) if eps is not None else None
        if sqrt is None or sqrt.op != "Sqrt" or div.inputs[1] != sqrt.outputs[0] or \
                _only_reader(g, users, sqrt.outputs[0]) is not div or \
                _only_reader(g, users, u) is not sub:
            continue
        n = g.tensors[x].shape[-1]
        dtype = g.tensors[x].dtype
        chain = [mean, sub, sq, var, add, sqrt, div]
        y = div.outputs[0]
        gamma = beta = None
        nxt = _only_reader(g, users, y)
        if nxt is not None and nxt.op == "Mul":
            c = _other(nxt, y)
            if c in g.constants and g.constants[c].size == n and g.tensors[c].shape[-1] == n:
                gamma, y = c, nxt.outputs[0]
                chain.append(nxt)
                nxt = _only_reader(g, users, y)
        if nxt is not None and nxt.op == "Add":
            c = _other(nxt, y)
            if c in g.constants and g.constants[c].size == n and g.tensors[c].shape[-1] == n:
                beta, y = c, nxt.outputs[0]
                chain.append(nxt)
        if dtype not in ("float32", "float64"):
            continue
        names = []
        for value, base, default in ((gamma, "gamma", 1.0), (beta, "beta", 0.0)):
            name = fresh(f"{sub.name}.{base}")
            new_constants[name] = np.full(n, default, dtype) if value is None else \
                g.constants[value].reshape(n).astype(dtype)
            names.append(name)
        last = chain[-1]
        for node in chain:
            replace[node.name] = None
        replace[last.name] = [Node("LayerNorm", (x, *names), (y,), {"eps": eps}, last.name)]
    return _rewrite(g, replace, new_constants) if replace else g


# ---------------------------------------------------------------------------- attention
def masked_attention_array(q, k, v, mask, scale, zero_nan_rows):
    """The meaning of ``MaskedAttention`` in numpy (float64 inside for float32 inputs is
    *not* used: it computes at the inputs' dtype, as the unfused ops do)."""
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * q.dtype.type(scale) + mask.astype(q.dtype)
    p = softmax_array(s, -1)
    if zero_nan_rows:
        p = np.where(np.isnan(p), q.dtype.type(0), p)
    return np.matmul(p, v).astype(q.dtype)


def _masked_attrs(inputs, attrs, node):
    from .ops import OPS

    base = OPS["Attention"].normalize(inputs[:3], {k: v for k, v in attrs.items()
                                                  if k != "zero_nan_rows"}, node)
    base["zero_nan_rows"] = bool(attrs.get("zero_nan_rows", False))
    return base


def _masked_infer(inputs, attrs, node):
    from .ops import OPS

    (out,) = OPS["Attention"].infer(inputs[:3], attrs, node)
    q, k, _v, mask = inputs
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    if k.shape[1] != h:
        raise op_error(node, "MaskedAttention", "q and k must have the same heads")
    if mask.dtype != q.dtype or len(mask.shape) != 4:
        raise op_error(node, "MaskedAttention", f"mask must be a 4-D {q.dtype} tensor")
    try:
        np.broadcast_shapes(mask.shape, (b, h, lq, lk))
    except ValueError:
        raise op_error(node, "MaskedAttention", f"mask {mask.shape} does not broadcast to "
                       f"{(b, h, lq, lk)}") from None
    if mask.shape[0] not in (1, b) or mask.shape[-1] != lk:
        raise op_error(node, "MaskedAttention", f"mask {mask.shape} must have {lk} keys")
    return [out]


def _masked_eval(arrays, attrs):
    q, k, v, mask = arrays
    return [masked_attention_array(q, k, v, mask, attrs["scale"], attrs["zero_nan_rows"])]


def masked_attention_step(node, g, options):
    """The compiled step of ``MaskedAttention`` (the op's kernel, :mod:`.steps` style):
    :func:`masked_attention`, its skip statistics into ``env[STATS_KEY]``."""
    from .steps import STATS_KEY

    ins, out, attrs = node.inputs, node.outputs[0], node.attrs

    def step(env):
        q, k, v, mask = (np.ascontiguousarray(env[i]) for i in ins)
        o, stats = masked_attention(q, k, v, mask, scale=attrs["scale"],
                                    thresh=attrs["thresh"], zero_nan_rows=attrs["zero_nan_rows"],
                                    block_q=attrs["block_q"], block_k=attrs["block_k"],
                                    backend=options.attention_backend)
        np.copyto(env[out], o)
        if stats is not None:
            env[STATS_KEY][node.name] = stats
    return step


register(OpDef("MaskedAttention", (4, 4), _masked_infer, _masked_eval, _masked_attrs,
               doc="softmax(q k^T scale + mask) v: attention with a run-time additive mask "
                   "(BLASST over each sequence's unmasked keys when it pads keys)",
               kernel=masked_attention_step))


def key_padding(mask: np.ndarray):
    """``(B, Lk)`` booleans (True: keep) if ``mask`` ``(B|1, H|1, Lq, Lk)`` is a key-padding
    mask -- the same row for every head and query, entries 0 or <= :data:`MASKED` --
    else None."""
    row = mask[:, :1, :1, :]
    if not np.all(mask == row):
        return None
    row = row[:, 0, 0, :]
    keep = row == 0
    if not np.all(keep | (row <= MASKED)):
        return None
    return keep


def masked_attention(q, k, v, mask, *, scale, thresh=0.0, zero_nan_rows=False,
                     block_q=None, block_k=None, backend="cpu"):
    """Run ``MaskedAttention``: ``(out, stats)``; ``stats`` is an
    :class:`~blasst_ref.AttentionStats` of the BLASST calls (summed over the sequences),
    or None where the mask is not a key-padding mask (the numpy meaning ran)."""
    from ..api import AttentionStats, attention

    keep = key_padding(mask)
    b = q.shape[0]
    if keep is not None and keep.shape[0] == 1 and b > 1:
        keep = np.broadcast_to(keep, (b, keep.shape[1]))
    if keep is None or not np.all(keep.any(axis=1)):
        # not key padding, or a sequence with no key at all: the exact meaning
        return masked_attention_array(q, k, v, mask, scale, zero_nan_rows), None
    kw = dict(scale=scale, block_q=block_q, block_k=block_k, backend=backend,
              return_stats=True)
    if keep.all():
        return attention(q, k, v, thresh, **kw)
    out = np.empty(q.shape[:3] + (v.shape[-1],), q.dtype)
    skipped = visited = 0
    per_head = np.zeros((b, q.shape[1]))
    stats = None
    for i in range(b):
        idx = np.flatnonzero(keep[i])
        ki = np.ascontiguousarray(k[i:i + 1, :, idx])
        vi = np.ascontiguousarray(v[i:i + 1, :, idx])
        o, stats = attention(np.ascontiguousarray(q[i:i + 1]), ki, vi, thresh, **kw)
        out[i] = o[0]
        skipped += stats.skipped_tiles
        visited += stats.visited_tiles
        per_head[i] = stats.per_head[0]
    combined = AttentionStats(sparsity=skipped / visited if visited else 0.0,
                              skipped_tiles=skipped, visited_tiles=visited, per_head=per_head,
                              block_q=stats.block_q, block_k=stats.block_k,
                              backend=stats.backend, phase=stats.phase,
                              tile_map=np.zeros((0, 0, 0, 0), np.int8))
    return out, combined


def _scores(g: Graph, producers, t: str) -> bool:
    """Whether ``t`` is a MatMul's output, or a scalar scaling (Mul/Div) of one."""
    node = producers.get(t)
    if node is not None and node.op in ("Mul", "Div"):
        consts = [i for i in node.inputs if _scalar(g, i) is not None]
        if not consts:
            return False
        node = producers.get(_other(node, consts[0]))
    return node is not None and node.op == "MatMul"


def fuse_export_attention(g: Graph, thresh: float = 0.0, block_q: int | None = None,
                          block_k: int | None = None) -> Graph:
    """Attention as exports write it -> ``MaskedAttention`` (or ``Attention`` when there is
    no run-time mask):

    ``S = MatMul(Q [* c1], Kt [* c2]) [* c | / c]``, ``[S + mask]`` (a tensor computed at
    run time, e.g. from the attention-mask input), ``P = Softmax(S)``,
    ``[P = Where(IsNaN(P), 0, P)]``, ``O = MatMul(P, V)``; 4-D ``Q (B, H, Lq, D)``,
    ``Kt (B, H, D, Lk)``, ``V (B, H, Lk, Dv)``; the scale is ``c1 * c2 * c`` (or ``/ c``).
    Intermediates must have no other reader. Masks that are constants are left to
    :func:`.passes.fuse_attention`, which knows causal ones."""
    users = g.consumers()
    producers = g.producers()
    fresh = g.name_generator()
    replace: dict = {}
    for sm in g.nodes:
        if sm.op != "Softmax" or sm.attrs["axis"] != len(g.tensors[sm.inputs[0]].shape) - 1:
            continue
        p = sm.outputs[0]
        chain = [sm]
        zero_nan = False
        if len(users[p]) == 2 and p not in g.outputs.values():  # Where(IsNaN(p), 0, p)
            isnan = next((n for n in users[p] if n.op == "IsNaN"), None)
            where = next((n for n in users[p] if n.op == "Where"), None)
            if isnan is None or where is None or \
                    where.inputs != (isnan.outputs[0], where.inputs[1], p) or \
                    _scalar(g, where.inputs[1]) != 0.0 or \
                    _only_reader(g, users, isnan.outputs[0]) is not where:
                continue
            chain += [isnan, where]
            p = where.outputs[0]
            zero_nan = True
        pv = _only_reader(g, users, p)
        if pv is None or pv.op != "MatMul" or pv.inputs[0] != p:
            continue
        chain.append(pv)
        t = sm.inputs[0]
        node = producers.get(t)
        mask = None
        if node is not None and node.op == "Add" and _only_reader(g, users, t) is sm:
            # the scores are the operand made by a MatMul, or by a scaling of one
            a, b_ = node.inputs
            t, mask = (a, b_) if _scores(g, producers, a) else (b_, a)
            if mask in g.constants or not _scores(g, producers, t):
                continue  # constant masks: passes.fuse_attention
            chain.append(node)
            node = producers.get(t)
        scale = 1.0
        if node is not None and node.op in ("Mul", "Div") and \
                _only_reader(g, users, t) is chain[-1]:
            consts = [i for i in node.inputs if _scalar(g, i) is not None]
            if consts and not (node.op == "Div" and node.inputs[1] != consts[0]):
                s = _scalar(g, consts[0])
                scale = s if node.op == "Mul" else 1.0 / s
                chain.append(node)
                t = _other(node, consts[0])
                node = producers.get(t)
        if node is None or node.op != "MatMul" or _only_reader(g, users, t) is not chain[-1]:
            continue
        qk = node
        chain.append(qk)
        q, kt = qk.inputs
        for idx, operand in enumerate((q, kt)):  # SDPA: Q * sqrt(scale), Kt * sqrt(scale)
            pre = producers.get(operand)
            if pre is not None and pre.op == "Mul" and _only_reader(g, users, operand) is qk:
                consts = [i for i in pre.inputs if _scalar(g, i) is not None]
                if consts:
                    scale *= _scalar(g, consts[0])
                    chain.append(pre)
                    if idx == 0:
                        q = _other(pre, consts[0])
                    else:
                        kt = _other(pre, consts[0])
        v = pv.inputs[1]
        qs, ks, vs = g.tensors[q].shape, g.tensors[kt].shape, g.tensors[v].shape
        if not (len(qs) == len(ks) == len(vs) == 4) or not math.isfinite(scale) or scale <= 0:
            continue
        (b, h, lq, d), (bk, hk, dk, lk), (bv, hv, lv, dv) = qs, ks, vs
        if not (b == bk == bv and h == hk == hv and d == dk and lk == lv):
            continue
        if mask is not None:
            ms = g.tensors[mask].shape
            if len(ms) != 4 or ms[0] not in (1, b) or ms[1] not in (1, h) or \
                    ms[2] not in (1, lq) or ms[3] != lk or \
                    g.tensors[mask].dtype != g.tensors[q].dtype:
                continue
        name = fresh("attention")
        k_name = f"{name}.k"
        attrs = {"scale": scale, "causal": False, "thresh": thresh, "block_q": block_q,
                 "block_k": block_k}
        nodes = [Node("Transpose", (kt,), (k_name,), {"perm": (0, 1, 3, 2)}, k_name)]
        if mask is None and zero_nan:
            continue  # a NaN guard with no mask: NaN inputs would be zeroed; leave it
        if mask is None:
            nodes.append(Node("Attention", (q, k_name, v), pv.outputs, attrs, name))
        else:
            nodes.append(Node("MaskedAttention", (q, k_name, v, mask), pv.outputs,
                              {**attrs, "zero_nan_rows": zero_nan}, name))
        for n in chain:
            replace[n.name] = None
        replace[pv.name] = nodes
    return _rewrite(g, replace) if replace else g
