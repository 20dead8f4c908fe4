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

Each op's ONNX form lives with its ``OpDef`` (:attr:`~.ops.OpDef.onnx`); the forms, and the
table of which IR op becomes which ONNX op, are in :mod:`.onnx_forms` (default opset 20;
17 to 19 work too, with GELU decomposed).

Constants become initializers under their own names; inputs keep their names (so feeds
need no renaming); each graph output is an ONNX output under its public name (an
``Identity`` where the public name differs from the tensor's). The fused ops that compiler
passes create (``FusedMatMul``, ``PackedMatMul``, ``Attention``, the int8 kernels) have no
ONNX form here: export the graph *before* compiling it. They raise
:class:`UnsupportedOpError`.

One known difference: a NaN reaching ``Quantize`` becomes the zero point in this package
and the type's lowest value (0 / -128) in ONNX Runtime (ONNX leaves it undefined; see
:func:`~blasst_ref.graph.ops.quantize_array`).
"""

from __future__ import annotations

import numpy as np

from . import ops as _ops
from .interpreter import check_feeds
from .ir import Graph, GraphError

__all__ = ["DEFAULT_OPSET", "SUPPORTED_OPS", "OnnxBuilder", "UnsupportedOpError",
           "onnxruntime_model_session",
           "onnxruntime_session", "run_onnxruntime", "to_onnx"]

#: The default ONNX opset: 20 has ``Gelu``; onnx >= 1.15 and onnxruntime >= 1.17 know it.
DEFAULT_OPSET = 20
#: The lowest opset accepted: 17 has ``LayerNormalization``.
MIN_OPSET = 17

#: IR ops :func:`to_onnx` can export: those whose ``OpDef`` has an ONNX form.
SUPPORTED_OPS = tuple(name for name, opdef in _ops.OPS.items() if opdef.onnx is not None)

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


class OnnxBuilder:
    """Collects ONNX nodes and initializers with names that do not clash with the graph's:
    what an op's ONNX form (:mod:`.onnx_forms`) writes to.

    Attributes:
        graph: the graph being exported. onnx: the ``onnx`` module.
    """

    def __init__(self, graph: Graph, onnx, helper, numpy_helper, reserved):
        self.graph = graph
        self.onnx, self.helper, self.numpy_helper = onnx, helper, numpy_helper
        self.nodes = []
        self.initializers = []
        self.used = set(graph.tensors) | set(reserved)
        self.rename: dict[str, str] = {}
        self._n = 0

    def fresh(self, base: str) -> str:
        """A new tensor name ``base__onnxN`` that clashes with nothing in the model."""
        while True:
            name = f"{base}__onnx{self._n}"
            self._n += 1
            if name not in self.used:
                self.used.add(name)
                return name

    def const(self, base: str, value: np.ndarray) -> str:
        """A new initializer holding ``value``; returns its name."""
        name = self.fresh(base)
        self.initializers.append(self.numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs, outputs, name: str, **attrs):
        """Append the ONNX node ``op(inputs) -> outputs`` with attributes ``attrs``."""
        self.nodes.append(self.helper.make_node(op, list(inputs), list(outputs), name=name,
                                                **attrs))

    def tensor(self, name: str) -> str:
        """The ONNX name of the graph's tensor ``name``."""
        return self.rename.get(name, name)

    def elem_type(self, dtype: str) -> int:
        """The ONNX element type of a numpy dtype name."""
        return _elem_type(self.onnx, dtype)


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
    forms = [_ops.get(node.op, node.name).onnx for node in graph.nodes]
    for node, form in zip(graph.nodes, forms):  # fail before building anything
        if form is None:
            raise UnsupportedOpError(
                f"to_onnx: op {node.op!r} (node {node.name!r}) has no ONNX export; supported "
                f"ops: {', '.join(SUPPORTED_OPS)}. Fused ops come from compiler passes: "
                "export the graph before compiling it")

    public = list(graph.outputs)
    for pub, tname in graph.outputs.items():
        if pub in graph.inputs and tname != pub:
            raise GraphError(f"to_onnx: output {pub!r} has the name of an input but is "
                             f"tensor {tname!r}; ONNX names outputs and inputs in one space")
    b = OnnxBuilder(graph, onnx, helper, numpy_helper, reserved=public)
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
    for node, form in zip(graph.nodes, forms):
        form(b, node, opset)
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
    model = to_onnx(graph, opset=opset)
    sess = onnxruntime_model_session(model.SerializeToString(), threads)
    return sess, {n: n for n in graph.inputs}


def onnxruntime_model_session(model, threads: int | None = None):
    """An ONNX Runtime session of an ONNX model (a file path or serialized bytes) with the
    options of :func:`onnxruntime_session`: every graph optimisation, no spinning pool
    threads, ``threads`` intra-op threads (default ORT's). For timing a model that was
    imported with :func:`blasst_ref.graph.from_onnx` against ORT on the very same file."""
    ort = _import_ort()
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
    model = str(model) if not isinstance(model, (bytes, bytearray)) else bytes(model)
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def run_onnxruntime(graph: Graph, feeds: dict, threads: int | None = None, *,
                    opset: int | None = None) -> dict[str, np.ndarray]:
    """Run the graph once in ONNX Runtime: ``{output name: array}``, like
    :func:`blasst_ref.graph.interpret` (feeds are checked the same way). Builds a new
    session per call: for timing, keep one from :func:`onnxruntime_session`."""
    feeds = check_feeds(graph, feeds)
    sess, names = onnxruntime_session(graph, threads, opset=opset)
    results = sess.run(None, {names[k]: v for k, v in feeds.items()})
    return dict(zip(graph.outputs, results))
