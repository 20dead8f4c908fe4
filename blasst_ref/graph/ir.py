"""The graph IR: statically shaped, typed tensors and the ops between them (docs/DESIGN.md §7.1).

A :class:`Graph` holds

* **tensors** (:class:`TensorInfo`): a name, a static shape, a dtype and a kind -- ``"input"``
  (fed at call time), ``"constant"`` (a weight: its numpy value lives in the graph) or
  ``"value"`` (computed by a node);
* **nodes** (:class:`Node`): an op name from :mod:`.ops`, input and output tensor names and
  attributes, kept **in execution order** (every node comes after the nodes that produce its
  inputs: the builder can only refer to tensors that exist, and :meth:`Graph.from_nodes`
  sorts and rejects cycles);
* **outputs**: public names mapped to tensors.

Graphs are built with one method per op (``g.matmul(x, w)``, ``g.relu(h)``, ...; see
:class:`Graph`), which infer the output's shape and dtype at once and raise a
:class:`GraphError` naming the op and the operands when they do not fit. Passes never edit a
graph: they build a new one (:meth:`Graph.rebuild`), so every pass is a pure function
``Graph -> Graph`` and the graph a user built is never changed by compiling it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from . import ops as _ops

__all__ = ["Graph", "GraphError", "Node", "Tensor", "TensorInfo"]

#: dtypes a tensor may have: floats for compute, 8-bit integers and int32 for the int8 path;
#: int64 and bool for what imported models compute on token ids and masks.
DTYPES = ("float32", "float64", "float16", "uint8", "int8", "int32", "int64", "bool")


class GraphError(ValueError):
    """A graph that cannot be built, compiled or run; the message names the op and tensors."""


@dataclass(frozen=True)
class TensorInfo:
    """A tensor of the graph: ``name``, static ``shape`` (a tuple of ints), ``dtype`` (a
    numpy dtype name, see :data:`DTYPES`) and ``kind``: ``"input"``, ``"constant"`` or
    ``"value"`` (produced by a node)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: str

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes (a Python int: it never wraps)."""
        return self.size * np.dtype(self.dtype).itemsize

    @property
    def size(self) -> int:
        """Number of elements (a Python int: it never wraps)."""
        return math.prod(self.shape)

    def describe(self) -> str:
        return f"{self.name}: {self.dtype}{list(self.shape)}"


@dataclass(frozen=True)
class Node:
    """One op application: ``outputs = op(*inputs, **attrs)``; tensors are named."""

    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: Mapping = field(default_factory=dict)
    name: str = ""

    def __post_init__(self):
        # Attributes are read-only, so a node shared by two graphs cannot be changed through
        # either of them (passes rebuild nodes instead).
        object.__setattr__(self, "attrs", MappingProxyType(dict(self.attrs)))

    def describe(self) -> str:
        attrs = ", ".join(f"{k}={_short(v)}" for k, v in self.attrs.items())
        ins = ", ".join(self.inputs)
        outs = ", ".join(self.outputs)
        return f"{outs} = {self.op}({ins}{', ' if attrs and ins else ''}{attrs})"


def _short(value) -> str:
    if isinstance(value, np.ndarray):
        return f"array{list(value.shape)}" if value.size > 4 else np.array2string(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value)


class Tensor:
    """A handle on a tensor of a graph under construction, returned by the builder methods.

    It carries the name, ``shape`` and ``dtype``; arithmetic operators build ops
    (``a @ b``, ``a + b``, ``a * 0.5``, ...) on the same graph.
    """

    __slots__ = ("graph", "name")

    def __init__(self, graph: Graph, name: str):
        self.graph = graph
        self.name = name

    @property
    def info(self) -> TensorInfo:
        return self.graph.tensors[self.name]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    @property
    def dtype(self) -> str:
        return self.info.dtype

    def __repr__(self) -> str:
        return f"Tensor({self.info.describe()})"

    def __matmul__(self, other):
        return self.graph.matmul(self, other)

    def __add__(self, other):
        return self.graph.add(self, other)

    def __radd__(self, other):
        return self.graph.add(other, self)

    def __sub__(self, other):
        return self.graph.sub(self, other)

    def __rsub__(self, other):
        return self.graph.sub(other, self)

    def __mul__(self, other):
        return self.graph.mul(self, other)

    def __rmul__(self, other):
        return self.graph.mul(other, self)

    def __truediv__(self, other):
        return self.graph.div(self, other)

    def __rtruediv__(self, other):
        return self.graph.div(other, self)


class Graph:
    """A dataflow graph of ops over static tensors (docs/DESIGN.md §7.1).

    Example::

        g = Graph("mlp")
        x = g.input("x", (32, 13), "float32")
        h = g.relu(g.add(g.matmul(x, g.constant("w1", W1)), g.constant("b1", b1)))
        g.output("y", h)

    Builder methods, one per op (lower case): :meth:`matmul` (batched, broadcasting batch
    dims), :meth:`add`, :meth:`sub`, :meth:`mul`, :meth:`div` (numpy broadcasting; a Python
    number becomes a scalar constant of the other operand's dtype), :meth:`relu`,
    :meth:`gelu`, :meth:`tanh`, :meth:`exp`, :meth:`softmax`, :meth:`layernorm`,
    :meth:`transpose`, :meth:`reshape`, :meth:`quantize`, :meth:`dequantize`; and
    :meth:`op` for any registered op by name.
    """

    def __init__(self, name: str = "graph"):
        self.name = name
        self.tensors: dict[str, TensorInfo] = {}
        self.constants: dict[str, np.ndarray] = {}
        self.nodes: list[Node] = []
        self.inputs: list[str] = []
        self.outputs: dict[str, str] = {}
        self._counter = 0

    # ------------------------------------------------------------------ leaves and outputs
    def input(self, name: str, shape: Iterable[int], dtype: str = "float32") -> Tensor:
        """Declare a graph input fed at call time, of static ``shape`` and ``dtype``."""
        shape = _check_shape(shape, f"input {name!r}")
        dtype = _check_dtype(dtype, f"input {name!r}")
        self._new_tensor(name, shape, dtype, "input")
        self.inputs.append(name)
        return Tensor(self, name)

    def constant(self, name: str, value) -> Tensor:
        """Declare a constant (a weight): ``value`` is copied into the graph as a numpy array."""
        # Our own read-only arrays (a pass handing a constant on) are shared, not copied.
        own = isinstance(value, np.ndarray) and not value.flags.writeable
        arr = value if own else np.array(value, copy=True)
        if arr.dtype == np.float64 and not isinstance(value, np.ndarray):
            arr = arr.astype(np.float32)  # Python lists and numbers: float32, the usual dtype
        dtype = _check_dtype(arr.dtype.name, f"constant {name!r}")
        if arr.flags.writeable:
            arr.setflags(write=False)
        self._new_tensor(name, arr.shape, dtype, "constant")
        self.constants[name] = arr
        return Tensor(self, name)

    def output(self, name: str, tensor: Tensor | str) -> None:
        """Mark ``tensor`` as a graph output, returned under ``name`` by every call."""
        tname = self._resolve(tensor, "output", name).name
        if name in self.outputs:
            raise GraphError(f"output {name!r} is declared twice")
        self.outputs[name] = tname

    # ------------------------------------------------------------------ ops
    def op(self, op: str, *inputs, **attrs) -> Tensor | tuple[Tensor, ...]:
        """Apply the registered op ``op`` (see :data:`blasst_ref.graph.ops.OPS`) to ``inputs``.

        Inputs are :class:`Tensor` handles of this graph, tensor names, or Python numbers
        (scalar constants of the dtype of the first tensor input). Shapes and dtypes are
        inferred now; a mismatch raises :class:`GraphError` naming the op and the operands.
        Returns the output handle (a tuple for ops with several outputs).
        """
        opdef = _ops.get(op)
        names = self._operands(op, inputs)
        infos = [self.tensors[n] for n in names]
        node_name = f"{op.lower()}_{self._next_id()}"
        attrs = opdef.normalize(infos, dict(attrs), node_name)
        out_specs = opdef.infer(infos, attrs, node_name)
        outs = []
        for i, (shape, dtype) in enumerate(out_specs):
            out_name = self._fresh(f"{node_name}" + (f"_{i}" if len(out_specs) > 1 else ""))
            self._new_tensor(out_name, shape, dtype, "value")
            outs.append(out_name)
        self.nodes.append(Node(op, tuple(names), tuple(outs), attrs, node_name))
        handles = tuple(Tensor(self, n) for n in outs)
        return handles[0] if len(handles) == 1 else handles

    def matmul(self, a, b) -> Tensor:
        """``a @ b`` with numpy semantics for ranks >= 2: ``(..., M, K) @ (..., K, N)``."""
        return self.op("MatMul", a, b)

    def add(self, a, b) -> Tensor:
        """Element-wise ``a + b`` with numpy broadcasting."""
        return self.op("Add", a, b)

    def sub(self, a, b) -> Tensor:
        """Element-wise ``a - b`` with numpy broadcasting."""
        return self.op("Sub", a, b)

    def mul(self, a, b) -> Tensor:
        """Element-wise ``a * b`` with numpy broadcasting."""
        return self.op("Mul", a, b)

    def div(self, a, b) -> Tensor:
        """Element-wise ``a / b`` with numpy broadcasting."""
        return self.op("Div", a, b)

    def relu(self, x) -> Tensor:
        """``max(x, 0)``."""
        return self.op("Relu", x)

    def gelu(self, x, approximate: str = "none") -> Tensor:
        """GELU: ``0.5 x (1 + erf(x / sqrt 2))``; ``approximate="tanh"`` for the tanh form."""
        return self.op("Gelu", x, approximate=approximate)

    def tanh(self, x) -> Tensor:
        return self.op("Tanh", x)

    def exp(self, x) -> Tensor:
        return self.op("Exp", x)

    def softmax(self, x, axis: int = -1) -> Tensor:
        """Safe softmax along ``axis``."""
        return self.op("Softmax", x, axis=axis)

    def layernorm(self, x, gamma, beta, eps: float = 1e-5) -> Tensor:
        """Layer normalisation over the last axis: ``(x - mean) / sqrt(var + eps) * gamma +
        beta`` with the biased variance; ``gamma`` and ``beta`` are ``(N,)``."""
        return self.op("LayerNorm", x, gamma, beta, eps=eps)

    def transpose(self, x, perm) -> Tensor:
        """Permute the axes: output axis ``i`` is input axis ``perm[i]`` (numpy's transpose)."""
        return self.op("Transpose", x, perm=perm)

    def reshape(self, x, shape) -> Tensor:
        """Reshape (C order, one ``-1`` allowed). Free at run time: a view of its input."""
        return self.op("Reshape", x, shape=shape)

    def quantize(self, x, scale, zero_point=0, dtype: str = "uint8", axis=None) -> Tensor:
        """``q = saturate(round_half_even(x / scale) + zero_point)`` to ``dtype``
        (``"uint8"`` or ``"int8"``); ``scale``/``zero_point`` are scalars (per tensor) or
        1-D along ``axis`` (per channel). NaN becomes the zero point (ONNX Runtime gives
        the lowest value instead: :func:`~blasst_ref.graph.ops.quantize_array`)."""
        return self.op("Quantize", x, scale=scale, zero_point=zero_point, dtype=dtype,
                       axis=axis)

    def dequantize(self, x, scale, zero_point=0, axis=None, dtype: str = "float32") -> Tensor:
        """``(x - zero_point) * scale`` in ``dtype``; per tensor, or per channel along ``axis``."""
        return self.op("Dequantize", x, scale=scale, zero_point=zero_point, axis=axis,
                       dtype=dtype)

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_nodes(cls, name: str, inputs: Mapping[str, tuple], constants: Mapping,
                   nodes: Iterable, outputs: Mapping[str, str]) -> Graph:
        """Build a graph from named parts, with the nodes in *any* order (as in ONNX).

        Args:
            inputs: ``{name: (shape, dtype)}``.
            constants: ``{name: array}``.
            nodes: :class:`Node` objects, or tuples ``(op, inputs, outputs[, attrs])``.
            outputs: ``{public name: tensor name}``.

        The nodes are sorted into an execution order; a cycle, a tensor that nothing
        produces, a tensor produced twice or an unknown op raise :class:`GraphError`.
        """
        g = cls(name)
        for iname, (shape, dtype) in inputs.items():
            g.input(iname, shape, dtype)
        for cname, value in constants.items():
            g.constant(cname, value)
        parsed = [n if isinstance(n, Node) else Node(n[0], tuple(n[1]), tuple(n[2]),
                                                     n[3] if len(n) > 3 else {},
                                                     f"{n[0].lower()}_{i}")
                  for i, n in enumerate(nodes)]
        for node in _topological_order(parsed, set(g.tensors)):
            g.append(node)
        for oname, tname in outputs.items():
            g.output(oname, tname)
        return g

    def append(self, node: Node) -> list[str]:
        """Append an already named node (used by passes and :meth:`from_nodes`): checks
        its inputs exist, infers its outputs and declares them. Returns the output names."""
        opdef = _ops.get(node.op, node.name)
        for n in node.inputs:
            if n not in self.tensors:
                raise GraphError(f"{node.op} {node.name!r}: input tensor {n!r} does not exist "
                                 "(no input, constant or earlier node defines it)")
        infos = [self.tensors[n] for n in node.inputs]
        attrs = opdef.normalize(infos, dict(node.attrs), node.name)
        specs = opdef.infer(infos, attrs, node.name)
        if len(specs) != len(node.outputs):
            raise GraphError(f"{node.op} {node.name!r} has {len(specs)} outputs, "
                             f"the node names {len(node.outputs)}")
        for out, (shape, dtype) in zip(node.outputs, specs):
            self._new_tensor(out, shape, dtype, "value")
        self.nodes.append(Node(node.op, node.inputs, node.outputs, attrs, node.name))
        return list(node.outputs)

    def rebuild(self, name: str | None = None) -> Graph:
        """A new graph with this graph's inputs and nothing else: passes start from it, add
        the constants and nodes they keep or create, and declare the outputs."""
        g = Graph(self.name if name is None else name)
        for n in self.inputs:
            info = self.tensors[n]
            g.input(n, info.shape, info.dtype)
        g._counter = self._counter
        return g

    def add_constant(self, name: str, value: np.ndarray) -> str:
        """Declare a constant under a fresh name derived from ``name``; returns the name."""
        name = self._fresh(name)
        self.constant(name, value)
        return name

    def name_generator(self):
        """A function ``base -> name`` giving names unused by this graph's tensors and nodes
        and by its own earlier results; passes name what they create with it (the graph
        itself is not touched, so passes stay pure)."""
        used = set(self.tensors) | {n.name for n in self.nodes}
        counter = [self._counter]

        def fresh(base: str) -> str:
            while True:
                name = f"{base}_{counter[0]}"
                counter[0] += 1
                if name not in used:
                    used.add(name)
                    return name

        return fresh

    def copy(self) -> Graph:
        """A copy sharing the (read-only) constant arrays and nodes."""
        g = Graph(self.name)
        g.tensors = dict(self.tensors)
        g.constants = dict(self.constants)
        g.nodes = list(self.nodes)
        g.inputs = list(self.inputs)
        g.outputs = dict(self.outputs)
        g._counter = self._counter
        return g

    # ------------------------------------------------------------------ queries
    def consumers(self) -> dict[str, list[Node]]:
        """``{tensor name: [nodes that read it]}`` (graph outputs are not nodes)."""
        users: dict[str, list[Node]] = {n: [] for n in self.tensors}
        for node in self.nodes:
            for i in node.inputs:
                users[i].append(node)
        return users

    def producers(self) -> dict[str, Node]:
        """``{tensor name: node that computes it}`` for every ``"value"`` tensor."""
        return {o: node for node in self.nodes for o in node.outputs}

    def prune(self) -> Graph:
        """A copy without the nodes and constants no output depends on (dead code)."""
        needed = set(self.outputs.values())
        keep = []
        for node in reversed(self.nodes):
            if any(o in needed for o in node.outputs):
                keep.append(node)
                needed.update(node.inputs)
        g = self.copy()
        g.nodes = keep[::-1]
        live = set(needed) | set(self.inputs)
        for node in g.nodes:
            live.update(node.outputs)
        g.tensors = {n: t for n, t in self.tensors.items() if n in live}
        g.constants = {n: c for n, c in self.constants.items() if n in live}
        return g

    def count_ops(self) -> dict[str, int]:
        """How many nodes of each op the graph has."""
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.op] = counts.get(node.op, 0) + 1
        return counts

    def __str__(self) -> str:
        lines = [f"graph {self.name}"]
        for n in self.inputs:
            lines.append(f"  input    {self.tensors[n].describe()}")
        for n in self.constants:
            lines.append(f"  constant {self.tensors[n].describe()}")
        for node in self.nodes:
            outs = ", ".join(self.tensors[o].describe() for o in node.outputs)
            lines.append(f"  {node.describe()}    -> {outs}")
        for pub, n in self.outputs.items():
            lines.append(f"  output   {pub} = {n}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Graph({self.name!r}, {len(self.inputs)} inputs, {len(self.constants)} "
                f"constants, {len(self.nodes)} nodes, {len(self.outputs)} outputs)")

    # ------------------------------------------------------------------ internals
    def _new_tensor(self, name: str, shape, dtype: str, kind: str) -> None:
        if not isinstance(name, str) or not name:
            raise GraphError(f"tensor names must be non-empty strings, got {name!r}")
        if name in self.tensors:
            raise GraphError(f"tensor {name!r} is defined twice")
        self.tensors[name] = TensorInfo(name, tuple(int(s) for s in shape), dtype, kind)

    def _next_id(self) -> int:
        self._counter += 1
        return self._counter - 1

    def _fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.tensors:
            name, i = f"{base}.{i}", i + 1
        return name

    def _resolve(self, t, op: str, what: str) -> TensorInfo:
        if isinstance(t, Tensor):
            if t.graph is not self:
                raise GraphError(f"{op}: operand {what} ({t.name!r}) belongs to another graph")
            return self.tensors[t.name]
        if isinstance(t, str):
            if t not in self.tensors:
                raise GraphError(f"{op}: operand {what} names an unknown tensor {t!r}")
            return self.tensors[t]
        raise GraphError(f"{op}: operand {what} must be a Tensor of this graph, a tensor name "
                         f"or a number, got {type(t).__name__}")

    def _operands(self, op: str, inputs) -> list[str]:
        ref_dtype = next((self._resolve(t, op, f"#{i}").dtype for i, t in enumerate(inputs)
                          if not _is_number(t)), "float32")
        names = []
        for i, t in enumerate(inputs):
            if _is_number(t):
                names.append(self.add_constant(f"scalar_{self._next_id()}",
                                               np.asarray(t, dtype=ref_dtype)))
            else:
                names.append(self._resolve(t, op, f"#{i}").name)
        return names


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.number)) and not isinstance(x, bool)


def _check_shape(shape, what: str) -> tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:
        dims = None
    # integers only (numpy's too): a float such as 2.5 must not be truncated to 2
    if dims is None or any(isinstance(s, (bool, np.bool_)) or
                           not isinstance(s, numbers.Integral) for s in dims):
        raise GraphError(f"{what}: shape must be a tuple of integers, got {shape!r}")
    shape = tuple(int(s) for s in dims)
    if any(s <= 0 for s in shape):
        raise GraphError(f"{what}: every dimension must be positive, got {shape}")
    return shape


def _check_dtype(dtype, what: str) -> str:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise GraphError(f"{what}: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return name


def _topological_order(nodes: list[Node], available: set[str]) -> list[Node]:
    """Kahn's algorithm over tensor names; raises :class:`GraphError` on cycles and on
    tensors that no node produces or that two nodes produce."""
    producer: dict[str, Node] = {}
    for node in nodes:
        _ops.get(node.op, node.name)
        for o in node.outputs:
            if o in producer or o in available:
                raise GraphError(f"tensor {o!r} is produced twice ({node.op} {node.name!r})")
            producer[o] = node
    for node in nodes:
        for i in node.inputs:
            if i not in producer and i not in available:
                raise GraphError(f"{node.op} {node.name!r}: input tensor {i!r} is neither an "
                                 "input, a constant nor produced by a node")
    ready = set(available)
    order, pending = [], list(nodes)
    while pending:
        progress = [n for n in pending if all(i in ready for i in n.inputs)]
        if not progress:
            cycle = ", ".join(f"{n.op} {n.name!r}" for n in pending)
            raise GraphError(f"the graph has a cycle through: {cycle}")
        for n in progress:
            order.append(n)
            ready.update(n.outputs)
        pending = [n for n in pending if n not in progress]
    return order
