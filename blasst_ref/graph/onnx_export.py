"""Export a graph to ONNX and run it in ONNX Runtime: the peer of the compiled executor.

::

    from blasst_ref.graph import models, onnx_export
    g = models.bert_layer(1, 128)
    model = onnx_export.to_onnx(g)                        # an onnx.ModelProto
    out = onnx_export.run_onnxruntime(g, {"x": x})        # {"y": array}
    sess, names = onnx_export.onnxruntime_session(g, threads=4)
    sess.run(None, {names["x"]: x})                       # for timing

``onnx`` and ``onnxruntime`` are an optional extra (``pip install 'blasst_ref[onnx]'``),
imported only when a function here is called.

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

Constants become initializers under their own names; inputs keep their names (so feeds
need no renaming); each graph output is an ONNX output under its public name (an
``Identity`` where the public name differs from the tensor's). The fused ops that compiler
passes create (``FusedMatMul``, ``PackedMatMul``, ``Attention``, the int8 kernels) have no
ONNX form here: export the graph *before* compiling it. They raise
:class:`UnsupportedOpError`.
"""

from __future__ import annotations

import math

import numpy as np

from .interpreter import check_feeds
from .ir import Graph, GraphError

__all__ = ["DEFAULT_OPSET", "SUPPORTED_OPS", "UnsupportedOpError", "onnxruntime_session",
           "run_onnxruntime", "to_onnx"]

#: The default ONNX opset: 20 has ``Gelu``; onnx >= 1.15 and onnxruntime >= 1.17 know it.
DEFAULT_OPSET = 20
#: The lowest opset accepted: 17 has ``LayerNormalization``.
MIN_OPSET = 17

#: IR ops :func:`to_onnx` can export.
SUPPORTED_OPS = ("MatMul", "Add", "Sub", "Mul", "Div", "Relu", "Gelu", "Tanh", "Exp",
                 "Softmax", "LayerNorm", "Transpose", "Reshape", "Quantize", "Dequantize")

_INSTALL = "pip install 'blasst_ref[onnx]'"


class UnsupportedOpError(GraphError, NotImplementedError):
    """The graph holds an op that :func:`to_onnx` cannot export (e.g. a fused op)."""


def _import_onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError as exc:
        raise ImportError(f"ONNX export needs the optional 'onnx' package: {_INSTALL} "
                          f"({exc})") from exc
    return onnx, helper, numpy_helper


def _import_ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError(f"running graphs in ONNX Runtime needs the optional 'onnxruntime' "
                          f"package: {_INSTALL} ({exc})") from exc
    return onnxruntime


def _elem_type(onnx, dtype: str) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class _Builder:
    """Collects ONNX nodes and initializers with names that do not clash with the graph's."""

    def __init__(self, graph: Graph, onnx, helper, numpy_helper, reserved):
        self.graph = graph
        self.onnx, self.helper, self.numpy_helper = onnx, helper, numpy_helper
        self.nodes = []
        self.initializers = []
        self.used = set(graph.tensors) | set(reserved)
        self.rename: dict[str, str] = {}
        self._n = 0

    def fresh(self, base: str) -> str:
        while True:
            name = f"{base}__onnx{self._n}"
            self._n += 1
            if name not in self.used:
                self.used.add(name)
                return name

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self.initializers.append(self.numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs, outputs, name: str, **attrs):
        self.nodes.append(self.helper.make_node(op, list(inputs), list(outputs), name=name,
                                                **attrs))

    def tensor(self, name: str) -> str:
        return self.rename.get(name, name)


def _gelu_nodes(b: _Builder, x: str, y: str, dtype: str, approximate: str, name: str):
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


def _export_node(b: _Builder, node, opset: int):
    g = b.graph
    op, attrs = node.op, node.attrs
    ins = [b.tensor(i) for i in node.inputs]
    outs = [b.tensor(o) for o in node.outputs]
    name = node.name
    out_dtype = g.tensors[node.outputs[0]].dtype
    if op in ("MatMul", "Add", "Sub", "Mul", "Div", "Relu", "Tanh", "Exp"):
        b.node(op, ins, outs, name)
    elif op == "Gelu" and out_dtype == "float64" and attrs["approximate"] == "none":
        # ONNX Runtime's CPU provider has no float64 Erf: this GELU runs in float32
        x32, y32 = b.fresh(f"{name}.x32"), b.fresh(f"{name}.y32")
        b.node("Cast", ins, [x32], f"{name}.cast_in", to=b.onnx.TensorProto.FLOAT)
        if opset >= 20:
            b.node("Gelu", [x32], [y32], name, approximate="none")
        else:
            _gelu_nodes(b, x32, y32, "float32", "none", name)
        b.node("Cast", [y32], outs, f"{name}.cast_out", to=b.onnx.TensorProto.DOUBLE)
    elif op == "Gelu":
        if opset >= 20:
            b.node("Gelu", ins, outs, name, approximate=attrs["approximate"])
        else:
            _gelu_nodes(b, ins[0], outs[0], out_dtype, attrs["approximate"], name)
    elif op == "Softmax":
        b.node("Softmax", ins, outs, name, axis=int(attrs["axis"]))
    elif op == "LayerNorm":
        b.node("LayerNormalization", ins, outs, name, axis=-1, epsilon=float(attrs["eps"]))
    elif op == "Transpose":
        b.node("Transpose", ins, outs, name, perm=[int(p) for p in attrs["perm"]])
    elif op == "Reshape":
        shape = b.const(f"{name}.shape", np.asarray(attrs["shape"], np.int64))
        b.node("Reshape", [ins[0], shape], outs, name)
    elif op == "Quantize":
        x = ins[0]
        if g.tensors[node.inputs[0]].dtype != "float32":
            x = b.fresh(f"{name}.f32")
            b.node("Cast", [ins[0]], [x], f"{name}.cast", to=b.onnx.TensorProto.FLOAT)
        scale, zp = _quant_param_arrays(attrs, attrs["dtype"])
        kw = {} if attrs["axis"] is None else {"axis": int(attrs["axis"])}
        b.node("QuantizeLinear", [x, b.const(f"{name}.scale", scale),
                                  b.const(f"{name}.zero_point", zp)], outs, name, **kw)
    elif op == "Dequantize":
        in_dtype = g.tensors[node.inputs[0]].dtype
        scale, zp = _quant_param_arrays(attrs, in_dtype)
        kw = {} if attrs["axis"] is None else {"axis": int(attrs["axis"])}
        y = outs[0] if out_dtype == "float32" else b.fresh(f"{name}.f32")
        b.node("DequantizeLinear", [ins[0], b.const(f"{name}.scale", scale),
                                    b.const(f"{name}.zero_point", zp)], [y], name, **kw)
        if y != outs[0]:
            b.node("Cast", [y], outs, f"{name}.cast", to=_elem_type(b.onnx, out_dtype))
    else:
        raise UnsupportedOpError(
            f"to_onnx: op {op!r} (node {name!r}) has no ONNX export; supported ops: "
            f"{', '.join(SUPPORTED_OPS)}. Fused ops come from compiler passes: export the "
            "graph before compiling it")


def to_onnx(graph: Graph, *, opset: int | None = None, name: str | None = None):
    """The graph as an ``onnx.ModelProto`` (checked with ``onnx.checker``).

    Args:
        graph: a graph of the ops in :data:`SUPPORTED_OPS` (any graph a user builds; not a
            compiled one, whose fused ops have no ONNX form here).
        opset: ONNX opset of the default domain, ``17`` or more; default
            :data:`DEFAULT_OPSET` (20). Below 20, GELU is decomposed into basic ops.
        name: the ONNX graph's name; default the graph's.

    Inputs keep their names, shapes and dtypes; constants become initializers under their
    own names; outputs are named by their public names, in ``graph.outputs`` order.

    Raises:
        UnsupportedOpError: an op with no ONNX export (the message names it and the node).
        ValueError: an opset below 17.
        ImportError: ``onnx`` is not installed (``pip install 'blasst_ref[onnx]'``).
    """
    onnx, helper, numpy_helper = _import_onnx()
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET} (LayerNormalization), got {opset}")
    for node in graph.nodes:  # fail before building anything
        if node.op not in SUPPORTED_OPS:
            raise UnsupportedOpError(
                f"to_onnx: op {node.op!r} (node {node.name!r}) has no ONNX export; supported "
                f"ops: {', '.join(SUPPORTED_OPS)}. Fused ops come from compiler passes: "
                "export the graph before compiling it")

    public = list(graph.outputs)
    for pub, tname in graph.outputs.items():
        if pub in graph.inputs and tname != pub:
            raise GraphError(f"to_onnx: output {pub!r} has the name of an input but is "
                             f"tensor {tname!r}; ONNX names outputs and inputs in one space")
    b = _Builder(graph, onnx, helper, numpy_helper, reserved=public)
    # Internal tensors whose names a public output takes are renamed (inputs never are).
    for tname in graph.tensors:
        if tname in graph.outputs and tname not in graph.inputs and \
                graph.outputs[tname] != tname:
            b.rename[tname] = b.fresh(tname)

    inputs = [helper.make_tensor_value_info(n, _elem_type(onnx, graph.tensors[n].dtype),
                                            list(graph.tensors[n].shape))
              for n in graph.inputs]
    for cname, value in graph.constants.items():
        b.initializers.append(numpy_helper.from_array(np.asarray(value), b.tensor(cname)))
    for node in graph.nodes:
        _export_node(b, node, opset)
    outputs = []
    for pub, tname in graph.outputs.items():
        info = graph.tensors[tname]
        src = b.tensor(tname)
        if src != pub:
            b.node("Identity", [src], [pub], f"output.{pub}")
        outputs.append(helper.make_tensor_value_info(pub, _elem_type(onnx, info.dtype),
                                                     list(info.shape)))

    onnx_graph = helper.make_graph(b.nodes, name or graph.name, inputs, outputs,
                                   initializer=b.initializers)
    opsets = [helper.make_opsetid("", opset)]
    # The oldest IR version that carries the opset: newer onnx packages default to IR
    # versions that older onnxruntime releases refuse to load.
    model = helper.make_model(onnx_graph, opset_imports=opsets,
                              ir_version=helper.find_min_ir_version_for(opsets),
                              producer_name="blasst_ref.graph")
    onnx.checker.check_model(model)
    return model


def onnxruntime_session(graph: Graph, threads: int | None = None, *, opset: int | None = None):
    """An ONNX Runtime ``InferenceSession`` of the graph, for benchmarking.

    CPUExecutionProvider, every graph optimisation on (``ORT_ENABLE_ALL``: ORT fuses
    MatMul + Add, GELU, LayerNorm, attention where it can -- it is the peer, so it gets its
    own best). ``threads`` sets ``intra_op_num_threads`` (default: ORT's, one per core).

    Returns:
        ``(session, input_names)``: ``input_names`` maps each graph input to its ONNX input
        name (the same name). ``session.run(None, feeds)`` returns the outputs as a list in
        ``graph.outputs`` order.
    """
    ort = _import_ort()
    model = to_onnx(graph, opset=opset)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's pool threads spin after each run by default; in an interleaved benchmark they
    # would steal the cores from whatever runs next (our kernels, numpy's BLAS).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                                providers=["CPUExecutionProvider"])
    return sess, {n: n for n in graph.inputs}


def run_onnxruntime(graph: Graph, feeds: dict, threads: int | None = None, *,
                    opset: int | None = None) -> dict[str, np.ndarray]:
    """Run the graph once in ONNX Runtime: ``{output name: array}``, like
    :func:`blasst_ref.graph.interpret` (feeds are checked the same way). Builds a new
    session per call: for timing, keep one from :func:`onnxruntime_session`."""
    feeds = check_feeds(graph, feeds)
    sess, names = onnxruntime_session(graph, threads, opset=opset)
    results = sess.run(None, {names[k]: v for k, v in feeds.items()})
    return dict(zip(graph.outputs, results))
