"""The IR ops of dynamic int8 quantization: per-row (per-token) u8 scales computed at run time.

Static quantization (:func:`~blasst_ref.graph.quantize.quantize_graph`'s default) fixes one
activation scale per tensor from calibration samples. Dynamic quantization computes the
scale when the activation exists, one per row -- per token of a transformer -- so an
outlier token cannot crush the resolution of all the others. The formula is ONNX's
``DynamicQuantizeLinear`` (what ONNX Runtime's dynamic quantization runs), applied to each
row instead of the whole tensor:

    lo = min(0, min(x_row)),  hi = max(0, max(x_row)),  scale = (hi - lo) / 255
    zero_point = round(clip(-lo / scale, 0, 255)),  q = clip(round(x / scale) + zero_point, 0, 255)

(float32 arithmetic, round half to even; a row of zeros gets scale 1, zero point 0).

* ``DynamicQuantizeRows(x)`` -> ``(q uint8 (..., K), scale float32 (..., 1), zero_point
  int32 (..., 1))``;
* ``DequantizeRows(q, scale, zero_point)`` -> ``(q - zero_point) * scale`` (float32);
* ``QMatMulDynamic(x, w_s8[, bias][, residual])`` -- what the int8 lowering makes of
  ``DequantizeRows(DynamicQuantizeRows(x)) @ Dequantize(w_s8) -> post-ops``: the rows of
  ``x`` quantized, ``acc = (q - zp) @ w_s8`` exactly in integers, then
  ``act((scale * w_scale[n]) * acc + bias) + residual`` in float32. Its compiled kernel is
  :class:`~blasst_ref.graph.int8_kernels.DynamicQMatMulPlan` (u8 x s8 -> s32 on VNNI, the
  per-row scale and compensation ``zp * col_sums[n]`` in the epilogue).

The first two are the "QDQ" form that :func:`~blasst_ref.graph.quantize.quantize_graph`
writes with ``activations="dynamic"`` (a float graph the interpreter runs: the oracle of
the fused kernel).
"""

from __future__ import annotations

import numpy as np

from .ops import (FLOATS, OpDef, apply_activation, fused_matmul_attrs, matmul_shape,
                  op_error, register)

__all__ = ["dequantize_rows_array", "qmatmul_dynamic_array", "qmatmul_dynamic_step",
           "quantize_rows_array"]


def quantize_rows_array(x: np.ndarray):
    """``(q, scale, zero_point)`` of each row of ``x`` ``(..., K)`` (module docstring):
    ``q`` uint8 like ``x``, ``scale`` float32 and ``zero_point`` int32 of shape
    ``(..., 1)``."""
    x = np.asarray(x, np.float32)
    f = np.float32
    lo = np.minimum(x.min(axis=-1, keepdims=True), f(0.0))
    hi = np.maximum(x.max(axis=-1, keepdims=True), f(0.0))
    scale = ((hi - lo) / f(255.0)).astype(np.float32)
    empty = ~(scale > 0) | ~np.isfinite(scale)
    scale = np.where(empty, f(1.0), scale).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        zp = np.rint(np.clip(-lo / scale, f(0.0), f(255.0))).astype(np.float32)
        zp = np.where(empty, f(0.0), zp)
        q = np.rint(x / scale)
    q = np.clip(np.nan_to_num(q, nan=0.0) + zp, 0, 255).astype(np.uint8)
    return q, scale, zp.astype(np.int32)


def dequantize_rows_array(q, scale, zero_point) -> np.ndarray:
    """``(q - zero_point) * scale`` as float32."""
    return ((q.astype(np.int32) - zero_point).astype(np.float32) * scale).astype(np.float32)


def qmatmul_dynamic_array(x, w, bias, residual, attrs) -> np.ndarray:
    """The meaning of ``QMatMulDynamic`` in numpy: rows quantized, the integer product
    exact (int64), then ``act((scale * w_scale[n]) * acc + bias) + residual`` in float32 --
    the float operations in the order the kernel's epilogue does them."""
    lead = x.shape[:-1]
    q, s, z = quantize_rows_array(x.reshape(-1, x.shape[-1]))
    acc = (q.astype(np.int64) - z) @ w.astype(np.int64)
    y = (s * attrs["w_scale"][None, :]).astype(np.float32) * acc.astype(np.float32)
    if bias is not None:
        y = y + bias.reshape(-1).astype(np.float32)
    y = apply_activation(y.astype(np.float32), attrs["act"])
    y = y.reshape(lead + (w.shape[1],))
    if residual is not None:
        y = y + residual
    return y.astype(np.float32)


# ---------------------------------------------------------------------------------------- ops
def _quantize_rows_infer(inputs, attrs, node):
    x = inputs[0]
    if x.dtype != "float32":
        raise op_error(node, "DynamicQuantizeRows", f"operand {x.name} must be float32")
    rows = x.shape[:-1] + (1,)
    return [(x.shape, "uint8"), (rows, "float32"), (rows, "int32")]


register(OpDef("DynamicQuantizeRows", (1, 1), _quantize_rows_infer,
               lambda arrs, a: list(quantize_rows_array(arrs[0])),
               doc="per-row dynamic u8 quantization: (q, scale, zero_point)"))


def _dequantize_rows_infer(inputs, attrs, node):
    q, s, z = inputs
    rows = q.shape[:-1] + (1,)
    if q.dtype != "uint8" or s.shape != rows or z.shape != rows or s.dtype != "float32" \
            or z.dtype != "int32":
        raise op_error(node, "DequantizeRows", "needs uint8 q (..., K), float32 scale and "
                       "int32 zero point (..., 1)")
    return [(q.shape, "float32")]


register(OpDef("DequantizeRows", (3, 3), _dequantize_rows_infer,
               lambda arrs, a: [dequantize_rows_array(*arrs)],
               doc="(q - zero_point) * scale, per row"))


def _qmatmul_dynamic_attrs(inputs, attrs, node):
    out = fused_matmul_attrs(inputs, attrs, node)
    n = inputs[1].shape[-1]
    w_scale = np.asarray(attrs["w_scale"], dtype=np.float32).reshape(-1)
    if w_scale.size not in (1, n) or not np.all(np.isfinite(w_scale)) or \
            not np.all(w_scale > 0):
        raise op_error(node, "QMatMulDynamic", f"w_scale must be {n} finite values > 0")
    w_scale = np.broadcast_to(w_scale, (n,)).copy()
    w_scale.setflags(write=False)
    out["w_scale"] = w_scale
    return out


def _qmatmul_dynamic_infer(inputs, attrs, node):
    x, w = inputs[:2]
    if x.dtype != "float32":
        raise op_error(node, "QMatMulDynamic", f"activation {x.name} must be float32")
    if w.dtype != "int8" or len(w.shape) != 2:
        raise op_error(node, "QMatMulDynamic", f"weight {w.name} must be a 2-D int8 (K, N) "
                       "tensor")
    shape = matmul_shape("QMatMulDynamic", node, x, w)
    rest = inputs[2:]
    if any(t.dtype not in FLOATS for t in rest):
        raise op_error(node, "QMatMulDynamic", "bias and residual must be float")
    if attrs["has_bias"] and rest[0].shape not in ((shape[-1],), (1, shape[-1])):
        raise op_error(node, "QMatMulDynamic", f"bias must be ({shape[-1]},)")
    if attrs["has_residual"] and rest[-1].shape != shape:
        raise op_error(node, "QMatMulDynamic", f"residual must be {shape}")
    return [(shape, "float32")]


def _qmatmul_dynamic_eval(arrays, attrs):
    x, w, rest = arrays[0], arrays[1], list(arrays[2:])
    bias = rest.pop(0) if attrs["has_bias"] else None
    residual = rest.pop(0) if attrs["has_residual"] else None
    return [qmatmul_dynamic_array(x, w, bias, residual, attrs)]


def qmatmul_dynamic_step(node, g, options):
    """The compiled step of ``QMatMulDynamic``: the weight packed for the VNNI kernel and a
    :class:`~.int8_kernels.DynamicQMatMulPlan` built once, here."""
    from . import int8_kernels as Q8
    from .steps import ACT_CODES

    ins, out, attrs = node.inputs, node.outputs[0], node.attrs
    pw = Q8.pack_int8_weight(g.constants[ins[1]], attrs["w_scale"])
    nb, nr = attrs["has_bias"], attrs["has_residual"]
    plan = Q8.DynamicQMatMulPlan(pw, g.constants[ins[2]].reshape(-1) if nb else None,
                                 ACT_CODES[attrs["act"]])
    n = pw.n

    def rows(a):
        return np.ascontiguousarray(a).reshape(-1, a.shape[-1])

    def step(env):
        res = rows(env[ins[-1]]) if nr else None
        plan(rows(env[ins[0]]), res, env[out].reshape(-1, n))
    return step


register(OpDef("QMatMulDynamic", (2, 4), _qmatmul_dynamic_infer, _qmatmul_dynamic_eval,
               _qmatmul_dynamic_attrs,
               doc="float32 rows quantized to u8 at run time (per-row scale), u8 x s8 -> "
                   "s32, per-row rescale and compensation, post-ops (the int8 lowering of "
                   "DequantizeRows(DynamicQuantizeRows(x)) @ Dequantize(w) -> post-ops)",
               inplace=lambda attrs, n: (), kernel=qmatmul_dynamic_step))
