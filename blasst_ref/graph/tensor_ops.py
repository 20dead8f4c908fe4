"""The IR ops that imported models need beyond the core set of :mod:`.ops`.

A framework export of a transformer (:func:`blasst_ref.graph.from_onnx`) computes more than
matmuls and element-wise float math at run time: the embedding lookup is a ``Gather`` on
integer token ids, the padding mask is built from an ``int64`` attention mask with
``Cast``, comparisons, ``And``, ``Expand`` and ``Where``; LayerNorm and GELU may come
decomposed (``ReduceMean``, ``Pow``, ``Sqrt``, ``Erf``). Each is registered here as an
:class:`~.ops.OpDef` with its shape rule and numpy meaning -- exactly ONNX's semantics for
the inputs the importer gives them (static shapes, constant indices/axes folded into
attributes) -- so that the interpreter runs an imported graph op by op and the compiler runs
what no pass fuses through the op's numpy meaning.

===============  ====================================================================
op               meaning (numpy)
===============  ====================================================================
Gather(axis)     ``np.take(data, indices, axis)``; negative indices count from the end
Cast(dtype)      ``x.astype(dtype)`` (float -> int truncates toward zero, as ONNX)
Where            ``np.where(cond, x, y)`` with broadcasting
Expand(shape)    ``x * ones(shape)``: broadcast to the given static shape
Slice(...)       ``x[starts:ends:steps]`` along ``axes`` (bounds already clamped)
Concat(axis)     ``np.concatenate(inputs, axis)``
ReduceMean       ``x.mean(axes, keepdims)`` at ``x``'s dtype
Pow              ``a ** b`` (floats)
Sqrt, Erf, Neg   element-wise floats
Equal, Less,     comparisons with broadcasting -> bool
Greater, ...
And, Or, Not     logic on bool tensors
IsNaN            ``np.isnan(x)`` -> bool
===============  ====================================================================
"""

from __future__ import annotations

import numpy as np

from . import onnx_forms
from .ops import OpDef, register
from .ops import broadcast_shape as _broadcast
from .ops import describe_tensor as _desc
from .ops import op_error as _err
from .ops import require_float as _require_float
from .ops import same_dtype as _same_dtype

__all__ = ["COMPARISONS", "LOGIC", "OP_NAMES", "slice_index"]

def _axis(op, node, rank, axis):
    axis = int(axis)
    if not -rank <= axis < rank:
        raise _err(node, op, f"axis {axis} out of range for rank {rank}")
    return axis % rank


# ---------------------------------------------------------------------------- ONNX forms
# Each op here is the ONNX op of the same name; these write its attributes back (the
# forms of :mod:`.onnx_forms`), so that an imported graph exports again with to_onnx.
def _io(b, node):
    return [b.tensor(i) for i in node.inputs], [b.tensor(o) for o in node.outputs]


def _onnx_gather(b, node, opset):
    ins, outs = _io(b, node)
    b.node("Gather", ins, outs, node.name, axis=int(node.attrs["axis"]))


def _onnx_cast(b, node, opset):
    ins, outs = _io(b, node)
    to = b.helper.np_dtype_to_tensor_dtype(np.dtype(node.attrs["dtype"]))
    b.node("Cast", ins, outs, node.name, to=int(to))


def _onnx_expand(b, node, opset):
    ins, outs = _io(b, node)
    shape = b.const(f"{node.name}.shape", np.asarray(node.attrs["shape"], np.int64))
    b.node("Expand", [ins[0], shape], outs, node.name)


def _onnx_slice(b, node, opset):
    ins, outs = _io(b, node)
    bounds = [b.const(f"{node.name}.{k}", np.asarray(node.attrs[k], np.int64))
              for k in ("starts", "ends", "axes", "steps")]
    b.node("Slice", [ins[0], *bounds], outs, node.name)


def _onnx_concat(b, node, opset):
    ins, outs = _io(b, node)
    b.node("Concat", ins, outs, node.name, axis=int(node.attrs["axis"]))


def _onnx_reduce_mean(b, node, opset):
    ins, outs = _io(b, node)
    axes, keep = [int(a) for a in node.attrs["axes"]], int(node.attrs["keepdims"])
    if opset >= 18:  # axes became an input
        b.node("ReduceMean", [ins[0], b.const(f"{node.name}.axes", np.asarray(axes, np.int64))],
               outs, node.name, keepdims=keep)
    else:
        b.node("ReduceMean", ins, outs, node.name, axes=axes, keepdims=keep)


# ---------------------------------------------------------------------------- Gather
def _gather_attrs(inputs, attrs, node):
    return {"axis": _axis("Gather", node, len(inputs[0].shape), attrs.get("axis", 0))}


def _gather_infer(inputs, attrs, node):
    data, idx = inputs
    if idx.dtype not in ("int64", "int32"):
        raise _err(node, "Gather", f"indices {_desc(idx)} must be int64 or int32")
    a = attrs["axis"]
    return [(data.shape[:a] + idx.shape + data.shape[a + 1:], data.dtype)]


def _gather_eval(arrays, attrs):
    data, idx = arrays
    # np.take wraps negative indices like ONNX; out-of-range ones raise IndexError
    return [np.take(data, idx.astype(np.int64), axis=attrs["axis"])]


register(OpDef("Gather", (2, 2), _gather_infer, _gather_eval, _gather_attrs,
               doc="np.take(data, indices, axis): embedding lookups, picking a token",
               onnx=_onnx_gather))


# ---------------------------------------------------------------------------- Cast
def _cast_attrs(inputs, attrs, node):
    from .ir import DTYPES

    dtype = str(attrs.get("dtype"))
    if dtype not in DTYPES:
        raise _err(node, "Cast", f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return {"dtype": dtype}


register(OpDef("Cast", (1, 1), lambda i, a, n: [(i[0].shape, a["dtype"])],
               lambda arrs, a: [arrs[0].astype(a["dtype"])], _cast_attrs,
               doc="x.astype(dtype)", inplace=lambda a, n: (), onnx=_onnx_cast))


# ---------------------------------------------------------------------------- Where
def _where_infer(inputs, attrs, node):
    cond, x, y = inputs
    if cond.dtype != "bool":
        raise _err(node, "Where", f"condition {_desc(cond)} must be bool")
    _same_dtype("Where", node, [x, y])
    return [(_broadcast("Where", node, cond, x, y), x.dtype)]


register(OpDef("Where", (3, 3), _where_infer,
               lambda arrs, a: [np.where(arrs[0], arrs[1], arrs[2])],
               doc="np.where(cond, x, y) with broadcasting", onnx=onnx_forms.same_op))


# ---------------------------------------------------------------------------- Expand
def _expand_attrs(inputs, attrs, node):
    shape = tuple(int(s) for s in attrs["shape"])
    try:
        out = tuple(int(s) for s in np.broadcast_shapes(inputs[0].shape, shape))
    except ValueError:
        raise _err(node, "Expand", f"{_desc(inputs[0])} does not broadcast to {shape}") \
            from None
    return {"shape": out}


register(OpDef("Expand", (1, 1), lambda i, a, n: [(a["shape"], i[0].dtype)],
               lambda arrs, a: [np.broadcast_to(arrs[0], a["shape"]).copy()], _expand_attrs,
               doc="broadcast x to a static shape (ONNX Expand)", onnx=_onnx_expand))


# ---------------------------------------------------------------------------- Slice
def _slice_attrs(inputs, attrs, node):
    shape = inputs[0].shape
    axes = tuple(_axis("Slice", node, len(shape), a) for a in attrs["axes"])
    starts, ends, steps = (tuple(int(v) for v in attrs[k]) for k in ("starts", "ends", "steps"))
    if not len(axes) == len(starts) == len(ends) == len(steps) or len(set(axes)) != len(axes):
        raise _err(node, "Slice", "axes, starts, ends and steps must have one entry per "
                   "distinct axis")
    if any(s == 0 for s in steps):
        raise _err(node, "Slice", "steps must be non-zero")
    return {"axes": axes, "starts": starts, "ends": ends, "steps": steps}


def slice_index(rank, attrs):
    """The numpy index of a ``Slice`` node's attributes on a tensor of ``rank``."""
    index = [slice(None)] * rank
    for a, s, e, st in zip(attrs["axes"], attrs["starts"], attrs["ends"], attrs["steps"]):
        # ONNX clamps out-of-range bounds exactly as Python's slicing does
        index[a] = slice(s, e, st)
    return tuple(index)


def _slice_infer(inputs, attrs, node):
    rank = len(inputs[0].shape)
    probe = np.empty(inputs[0].shape, dtype=np.uint8)[slice_index(rank, attrs)]
    if probe.size == 0:
        raise _err(node, "Slice", f"slicing {_desc(inputs[0])} with {attrs} leaves nothing")
    return [(probe.shape, inputs[0].dtype)]


register(OpDef("Slice", (1, 1), _slice_infer,
               lambda arrs, a: [np.ascontiguousarray(arrs[0][slice_index(arrs[0].ndim,
                                                                            a)])],
               _slice_attrs, doc="x[starts:ends:steps] along axes", onnx=_onnx_slice))


# ---------------------------------------------------------------------------- Concat
def _concat_attrs(inputs, attrs, node):
    return {"axis": _axis("Concat", node, len(inputs[0].shape), attrs.get("axis", 0))}


def _concat_infer(inputs, attrs, node):
    _same_dtype("Concat", node, inputs)
    a = attrs["axis"]
    first = inputs[0].shape
    for t in inputs[1:]:
        if len(t.shape) != len(first) or t.shape[:a] + t.shape[a + 1:] != \
                first[:a] + first[a + 1:]:
            raise _err(node, "Concat", "shapes differ outside the concat axis: "
                       + ", ".join(_desc(t) for t in inputs))
    return [(first[:a] + (sum(t.shape[a] for t in inputs),) + first[a + 1:],
             inputs[0].dtype)]


register(OpDef("Concat", (1, 1 << 16), _concat_infer,
               lambda arrs, a: [np.concatenate(arrs, axis=a["axis"])], _concat_attrs,
               doc="np.concatenate(inputs, axis)", onnx=_onnx_concat))


# ---------------------------------------------------------------------------- ReduceMean
def _reduce_attrs(inputs, attrs, node):
    rank = len(inputs[0].shape)
    axes = attrs.get("axes")
    axes = tuple(range(rank)) if axes is None else \
        tuple(sorted({_axis("ReduceMean", node, rank, a) for a in axes}))
    return {"axes": axes, "keepdims": bool(attrs.get("keepdims", True))}


def _reduce_infer(inputs, attrs, node):
    _require_float("ReduceMean", node, inputs)
    shape = inputs[0].shape
    out = tuple(1 if i in attrs["axes"] else s for i, s in enumerate(shape)) \
        if attrs["keepdims"] else tuple(s for i, s in enumerate(shape) if i not in attrs["axes"])
    return [(out, inputs[0].dtype)]


register(OpDef("ReduceMean", (1, 1), _reduce_infer,
               lambda arrs, a: [np.mean(arrs[0], axis=a["axes"], keepdims=a["keepdims"],
                                        dtype=arrs[0].dtype)],
               _reduce_attrs, doc="mean over axes (keepdims as given)",
               onnx=_onnx_reduce_mean))


# ---------------------------------------------------------------------------- element-wise
def _float_unary(name, fn, doc):
    def infer(inputs, attrs, node):
        _require_float(name, node, inputs)
        return [(inputs[0].shape, inputs[0].dtype)]

    register(OpDef(name, (1, 1), infer, lambda arrs, a: [fn(arrs[0])], elementwise=True,
                   doc=doc, onnx=onnx_forms.same_op))


def _erf(x):
    from scipy.special import erf

    return erf(x).astype(x.dtype, copy=False)


_float_unary("Sqrt", np.sqrt, "sqrt(x)")
_float_unary("Erf", _erf, "erf(x)")
_float_unary("Neg", np.negative, "-x")


def _pow_infer(inputs, attrs, node):
    _require_float("Pow", node, inputs)
    return [(_broadcast("Pow", node, *inputs), inputs[0].dtype)]


register(OpDef("Pow", (2, 2), _pow_infer,
               lambda arrs, a: [np.power(arrs[0], arrs[1].astype(arrs[0].dtype))],
               elementwise=True, doc="a ** b (numpy broadcasting)", onnx=onnx_forms.same_op))

#: comparison ops -> numpy function (bool output)
COMPARISONS = {"Equal": np.equal, "Less": np.less, "LessOrEqual": np.less_equal,
               "Greater": np.greater, "GreaterOrEqual": np.greater_equal}
#: logic ops on bool tensors
LOGIC = {"And": np.logical_and, "Or": np.logical_or, "Xor": np.logical_xor}


def _compare(name, fn):
    def infer(inputs, attrs, node):
        _same_dtype(name, node, inputs)
        return [(_broadcast(name, node, *inputs), "bool")]

    register(OpDef(name, (2, 2), infer, lambda arrs, a: [fn(arrs[0], arrs[1])],
                   doc=f"a {name} b -> bool", onnx=onnx_forms.same_op))


def _logic(name, fn):
    def infer(inputs, attrs, node):
        for t in inputs:
            if t.dtype != "bool":
                raise _err(node, name, f"operand {_desc(t)} must be bool")
        return [(_broadcast(name, node, *inputs), "bool")]

    register(OpDef(name, (2, 2), infer, lambda arrs, a: [fn(arrs[0], arrs[1])],
                   elementwise=True, doc=f"logical {name.lower()} of bool tensors",
                   onnx=onnx_forms.same_op))


for _name, _fn in COMPARISONS.items():
    _compare(_name, _fn)
for _name, _fn in LOGIC.items():
    _logic(_name, _fn)


def _not_infer(inputs, attrs, node):
    if inputs[0].dtype != "bool":
        raise _err(node, "Not", f"operand {_desc(inputs[0])} must be bool")
    return [(inputs[0].shape, "bool")]


register(OpDef("Not", (1, 1), _not_infer, lambda arrs, a: [np.logical_not(arrs[0])],
               elementwise=True, doc="logical not", onnx=onnx_forms.same_op))


def _isnan_infer(inputs, attrs, node):
    _require_float("IsNaN", node, inputs)
    return [(inputs[0].shape, "bool")]


register(OpDef("IsNaN", (1, 1), _isnan_infer, lambda arrs, a: [np.isnan(arrs[0])],
               doc="np.isnan(x) -> bool", onnx=onnx_forms.same_op))

#: The ops this module registers.
OP_NAMES = ("Gather", "Cast", "Where", "Expand", "Slice", "Concat", "ReduceMean", "Sqrt", "Erf",
            "Neg", "Pow", *COMPARISONS, *LOGIC, "Not", "IsNaN")
