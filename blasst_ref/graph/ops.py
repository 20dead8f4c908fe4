"""The op set of the graph IR: every op described once, in one :class:`OpDef` each.

Each op is an :class:`OpDef` in the registry :data:`OPS`:

* ``infer(inputs, attrs, node)`` -> ``[(shape, dtype), ...]``: shape and dtype inference,
  run when the node is added to a graph; raises :class:`~.ir.GraphError` naming the op
  and the operands;
* ``evaluate(arrays, attrs)`` -> ``[array, ...]``: the op in plain numpy, at the tensors'
  dtype. This *is* the semantics: :func:`blasst_ref.graph.interpret` runs nothing else, and
  the compiled kernels are tested against it;
* ``elementwise`` (the output has the shape of an input and element ``i`` depends only on
  element ``i`` of each input: the memory planner may write it in place of an input that
  dies there) and ``view`` (the output is a view of input 0: a reshape costs nothing);
* ``kernel``: how the compiled graph runs it, a step builder of :mod:`.steps` (none: its
  numpy meaning, copied into its planned buffer);
* ``onnx``: its ONNX form, a function of :mod:`.onnx_forms` (none: it cannot be exported).

The fused ops that passes create (``FusedMatMul``, ``PackedMatMul``, ``Attention``) are
ops like any other, with a numpy meaning, so a graph after any pass still runs in the
interpreter -- which is how every pass is tested.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import onnx_forms, steps

__all__ = ["OPS", "OpDef", "get", "quantize_array", "dequantize_array", "gelu_array"]

Spec = tuple[tuple[int, ...], str]


def _err(node: str, op: str, msg: str):
    from .ir import GraphError

    return GraphError(f"{op} {node!r}: {msg}")


def _desc(t) -> str:
    return f"{t.name} {t.dtype}{list(t.shape)}"


@dataclass(frozen=True)
class OpDef:
    """An op: its arity, attribute normaliser, shape rule, numpy evaluation, compiled kernel
    and ONNX form."""

    name: str
    n_inputs: tuple[int, int]
    infer_fn: Callable
    evaluate: Callable
    normalize_fn: Callable | None = None
    elementwise: bool = False
    view: bool = False
    doc: str = ""
    #: ``inplace(attrs, n_inputs)`` -> indices of the inputs whose buffer the output may
    #: take when that input dies at this node (the compiled kernel is correct when its
    #: output aliases them). Default: every input of an element-wise op, none otherwise.
    inplace: Callable | None = None
    #: ``kernel(node, graph, options)`` -> ``step(env)``: how the compiled graph runs this
    #: op (:mod:`.steps`). ``None``, or a kernel that returns None for a node's attributes:
    #: :func:`.steps.evaluate_step`, the numpy meaning copied into the planned buffer.
    kernel: Callable | None = None
    #: ``onnx(builder, node, opset)``: appends the op's ONNX form (:mod:`.onnx_forms`);
    #: ``None``: no ONNX form (the fused ops that compiler passes create).
    onnx: Callable | None = None

    def inplace_inputs(self, attrs, n_inputs: int) -> tuple[int, ...]:
        """Indices of the inputs that the output may overwrite (see :attr:`inplace`)."""
        if self.inplace is not None:
            return tuple(self.inplace(attrs, n_inputs))
        return tuple(range(n_inputs)) if self.elementwise else ()

    def normalize(self, inputs, attrs: dict, node: str) -> dict:
        lo, hi = self.n_inputs
        if not lo <= len(inputs) <= hi:
            want = f"{lo}" if lo == hi else f"{lo} to {hi}"
            raise _err(node, self.name, f"takes {want} inputs, got {len(inputs)}")
        return self.normalize_fn(inputs, attrs, node) if self.normalize_fn else attrs

    def infer(self, inputs, attrs: dict, node: str) -> list[Spec]:
        return self.infer_fn(inputs, attrs, node)


OPS: dict[str, OpDef] = {}


def register(opdef: OpDef) -> OpDef:
    """Add an op to :data:`OPS` (the int8 lowering registers its fused ops this way)."""
    OPS[opdef.name] = opdef
    return opdef


def get(op: str, node: str | None = None) -> OpDef:
    """The :class:`OpDef` of ``op``; an unknown op raises a GraphError listing the known ones."""
    try:
        return OPS[op]
    except KeyError:
        from .ir import GraphError

        where = f" (node {node!r})" if node else ""
        raise GraphError(f"unknown op {op!r}{where}; known ops: {', '.join(sorted(OPS))}") \
            from None


FLOATS = ("float32", "float64", "float16")


def _require_float(op, node, inputs):
    for t in inputs:
        if t.dtype not in FLOATS:
            raise _err(node, op, f"operand {_desc(t)} must be a float tensor")


def _same_dtype(op, node, inputs):
    dtypes = {t.dtype for t in inputs}
    if len(dtypes) > 1:
        raise _err(node, op, "operands have different dtypes: "
                   + ", ".join(_desc(t) for t in inputs))


def _broadcast(op, node, *tensors) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in np.broadcast_shapes(*(t.shape for t in tensors)))
    except ValueError:
        raise _err(node, op, "shapes do not broadcast: "
                   + ", ".join(_desc(t) for t in tensors)) from None


# ---------------------------------------------------------------------------- element-wise
def _binary(name, fn, doc):
    def infer(inputs, attrs, node):
        _require_float(name, node, inputs)
        _same_dtype(name, node, inputs)
        return [(_broadcast(name, node, *inputs), inputs[0].dtype)]

    def evaluate(arrays, attrs):
        return [fn(arrays[0], arrays[1])]

    register(OpDef(name, (2, 2), infer, evaluate, elementwise=True, doc=doc,
                   kernel=steps.ufunc(fn), onnx=onnx_forms.same_op))


_binary("Add", np.add, "a + b (numpy broadcasting)")
_binary("Sub", np.subtract, "a - b (numpy broadcasting)")
_binary("Mul", np.multiply, "a * b (numpy broadcasting)")
_binary("Div", np.divide, "a / b (numpy broadcasting)")


def gelu_array(x: np.ndarray, approximate: str = "none") -> np.ndarray:
    """GELU in numpy at ``x``'s dtype: ``0.5 x (1 + erf(x / sqrt 2))``, or with
    ``approximate="tanh"``: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    from scipy.special import erf

    x = np.asarray(x)
    if approximate == "tanh":
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)
        return (0.5 * x * (1.0 + np.tanh(inner))).astype(x.dtype, copy=False)
    return (0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))).astype(x.dtype, copy=False)


def _unary(name, fn, doc, normalize=None, *, kernel, onnx=onnx_forms.same_op):
    def infer(inputs, attrs, node):
        _require_float(name, node, inputs)
        return [(inputs[0].shape, inputs[0].dtype)]

    def evaluate(arrays, attrs):
        return [fn(arrays[0], attrs)]

    register(OpDef(name, (1, 1), infer, evaluate, normalize, elementwise=True, doc=doc,
                   kernel=kernel, onnx=onnx))


def _gelu_attrs(inputs, attrs, node):
    approx = attrs.get("approximate", "none")
    if approx not in ("none", "tanh"):
        raise _err(node, "Gelu", f"approximate must be 'none' or 'tanh', got {approx!r}")
    return {"approximate": approx}


_unary("Relu", lambda x, a: np.maximum(x, x.dtype.type(0)), "max(x, 0)", kernel=steps.relu)
_unary("Gelu", lambda x, a: gelu_array(x, a["approximate"]), "GELU (erf, or tanh form)",
       _gelu_attrs, kernel=steps.gelu, onnx=onnx_forms.gelu)
_unary("Tanh", lambda x, a: np.tanh(x), "tanh(x)", kernel=steps.ufunc(np.tanh))
_unary("Exp", lambda x, a: np.exp(x), "exp(x)", kernel=steps.ufunc(np.exp))


# ---------------------------------------------------------------------------- MatMul
def _matmul_shape(op, node, a, b) -> tuple[int, ...]:
    if len(a.shape) < 2 or len(b.shape) < 2:
        raise _err(node, op, f"operands need rank >= 2: {_desc(a)}, {_desc(b)}")
    if a.shape[-1] != b.shape[-2]:
        raise _err(node, op, f"inner dimensions differ: {_desc(a)} @ {_desc(b)} "
                   f"({a.shape[-1]} != {b.shape[-2]})")
    try:
        batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        raise _err(node, op, f"batch dimensions do not broadcast: {_desc(a)} @ {_desc(b)}") \
            from None
    return tuple(int(s) for s in batch) + (a.shape[-2], b.shape[-1])


def _matmul_infer(inputs, attrs, node):
    _require_float("MatMul", node, inputs)
    _same_dtype("MatMul", node, inputs)
    return [(_matmul_shape("MatMul", node, *inputs), inputs[0].dtype)]


register(OpDef("MatMul", (2, 2), _matmul_infer, lambda a, attrs: [np.matmul(a[0], a[1])],
               doc="(..., M, K) @ (..., K, N), batch dims broadcast",
               kernel=steps.matmul, onnx=onnx_forms.same_op))


# ---------------------------------------------------------------------------- Softmax
def _axis_attrs(op):
    def normalize(inputs, attrs, node):
        rank = len(inputs[0].shape)
        axis = int(attrs.get("axis", -1))
        if not -rank <= axis < rank:
            raise _err(node, op, f"axis {axis} out of range for {_desc(inputs[0])}")
        return {"axis": axis % rank}

    return normalize


def softmax_array(x: np.ndarray, axis: int) -> np.ndarray:
    """Safe softmax in numpy: ``exp(x - max) / sum(exp(x - max))`` along ``axis``."""
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


register(OpDef("Softmax", (1, 1),
               lambda i, a, n: (_require_float("Softmax", n, i), [(i[0].shape, i[0].dtype)])[1],
               lambda arrs, a: [softmax_array(arrs[0], a["axis"])], _axis_attrs("Softmax"),
               doc="safe softmax along axis", inplace=lambda a, n: (0,),
               kernel=steps.softmax, onnx=onnx_forms.softmax))


# ---------------------------------------------------------------------------- LayerNorm
def _layernorm_attrs(inputs, attrs, node):
    eps = float(attrs.get("eps", 1e-5))
    if not (eps >= 0 and math.isfinite(eps)):
        raise _err(node, "LayerNorm", f"eps must be finite and >= 0, got {eps}")
    return {"eps": eps}


def _layernorm_infer(inputs, attrs, node):
    x, gamma, beta = inputs
    _require_float("LayerNorm", node, inputs)
    _same_dtype("LayerNorm", node, inputs)
    n = x.shape[-1]
    for t in (gamma, beta):
        if t.shape != (n,):
            raise _err(node, "LayerNorm", f"{_desc(t)} must have shape ({n},) (the last axis "
                       f"of {_desc(x)})")
    return [(x.shape, x.dtype)]


def layernorm_array(x, gamma, beta, eps):
    """LayerNorm over the last axis in numpy (biased variance, as ONNX)."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return ((x - mean) / np.sqrt(var + x.dtype.type(eps)) * gamma + beta).astype(x.dtype)


register(OpDef("LayerNorm", (3, 3), _layernorm_infer,
               lambda a, attrs: [layernorm_array(a[0], a[1], a[2], attrs["eps"])],
               _layernorm_attrs, doc="(x - mean) / sqrt(var + eps) * gamma + beta, last axis",
               inplace=lambda a, n: (0,), kernel=steps.layernorm, onnx=onnx_forms.layernorm))


# ---------------------------------------------------------------------------- layout ops
def _integers(op, node, name, values) -> tuple[int, ...]:
    """``values`` as a tuple of Python ints, or a GraphError: integers only (numpy's too),
    so that a float such as 2.5 is never truncated."""
    try:
        items = tuple(values)
    except TypeError:
        items = None
    if items is None or any(isinstance(v, (bool, np.bool_)) or
                            not isinstance(v, numbers.Integral) for v in items):
        raise _err(node, op, f"{name} must hold integers, got {values!r}")
    return tuple(int(v) for v in items)


def _transpose_attrs(inputs, attrs, node):
    rank = len(inputs[0].shape)
    perm = attrs.get("perm")
    perm = tuple(range(rank))[::-1] if perm is None else \
        _integers("Transpose", node, "perm", perm)
    if sorted(perm) != list(range(rank)):
        raise _err(node, "Transpose", f"perm {perm} is not a permutation of the {rank} axes "
                   f"of {_desc(inputs[0])}")
    return {"perm": perm}


register(OpDef("Transpose", (1, 1),
               lambda i, a, n: [(tuple(i[0].shape[p] for p in a["perm"]), i[0].dtype)],
               lambda arrs, a: [np.ascontiguousarray(np.transpose(arrs[0], a["perm"]))],
               _transpose_attrs, doc="permute axes",
               kernel=steps.transpose, onnx=onnx_forms.transpose))


def _reshape_attrs(inputs, attrs, node):
    x = inputs[0]
    shape = _integers("Reshape", node, "shape", attrs["shape"])
    size = math.prod(x.shape)  # Python ints: no wrap-around for huge shapes
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise _err(node, "Reshape", f"shape {shape} may hold positive sizes and one -1")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if size % known:
            raise _err(node, "Reshape", f"cannot reshape {_desc(x)} to {shape}")
        shape = tuple(size // known if s == -1 else s for s in shape)
    if math.prod(shape) != size:
        raise _err(node, "Reshape", f"cannot reshape {_desc(x)} ({size} elements) to {shape}")
    return {"shape": shape}


register(OpDef("Reshape", (1, 1), lambda i, a, n: [(a["shape"], i[0].dtype)],
               lambda arrs, a: [arrs[0].reshape(a["shape"])], _reshape_attrs, view=True,
               doc="reshape in C order (a view)", kernel=steps.reshape, onnx=onnx_forms.reshape))


# ---------------------------------------------------------------------------- int8
INT_RANGES = {"uint8": (0, 255), "int8": (-128, 127), "int32": (-2**31, 2**31 - 1)}


def _quant_params(op, node, x, attrs):
    axis = attrs.get("axis")
    scale = np.asarray(attrs["scale"], dtype=np.float32)
    zp = np.asarray(attrs.get("zero_point", 0))
    if scale.ndim > 1 or zp.ndim > 1:
        raise _err(node, op, "scale and zero_point must be scalars or 1-D")
    if not np.all(np.isfinite(scale)) or not np.all(scale > 0):
        raise _err(node, op, f"scale must be finite and > 0, got {attrs['scale']!r}")
    if np.any(zp != np.round(zp)):
        raise _err(node, op, f"zero_point must hold integers, got {attrs.get('zero_point')!r}")
    zp = zp.astype(np.int32)
    rank = len(x.shape)
    if scale.ndim == 1 or zp.ndim == 1:
        if axis is None:
            raise _err(node, op, "per-channel scale/zero_point (1-D) need an axis")
        if not -rank <= int(axis) < rank:
            raise _err(node, op, f"axis {axis} out of range for {_desc(x)}")
        axis = int(axis) % rank
        c = x.shape[axis]
        scale = np.broadcast_to(scale, (c,)).copy() if scale.size in (1, c) else None
        zp = np.broadcast_to(zp, (c,)).copy() if zp.size in (1, c) else None
        if scale is None or zp is None:
            raise _err(node, op, f"per-channel parameters must have {c} entries (axis {axis} "
                       f"of {_desc(x)})")
    else:
        axis = None
    scale.setflags(write=False)
    zp.setflags(write=False)
    return scale, zp, axis


def _quantize_attrs(inputs, attrs, node):
    dtype = attrs.get("dtype", "uint8")
    if dtype not in ("uint8", "int8"):
        raise _err(node, "Quantize", f"dtype must be 'uint8' or 'int8', got {dtype!r}")
    scale, zp, axis = _quant_params("Quantize", node, inputs[0], attrs)
    lo, hi = INT_RANGES[dtype]
    if np.any(zp < lo) or np.any(zp > hi):
        raise _err(node, "Quantize", f"zero_point outside the {dtype} range [{lo}, {hi}]")
    return {"scale": scale, "zero_point": zp, "dtype": dtype, "axis": axis}


def _dequantize_attrs(inputs, attrs, node):
    dtype = attrs.get("dtype", "float32")
    if dtype not in FLOATS:
        raise _err(node, "Dequantize", f"dtype must be a float dtype, got {dtype!r}")
    scale, zp, axis = _quant_params("Dequantize", node, inputs[0], attrs)
    return {"scale": scale, "zero_point": zp, "dtype": dtype, "axis": axis}


def _channel_shape(rank, axis):
    return tuple(-1 if i == axis else 1 for i in range(rank))


def quantize_array(x, scale, zero_point, dtype, axis=None) -> np.ndarray:
    """``saturate(round_half_even(x / scale) + zero_point)`` as ``dtype`` (ONNX
    QuantizeLinear); ``+-inf`` saturate.

    NaN maps to the zero point, as 0.0 does (so it dequantizes to 0.0), here and in every
    compiled int8 kernel. ONNX leaves NaN undefined for 8-bit outputs and other runtimes
    differ: ONNX Runtime gives the type's lowest value (0 / -128), PyTorch's
    ``quantize_per_tensor`` its highest (255 / 127). An exported graph therefore disagrees
    with this one only where a NaN reaches a ``Quantize``."""
    scale = np.asarray(scale, np.float32)
    zp = np.asarray(zero_point, np.int32)
    if axis is not None:
        scale = scale.reshape(_channel_shape(x.ndim, axis))
        zp = zp.reshape(_channel_shape(x.ndim, axis))
    q = np.rint(x.astype(np.float32) / scale)  # rint rounds half to even
    q = np.nan_to_num(q, nan=0.0) + zp
    lo, hi = INT_RANGES[dtype]
    return np.clip(q, lo, hi).astype(dtype)


def dequantize_array(q, scale, zero_point, dtype="float32", axis=None) -> np.ndarray:
    """``(q - zero_point) * scale`` as ``dtype`` (ONNX DequantizeLinear)."""
    scale = np.asarray(scale, np.float32)
    zp = np.asarray(zero_point, np.int32)
    if axis is not None:
        scale = scale.reshape(_channel_shape(q.ndim, axis))
        zp = zp.reshape(_channel_shape(q.ndim, axis))
    return ((q.astype(np.int64) - zp).astype(np.float32) * scale).astype(dtype)


def _quantize_infer(inputs, attrs, node):
    _require_float("Quantize", node, inputs)
    return [(inputs[0].shape, attrs["dtype"])]


def _dequantize_infer(inputs, attrs, node):
    if inputs[0].dtype not in INT_RANGES:
        raise _err(node, "Dequantize", f"operand {_desc(inputs[0])} must be uint8, int8 or "
                   "int32")
    return [(inputs[0].shape, attrs["dtype"])]


register(OpDef("Quantize", (1, 1), _quantize_infer,
               lambda a, t: [quantize_array(a[0], t["scale"], t["zero_point"], t["dtype"],
                                            t["axis"])],
               _quantize_attrs, doc="float -> u8/s8: saturate(round_half_even(x/s) + zp)",
               kernel=steps.quantize, onnx=onnx_forms.quantize))
register(OpDef("Dequantize", (1, 1), _dequantize_infer,
               lambda a, t: [dequantize_array(a[0], t["scale"], t["zero_point"], t["dtype"],
                                              t["axis"])],
               _dequantize_attrs, doc="u8/s8/s32 -> float: (q - zp) * s",
               onnx=onnx_forms.dequantize))


# ---------------------------------------------------------------------------- fused ops
#: activations a FusedMatMul applies after its bias (the codes of graph.kernels).
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "tanh", "exp")


def apply_activation(y: np.ndarray, act: str) -> np.ndarray:
    if act == "none":
        return y
    if act == "relu":
        return np.maximum(y, y.dtype.type(0))
    if act == "gelu":
        return gelu_array(y)
    if act == "gelu_tanh":
        return gelu_array(y, "tanh")
    if act == "tanh":
        return np.tanh(y)
    return np.exp(y)


def _fused_matmul_attrs(inputs, attrs, node):
    act = attrs.get("act", "none")
    if act not in ACTIVATIONS:
        raise _err(node, "FusedMatMul", f"act must be one of {ACTIVATIONS}, got {act!r}")
    has_bias = bool(attrs.get("has_bias", False))
    has_residual = bool(attrs.get("has_residual", False))
    if len(inputs) != 2 + has_bias + has_residual:
        raise _err(node, "FusedMatMul", f"{len(inputs)} inputs do not match has_bias="
                   f"{has_bias}, has_residual={has_residual}")
    return {"act": act, "has_bias": has_bias, "has_residual": has_residual}


def _fused_matmul_infer(inputs, attrs, node):
    a, b = inputs[:2]
    _require_float("FusedMatMul", node, inputs)
    _same_dtype("FusedMatMul", node, inputs)
    shape = _matmul_shape("FusedMatMul", node, a, b)
    rest = inputs[2:]
    if attrs["has_bias"]:
        bias, rest = rest[0], rest[1:]
        if bias.shape not in ((shape[-1],), (1, shape[-1])):
            raise _err(node, "FusedMatMul", f"bias {_desc(bias)} must be ({shape[-1]},)")
    if attrs["has_residual"] and rest[0].shape != shape:
        raise _err(node, "FusedMatMul", f"residual {_desc(rest[0])} must have the output "
                   f"shape {shape}")
    return [(shape, a.dtype)]


def _residual_inplace(attrs, n_inputs):
    # the kernel reads each residual element once, just before it writes the same element
    return (n_inputs - 1,) if attrs["has_residual"] else ()


def fused_matmul_array(a, b, bias, residual, act):
    """``act(a @ b + bias) + residual`` in numpy at the operands' dtype."""
    y = np.matmul(a, b)
    if bias is not None:
        y = y + bias.reshape(-1)
    y = apply_activation(y, act)
    if residual is not None:
        y = y + residual
    return y


def _fused_matmul_eval(arrays, attrs):
    a, b, rest = arrays[0], arrays[1], list(arrays[2:])
    bias = rest.pop(0) if attrs["has_bias"] else None
    residual = rest.pop(0) if attrs["has_residual"] else None
    return [fused_matmul_array(a, b, bias, residual, attrs["act"])]


register(OpDef("FusedMatMul", (2, 4), _fused_matmul_infer, _fused_matmul_eval,
               _fused_matmul_attrs,
               doc="act(a @ b + bias) + residual: MatMul with its post-op chain",
               inplace=_residual_inplace, kernel=steps.fused_matmul))


def unpack_panels(panels: np.ndarray, n: int) -> np.ndarray:
    """The ``(K, N)`` weight back from its ``(P, K, panel)`` packed panels."""
    p, k, width = panels.shape
    return np.ascontiguousarray(panels.transpose(1, 0, 2).reshape(k, p * width)[:, :n])


def _packed_attrs(inputs, attrs, node):
    out = _fused_matmul_attrs(inputs, attrs, node)
    out["n"] = int(attrs["n"])
    return out


def _packed_infer(inputs, attrs, node):
    a, panels = inputs[:2]
    if len(panels.shape) != 3 or panels.shape[1] != a.shape[-1] or \
            panels.shape[0] * panels.shape[2] < attrs["n"]:
        raise _err(node, "PackedMatMul", f"packed weight {_desc(panels)} does not fit "
                   f"{_desc(a)} with N = {attrs['n']}")
    from .ir import TensorInfo

    logical = TensorInfo(panels.name, (panels.shape[1], attrs["n"]), panels.dtype, "constant")
    return _fused_matmul_infer([a, logical, *inputs[2:]], attrs, node)


def _packed_eval(arrays, attrs):
    w = unpack_panels(arrays[1], attrs["n"])
    return _fused_matmul_eval([arrays[0], w, *arrays[2:]], attrs)


register(OpDef("PackedMatMul", (2, 4), _packed_infer, _packed_eval, _packed_attrs,
               doc="FusedMatMul on a constant weight packed at compile time into "
                   "(ceil(N/panel), K, panel) panels", inplace=_residual_inplace,
               kernel=steps.packed_matmul))


def _attention_attrs(inputs, attrs, node):
    thresh = float(attrs.get("thresh", 0.0))
    if not 0.0 <= thresh < 1.0:
        raise _err(node, "Attention", f"thresh must be in [0, 1), got {thresh}")
    blocks = {}
    for key in ("block_q", "block_k"):
        value = attrs.get(key)
        if value is not None and (int(value) != value or value < 1):
            raise _err(node, "Attention", f"{key} must be a positive int, got {value!r}")
        blocks[key] = None if value is None else int(value)
    return {"scale": float(attrs["scale"]), "causal": bool(attrs.get("causal", False)),
            "thresh": thresh, **blocks}


def _attention_infer(inputs, attrs, node):
    q, k, v = inputs
    _require_float("Attention", node, inputs)
    _same_dtype("Attention", node, inputs)
    if not (len(q.shape) == len(k.shape) == len(v.shape) == 4):
        raise _err(node, "Attention", "q, k, v must be (B, H, L, D): "
                   + ", ".join(_desc(t) for t in inputs))
    (b, hq, lq, d), (bk, hkv, lk, dk), (bv, hv, lv, dv) = q.shape, k.shape, v.shape
    if not (b == bk == bv and d == dk and hkv == hv and lk == lv and hq % hkv == 0):
        raise _err(node, "Attention", "q, k, v do not fit "
                   + ", ".join(_desc(t) for t in inputs))
    return [((b, hq, lq, dv), q.dtype)]


def _attention_eval(arrays, attrs):
    from ..api import attention

    q, k, v = arrays
    return [attention(q, k, v, attrs["thresh"], causal=attrs["causal"], scale=attrs["scale"],
                      block_q=attrs["block_q"], block_k=attrs["block_k"],
                      backend="reference")]


register(OpDef("Attention", (3, 3), _attention_infer, _attention_eval, _attention_attrs,
               doc="blasst_ref.attention(q, k, v, thresh, causal, scale): "
                   "MatMul -> scale -> (mask) -> Softmax -> MatMul in one BLASST call",
               kernel=steps.attention))


# ---------------------------------------------------------------------------- int8 (fused)
def _qmatmul_attrs(inputs, attrs, node):
    out = _fused_matmul_attrs(inputs, attrs, node)
    a_scale = float(attrs["a_scale"])
    w_scale = np.asarray(attrs["w_scale"], dtype=np.float32).reshape(-1)
    n = inputs[1].shape[-1]
    if not (math.isfinite(a_scale) and a_scale > 0):
        raise _err(node, "QMatMul", f"a_scale must be finite and > 0, got {a_scale}")
    if w_scale.size not in (1, n) or not np.all(np.isfinite(w_scale)) or \
            not np.all(w_scale > 0):
        raise _err(node, "QMatMul", f"w_scale must be {n} finite values > 0")
    w_scale = np.broadcast_to(w_scale, (n,)).copy()
    w_scale.setflags(write=False)
    a_zp = int(attrs.get("a_zero_point", 0))
    if not 0 <= a_zp <= 255:
        raise _err(node, "QMatMul", f"a_zero_point must be in [0, 255], got {a_zp}")
    out_scale = attrs.get("out_scale")
    out_zp = int(attrs.get("out_zero_point", 0))
    if out_scale is not None:
        out_scale = float(out_scale)
        if not (math.isfinite(out_scale) and out_scale > 0):
            raise _err(node, "QMatMul", f"out_scale must be finite and > 0, got {out_scale}")
        if not 0 <= out_zp <= 255:
            raise _err(node, "QMatMul", f"out_zero_point must be in [0, 255], got {out_zp}")
    out.update(a_scale=a_scale, a_zero_point=a_zp, w_scale=w_scale, out_scale=out_scale,
               out_zero_point=out_zp)
    return out


def _qmatmul_infer(inputs, attrs, node):
    a, w = inputs[:2]
    if a.dtype != "uint8":
        raise _err(node, "QMatMul", f"activation {_desc(a)} must be uint8")
    if w.dtype != "int8" or len(w.shape) != 2:
        raise _err(node, "QMatMul", f"weight {_desc(w)} must be a 2-D int8 (K, N) tensor")
    shape = _matmul_shape("QMatMul", node, a, w)
    rest = inputs[2:]
    _require_float("QMatMul", node, rest)
    if attrs["has_bias"] and rest[0].shape not in ((shape[-1],), (1, shape[-1])):
        raise _err(node, "QMatMul", f"bias {_desc(rest[0])} must be ({shape[-1]},)")
    if attrs["has_residual"] and rest[-1].shape != shape:
        raise _err(node, "QMatMul", f"residual {_desc(rest[-1])} must be {shape}")
    return [(shape, "float32" if attrs["out_scale"] is None else "uint8")]


def qmatmul_array(a, w, bias, residual, attrs) -> np.ndarray:
    """The meaning of ``QMatMul`` in numpy (docs/DESIGN.md §7.4):

    ``acc = sum_k (a - za) w`` exactly in int64 (u8 activations with zero point ``za``,
    symmetric s8 weights), computed as ``a @ w - za * colsum(w)`` -- the compensation
    term the kernel precomputes from the constant weights; then
    ``y = act(acc * (a_scale * w_scale[n]) + bias) + residual`` in float32, and, with an
    ``out_scale``, ``y`` requantized to u8 (:func:`quantize_array`).
    """
    acc = a.astype(np.int64) @ w.astype(np.int64)
    acc -= attrs["a_zero_point"] * w.astype(np.int64).sum(axis=0)
    y = acc.astype(np.float32) * (np.float32(attrs["a_scale"]) * attrs["w_scale"])
    if bias is not None:
        y = y + bias.reshape(-1).astype(np.float32)
    y = apply_activation(y.astype(np.float32), attrs["act"])
    if residual is not None:
        y = y + residual
    if attrs["out_scale"] is None:
        return y.astype(np.float32)
    return quantize_array(y, attrs["out_scale"], attrs["out_zero_point"], "uint8")


def _qmatmul_eval(arrays, attrs):
    a, w, rest = arrays[0], arrays[1], list(arrays[2:])
    bias = rest.pop(0) if attrs["has_bias"] else None
    residual = rest.pop(0) if attrs["has_residual"] else None
    return [qmatmul_array(a, w, bias, residual, attrs)]


register(OpDef("QMatMul", (2, 4), _qmatmul_infer, _qmatmul_eval, _qmatmul_attrs,
               doc="u8 x s8 -> s32 matmul with zero-point compensation, rescale, post-ops "
                   "and optional u8 requantisation (the int8 lowering of Dequantize -> "
                   "MatMul -> post-ops -> Quantize)",
               inplace=lambda attrs, n: (), kernel=steps.qmatmul))



# ---------------------------------------------------------------------------- for op modules
# Public names of the helpers that the modules registering ops of their own use
# (:mod:`.tensor_ops`, :mod:`.ops_dynamic`): errors naming the node, operand checks, shapes.
op_error = _err
describe_tensor = _desc
require_float = _require_float
same_dtype = _same_dtype
broadcast_shape = _broadcast
matmul_shape = _matmul_shape
fused_matmul_attrs = _fused_matmul_attrs
