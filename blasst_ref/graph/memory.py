"""Static memory planning: one arena, liveness intervals, best-fit placement, in-place reuse.

docs/DESIGN.md §7.3. The planner runs last, on the graph the passes left (planning the
unfused graph would plan buffers that fusion removes), and is a pure function of that
graph's schedule: the nodes of ``graph.nodes`` in order. Node ``s`` runs at **step** ``s``.

Vocabulary:

* **alias class**: a tensor and its views (outputs of ops with :attr:`OpDef.view`, i.e.
  Reshape, transitively). A view never has bytes of its own: it reads its root's storage,
  so each of its reads keeps the root alive.
* **external** tensors are not planned: a class rooted at an input or a constant (its
  storage belongs to the caller or to the graph), and a class that holds a graph output
  (outputs are fresh arrays on every call, so that a later call never overwrites an array
  an earlier call returned).
* **buffer**: a region of the arena holding one alias class -- or several in sequence, when
  a node writes its output *in place* of an operand that dies at that node.
* **liveness** of a buffer: from the step that first writes it to the last step that reads
  any of its tensors, inclusive. Two buffers live at a common step must not share a byte:
  that is the invariant :func:`check_plan` checks.

Placement is online, in execution order, best-fit (as in tinygrad's ``memory_planner`` and
oneDNN Graph Compiler's buffer scheduler): at step ``s`` the buffers written at ``s`` take the
smallest free hole that fits (else the arena grows at its end), then the buffers whose last
read is at ``s`` give their bytes back. Placing before freeing is what keeps a node's output
off its own operands -- unless the op may write in place of one of them, which the planner
decides explicitly.

``enabled=False`` is the naive baseline: every planned class gets its own slot, one after the
other. ``naive_bytes`` is that baseline's size, so ``summary()`` reads "memory reduced from
naive to peak".
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from types import MappingProxyType

from . import ops as _ops
from .ir import Graph

__all__ = ["Buffer", "MemoryPlan", "check_plan", "format_bytes", "plan_memory"]


@dataclass(frozen=True)
class Buffer:
    """A region ``[offset, offset + nbytes)`` of the arena, live over steps ``[first, last]``.

    Attributes:
        tensors: the tensors stored here: an alias root, its views, and the tensors written
            in place over it later (with their views), in the order they are created.
        offset: byte offset in the arena (a multiple of the plan's ``alignment``).
        nbytes: size of the data (every tensor here has this size).
        first: the step that writes the buffer first.
        last: the last step that reads any of its tensors (``first`` when nothing reads it:
            the output of a dead-end node is still written, so it still needs its bytes).
    """

    tensors: tuple[str, ...]
    offset: int
    nbytes: int
    first: int
    last: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True)
class MemoryPlan:
    """Where every intermediate tensor lives: the result of :func:`plan_memory`.

    Attributes:
        buffers: the arena's buffers, in the order they are first written.
        offsets: every arena tensor -> its byte offset (views and in-place tensors have the
            offset of their buffer).
        external: the ``"value"`` tensors that are not in the arena: graph outputs and every
            tensor aliasing one (allocated fresh per call), and views of inputs/constants.
        peak_bytes: the arena's size.
        naive_bytes: the arena without reuse: every planned non-view intermediate in its own
            slot of ``nbytes`` rounded up to ``alignment`` (external tensors and views do not
            count). ``peak_bytes <= naive_bytes`` always; equal when ``enabled`` is False.
        enabled: whether buffers were reused (False: the naive baseline).
        inplace: output tensor -> the operand whose buffer it took.
        alignment: the alignment of every offset, in bytes.
    """

    buffers: tuple[Buffer, ...]
    offsets: Mapping[str, int]
    external: frozenset[str]
    peak_bytes: int
    naive_bytes: int
    enabled: bool
    inplace: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    alignment: int = 64

    def summary(self) -> str:
        """One line, e.g. ``"memory reduced from 12.0 MiB to 3.1 MiB, to 26% (-74%), in 7
        buffers, 3 in place"``: peak / naive, and the change from naive to peak."""
        n = len(self.buffers)
        buffers = f"{n} buffer{'' if n == 1 else 's'}"
        if not self.enabled:
            return (f"memory planning off: {format_bytes(self.peak_bytes)} in {buffers} "
                    f"(naive {format_bytes(self.naive_bytes)})")
        if not self.buffers:
            return "memory: no intermediate tensors to plan"
        ratio = ""
        if self.naive_bytes:
            share = self.peak_bytes / self.naive_bytes
            ratio = f", to {share:.0%} ({share - 1:+.0%}),"
        return (f"memory reduced from {format_bytes(self.naive_bytes)} to "
                f"{format_bytes(self.peak_bytes)}{ratio} in {buffers}, "
                f"{len(self.inplace)} in place")

    def plot(self, ax=None, graph: Graph | None = None):
        """The arena over time: x = execution step, y = offset in the arena (in MiB, KiB or
        bytes, whichever suits the peak), one rectangle per buffer from its first to its last
        step, labelled with its first tensor (and how many more it holds). ``graph`` (the
        planned graph) names the steps by their ops. Returns the matplotlib Axes: a new
        figure's when ``ax`` is None, laid out (constrained layout) so that a plain
        ``savefig`` keeps the rotated op names and the axis labels."""
        import matplotlib  # lazily: planning must not need matplotlib
        from matplotlib.patches import Rectangle

        if ax is None:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots(figsize=(9, 4.5), layout="constrained")
        unit, scale = _plot_unit(self.peak_bytes)
        colors = matplotlib.colormaps["tab20"]
        for k, b in enumerate(self.buffers):
            ax.add_patch(Rectangle((b.first - 0.4, b.offset / scale), b.last - b.first + 0.8,
                                   b.nbytes / scale, facecolor=colors(k % 20),
                                   edgecolor="black", linewidth=0.6))
            more = f" +{len(b.tensors) - 1}" if len(b.tensors) > 1 else ""
            ax.text((b.first + b.last) / 2, (b.offset + b.nbytes / 2) / scale,
                    b.tensors[0] + more, ha="center", va="center", fontsize=7, clip_on=True)
        steps = len(graph.nodes) if graph is not None else \
            max((b.last + 1 for b in self.buffers), default=0)
        ax.axhline(self.peak_bytes / scale, color="gray", linestyle="--", linewidth=0.8)
        ax.set_xlim(-0.5, max(steps, 1) - 0.5)
        ax.set_ylim(0, max(self.peak_bytes, 1) / scale * 1.05)
        if graph is not None:
            ax.set_xticks(range(steps))
            ax.set_xticklabels([n.op for n in graph.nodes], rotation=90, fontsize=7)
        ax.set_xlabel("execution step")
        ax.set_ylabel(f"arena offset ({unit})")
        ax.set_title(self.summary(), fontsize=9)
        return ax


def format_bytes(n: int) -> str:
    """``512 B``, ``1.5 KiB``, ``12.0 MiB``, ..."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


def _plot_unit(nbytes: int) -> tuple[str, int]:
    """The unit of the plot's y axis for an arena of ``nbytes``: ``(name, bytes per unit)``."""
    for name, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return name, scale
    return "bytes", 1


def _round_up(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


# ---------------------------------------------------------------------------- liveness
@dataclass
class _Liveness:
    """What the schedule says about every tensor (no decision made yet)."""

    root: dict[str, str]           # tensor -> the tensor whose storage it uses (a view's root)
    members: dict[str, list[str]]  # root -> its alias class, in creation order
    write: dict[str, int]          # root value tensor -> the step that writes it
    last: dict[str, int]           # root -> the last step reading any tensor of its class
    external: set[str]             # roots whose class is not planned


def _liveness(graph: Graph) -> _Liveness:
    root = {name: name for name in graph.tensors}
    write: dict[str, int] = {}
    last: dict[str, int] = {}
    for s, node in enumerate(graph.nodes):
        for t in node.inputs:  # a read through a view is a read of the root's storage
            last[root[t]] = s
        if _ops.get(node.op, node.name).view:
            for out in node.outputs:
                root[out] = root[node.inputs[0]]
        else:
            for out in node.outputs:
                write[out] = last[out] = s
    members: dict[str, list[str]] = {}
    for name in graph.tensors:  # dict order = creation order
        members.setdefault(root[name], []).append(name)
    external = {r for r in members if graph.tensors[r].kind != "value"}
    external |= {root[t] for t in graph.outputs.values()}
    return _Liveness(root, members, write, last, external)


# ---------------------------------------------------------------------------- buffers
@dataclass
class _Buf:  # a Buffer while it is being built (mutable)
    tensors: list[str]
    nbytes: int
    first: int
    last: int
    offset: int = 0


def _buffers(graph: Graph, live: _Liveness, inplace: bool) -> tuple[list[_Buf], dict]:
    """One buffer per planned alias class, except that a class written in place of an
    operand joins that operand's buffer. Returns the buffers and ``{output: operand}``."""
    bufs: list[_Buf] = []
    buf_of: dict[str, _Buf] = {}  # planned root -> its buffer
    taken: dict[str, str] = {}
    for s, node in enumerate(graph.nodes):
        opdef = _ops.get(node.op, node.name)
        if opdef.view:
            continue
        for out in node.outputs:
            if out in live.external:
                continue
            donor = _donor(graph, live, buf_of, s, node, opdef, out) if inplace else None
            if donor is not None:
                buf = buf_of[live.root[donor]]
                buf.tensors += live.members[out]
                buf.last = max(buf.last, live.last[out])
                taken[out] = donor
            else:
                buf = _Buf(list(live.members[out]), graph.tensors[out].nbytes, s, live.last[out])
                bufs.append(buf)
            buf_of[out] = buf
    return bufs, taken


def _donor(graph, live, buf_of, s, node, opdef, out) -> str | None:
    """The operand whose buffer ``out`` may take at step ``s``, or None."""
    if len(node.outputs) != 1:
        return None  # two outputs could not share one donor; keep it simple
    info = graph.tensors[out]
    operand_bufs = [buf_of.get(live.root[t]) for t in node.inputs]
    for i in opdef.inplace_inputs(node.attrs, len(node.inputs)):
        buf, t = operand_bufs[i], graph.tensors[node.inputs[i]]
        if buf is None:
            continue  # an input, a constant or (a view of) an output: not ours to overwrite
        if buf.last != s:
            continue  # some tensor of that buffer is still read after this node
        if sum(b is buf for b in operand_bufs) != 1:
            continue  # read through another operand too (x + x, x + view of x): conservative
        if buf.nbytes != info.nbytes or t.dtype != info.dtype or t.size != info.size:
            continue  # element i of the output must sit exactly where element i of t was
        return node.inputs[i]
    return None


# ---------------------------------------------------------------------------- placement
def _place_best_fit(bufs: list[_Buf], n_steps: int, alignment: int) -> int:
    """Give every buffer an offset (best-fit, online, in execution order); returns the peak."""
    starting: list[list[_Buf]] = [[] for _ in range(n_steps)]
    ending: list[list[_Buf]] = [[] for _ in range(n_steps)]
    for b in bufs:
        starting[b.first].append(b)
        ending[b.last].append(b)
    holes: list[list[int]] = []  # [offset, size], sorted by offset, never two adjacent
    end = 0                      # the arena's high-water mark: the peak so far
    for s in range(n_steps):
        # place first: what step s writes must not overlap anything step s reads
        for b in starting[s]:
            size = _round_up(b.nbytes, alignment)
            fits = [h for h in holes if h[1] >= size]
            if size == 0:
                b.offset = 0  # occupies nothing
            elif fits:
                hole = min(fits, key=lambda h: (h[1], h[0]))  # best fit; lowest offset on ties
                b.offset = hole[0]
                hole[0] += size
                hole[1] -= size
                if hole[1] == 0:
                    holes.remove(hole)
            elif holes and holes[-1][0] + holes[-1][1] == end:
                b.offset = holes.pop()[0]  # the last hole touches the end: grow from there
                end = b.offset + size
            else:
                b.offset = end
                end += size
        # then free what dies here
        for b in ending[s]:
            size = _round_up(b.nbytes, alignment)
            if size:
                _free(holes, b.offset, size)
    return end


def _free(holes: list[list[int]], offset: int, size: int) -> None:
    """Return ``[offset, offset + size)`` to the sorted hole list, merging with neighbours."""
    k = bisect.bisect_left(holes, [offset, size])
    holes.insert(k, [offset, size])
    if k + 1 < len(holes) and offset + size == holes[k + 1][0]:  # merge with the next
        holes[k][1] += holes.pop(k + 1)[1]
    if k > 0 and holes[k - 1][0] + holes[k - 1][1] == offset:   # merge with the previous
        holes[k - 1][1] += holes.pop(k)[1]


# ---------------------------------------------------------------------------- the planner
def plan_memory(graph: Graph, enabled: bool = True, alignment: int = 64,
                inplace: bool = True, *, verbose: bool = False) -> MemoryPlan:
    """Plan the intermediate tensors of ``graph`` into one arena.

    Args:
        graph: a graph whose ``nodes`` are the execution order (as every Graph's are).
        enabled: reuse memory (best fit over liveness intervals); False gives every planned
            tensor its own slot -- the baseline ``naive_bytes`` measures.
        alignment: every offset is a multiple of it and every buffer takes a multiple of it.
        inplace: let an op write its output over an operand that dies at that node, where
            the op allows it (:meth:`OpDef.inplace_inputs`) and sizes and dtypes match.
        verbose: print :meth:`MemoryPlan.summary`.

    Returns:
        A :class:`MemoryPlan`. The graph is not changed.
    """
    if not isinstance(graph, Graph):
        raise TypeError(f"plan_memory() needs a blasst_ref.graph.Graph, got "
                        f"{type(graph).__name__}")
    if not isinstance(alignment, int) or alignment <= 0:
        raise ValueError(f"alignment must be a positive int (bytes), got {alignment!r}")
    live = _liveness(graph)
    bufs, taken = _buffers(graph, live, inplace=enabled and inplace)
    naive = sum(_round_up(graph.tensors[r].nbytes, alignment) for r in live.write
                if r not in live.external)
    if enabled:
        peak = _place_best_fit(bufs, len(graph.nodes), alignment)
    else:  # the baseline: one slot each, one after the other (no in-place either)
        peak = 0
        for b in bufs:
            b.offset, peak = peak, peak + _round_up(b.nbytes, alignment)
    buffers = tuple(Buffer(tuple(b.tensors), b.offset, b.nbytes, b.first, b.last) for b in bufs)
    plan = MemoryPlan(
        buffers=buffers,
        offsets=MappingProxyType({t: b.offset for b in buffers for t in b.tensors}),
        external=frozenset(t for t, r in live.root.items()
                           if r in live.external and graph.tensors[t].kind == "value"),
        peak_bytes=peak, naive_bytes=naive, enabled=bool(enabled),
        inplace=MappingProxyType(taken), alignment=alignment)
    if verbose:
        print(plan.summary())
    return plan


# ---------------------------------------------------------------------------- the checker
def check_plan(graph: Graph, plan: MemoryPlan) -> None:
    """Verify ``plan`` against ``graph``; raise AssertionError naming what is wrong.

    Checks, independently of how the plan was made: every value tensor is either in the
    arena or external, and inputs, constants, outputs and whatever aliases an output are
    not in the arena; views sit where their roots do; offsets are aligned and buffers lie
    inside ``peak_bytes``; each buffer's ``[first, last]`` covers every write and read of its
    tensors; a tensor written over another in the same buffer is written after the last read
    of the one before (or at that read, by an op allowed to work in place); and no two
    buffers live at a common step share a byte.
    """
    def fail(msg: str):
        raise AssertionError(f"memory plan of graph {graph.name!r}: {msg}")

    live = _liveness(graph)
    where: dict[str, int] = {}  # tensor -> index of its buffer
    for k, b in enumerate(plan.buffers):
        for t in b.tensors:
            if t not in graph.tensors:
                fail(f"buffer #{k} holds {t!r}, which is no tensor of the graph")
            if t in where:
                fail(f"tensor {t!r} is in buffers #{where[t]} and #{k}")
            where[t] = k
            if plan.offsets.get(t) != b.offset:
                fail(f"offsets[{t!r}] = {plan.offsets.get(t)} but its buffer #{k} is at "
                     f"{b.offset}")
    if set(plan.offsets) != set(where):
        fail(f"offsets name tensors in no buffer: {sorted(set(plan.offsets) - set(where))}")

    # what may and may not be in the arena
    outputs = set(graph.outputs.values())
    for t, info in graph.tensors.items():
        if info.kind != "value":
            if t in where or t in plan.external:
                fail(f"{info.kind} {t!r} is planned (in the arena or external)")
            continue
        if (t in where) == (t in plan.external):
            fail(f"value tensor {t!r} is " + ("both in the arena and external" if t in where
                                              else "neither in the arena nor external"))
        if t in where and (live.root[t] in live.external or t in outputs):
            fail(f"tensor {t!r} is in the arena but is (an alias of) an output, input or "
                 "constant")
    for node in graph.nodes:
        if _ops.get(node.op, node.name).view:
            src, out = node.inputs[0], node.outputs[0]
            if where.get(src, -1) != where.get(out, -1):
                fail(f"view {out!r} ({node.op} {node.name!r}) is not stored with {src!r}")

    for out, donor in plan.inplace.items():
        if out not in where or where[out] != where.get(donor):
            fail(f"inplace says {out!r} took the buffer of {donor!r}, but they are not stored "
                 "together")

    # geometry
    for k, b in enumerate(plan.buffers):
        if b.offset % plan.alignment:
            fail(f"buffer #{k} {b.tensors} at offset {b.offset} is not aligned to "
                 f"{plan.alignment} bytes")
        if b.offset < 0 or b.end > plan.peak_bytes:
            fail(f"buffer #{k} {b.tensors} [{b.offset}, {b.end}) lies outside the arena of "
                 f"{plan.peak_bytes} bytes")
        if any(graph.tensors[t].nbytes > b.nbytes for t in b.tensors):
            fail(f"buffer #{k} of {b.nbytes} bytes is too small for one of {b.tensors}")

    # liveness: [first, last] covers every write and read; in-place successions are legal
    reads: dict[str, list[tuple[int, int]]] = {}  # root -> [(step, operand index)]
    for s, node in enumerate(graph.nodes):
        for j, t in enumerate(node.inputs):
            reads.setdefault(live.root[t], []).append((s, j))
    for k, b in enumerate(plan.buffers):
        gens = sorted((live.write[t], t) for t in b.tensors if live.root[t] == t)
        if not gens:
            fail(f"buffer #{k} holds only views {b.tensors}")
        steps = [s for s, _ in gens] + [s for _, t in gens for s, _ in reads.get(t, [])]
        if b.first > min(steps) or b.last < max(steps):
            fail(f"buffer #{k} {b.tensors} is live over [{b.first}, {b.last}] but used over "
                 f"[{min(steps)}, {max(steps)}]")
        for (_, prev), (s, nxt) in pairwise(gens):
            node = graph.nodes[s]
            late = [r for r, _ in reads.get(prev, []) if r > s]
            if late:
                fail(f"{nxt!r} overwrites {prev!r} (buffer #{k}) at step {s}, but step "
                     f"{late[0]} still reads {prev!r}")
            here = [j for r, j in reads.get(prev, []) if r == s]
            allowed = _ops.get(node.op).inplace_inputs(node.attrs, len(node.inputs))
            if len(here) > 1 or (here and here[0] not in allowed):
                fail(f"{node.op} {node.name!r} writes {nxt!r} over its operand {prev!r} "
                     f"(buffer #{k}), which it may not do in place")

    # the invariant: buffers live at a common step never share a byte
    for i, a in enumerate(plan.buffers):
        for j in range(i + 1, len(plan.buffers)):
            b = plan.buffers[j]
            if a.first <= b.last and b.first <= a.last and \
                    a.offset < b.end and b.offset < a.end:
                fail(f"buffers #{i} {a.tensors} (steps [{a.first}, {a.last}], bytes "
                     f"[{a.offset}, {a.end})) and #{j} {b.tensors} (steps [{b.first}, "
                     f"{b.last}], bytes [{b.offset}, {b.end})) are live together and overlap")
