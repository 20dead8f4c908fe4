"""Each op's ONNX form: one function per op, named by its ``OpDef`` (:attr:`~.ops.OpDef.onnx`).

A form ``export(b, node, opset)`` appends the ONNX nodes (and initializers) that compute
``node`` to ``b``, an :class:`~.onnx_export.OnnxBuilder`; :func:`~.onnx_export.to_onnx`
calls it for every node. An op without a form (the fused ops that compiler passes create)
cannot be exported: export a graph before compiling it.

Op mapping (default opset 20; 17 to 19 work too, with GELU decomposed):

===============================  ================================================
IR op                            ONNX
===============================  ================================================
MatMul, Add, Sub, Mul, Div       the same ops (numpy broadcasting in both)
Relu, Tanh, Exp                  the same ops
Gelu(approximate)                ``Gelu`` (opset 20); below 20, ``0.5 x (1 + Erf(x /
                                 sqrt 2))`` or the tanh form from basic ops. float64
                                 erf-GELU runs in float32 between two ``Cast``s (ORT's
                                 CPU provider has no float64 ``Erf``)
Softmax(axis)                    ``Softmax(axis)`` (opset >= 13: along one axis)
LayerNorm(eps)                   ``LayerNormalization(axis=-1, epsilon=eps)``
Transpose(perm)                  ``Transpose(perm)``
Reshape(shape)                   ``Reshape`` with an int64 shape initializer
Quantize(scale, zp, dtype, axis) ``QuantizeLinear`` (float32 in; a ``Cast`` first
                                 otherwise), ``y_zero_point`` of ``dtype``
Dequantize(scale, zp, axis)      ``DequantizeLinear`` (float32 out; a ``Cast`` after
                                 for float16/float64)
===============================  ================================================

Nothing here imports ``onnx``: the builder carries it (``b.onnx``).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["dequantize", "gelu", "layernorm", "quantize", "reshape", "same_op", "softmax",
           "transpose"]


def _io(b, node):
    return [b.tensor(i) for i in node.inputs], [b.tensor(o) for o in node.outputs]


def same_op(b, node, opset: int):
    """The ONNX op of the same name and inputs, no attributes (MatMul, Add, Relu, ...)."""
    ins, outs = _io(b, node)
    b.node(node.op, ins, outs, node.name)


def softmax(b, node, opset: int):
    ins, outs = _io(b, node)
    b.node("Softmax", ins, outs, node.name, axis=int(node.attrs["axis"]))


def layernorm(b, node, opset: int):
    ins, outs = _io(b, node)
    b.node("LayerNormalization", ins, outs, node.name, axis=-1,
           epsilon=float(node.attrs["eps"]))


def transpose(b, node, opset: int):
    ins, outs = _io(b, node)
    b.node("Transpose", ins, outs, node.name, perm=[int(p) for p in node.attrs["perm"]])


def reshape(b, node, opset: int):
    ins, outs = _io(b, node)
    shape = b.const(f"{node.name}.shape", np.asarray(node.attrs["shape"], np.int64))
    b.node("Reshape", [ins[0], shape], outs, node.name)


def gelu(b, node, opset: int):
    ins, outs = _io(b, node)
    name, approximate = node.name, node.attrs["approximate"]
    out_dtype = b.graph.tensors[node.outputs[0]].dtype
    if out_dtype == "float64" and approximate == "none":
        # ONNX Runtime's CPU provider has no float64 Erf: this GELU runs in float32
        x32, y32 = b.fresh(f"{name}.x32"), b.fresh(f"{name}.y32")
        b.node("Cast", ins, [x32], f"{name}.cast_in", to=b.onnx.TensorProto.FLOAT)
        if opset >= 20:
            b.node("Gelu", [x32], [y32], name, approximate="none")
        else:
            _gelu_nodes(b, x32, y32, "float32", "none", name)
        b.node("Cast", [y32], outs, f"{name}.cast_out", to=b.onnx.TensorProto.DOUBLE)
    elif opset >= 20:
        b.node("Gelu", ins, outs, name, approximate=approximate)
    else:
        _gelu_nodes(b, ins[0], outs[0], out_dtype, approximate, name)


def _gelu_nodes(b, x: str, y: str, dtype: str, approximate: str, name: str):
    """GELU from basic ops, for opsets below 20."""
    def c(base, v):
        return b.const(f"{name}.{base}", np.asarray(v, dtype=dtype))

    t = [b.fresh(f"{name}.t") for _ in range(6)]
    if approximate == "tanh":
        # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        b.node("Mul", [x, x], [t[0]], f"{name}.x2")
        b.node("Mul", [t[0], x], [t[1]], f"{name}.x3")
        b.node("Mul", [t[1], c("k", 0.044715)], [t[2]], f"{name}.kx3")
        b.node("Add", [x, t[2]], [t[3]], f"{name}.inner")
        b.node("Mul", [t[3], c("s", math.sqrt(2.0 / math.pi))], [t[4]], f"{name}.scaled")
        b.node("Tanh", [t[4]], [t[5]], f"{name}.tanh")
    else:
        # 0.5 x (1 + erf(x / sqrt 2))
        b.node("Div", [x, c("sqrt2", math.sqrt(2.0))], [t[4]], f"{name}.div")
        b.node("Erf", [t[4]], [t[5]], f"{name}.erf")
    one_plus = b.fresh(f"{name}.onep")
    half_x = b.fresh(f"{name}.halfx")
    b.node("Add", [t[5], c("one", 1.0)], [one_plus], f"{name}.add1")
    b.node("Mul", [x, c("half", 0.5)], [half_x], f"{name}.half")
    b.node("Mul", [half_x, one_plus], [y], f"{name}.out")


def _quant_param_arrays(attrs, zp_dtype):
    scale = np.asarray(attrs["scale"], np.float32)
    zp = np.asarray(attrs["zero_point"]).astype(zp_dtype)
    if attrs["axis"] is None:
        scale, zp = scale.reshape(()), zp.reshape(())
    return scale, zp


def quantize(b, node, opset: int):
    ins, outs = _io(b, node)
    name, attrs = node.name, node.attrs
    x = ins[0]
    if b.graph.tensors[node.inputs[0]].dtype != "float32":
        x = b.fresh(f"{name}.f32")
        b.node("Cast", [ins[0]], [x], f"{name}.cast", to=b.onnx.TensorProto.FLOAT)
    scale, zp = _quant_param_arrays(attrs, attrs["dtype"])
    kw = {} if attrs["axis"] is None else {"axis": int(attrs["axis"])}
    b.node("QuantizeLinear", [x, b.const(f"{name}.scale", scale),
                              b.const(f"{name}.zero_point", zp)], outs, name, **kw)


def dequantize(b, node, opset: int):
    ins, outs = _io(b, node)
    name, attrs = node.name, node.attrs
    in_dtype = b.graph.tensors[node.inputs[0]].dtype
    out_dtype = b.graph.tensors[node.outputs[0]].dtype
    scale, zp = _quant_param_arrays(attrs, in_dtype)
    kw = {} if attrs["axis"] is None else {"axis": int(attrs["axis"])}
    y = outs[0] if out_dtype == "float32" else b.fresh(f"{name}.f32")
    b.node("DequantizeLinear", [ins[0], b.const(f"{name}.scale", scale),
                                b.const(f"{name}.zero_point", zp)], [y], name, **kw)
    if y != outs[0]:
        b.node("Cast", [y], outs, f"{name}.cast", to=b.elem_type(out_dtype))
