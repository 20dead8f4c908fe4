"""``compile(graph)``: passes, a memory plan and a list of kernel calls -- the executor.

:func:`compile` runs the passes of :mod:`.passes` (each switchable), plans the memory of what
is left (:mod:`.memory`) and turns every node into one *step*: a Python closure over the
kernel that runs the op and the arrays it reads and writes. Intermediates are views into
one preallocated arena at the planner's offsets, made once here; graph outputs are fresh
arrays on every call (a returned array is never overwritten by a later call). A call is
then: check the feeds, walk the steps, return the outputs.

The kernels: ``PackedMatMul`` -> :func:`.kernels.matmul_packed` (blocked, on weights packed
at compile time, post-ops before the store); ``FusedMatMul`` on two activations -> numpy's
matmul and :func:`.kernels.matmul_epilogue`; ``LayerNorm`` and last-axis ``Softmax`` ->
their Numba kernels; ``QMatMul`` -> :class:`.int8_kernels.QMatMulPlan` (u8 x s8 -> s32,
built once here); a per-tensor float32 ``Quantize`` to u8/s8 -> :func:`.int8_kernels.quantize`'s
one-pass kernel; ``Attention`` -> :func:`blasst_ref.attention`; element-wise ops -> numpy
ufuncs writing straight into their planned buffer; anything else -> the op's numpy meaning,
copied into its buffer.

A compiled graph keeps state (the arena), so one instance must not run two calls at once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..cpu import _blas_single_threaded
from . import kernels as K
from . import ops as _ops
from . import export_fusion as X
from . import passes as P
from .interpreter import check_feeds
from .ir import Graph, GraphError, Node
from . import memory as _memory
from .memory import MemoryPlan

__all__ = ["CompiledGraph", "compile"]

_ACT_CODES = {"none": K.ACT_NONE, "relu": K.ACT_RELU, "gelu": K.ACT_GELU,
              "gelu_tanh": K.ACT_GELU_TANH, "tanh": K.ACT_TANH, "exp": K.ACT_EXP}
_STATS = "__attention_stats__"  # env key: AttentionStats of this call, per Attention node
_UFUNCS = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
           "Tanh": np.tanh, "Exp": np.exp}


@dataclass(frozen=True)
class Stage:
    """One compiler pass as it ran: its name and the graph it produced."""

    name: str
    graph: Graph


def compile(graph: Graph, *, fuse: bool = True, fold_constants: bool = True,
            matmul_kernel: str = "packed", plan_memory: bool = True, inplace: bool = True,
            int8: bool = True,
            attention_thresh: float = 0.0, attention_backend: str = "cpu",
            attention_block: tuple[int | None, int | None] = (None, None),
            check: bool = False) -> CompiledGraph:
    """Compile ``graph`` into a callable :class:`CompiledGraph`.

    Args:
        graph: the graph to compile (left unchanged: passes build new graphs).
        fuse: attention fusion (-> one :func:`blasst_ref.attention` call), MatMul post-op
            fusion and layout-op merging.
        fold_constants: evaluate constant subgraphs once, now.
        int8: lower quantized MatMuls (``Dequantize -> MatMul -> post-ops -> Quantize``, as
            :func:`~blasst_ref.graph.quantize.quantize_graph` writes them) to ``QMatMul``
            kernels: u8 x s8 -> s32 with VNNI where the CPU has it. Needs ``fuse``.
        matmul_kernel: how a MatMul on a constant weight runs. ``"packed"`` (default):
            constant-weight preprocessing packs every weight into column panels now
            (:func:`~.passes.pack_weights`), and a blocked Numba kernel applies the
            post-ops to each block before its store (:func:`~.kernels.matmul_packed`);
            BLAS stays single-threaded for the whole call, so Numba's threads are the only
            pool. ``"blas"``: the product through numpy's multi-threaded BLAS straight into
            its buffer, then the post-ops in one Numba pass -- two thread pools, which
            trade the cores badly (docs/BENCHMARKS.md, "graph").
        plan_memory: best-fit arena with buffer reuse; off, every intermediate gets its own
            buffer (the naive baseline). ``inplace``: element-wise ops may overwrite an
            input that dies there.
        attention_thresh: BLASST's threshold for the fused attention (``0`` = exact dense).
        attention_backend: ``"cpu"`` or ``"reference"`` (any host backend of
            :func:`blasst_ref.attention`).
        attention_block: ``(block_q, block_k)`` tile sizes of the fused attention
            (``None``: :mod:`blasst_ref.tiling`'s defaults); smaller tiles skip more.
        check: also verify the memory plan (no two live buffers overlap) now.

    Returns:
        A :class:`CompiledGraph`; call it with the graph's inputs as keyword arguments.
    """
    if not isinstance(graph, Graph):
        raise TypeError(f"compile() needs a blasst_ref.graph.Graph, got {type(graph).__name__}")
    if not 0.0 <= float(attention_thresh) < 1.0:
        raise ValueError(f"attention_thresh must be in [0, 1), got {attention_thresh}")
    if matmul_kernel not in ("blas", "packed"):
        raise ValueError(f"matmul_kernel must be 'blas' or 'packed', got {matmul_kernel!r}")
    if attention_backend not in ("cpu", "reference"):
        raise ValueError(f"attention_backend must be 'cpu' or 'reference', "
                         f"got {attention_backend!r}")
    if not graph.outputs:
        raise GraphError(f"graph {graph.name!r} has no outputs: declare them with g.output()")
    stages = [Stage("input", graph)]

    def run(name: str, fn: Callable[[Graph], Graph]):
        stages.append(Stage(name, fn(stages[-1].graph)))

    run("prune", Graph.prune)
    if fold_constants:
        run("fold_constants", P.fold_constants)
    if fuse:
        block_q, block_k = attention_block
        run("fuse_gelu_erf", X.fuse_gelu_erf)
        run("fuse_layernorm", X.fuse_layernorm)
        run("fuse_export_attention", lambda g: X.fuse_export_attention(
            g, float(attention_thresh), block_q, block_k))
        run("fuse_attention", lambda g: P.fuse_attention(g, float(attention_thresh),
                                                         block_q, block_k))
        run("fuse_matmul", P.fuse_matmul)
        if int8:
            run("lower_int8", P.lower_int8)
        run("merge_layout_ops", P.merge_layout_ops)
    if matmul_kernel == "packed":
        run("pack_weights", P.pack_weights)
    final = stages[-1].graph
    plan = _memory.plan_memory(final, enabled=plan_memory, inplace=inplace)
    if check:
        _memory.check_plan(final, plan)
    return CompiledGraph(graph, final, plan, stages, attention_backend)


class CompiledGraph:
    """A compiled graph: call it with the inputs as keyword arguments.

    Attributes:
        source: the graph as given. graph: the graph after the passes.
        stages: every pass with the graph it produced (print them to see what each did).
        memory: the :class:`~blasst_ref.graph.memory.MemoryPlan` (``peak_bytes``,
            ``naive_bytes``).
        times: seconds per step of the last call (``step_names`` names them).
    """

    def __init__(self, source: Graph, graph: Graph, plan: MemoryPlan, stages: list[Stage],
                 attention_backend: str):
        self.source = source
        self.graph = graph
        self.memory = plan
        self.stages = stages
        self.attention_backend = attention_backend
        self.arena = np.empty(plan.peak_bytes, dtype=np.uint8)
        self._arena_views = {name: _view(self.arena, plan.offsets[name], graph.tensors[name])
                             for name in plan.offsets}
        self._steps = [_make_step(node, graph, attention_backend) for node in graph.nodes]
        self.step_names = [f"{n.op} {n.name}" for n in graph.nodes]
        # graph outputs (and what they view) are fresh arrays on every call; views of
        # inputs/constants are "borrowed" and copied on the way out
        views = {n.outputs[0]: n.inputs[0] for n in graph.nodes if _ops.get(n.op).view}
        self._fresh_each_call = [
            name for n in graph.nodes if not _ops.get(n.op).view for name in n.outputs
            if name not in self._arena_views]
        self._borrowed = set()
        for t in graph.outputs.values():
            root = t
            while root in views:
                root = views[root]
            if root in graph.inputs or root in graph.constants:
                self._borrowed.add(t)
        # With the packed matmul kernel every parallel loop is a Numba one: BLAS is kept to
        # one thread for the whole call, so that its idle pool threads never spin against
        # Numba's on the same cores (see docs/BENCHMARKS.md, "graph").
        self._threads = _blas_single_threaded if "PackedMatMul" in graph.count_ops() \
            else contextlib.nullcontext
        #: ``{Attention node name: AttentionStats}`` of the last call (skip statistics).
        self.attention_stats: dict = {}
        #: seconds per step of the last call
        self.times = np.zeros(len(self._steps))
        self.calls = 0
        #: seconds per step summed over every call but the first (which JIT-compiles the
        #: Numba kernels: it would swamp the mean), and the first call's own
        self.total_times = np.zeros(len(self._steps))
        self.first_times = np.zeros(len(self._steps))

    def __call__(self, **feeds) -> dict[str, np.ndarray]:
        g = self.graph
        env: dict = dict(g.constants)
        env.update(check_feeds(g, feeds))
        env.update(self._arena_views)
        for name in self._fresh_each_call:
            info = g.tensors[name]
            env[name] = np.empty(info.shape, dtype=info.dtype)
        env[_STATS] = {}
        clock = time.perf_counter
        with self._threads():
            for i, step in enumerate(self._steps):
                t0 = clock()
                step(env)
                self.times[i] = clock() - t0
        if self.calls:
            self.total_times += self.times
        else:
            self.first_times[:] = self.times
        self.calls += 1
        self.attention_stats = env[_STATS]
        # an output that is (a view of) an input or a constant must not hand out the
        # caller's or the graph's own array
        return {pub: env[t].copy() if t in self._borrowed else env[t]
                for pub, t in g.outputs.items()}

    # ------------------------------------------------------------------ reporting
    def report(self) -> str:
        """Partitions and fused ops, the memory plan, and per-op time of the calls so far."""
        src, g = self.source.count_ops(), self.graph.count_ops()
        lines = [f"compiled graph {self.graph.name!r}: {sum(src.values())} ops -> "
                 f"{sum(g.values())} kernels"]
        lines.append("  passes: " + " -> ".join(
            f"{s.name} ({len(s.graph.nodes)})" for s in self.stages))
        lines.append("  ops after the passes: " + ", ".join(
            f"{op} x{n}" for op, n in sorted(g.items(), key=lambda kv: -kv[1])))
        n_int8 = g.get("QMatMul", 0)
        if n_int8:
            from .int8_kernels import int8_backend

            n_float = sum(g.get(op, 0) for op in ("MatMul", "FusedMatMul", "PackedMatMul"))
            names = ", ".join(n.name for n in self.graph.nodes if n.op == "QMatMul")
            lines.append(f"  int8 ({int8_backend()}): {n_int8} QMatMul kernels ({names}); "
                         f"{n_float} matmuls stay float32")
        lines.append("  " + self.memory.summary())
        if self.calls:
            if self.calls > 1:
                mean = self.total_times / (self.calls - 1)
                how = f"mean of the {self.calls - 1} calls after the first"
            else:
                mean = self.first_times
                how = "the first call only: it includes JIT compilation; call again"
            total = mean.sum()
            lines.append(f"  time per call: {total * 1e3:.3f} ms ({how})")
            by_op: dict[str, float] = {}
            for node, t in zip(self.graph.nodes, mean):
                by_op[node.op] = by_op.get(node.op, 0.0) + t
            for op, t in sorted(by_op.items(), key=lambda kv: -kv[1]):
                lines.append(f"    {op:<14} {t * 1e3:9.3f} ms  {100 * t / total:5.1f}%")
        else:
            lines.append("  (call it to see per-op times)")
        for name, st in self.attention_stats.items():
            lines.append(f"  attention {name}: thresh {self._thresh(name):g}, sparsity "
                         f"{st.sparsity:.1%} ({st.skipped_tiles}/{st.visited_tiles} tiles "
                         f"skipped, {st.backend})")
        return "\n".join(lines)

    def _thresh(self, node_name: str) -> float:
        return next(n.attrs["thresh"] for n in self.graph.nodes if n.name == node_name)

    def plot_memory(self, ax=None):
        """The arena over the execution order: one rectangle per buffer (matplotlib Axes)."""
        return self.memory.plot(ax=ax, graph=self.graph)

    def __repr__(self) -> str:
        return (f"CompiledGraph({self.graph.name!r}, {len(self.graph.nodes)} kernels, "
                f"arena {self.memory.peak_bytes} bytes)")


def _view(arena: np.ndarray, offset: int, info) -> np.ndarray:
    return np.ndarray(info.shape, dtype=info.dtype, buffer=arena, offset=offset)


def _rows(a: np.ndarray) -> np.ndarray:
    """``(..., N)`` as a C-contiguous ``(M, N)`` view (a copy only if not contiguous)."""
    return np.ascontiguousarray(a).reshape(-1, a.shape[-1]) if a.ndim != 2 else \
        np.ascontiguousarray(a)


def _make_step(node: Node, g: Graph, attention_backend: str) -> Callable[[dict], None]:
    """The closure that runs ``node`` with arrays from the environment."""
    ins, out, attrs, op = node.inputs, node.outputs[0], node.attrs, node.op
    out_shape = g.tensors[out].shape

    if op == "PackedMatMul":
        panels = g.constants[ins[1]]
        pw = K.PackedWeight(panels, panels.shape[1], attrs["n"], panels.shape[2])
        act = _ACT_CODES[attrs["act"]]
        nb, nr = attrs["has_bias"], attrs["has_residual"]

        def step(env):
            a = env[ins[0]]
            bias = env[ins[2]].reshape(-1) if nb else None
            res = _rows(env[ins[-1]]) if nr else None
            K.matmul_packed(_rows(a), pw, bias, act, res, env[out].reshape(-1, pw.n))
        return step

    if op == "FusedMatMul":
        # The product through BLAS (multi-threaded, straight into the planned buffer), then
        # bias, activation and residual in one serial Numba pass over it (see
        # kernels.matmul_epilogue's `parallel`) -- instead of numpy's one pass and one new
        # array per post-op.
        act = _ACT_CODES[attrs["act"]]
        nb, nr = attrs["has_bias"], attrs["has_residual"]
        b_is_weight = ins[1] in g.constants and len(g.tensors[ins[1]].shape) == 2
        n = out_shape[-1]

        def step(env):
            o = env[out]
            res = env[ins[-1]] if nr else None
            a, b = env[ins[0]], env[ins[1]]
            if b_is_weight:  # (..., K) @ (K, N) is one 2-D product over the rows
                a = _rows(a)
            # the product must not land on the residual before the epilogue has read it
            y = np.matmul(a, b) if nr and np.shares_memory(o, res) else \
                np.matmul(a, b, out=o.reshape(a.shape[:-1] + (n,)))
            bias = env[ins[2]].reshape(-1) if nb else None
            K.matmul_epilogue(y.reshape(-1, n), bias, act, _rows(res) if nr else None,
                              o.reshape(-1, n), parallel=False)
        return step

    if op == "QMatMul":
        # u8 x s8 -> s32 (VNNI where the CPU has it), compensation, rescale, post-ops and
        # requantization in one kernel; the weight is packed for vpdpbusd here, once.
        from . import int8_kernels as Q8

        pw = Q8.pack_int8_weight(g.constants[ins[1]], attrs["w_scale"])
        nb, nr = attrs["has_bias"], attrs["has_residual"]
        plan = Q8.QMatMulPlan(pw, attrs["a_scale"], attrs["a_zero_point"],
                              g.constants[ins[2]].reshape(-1) if nb else None,
                              _ACT_CODES[attrs["act"]], attrs["out_scale"],
                              attrs["out_zero_point"])
        n = out_shape[-1]
        if nr:
            def step(env):
                plan(_rows(env[ins[0]]), residual=_rows(env[ins[-1]]),
                     out=env[out].reshape(-1, n))
            return step

        def step(env):  # the common case, kept to one call
            plan(_rows(env[ins[0]]), None, env[out].reshape(-1, n))
        return step

    if op == "Quantize" and attrs["axis"] is None and attrs["dtype"] in ("uint8", "int8") \
            and g.tensors[ins[0]].dtype == "float32":
        # per-tensor float32 -> u8/s8 (an int8 graph's entry): one compiled pass, bit for
        # bit ops.quantize_array, instead of numpy's five passes and temporaries
        from . import int8_kernels as Q8

        lo, hi = _ops.INT_RANGES[attrs["dtype"]]
        scale, zp = np.float32(attrs["scale"]), int(attrs["zero_point"])

        def step(env):
            Q8._quantize_run(np.ascontiguousarray(env[ins[0]]).reshape(-1),
                             env[out].reshape(-1), scale, zp, lo, hi)
        return step

    if op == "MatMul":
        if ins[1] in g.constants and len(g.tensors[ins[1]].shape) == 2:
            n = out_shape[-1]
            # (..., K) @ (K, N): one 2-D BLAS call over all rows, not one per batch index
            return lambda env: np.matmul(_rows(env[ins[0]]), env[ins[1]],
                                         out=env[out].reshape(-1, n))
        return lambda env: np.matmul(env[ins[0]], env[ins[1]], out=env[out])

    if op == "LayerNorm":
        eps = attrs["eps"]

        def step(env):
            o = env[out]
            K.layernorm(_rows(env[ins[0]]), env[ins[1]], env[ins[2]], eps,
                        o.reshape(-1, o.shape[-1]))
        return step

    if op == "Softmax" and attrs["axis"] == len(out_shape) - 1:
        def step(env):
            o = env[out]
            K.softmax_lastaxis(_rows(env[ins[0]]), o.reshape(-1, o.shape[-1]))
        return step

    if op == "Relu":
        return lambda env: np.maximum(env[ins[0]], env[ins[0]].dtype.type(0), out=env[out])

    if op == "Gelu" and attrs["approximate"] == "none":
        def step(env):
            K.gelu(env[ins[0]].reshape(-1), env[out].reshape(-1))
        return step

    if op in _UFUNCS:
        ufunc = _UFUNCS[op]
        return lambda env: ufunc(*(env[i] for i in ins), out=env[out])

    if op == "Reshape":
        shape = attrs["shape"]

        def step(env):
            env[out] = env[ins[0]].reshape(shape)
        return step

    if op == "Transpose":
        perm = attrs["perm"]
        return lambda env: np.copyto(env[out], np.transpose(env[ins[0]], perm))

    if op == "Attention":
        from ..api import attention

        def step(env):
            q, k, v = (np.ascontiguousarray(env[i]) for i in ins)
            o, stats = attention(q, k, v, attrs["thresh"], causal=attrs["causal"],
                                 scale=attrs["scale"], block_q=attrs["block_q"],
                                 block_k=attrs["block_k"], backend=attention_backend,
                                 return_stats=True)
            np.copyto(env[out], o)
            env[_STATS][node.name] = stats
        return step

    if op == "MaskedAttention":
        def step(env):
            q, k, v, mask = (np.ascontiguousarray(env[i]) for i in ins)
            o, stats = X.masked_attention(q, k, v, mask, scale=attrs["scale"],
                                          thresh=attrs["thresh"],
                                          zero_nan_rows=attrs["zero_nan_rows"],
                                          block_q=attrs["block_q"], block_k=attrs["block_k"],
                                          backend=attention_backend)
            np.copyto(env[out], o)
            if stats is not None:
                env[_STATS][node.name] = stats
        return step

    evaluate = _ops.get(op).evaluate

    def step(env):  # any other op: its numpy meaning, copied into the planned buffer
        for name, value in zip(node.outputs, evaluate([env[i] for i in ins], attrs)):
            np.copyto(env[name], np.asarray(value).reshape(g.tensors[name].shape),
                      casting="unsafe")
    return step
