"""Import ONNX models into the graph IR: ``from_onnx(model_or_path, input_shapes=...)``.

::

    from blasst_ref import graph as bg
    g = bg.from_onnx("bert.onnx", input_shapes={"input_ids": (1, 128),
                                                "attention_mask": (1, 128),
                                                "token_type_ids": (1, 128)})
    cg = bg.compile(g)                     # fusion, packed weights, BLASST attention
    out = cg(input_ids=ids, attention_mask=mask, token_type_ids=types)

The IR is statically shaped, so every dynamic dimension of the model's inputs (a
``dim_param`` such as ``"batch"``) needs a size from ``input_shapes``. With every input
shape known, every tensor's shape is known, and the *shape subgraphs* of a framework export
(``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``, ``Range``, ``ConstantOfShape``, the
integer arithmetic between them) are **folded at import**: any node whose inputs are all
known now (initializers, constants, shapes) is evaluated once in numpy and becomes a
constant. What is left is the computation on the run-time inputs, written with the ops of
:mod:`.ops` and :mod:`.tensor_ops`, so that :func:`~blasst_ref.graph.interpret` runs it op
by op and :func:`~blasst_ref.graph.compile` fuses it.

Supported ONNX ops (default domain, opsets 11 and up)
-----------------------------------------------------

The op subset that BERT/MiniLM-family exports use (``torch.onnx.export`` of Hugging Face
``BertModel``, eager or SDPA attention, opsets 14-20). "import time only" ops must have
inputs known at import (they are folded); the others become IR ops when an input is a
run-time tensor.

=======================================  ==================================================
ONNX op                                  becomes (IR op)
=======================================  ==================================================
MatMul (ranks >= 2)                      MatMul
Gemm                                     MatMul (+ Transpose of ``A``) + Add; ``alpha``,
                                         ``beta`` and ``transB`` folded into the constants
Add, Sub, Mul, Div (floats at run time)  Add, Sub, Mul, Div
Pow, Sqrt, Erf, Neg, Tanh, Relu, Exp     Pow, Sqrt, Erf, Neg, Tanh, Relu, Exp
Gelu (opset 20)                          Gelu
Softmax (opset >= 13; below, last axis)  Softmax
LayerNormalization (last axis; constant  LayerNorm
scale and bias)
ReduceMean                               ReduceMean
Transpose                                Transpose
Reshape, Flatten, Squeeze, Unsqueeze     Reshape (a view; the target shape must be known
                                         at import)
Gather                                   Gather (constant or run-time indices)
Slice (constant starts/ends/axes/steps)  Slice
Concat                                   Concat
Cast                                     Cast
Where, Expand                            Where, Expand
Equal, Less, LessOrEqual, Greater,       the same ops (bool results)
GreaterOrEqual, And, Or, Xor, Not, IsNaN
Identity, Dropout (inference)            nothing: the input itself
Shape, Size, Constant, ConstantOfShape,  import time only: constants
Range
=======================================  ==================================================

Anything else -- another op, a custom domain, a run-time value where the importer needs a
constant (a Reshape whose target shape depends on run-time data), a dynamic input dimension
without ``input_shapes`` -- raises :class:`OnnxImportError` naming the node, its op and what
to do. ``onnx`` is an optional dependency (``pip install 'blasst_ref[onnx]'``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from . import tensor_ops as _tensor_ops  # noqa: F401  (registers Gather, Cast, Where, ...)
from .ir import DTYPES, Graph, GraphError, Node
from .ops import layernorm_array

__all__ = ["MIN_OPSET", "OnnxImportError", "SUPPORTED_OPS", "from_onnx"]

#: The oldest default-domain opset accepted (Slice takes its bounds as inputs from 10 on,
#: ReduceMean/Squeeze/Unsqueeze change form at 13 and 18: both forms are read).
MIN_OPSET = 11

_INSTALL = "pip install 'blasst_ref[onnx]'"


def _contiguous(x: np.ndarray) -> np.ndarray:
    """``x`` C-contiguous, keeping 0-d arrays 0-d (``np.ascontiguousarray`` makes them 1-d)."""
    x = np.asarray(x)
    return x if x.flags.c_contiguous else x.copy()


class OnnxImportError(GraphError):
    """An ONNX model that :func:`from_onnx` cannot import; the message names the node,
    its op and, where there is one, the remedy."""


# ---------------------------------------------------------------------------- loading
def _load(model_or_path):
    try:
        import onnx
    except ImportError as exc:
        raise ImportError(f"from_onnx needs the optional 'onnx' package: {_INSTALL} ({exc})") \
            from exc
    if isinstance(model_or_path, onnx.ModelProto):
        model = model_or_path
        where = "the given ModelProto"
    elif isinstance(model_or_path, (bytes, bytearray)):
        model, where = _parse(onnx, bytes(model_or_path), "the given bytes"), "the given bytes"
    elif isinstance(model_or_path, (str, os.PathLike)):
        path = os.fspath(model_or_path)
        where = repr(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"from_onnx: no ONNX file at {path!r}")
        with open(path, "rb") as f:
            model = _parse(onnx, f.read(), where)
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    else:
        raise TypeError("from_onnx needs an onnx.ModelProto, the bytes of one or a file path, "
                        f"got {type(model_or_path).__name__}")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxImportError(f"from_onnx: {where} is not a valid ONNX model ({first}); a "
                              "truncated or partly written file reads this way") from None
    return onnx, model


def _parse(onnx, data: bytes, where: str):
    from google.protobuf.message import DecodeError

    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except DecodeError as exc:
        raise OnnxImportError(f"from_onnx: cannot parse {where} as an ONNX model ({exc}); the "
                              "file is truncated or is not an ONNX model") from None
    if not model.HasField("graph"):
        raise OnnxImportError(f"from_onnx: {where} holds no graph; the file is truncated or is "
                              "not an ONNX model")
    return model


# ---------------------------------------------------------------------------- the importer
class _Importer:
    """Walks the ONNX nodes in order; each value is either a constant known now (a numpy
    array in :attr:`consts`) or a run-time IR tensor (its name in :attr:`values`)."""

    def __init__(self, onnx, model, input_shapes: Mapping, name: str | None):
        self.onnx = onnx
        self.model = model
        graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                          None)
        if self.opset is None or self.opset < MIN_OPSET:
            raise OnnxImportError(f"from_onnx: the model uses default-domain opset "
                                  f"{self.opset}; opset {MIN_OPSET} or newer is needed "
                                  "(re-export it with a newer opset_version)")
        self.g = Graph(name or graph.name or "onnx")
        self.consts: dict[str, np.ndarray] = {}
        self.values: dict[str, str] = {}
        self.in_graph: set[str] = set()  # constants already declared in self.g
        self.used_names = {v for n in graph.node for v in (*n.input, *n.output)} | \
            {t.name for t in graph.initializer} | {v.name for v in graph.input}
        self.node_names: set[str] = set()
        from onnx import numpy_helper

        for init in graph.initializer:
            self.consts[init.name] = numpy_helper.to_array(init)
        self._declare_inputs(graph, dict(input_shapes or {}))

    # -------------------------------------------------------------- inputs and outputs
    def _declare_inputs(self, graph, shapes: dict):
        real = [v for v in graph.input if v.name not in self.consts]
        names = [v.name for v in real]
        unknown = sorted(set(shapes) - set(names))
        if unknown:
            raise OnnxImportError(f"from_onnx: input_shapes names {', '.join(map(repr, unknown))}"
                                  f", which the model has no input of; its inputs: "
                                  f"{', '.join(names) or 'none'}")
        for v in real:
            ttype = v.type.tensor_type
            dtype = self._dtype(ttype.elem_type, f"input {v.name!r}")
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                    for d in ttype.shape.dim]
            if v.name in shapes:
                given = tuple(int(s) for s in shapes[v.name])
                if ttype.HasField("shape") and len(given) != len(dims):
                    raise OnnxImportError(f"from_onnx: input_shapes[{v.name!r}] = {given} has "
                                          f"rank {len(given)}; the model declares {dims}")
                for axis, (d, s) in enumerate(zip(dims, given)):
                    if isinstance(d, int) and d > 0 and d != s:
                        raise OnnxImportError(
                            f"from_onnx: input_shapes[{v.name!r}] = {given}, but axis {axis} "
                            f"is fixed to {d} in the model")
                shape = given
            else:
                if not ttype.HasField("shape"):
                    raise OnnxImportError(f"from_onnx: input {v.name!r} has no declared shape; "
                                          f"pass input_shapes={{{v.name!r}: (...)}}")
                dynamic = [(a, d) for a, d in enumerate(dims) if not (isinstance(d, int) and d > 0)]
                if dynamic:
                    what = ", ".join(f"axis {a} ({d!r})" for a, d in dynamic)
                    raise OnnxImportError(
                        f"from_onnx: input {v.name!r} {dims} has dynamic dimensions: {what}. "
                        f"The graph IR is statically shaped: pass input_shapes="
                        f"{{{v.name!r}: (...)}} with the sizes to compile for")
                shape = tuple(dims)
            try:
                self.g.input(v.name, shape, dtype)
            except GraphError as exc:
                raise OnnxImportError(f"from_onnx: input {v.name!r}: {exc}") from None
            self.values[v.name] = v.name
            self.in_graph.add(v.name)

    def _declare_outputs(self, graph):
        for v in graph.output:
            if v.name in self.values:
                self.g.output(v.name, self.values[v.name])
            elif v.name in self.consts:  # an output known at import time
                self.g.output(v.name, self.tensor(v.name, "graph outputs"))
            else:
                raise OnnxImportError(f"from_onnx: graph output {v.name!r} is computed by no node")

    def _dtype(self, elem_type: int, what: str) -> str:
        try:
            name = np.dtype(self.onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
        except (KeyError, TypeError, ValueError):
            name = self.onnx.TensorProto.DataType.Name(elem_type)
        if name not in DTYPES:
            raise OnnxImportError(f"from_onnx: {what} has element type {name}; supported: "
                                  f"{', '.join(DTYPES)}")
        return name

    # -------------------------------------------------------------- values
    def tensor(self, onnx_name: str, user: str) -> str:
        """The IR tensor of an ONNX value, declaring a constant in the graph on first use."""
        if onnx_name in self.values:
            return self.values[onnx_name]
        value = self.consts[onnx_name]
        if onnx_name not in self.in_graph:
            if value.dtype.name not in DTYPES:
                raise OnnxImportError(f"from_onnx: constant {onnx_name!r} of dtype {value.dtype} "
                                      f"is read at run time by {user}; supported dtypes: "
                                      f"{', '.join(DTYPES)}")
            self.g.constant(onnx_name, _contiguous(value))
            self.in_graph.add(onnx_name)
        return onnx_name

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.used_names or name in self.g.tensors:
            k += 1
            name = f"{base}.{k}"
        self.used_names.add(name)
        return name

    def node_name(self, base: str) -> str:
        name, k = base, 0
        while name in self.node_names:
            k += 1
            name = f"{base}.{k}"
        self.node_names.add(name)
        return name

    # -------------------------------------------------------------- nodes
    def run(self) -> Graph:
        graph = self.model.graph
        for i, node in enumerate(graph.node):
            label = node.name or f"{node.op_type}_{i}"
            if node.domain not in ("", "ai.onnx"):
                raise OnnxImportError(f"from_onnx: node {label!r} is op {node.op_type!r} of "
                                      f"domain {node.domain!r}; only the default ONNX domain is "
                                      "supported")
            handler = _HANDLERS.get(node.op_type)
            if handler is None:
                raise OnnxImportError(
                    f"from_onnx: node {label!r} is op {node.op_type!r}, which is not "
                    f"supported; supported ops: {', '.join(sorted(SUPPORTED_OPS))}")
            for v in node.input:
                if v and v not in self.consts and v not in self.values:
                    raise OnnxImportError(f"from_onnx: node {label!r} ({node.op_type}) reads "
                                          f"{v!r}, which no input, initializer or earlier "
                                          "node defines (nodes out of order?)")
            ctx = _Node(self, node, label)
            try:
                results = handler(ctx)
            except OnnxImportError:
                raise
            except (GraphError, ValueError, IndexError) as exc:
                raise OnnxImportError(f"from_onnx: node {label!r} ({node.op_type}): {exc}") \
                    from None
            for out, value in zip(node.output, results):
                if not out:
                    continue
                if isinstance(value, (np.ndarray, np.generic)):  # np.take may give a scalar
                    self.consts[out] = np.asarray(value)
                else:
                    self.values[out] = value
        self._declare_outputs(graph)
        return self.g.prune()


class _Node:
    """What a handler sees of one ONNX node: its inputs (constant or run time), attributes,
    and a way to emit IR nodes."""

    def __init__(self, imp: _Importer, node, label: str):
        self.imp, self.node, self.label = imp, node, label
        self.op = node.op_type
        self.opset = imp.opset
        self.inputs = list(node.input)
        self.attrs = {a.name: imp.onnx.helper.get_attribute_value(a) for a in node.attribute}
        self._emitted = 0

    def has(self, i: int) -> bool:
        return i < len(self.inputs) and self.inputs[i] != ""

    def const(self, i: int) -> np.ndarray | None:
        return self.imp.consts.get(self.inputs[i]) if self.has(i) else None

    def all_const(self) -> bool:
        return all(self.imp.consts.get(v) is not None for v in self.inputs if v)

    def need_const(self, i: int, what: str) -> np.ndarray:
        value = self.const(i)
        if value is None:
            raise OnnxImportError(
                f"from_onnx: node {self.label!r} ({self.op}): its {what} (input {i}, "
                f"{self.inputs[i]!r}) is computed at run time; the graph IR needs it known at "
                "import (give every dynamic input dimension in input_shapes)")
        return value

    def shape(self, i: int) -> tuple[int, ...]:
        c = self.const(i)
        return tuple(c.shape) if c is not None else self.imp.g.tensors[self.tensor(i)].shape

    def dtype(self, i: int) -> str:
        c = self.const(i)
        return c.dtype.name if c is not None else self.imp.g.tensors[self.tensor(i)].dtype

    def tensor(self, i: int) -> str:
        return self.imp.tensor(self.inputs[i], f"node {self.label!r} ({self.op})")

    def attr(self, name: str, default=None):
        value = self.attrs.get(name, default)
        return value.decode() if isinstance(value, bytes) else value

    def emit(self, op: str, inputs, attrs=None, last: bool = True, out: int = 0) -> str:
        """Append the IR node ``op(inputs, attrs)``; ``inputs`` are IR names or input
        indices of this ONNX node. The last node of a lowering writes the ONNX output's
        name, earlier ones fresh names."""
        names = [self.tensor(x) if isinstance(x, int) else x for x in inputs]
        out_name = self.node.output[out] if last else \
            self.imp.fresh(f"{self.node.output[out]}.{op.lower()}")
        node_name = self.imp.node_name(self.label if self._emitted == 0 else
                                       f"{self.label}.{op.lower()}")
        self._emitted += 1
        self.imp.g.append(Node(op, tuple(names), (out_name,), attrs or {}, node_name))
        return out_name

    def const_tensor(self, base: str, value: np.ndarray) -> str:
        """Declare a constant the lowering made (e.g. a transposed Gemm weight)."""
        name = self.imp.fresh(f"{self.node.output[0]}.{base}")
        self.imp.g.constant(name, _contiguous(value))
        self.imp.in_graph.add(name)
        return name


# ---------------------------------------------------------------------------- handlers
_HANDLERS: dict = {}
#: Every ONNX op :func:`from_onnx` reads (see the module docstring's table).
SUPPORTED_OPS: tuple[str, ...] = ()


def _handles(*ops):
    def deco(fn):
        for op in ops:
            _HANDLERS[op] = fn
        return fn
    return deco


def _int_div(a, b):
    """ONNX integer Div truncates toward zero (C semantics), unlike numpy's floor division."""
    q = np.abs(a) // np.abs(b)
    return (np.sign(a) * np.sign(b) * q).astype(np.result_type(a, b))


_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
           "Pow": np.power}


@_handles(*_BINARY)
def _binary(c: _Node):
    a, b = c.const(0), c.const(1)
    if a is not None and b is not None:
        if c.op == "Div" and np.issubdtype(a.dtype, np.integer):
            return [_int_div(a, b)]
        if c.op == "Pow":
            return [np.power(a, b.astype(a.dtype)).astype(a.dtype)]
        return [np.asarray(_BINARY[c.op](a, b)).astype(a.dtype)]
    for i in (0, 1):
        if c.dtype(i) not in ("float32", "float64", "float16"):
            raise OnnxImportError(
                f"from_onnx: node {c.label!r} ({c.op}) computes on {c.dtype(i)} values at "
                "run time; only float arithmetic runs at run time (integer arithmetic must "
                "fold at import: give every dynamic dimension in input_shapes)")
    return [c.emit(c.op, [0, 1])]


_UNARY = {"Sqrt": np.sqrt, "Neg": np.negative, "Tanh": np.tanh, "Exp": np.exp,
          "Relu": lambda x: np.maximum(x, x.dtype.type(0)), "IsNaN": np.isnan,
          "Not": np.logical_not}


def _erf_array(x):
    from scipy.special import erf

    return erf(x).astype(x.dtype)


@_handles("Sqrt", "Neg", "Tanh", "Exp", "Relu", "Erf", "IsNaN", "Not")
def _unary(c: _Node):
    x = c.const(0)
    if x is not None:
        return [np.asarray(_erf_array(x) if c.op == "Erf" else _UNARY[c.op](x))]
    return [c.emit(c.op, [0])]


@_handles("Gelu")
def _gelu(c: _Node):
    from .ops import gelu_array

    approx = c.attr("approximate", "none")
    if c.const(0) is not None:
        return [gelu_array(c.const(0), approx)]
    return [c.emit("Gelu", [0], {"approximate": approx})]


_COMPARE = {"Equal": np.equal, "Less": np.less, "LessOrEqual": np.less_equal,
            "Greater": np.greater, "GreaterOrEqual": np.greater_equal,
            "And": np.logical_and, "Or": np.logical_or, "Xor": np.logical_xor}


@_handles(*_COMPARE)
def _compare(c: _Node):
    if c.all_const():
        return [np.asarray(_COMPARE[c.op](c.const(0), c.const(1)))]
    return [c.emit(c.op, [0, 1])]


@_handles("Where")
def _where(c: _Node):
    if c.all_const():
        return [np.where(c.const(0), c.const(1), c.const(2))]
    return [c.emit("Where", [0, 1, 2])]


@_handles("Identity", "Dropout")
def _identity(c: _Node):
    if c.op == "Dropout" and len(c.node.output) > 1 and c.node.output[1]:
        raise OnnxImportError(f"from_onnx: node {c.label!r} (Dropout) outputs its mask; only "
                              "inference Dropout (one output) is supported")
    x = c.const(0)
    return [x if x is not None else c.tensor(0)]


@_handles("Constant")
def _constant(c: _Node):
    from onnx import numpy_helper

    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in c.attrs:
            v = c.attrs[key]
            if key == "value":
                return [numpy_helper.to_array(v)]
            dtype = np.float32 if "float" in key else np.int64
            return [np.asarray(v, dtype=dtype)]
    raise OnnxImportError(f"from_onnx: node {c.label!r} (Constant) holds a "
                          f"{', '.join(c.attrs) or 'missing'} value; only tensors and "
                          "float/int scalars and lists are supported")


@_handles("ConstantOfShape")
def _constant_of_shape(c: _Node):
    from onnx import numpy_helper

    shape = c.need_const(0, "shape").astype(np.int64)
    value = numpy_helper.to_array(c.attrs["value"]).reshape(-1) if "value" in c.attrs else \
        np.zeros(1, np.float32)
    return [np.full(tuple(int(s) for s in shape), value[0], dtype=value.dtype)]


@_handles("Shape")
def _shape(c: _Node):
    shape = np.asarray(c.shape(0), dtype=np.int64)
    start, end = c.attr("start", 0), c.attr("end", None)
    return [shape[start:end]]


@_handles("Size")
def _size(c: _Node):
    return [np.asarray(int(np.prod(c.shape(0), dtype=np.int64)), dtype=np.int64)]


@_handles("Range")
def _range(c: _Node):
    start, limit, delta = (c.need_const(i, what) for i, what in
                           enumerate(("start", "limit", "delta")))
    return [np.arange(start, limit, delta, dtype=start.dtype)]


@_handles("Cast")
def _cast(c: _Node):
    dtype = np.dtype(c.imp.onnx.helper.tensor_dtype_to_np_dtype(int(c.attr("to"))))
    x = c.const(0)
    if x is not None:
        return [x.astype(dtype)]
    name = c.imp._dtype(int(c.attr("to")), f"node {c.label!r} (Cast)'s target")
    if name == c.dtype(0):
        return [c.tensor(0)]
    return [c.emit("Cast", [0], {"dtype": name})]


def _reshape_to(c: _Node, shape: tuple[int, ...]):
    x = c.const(0)
    if x is not None:
        return [x.reshape(shape)]
    if shape == c.shape(0):
        return [c.tensor(0)]
    return [c.emit("Reshape", [0], {"shape": shape})]


@_handles("Reshape")
def _reshape(c: _Node):
    target = [int(s) for s in c.need_const(1, "target shape")]
    src = c.shape(0)
    if not c.attr("allowzero", 0):
        target = [src[i] if s == 0 else s for i, s in enumerate(target)]
    shape = np.empty(src, dtype=np.uint8).reshape(target).shape  # resolves -1, checks size
    return _reshape_to(c, tuple(int(s) for s in shape))


def _axes(c: _Node, input_index: int, since: int) -> list[int] | None:
    """The ``axes`` of Squeeze/Unsqueeze/ReduceMean: an attribute before opset ``since``,
    an (optional) input from it on."""
    if c.opset >= since:
        return None if not c.has(input_index) else \
            [int(a) for a in c.need_const(input_index, "axes").reshape(-1)]
    axes = c.attr("axes")
    return None if axes is None else [int(a) for a in axes]


@_handles("Unsqueeze")
def _unsqueeze(c: _Node):
    src = c.shape(0)
    axes = _axes(c, 1, 13)
    rank = len(src) + len(axes)
    axes = sorted(a % rank for a in axes)
    shape = list(src)
    for a in axes:
        shape.insert(a, 1)
    return _reshape_to(c, tuple(shape))


@_handles("Squeeze")
def _squeeze(c: _Node):
    src = c.shape(0)
    axes = _axes(c, 1, 13)
    axes = [i for i, s in enumerate(src) if s == 1] if axes is None else \
        [a % len(src) for a in axes]
    if any(src[a] != 1 for a in axes):
        raise OnnxImportError(f"from_onnx: node {c.label!r} (Squeeze) squeezes axes {axes} of "
                              f"shape {src}, which are not all 1")
    return _reshape_to(c, tuple(s for i, s in enumerate(src) if i not in axes))


@_handles("Flatten")
def _flatten(c: _Node):
    src = c.shape(0)
    axis = int(c.attr("axis", 1)) % (len(src) + 1) if src else 0
    lead = int(np.prod(src[:axis], dtype=np.int64))
    return _reshape_to(c, (lead, int(np.prod(src[axis:], dtype=np.int64))))


@_handles("Transpose")
def _transpose(c: _Node):
    perm = c.attr("perm")
    perm = tuple(range(len(c.shape(0))))[::-1] if perm is None else tuple(int(p) for p in perm)
    x = c.const(0)
    if x is not None:
        return [_contiguous(np.transpose(x, perm))]
    if perm == tuple(range(len(perm))):
        return [c.tensor(0)]
    return [c.emit("Transpose", [0], {"perm": perm})]


@_handles("Gather")
def _gather(c: _Node):
    axis = int(c.attr("axis", 0))
    data, idx = c.const(0), c.const(1)
    if data is not None and idx is not None:
        return [np.take(data, idx.astype(np.int64), axis=axis)]
    if idx is not None:
        n = c.shape(0)[axis % len(c.shape(0))]
        if np.any(idx < -n) or np.any(idx >= n):
            raise OnnxImportError(f"from_onnx: node {c.label!r} (Gather) has indices outside "
                                  f"[-{n}, {n})")
    return [c.emit("Gather", [0, 1], {"axis": axis})]


@_handles("Slice")
def _slice(c: _Node):
    rank = len(c.shape(0))
    starts = c.need_const(1, "starts").reshape(-1)
    ends = c.need_const(2, "ends").reshape(-1)
    axes = c.need_const(3, "axes").reshape(-1) if c.has(3) else np.arange(len(starts))
    steps = c.need_const(4, "steps").reshape(-1) if c.has(4) else np.ones(len(starts), np.int64)
    attrs = {"axes": tuple(int(a) % rank for a in axes),
             "starts": tuple(int(s) for s in starts), "ends": tuple(int(e) for e in ends),
             "steps": tuple(int(s) for s in steps)}
    x = c.const(0)
    if x is not None:
        from .tensor_ops import slice_index

        return [_contiguous(x[slice_index(x.ndim, attrs)])]
    return [c.emit("Slice", [0], attrs)]


@_handles("Concat")
def _concat(c: _Node):
    axis = int(c.attr("axis"))
    if c.all_const():
        return [np.concatenate([c.const(i) for i in range(len(c.inputs))], axis=axis)]
    return [c.emit("Concat", list(range(len(c.inputs))), {"axis": axis})]


@_handles("Expand")
def _expand(c: _Node):
    shape = tuple(int(s) for s in c.need_const(1, "shape"))
    x = c.const(0)
    out = tuple(int(s) for s in np.broadcast_shapes(c.shape(0), shape))
    if x is not None:
        return [np.broadcast_to(x, out).copy()]
    if out == c.shape(0):
        return [c.tensor(0)]
    return [c.emit("Expand", [0], {"shape": out})]


@_handles("ReduceMean")
def _reduce_mean(c: _Node):
    axes = _axes(c, 1, 18)
    keepdims = bool(c.attr("keepdims", 1))
    if axes is None and c.attr("noop_with_empty_axes", 0):
        return [c.const(0) if c.const(0) is not None else c.tensor(0)]
    x = c.const(0)
    if x is not None:
        return [np.mean(x, axis=None if axes is None else tuple(axes), keepdims=keepdims,
                        dtype=x.dtype)]
    return [c.emit("ReduceMean", [0], {"axes": axes, "keepdims": keepdims})]


@_handles("Softmax")
def _softmax(c: _Node):
    rank = len(c.shape(0))
    axis = int(c.attr("axis", -1 if c.opset >= 13 else 1)) % rank
    if c.opset < 13 and axis != rank - 1:
        raise OnnxImportError(f"from_onnx: node {c.label!r} (Softmax, opset {c.opset}) "
                              f"flattens from axis {axis}; only the last axis is supported "
                              "before opset 13")
    x = c.const(0)
    if x is not None:
        from .ops import softmax_array

        return [softmax_array(x, axis)]
    return [c.emit("Softmax", [0], {"axis": axis})]


@_handles("LayerNormalization")
def _layer_norm(c: _Node):
    rank = len(c.shape(0))
    axis = int(c.attr("axis", -1)) % rank
    if axis != rank - 1:
        raise OnnxImportError(f"from_onnx: node {c.label!r} (LayerNormalization) normalises "
                              f"from axis {axis}; only the last axis is supported")
    if any(o for o in c.node.output[1:]):
        raise OnnxImportError(f"from_onnx: node {c.label!r} (LayerNormalization) outputs its "
                              "mean/inverse std dev; only the normalised output is supported")
    n = c.shape(0)[-1]
    dtype = c.dtype(0)
    gamma = c.need_const(1, "scale").reshape(-1)
    beta = c.need_const(2, "bias").reshape(-1) if c.has(2) else np.zeros(n, dtype)
    if gamma.size != n or beta.size != n:
        raise OnnxImportError(f"from_onnx: node {c.label!r} (LayerNormalization): scale and "
                              f"bias must have {n} entries (the last axis)")
    eps = float(c.attr("epsilon", 1e-5))
    x = c.const(0)
    if x is not None:
        return [layernorm_array(x, gamma, beta, eps)]
    g_name = c.tensor(1) if c.const(1).shape == (n,) else c.const_tensor("gamma", gamma)
    b_name = (c.tensor(2) if c.const(2).shape == (n,) else c.const_tensor("beta", beta)) \
        if c.has(2) else c.const_tensor("beta", beta)
    return [c.emit("LayerNorm", [0, g_name, b_name], {"eps": eps})]


@_handles("MatMul")
def _matmul(c: _Node):
    a, b = c.const(0), c.const(1)
    if a is not None and b is not None:
        return [np.matmul(a, b)]
    if len(c.shape(0)) < 2 or len(c.shape(1)) < 2:
        raise OnnxImportError(f"from_onnx: node {c.label!r} (MatMul) has a 1-D operand "
                              f"({c.shape(0)} @ {c.shape(1)}); only ranks >= 2 are supported")
    return [c.emit("MatMul", [0, 1])]


@_handles("Gemm")
def _gemm(c: _Node):
    alpha, beta = float(c.attr("alpha", 1.0)), float(c.attr("beta", 1.0))
    trans_a, trans_b = int(c.attr("transA", 0)), int(c.attr("transB", 0))
    a, b = c.const(0), c.const(1)
    bias = c.const(2) if c.has(2) else None
    if a is not None and b is not None and (bias is not None or not c.has(2)):
        y = alpha * np.matmul(a.T if trans_a else a, b.T if trans_b else b)
        return [(y + beta * bias if bias is not None else y).astype(a.dtype)]
    a_name = c.emit("Transpose", [0], {"perm": (1, 0)}, last=False) if trans_a else c.tensor(0)
    if b is not None:  # the usual case, a constant weight: fold alpha and transB into it
        w = (b.T if trans_b else b) * b.dtype.type(alpha)
        b_name = c.const_tensor("weight", w.astype(b.dtype))
    else:
        b_name = c.emit("Transpose", [1], {"perm": (1, 0)}, last=False) if trans_b \
            else c.tensor(1)
        if alpha != 1.0:
            b_name = c.emit("Mul", [b_name, c.const_tensor("alpha", np.asarray(
                alpha, c.dtype(1)))], last=False)
    if not c.has(2):
        return [c.emit("MatMul", [a_name, b_name])]
    y = c.emit("MatMul", [a_name, b_name], last=False)
    if bias is not None:
        return [c.emit("Add", [y, c.const_tensor("bias", (bias * bias.dtype.type(beta))
                                                  .astype(bias.dtype))])]
    cb = c.tensor(2)
    if beta != 1.0:
        cb = c.emit("Mul", [cb, c.const_tensor("beta", np.asarray(beta, c.dtype(2)))],
                    last=False)
    return [c.emit("Add", [y, cb])]


SUPPORTED_OPS = tuple(sorted(_HANDLERS))


# ---------------------------------------------------------------------------- entry point
def from_onnx(model_or_path, input_shapes: Mapping[str, tuple] | None = None, *,
              name: str | None = None) -> Graph:
    """Import an ONNX model as a :class:`~blasst_ref.graph.Graph`.

    Args:
        model_or_path: an ``onnx.ModelProto``, the serialized bytes of one, or the path of
            an ``.onnx`` file (external data files beside it are read too).
        input_shapes: ``{input name: shape}`` for the inputs with dynamic dimensions (or to
            pin any input's shape); every other input must have a fully static shape in the
            model. The imported graph is specialised to these shapes.
        name: the graph's name (default: the ONNX graph's).

    Returns:
        A graph with the model's inputs (same names, the given shapes, their dtypes: token
        ids stay ``int64``) and outputs (same names). Initializers that the run-time
        computation reads become constants under their ONNX names; everything computable
        from constants and shapes alone was evaluated during the import.

    Raises:
        OnnxImportError: an unsupported op or domain (the message names the node and op),
            a dynamic input dimension without ``input_shapes``, a value that must be known at
            import but is computed at run time, a truncated or invalid file.
        FileNotFoundError: no file at the path.
        ImportError: ``onnx`` is not installed.
    """
    onnx, model = _load(model_or_path)
    importer = _Importer(onnx, model, input_shapes or {}, name)
    return importer.run()
