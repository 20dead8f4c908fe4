"""``compile(graph)``: passes, a memory plan and a list of kernel calls -- the executor.

:func:`compile` runs the passes of :mod:`.passes` (each switchable), plans the memory of what
is left (:mod:`.memory`) and turns every node into one *step*: a Python closure over the
kernel that runs the op and the arrays it reads and writes. Intermediates are views into
a preallocated arena at the planner's offsets, made once (and reused by call after call);
graph outputs are fresh arrays on every call (a returned array is never overwritten by a
later call, and shares memory with nothing). A call is then: check the feeds, walk the
steps, return the outputs.

Which kernel runs an op is part of the op's ``OpDef`` (:attr:`.ops.OpDef.kernel`, a step
builder of :mod:`.steps`, whose docstring lists them); an op without one runs its numpy
meaning, copied into its buffer.

One compiled graph may be called from several threads at once: each call in flight runs
in an arena of its own, taken from a pool (one arena while calls come one at a time, as
many as calls ever overlapped otherwise).
"""

from __future__ import annotations

import contextlib
import numbers
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from ..numba_utils import blas_single_threaded
from . import ops as _ops
from . import passes as P
from . import steps as S
from .interpreter import check_feeds
from .ir import Graph, GraphError, Node
from . import memory as _memory
from .memory import MemoryPlan

__all__ = ["CompiledGraph", "compile"]

#: the passes that ``fuse=False`` switches off
FUSION_PASSES = ("fuse_gelu_erf", "fuse_layernorm", "fuse_export_attention",
                 "fuse_attention", "fuse_matmul", "lower_int8", "merge_layout_ops")


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
            passes: Mapping[str, bool] | None = None,
            check: bool = False) -> CompiledGraph:
    """Compile ``graph`` into a callable :class:`CompiledGraph`.

    The passes run in the order of :data:`.passes.PIPELINE` (``fold_constants``,
    ``fuse_gelu_erf``, ``fuse_layernorm``, ``fuse_export_attention``, ``fuse_attention``,
    ``fuse_matmul``, ``lower_int8``, ``merge_layout_ops``, ``pack_weights``); ``fuse``, ``fold_constants``, ``int8`` and ``matmul_kernel`` switch
    groups of them, ``passes`` any one.

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
        attention_block: ``(block_q, block_k)`` tile sizes of the fused attention, positive
            integers (``None``: :mod:`blasst_ref.tiling`'s defaults); smaller tiles skip
            more.
        passes: ``{pass name: on}`` for single passes, applied after the switches above
            (``{"fuse_attention": False}`` keeps the attention unfused;
            ``{"lower_int8": True}`` with ``fuse=False`` runs the int8 lowering alone). An
            unknown name is a ValueError that lists the passes.
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
    enabled = {name: True for name in P.PIPELINE}
    enabled["fold_constants"] = bool(fold_constants)
    if not fuse:
        enabled.update(dict.fromkeys(FUSION_PASSES, False))
    if not int8:
        enabled["lower_int8"] = False
    enabled["pack_weights"] = matmul_kernel == "packed"
    enabled.update(_check_passes(passes))
    block_q, block_k = _check_attention_block(attention_block)
    attention = dict(thresh=float(attention_thresh), block_q=block_q, block_k=block_k)
    pass_args = {"fuse_attention": attention, "fuse_export_attention": attention}
    stages = [Stage("input", graph)]
    stages.append(Stage("prune", stages[-1].graph.prune()))
    for name in P.PIPELINE:
        if enabled[name]:
            stages.append(Stage(name, getattr(P, name)(stages[-1].graph,
                                                        **pass_args.get(name, {}))))
    final = stages[-1].graph
    plan = _memory.plan_memory(final, enabled=plan_memory, inplace=inplace)
    if check:
        _memory.check_plan(final, plan)
    return CompiledGraph(graph, final, plan, stages, attention_backend)


def _check_attention_block(block) -> tuple[int | None, int | None]:
    """``attention_block`` of :func:`compile` as Python ints (or None), or a clear error now
    (not at the first call, nor only for graphs that have an attention to fuse)."""
    expected = "attention_block must be (block_q, block_k), each a positive integer or None"
    if not isinstance(block, (tuple, list)):
        raise TypeError(f"{expected}; got {block!r}")
    if len(block) != 2:
        raise ValueError(f"{expected}; got {block!r}")
    for b in block:
        if b is None:
            continue
        if isinstance(b, (bool, np.bool_)) or not isinstance(b, numbers.Integral):
            raise TypeError(f"{expected}; got {block!r}")
        if b <= 0:
            raise ValueError(f"{expected}; got {block!r}")
    return tuple(None if b is None else int(b) for b in block)


def _check_passes(passes) -> dict[str, bool]:
    """``passes`` of :func:`compile` as a dict, or a clear error."""
    if passes is None:
        return {}
    if not isinstance(passes, Mapping):
        raise TypeError(f"passes must be a mapping {{pass name: bool}}, got "
                        f"{type(passes).__name__}")
    for name, on in passes.items():
        if name not in P.PIPELINE:
            raise ValueError(f"passes: unknown pass {name!r}; the passes are "
                             f"{', '.join(P.PIPELINE)}")
        if not isinstance(on, (bool, np.bool_)):
            raise TypeError(f"passes[{name!r}] must be True or False, got {on!r}")
    return {name: bool(on) for name, on in passes.items()}


class CompiledGraph:
    """A compiled graph: call it with the inputs as keyword arguments.

    Calls from several threads at once are safe and give what each call gives alone: each
    call in flight runs in an arena of its own (the statistics below are those of the last
    call to finish).

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
        options = S.StepOptions(attention_backend=attention_backend)
        self._steps = [_make_step(node, graph, options) for node in graph.nodes]
        self.step_names = [f"{n.op} {n.name}" for n in graph.nodes]
        # graph outputs (and what they view) are fresh arrays on every call, never in the
        # arena; an output that shares its storage with an input, a constant or an earlier
        # output (a view of it, or the same tensor under two names) is copied on the way out
        views = {n.outputs[0]: n.inputs[0] for n in graph.nodes if _ops.get(n.op).view}
        self._fresh_each_call = [
            name for n in graph.nodes if not _ops.get(n.op).view for name in n.outputs
            if name not in plan.offsets]
        self._copied_outputs = set()
        returned = set()  # the storage (alias root) of the outputs so far
        for pub, t in graph.outputs.items():
            root = t
            while root in views:
                root = views[root]
            if root in graph.inputs or root in graph.constants or root in returned:
                self._copied_outputs.add(pub)
            returned.add(root)
        # With the packed matmul kernel every parallel loop is a Numba one: BLAS is kept to
        # one thread for the whole call, so that its idle pool threads never spin against
        # Numba's on the same cores (see docs/BENCHMARKS.md, "graph").
        self._threads = blas_single_threaded if "PackedMatMul" in graph.count_ops() \
            else contextlib.nullcontext
        #: ``{Attention node name: AttentionStats}`` of the last call to finish (skip
        #: statistics).
        self.attention_stats: dict = {}
        #: seconds per step of the last call to finish
        self.times = np.zeros(len(self._steps))
        self.calls = 0
        #: seconds per step summed over every call but the first (which JIT-compiles the
        #: Numba kernels: it would swamp the mean), and the first call's own
        self.total_times = np.zeros(len(self._steps))
        self.first_times = np.zeros(len(self._steps))
        self._stats_lock = threading.Lock()  # guards the bookkeeping above
        # the arenas of the calls not in flight (a call takes one, or makes one if none is
        # free: as many exist as calls ever overlapped)
        self._spare_arenas = [self._new_arena()]

    def _new_arena(self) -> tuple[dict, np.ndarray]:
        """A fresh arena for one call in flight: the views of the planned tensors into it,
        and the call's step times."""
        arena = np.empty(self.memory.peak_bytes, dtype=np.uint8)
        views = {name: _view(arena, self.memory.offsets[name], self.graph.tensors[name])
                 for name in self.memory.offsets}
        return views, np.zeros(len(self._steps))

    def __call__(self, **feeds) -> dict[str, np.ndarray]:
        """Run the graph on ``feeds`` (one array per graph input, of its declared shape and
        dtype); returns ``{output name: array}``, fresh arrays of this call. Thread-safe:
        each call in flight has an arena of its own."""
        g = self.graph
        env: dict = dict(g.constants)
        env.update(check_feeds(g, feeds))
        try:  # (list.pop and list.append are atomic)
            arena = self._spare_arenas.pop()
        except IndexError:  # other calls are in flight: this one gets an arena of its own
            arena = self._new_arena()
        views, times = arena
        env.update(views)
        for name in self._fresh_each_call:
            info = g.tensors[name]
            env[name] = np.empty(info.shape, dtype=info.dtype)
        env[S.STATS_KEY] = {}
        clock = time.perf_counter
        try:
            with self._threads():
                for i, step in enumerate(self._steps):
                    t0 = clock()
                    step(env)
                    times[i] = clock() - t0
        except BaseException:
            self._spare_arenas.append(arena)
            raise
        with self._stats_lock:  # report()'s bookkeeping
            # this call's times become `times`; the array they replace goes with the arena,
            # for the next call to write into (no copy)
            self.times, times = times, self.times
            if self.calls:
                self.total_times += self.times
            else:
                self.first_times[:] = self.times
            self.calls += 1
            self.attention_stats = env[S.STATS_KEY]
        self._spare_arenas.append((views, times))
        # no output may hand out the caller's array, the graph's own or another output's
        return {pub: env[t].copy() if pub in self._copied_outputs else env[t]
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


def _make_step(node: Node, g: Graph, options: S.StepOptions) -> Callable[[dict], None]:
    """The closure that runs ``node``: its ``OpDef``'s kernel, else its numpy meaning."""
    opdef = _ops.get(node.op, node.name)
    step = opdef.kernel(node, g, options) if opdef.kernel is not None else None
    return step if step is not None else S.evaluate_step(node, g, opdef.evaluate)
