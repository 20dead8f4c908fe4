"""The op-by-op numpy interpreter: the oracle every compiled graph is tested against.

:func:`interpret` walks the nodes in execution order and applies each op's numpy meaning
(:attr:`blasst_ref.graph.ops.OpDef.evaluate`) at the tensors' own dtype: no fusion, no
memory reuse, nothing clever -- which is the point. It is also the "primitive by primitive"
baseline of ``python -m blasst_ref.bench graph``.
"""

from __future__ import annotations

import numpy as np

from . import ops as _ops
from .ir import Graph, GraphError

__all__ = ["check_feeds", "interpret", "trace"]


def check_feeds(graph: Graph, feeds: dict) -> dict[str, np.ndarray]:
    """Validate call-time inputs against the graph's declared inputs.

    Every declared input must be given, nothing else may be, and each must be an array of
    the declared shape and dtype (no silent casts: a float64 array for a float32 input is an
    error; any byte order is read: a non-native one is converted, a copy). Returns ``{name:
    numpy array}``; raises :class:`GraphError` naming the tensor.
    """
    declared = set(graph.inputs)
    missing = [n for n in graph.inputs if n not in feeds]
    extra = sorted(set(feeds) - declared)
    if missing:
        raise GraphError(f"graph {graph.name!r}: missing input(s) {', '.join(missing)}; "
                         f"expected {', '.join(graph.inputs) or 'none'}")
    if extra:
        raise GraphError(f"graph {graph.name!r}: unexpected input(s) {', '.join(extra)}; "
                         f"expected {', '.join(graph.inputs) or 'none'}")
    out = {}
    for name in graph.inputs:
        info = graph.tensors[name]
        value = feeds[name]
        if not isinstance(value, np.ndarray):
            raise GraphError(f"input {name!r} must be a numpy array, got {type(value).__name__}")
        if value.shape != info.shape:
            raise GraphError(f"input {name!r} has shape {value.shape}, the graph declares "
                             f"{info.shape}")
        if value.dtype.name != info.dtype:
            raise GraphError(f"input {name!r} has dtype {value.dtype.name}, the graph declares "
                             f"{info.dtype}")
        if not value.dtype.isnative:  # e.g. big-endian here: the kernels read native
            value = value.astype(value.dtype.newbyteorder("="))
        out[name] = value
    return out


def interpret(graph: Graph, **feeds) -> dict[str, np.ndarray]:
    """Run ``graph`` op by op in numpy; returns ``{output name: array}``.

    Args:
        graph: any :class:`~blasst_ref.graph.Graph`, before or after compiler passes.
        **feeds: one numpy array per graph input, of its declared shape and dtype.

    The outputs share memory with nothing: not with each other, the feeds or the graph.
    """
    env = trace(graph, feeds)
    # independent arrays, as a compiled graph returns: an output that shares memory with
    # an input, a constant or an earlier output (a view of it, or one tensor under two
    # names) is copied
    taken = [env[n] for n in graph.inputs] + list(graph.constants.values())
    out = {}
    for pub, t in graph.outputs.items():
        value = env[t]
        if any(np.may_share_memory(value, other) for other in taken):
            value = value.copy()
        out[pub] = value
        taken.append(value)
    return out


def trace(graph: Graph, feeds: dict) -> dict[str, np.ndarray]:
    """Like :func:`interpret`, but returns *every* tensor: ``{tensor name: array}`` (inputs,
    constants and each node's outputs). Post-training quantization observes ranges with it."""
    env: dict[str, np.ndarray] = dict(graph.constants)
    env.update(check_feeds(graph, feeds))
    for node in graph.nodes:
        results = _ops.get(node.op, node.name).evaluate([env[i] for i in node.inputs],
                                                          node.attrs)
        for name, value in zip(node.outputs, results):
            info = graph.tensors[name]
            env[name] = np.asarray(value).astype(info.dtype, copy=False).reshape(info.shape)
    return env
