"""The static memory planner (blasst_ref.graph.memory, docs/DESIGN.md §7.3).

The invariant -- no two buffers live at a common step share a byte -- is checked by
``check_plan`` on random graphs; the plan is *used* by a tiny plan-following executor below
(one poisoned arena, every intermediate a view into it) whose outputs must equal the
interpreter's. Hand-built graphs pin the exact plans of the cases that matter: an
element-wise chain (in place), a diamond (in place must wait), views (they extend their
root's life), outputs and inputs (never in the arena).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from strategies import random_graphs
from helpers import assert_saved_figure_keeps_its_text

from blasst_ref.graph import Graph, interpret
from blasst_ref.graph import ops as graph_ops
from blasst_ref.graph.memory import MemoryPlan, check_plan, format_bytes, plan_memory

MODES = [(True, True), (True, False), (False, True), (False, False)]  # (enabled, inplace)


# ---------------------------------------------------------------------------- the executor
def run_with_plan(graph: Graph, plan: MemoryPlan, feeds: dict) -> dict[str, np.ndarray]:
    """Run ``graph`` the way a compiled graph does: every arena tensor is a view into one
    uint8 arena at its planned offset, filled with 0xFF bytes first (NaN in every float
    dtype), so a tensor clobbered while still live -- or read before it is written --
    shows up as a wrong or NaN output. External tensors are fresh arrays; views (Reshape)
    are numpy reshapes of their input."""
    arena = np.full(plan.peak_bytes, 0xFF, dtype=np.uint8)
    env: dict[str, np.ndarray] = dict(graph.constants)
    env.update(feeds)
    for node in graph.nodes:
        opdef = graph_ops.get(node.op)
        if opdef.view:
            (out,) = node.outputs
            env[out] = env[node.inputs[0]].reshape(graph.tensors[out].shape)
            if out in plan.offsets:  # the plan's offset is where the view really is
                assert env[out].__array_interface__["data"][0] == \
                    arena.__array_interface__["data"][0] + plan.offsets[out]
            continue
        results = opdef.evaluate([env[i] for i in node.inputs], node.attrs)
        for out, value in zip(node.outputs, results):
            info = graph.tensors[out]
            value = np.asarray(value).astype(info.dtype, copy=False).reshape(info.shape)
            if out in plan.offsets:
                dst = np.ndarray(info.shape, info.dtype, buffer=arena, offset=plan.offsets[out])
                np.copyto(dst, value)
                env[out] = dst
            else:
                assert out in plan.external, f"{out} has no place in the plan"
                env[out] = value.copy()
    return {pub: env[t].copy() for pub, t in graph.outputs.items()}


# ---------------------------------------------------------------------------- properties
@pytest.mark.parametrize("enabled,inplace", MODES)
@given(case=random_graphs())
def test_plan_is_valid_on_random_graphs(case, enabled, inplace):
    graph, _ = case
    plan = plan_memory(graph, enabled=enabled, inplace=inplace)
    check_plan(graph, plan)
    assert plan.peak_bytes <= plan.naive_bytes
    if not enabled:
        assert plan.peak_bytes == plan.naive_bytes
        assert not plan.inplace
    if not inplace:
        assert not plan.inplace
    arena = set(plan.offsets)
    assert not arena & set(graph.inputs)
    assert not arena & set(graph.constants)
    assert not arena & set(graph.outputs.values())
    assert set(graph.outputs.values()) - set(graph.inputs) <= plan.external


@given(case=random_graphs())
def test_executing_with_the_plan_equals_interpret(case):
    graph, feeds = case
    want = interpret(graph, **feeds)
    for enabled, inplace in MODES:
        plan = plan_memory(graph, enabled=enabled, inplace=inplace)
        got = run_with_plan(graph, plan, feeds)
        for name in graph.outputs:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6,
                                       err_msg=f"output {name} of\n{graph}\n{plan}")


@given(case=random_graphs())
def test_planning_is_pure_and_deterministic(case):
    graph, _ = case
    before = str(graph)
    assert plan_memory(graph) == plan_memory(graph)
    assert str(graph) == before


def test_the_executor_catches_a_bad_plan():
    """The executor is only a proof if it fails on a plan that overlaps live tensors."""
    g, x = _graph((4, 16))
    a = g.relu(x)
    b = g.tanh(x)
    g.output("y", g.add(a, b))  # a and b live together at step 2
    plan = plan_memory(g)
    bad = dataclasses.replace(plan, offsets={t: 0 for t in plan.offsets})
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)}
    got = run_with_plan(g, bad, feeds)["y"]
    assert not np.allclose(got, interpret(g, **feeds)["y"])
    with pytest.raises(AssertionError, match="live together and overlap"):
        check_plan(g, dataclasses.replace(bad, buffers=tuple(
            dataclasses.replace(buf, offset=0) for buf in plan.buffers)))


# ---------------------------------------------------------------------------- exact plans
def _graph(shape=(4, 16)):
    g = Graph("t")
    return g, g.input("x", shape, "float32")


def _chain(shape):
    """x -> 6 element-wise ops of one shape -> output."""
    g, x = _graph(shape)
    h = g.relu(x)
    h = g.tanh(h)
    h = g.exp(h)
    h = g.gelu(h)
    h = g.sub(h, 0.5)
    h = g.tanh(h)
    g.output("y", h)
    return g


def test_chain_runs_in_one_buffer_in_place():
    # relu reads the input (not ours), so it needs a buffer; tanh, exp, gelu and sub each
    # take the buffer of their operand, which dies there; the last tanh is the output
    # (external), so it cannot. One buffer of 256 bytes, 4 in place; naive: 5 x 256.
    g = _chain((4, 16))  # 4 * 16 * 4 = 256 bytes, a multiple of 64
    names = [n.outputs[0] for n in g.nodes]
    plan = plan_memory(g)
    check_plan(g, plan)
    assert len(plan.buffers) == 1
    buf = plan.buffers[0]
    assert buf.tensors == tuple(names[:5])
    assert (buf.offset, buf.nbytes, buf.first, buf.last) == (0, 256, 0, 5)
    assert dict(plan.inplace) == {names[i + 1]: names[i] for i in range(4)}
    assert plan.external == {names[5]}
    assert (plan.peak_bytes, plan.naive_bytes) == (256, 5 * 256)
    assert plan.summary() == \
        "memory reduced from 1.2 KiB to 256 B, to 20% (-80%), in 1 buffer, 4 in place"


def test_chain_without_inplace_ping_pongs_between_two_buffers():
    g = _chain((4, 16))
    plan = plan_memory(g, inplace=False)
    check_plan(g, plan)
    assert [b.offset for b in plan.buffers] == [0, 256, 0, 256, 0]
    assert [(b.first, b.last) for b in plan.buffers] == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert (plan.peak_bytes, plan.naive_bytes) == (512, 5 * 256)
    assert not plan.inplace


def test_disabled_planning_is_the_naive_baseline():
    g = _chain((3, 5))  # 60 bytes: every slot is rounded up to 64
    plan = plan_memory(g, enabled=False)
    check_plan(g, plan)
    assert [b.offset for b in plan.buffers] == [0, 64, 128, 192, 256]
    assert plan.peak_bytes == plan.naive_bytes == 5 * 64
    assert not plan.inplace and not plan.enabled
    assert plan.summary() == "memory planning off: 320 B in 5 buffers (naive 320 B)"


def test_alignment():
    g = _chain((3, 5))
    plan = plan_memory(g, inplace=False, alignment=256)
    check_plan(g, plan)
    assert [b.offset for b in plan.buffers] == [0, 256, 0, 256, 0]
    assert plan.peak_bytes == 512
    with pytest.raises(ValueError, match="alignment"):
        plan_memory(g, alignment=0)


def test_diamond_waits_for_the_last_read():
    g, x = _graph()
    a = g.relu(x)      # step 0
    b = g.tanh(a)      # step 1: a is read again at step 2, so b must not take a's buffer
    c = g.add(a, b)    # step 2: a and b both die here; c takes a's (operand 0)
    g.output("y", g.exp(c))
    plan = plan_memory(g)
    check_plan(g, plan)
    assert dict(plan.inplace) == {c.name: a.name}
    assert plan.offsets[b.name] != plan.offsets[a.name]
    assert [buf.tensors for buf in plan.buffers] == [(a.name, c.name), (b.name,)]
    assert [(buf.first, buf.last) for buf in plan.buffers] == [(0, 3), (1, 2)]
    assert plan.peak_bytes == 2 * 256


def test_no_inplace_when_the_operand_is_read_twice_by_the_node():
    g, x = _graph()
    a = g.relu(x)
    s = g.add(a, a)  # a dies here, but is read through both operands: be conservative
    g.output("y", g.exp(s))
    plan = plan_memory(g)
    check_plan(g, plan)
    assert not plan.inplace
    assert plan.offsets[a.name] != plan.offsets[s.name]


def test_no_inplace_across_views_of_the_same_buffer():
    g, x = _graph()
    a = g.relu(x)
    v = g.reshape(a, (4, 16))  # same shape, same bytes
    s = g.mul(a, v)            # reads a's buffer through two operands
    g.output("y", g.exp(s))
    plan = plan_memory(g)
    check_plan(g, plan)
    assert not plan.inplace


def test_inplace_only_where_the_op_allows_it():
    g, x = _graph((8, 8))
    a = g.relu(x)
    m = g.matmul(a, g.constant("w", np.eye(8, dtype=np.float32)))  # same size, not in place
    t = g.transpose(m, (1, 0))                                        # not in place either
    sm = g.softmax(t)                                                 # Softmax: input 0
    g.output("y", g.exp(sm))
    plan = plan_memory(g)
    check_plan(g, plan)
    assert dict(plan.inplace) == {sm.name: t.name}


def test_fused_matmul_may_overwrite_its_residual():
    g, x = _graph((4, 8))
    r = g.tanh(x)
    h = g.relu(x)
    w = g.constant("w", np.full((8, 8), 0.1, dtype=np.float32))
    y = g.op("FusedMatMul", h, w, r, has_residual=True)  # OpDef.inplace: the residual only
    g.output("y", g.exp(y))
    plan = plan_memory(g)
    check_plan(g, plan)
    assert dict(plan.inplace) == {y.name: r.name}


def test_no_inplace_over_a_smaller_broadcast_operand():
    g, x = _graph((4, 16))
    row = g.input("row", (1, 16), "float32")
    a = g.relu(row)     # dies at the Add, but has a quarter of the output's bytes
    b = g.tanh(x)       # dies at the Add, same bytes as the output: this one
    s = g.add(a, b)
    g.output("y", g.exp(s))
    plan = plan_memory(g)
    check_plan(g, plan)
    assert dict(plan.inplace) == {s.name: b.name}


def test_views_extend_the_life_of_their_root():
    # a's own last read is the Reshape at step 1; its view v is read at step 3. If the view
    # were ignored, a's bytes would be free at step 2 and b would be placed on top of them,
    # clobbering v before exp(v) reads it.
    g, x = _graph((4, 16))
    a = g.relu(x)                 # step 0
    v = g.reshape(a, (8, 8))      # step 1: a view, no bytes of its own
    b = g.tanh(x)                 # step 2
    c = g.exp(v)                  # step 3: reads a's bytes through v (and may take them)
    d = g.reshape(c, (4, 16))     # step 4
    g.output("y", g.add(d, b))    # step 5
    plan = plan_memory(g)
    check_plan(g, plan)
    root = next(buf for buf in plan.buffers if a.name in buf.tensors)
    other = next(buf for buf in plan.buffers if b.name in buf.tensors)
    assert root.last >= 3 and other.first == 2
    assert root.offset + root.nbytes <= other.offset or other.offset + other.nbytes <= root.offset
    assert plan.offsets[v.name] == plan.offsets[a.name]
    assert v.name in root.tensors and not any(buf.tensors[0] == v.name for buf in plan.buffers)
    # exp(v) took a's buffer (a and v die at step 3); d is a view of c, read at step 5
    assert dict(plan.inplace) == {c.name: v.name}
    assert root.tensors == (a.name, v.name, c.name, d.name) and root.last == 5
    feeds = {"x": np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)}
    np.testing.assert_array_equal(run_with_plan(g, plan, feeds)["y"], interpret(g, **feeds)["y"])

    # a plan that forgets v's reads (a's buffer ends at step 1) is rejected
    wrong = [dataclasses.replace(buf, last=1) if buf is root else buf for buf in plan.buffers]
    with pytest.raises(AssertionError, match="is live over"):
        check_plan(g, dataclasses.replace(plan, buffers=tuple(wrong)))


def test_outputs_inputs_and_their_views_are_external():
    g, x = _graph((4, 16))
    r = g.reshape(x, (8, 8))          # a view of an input: the caller's memory
    a = g.relu(r)                     # planned
    b = g.tanh(a)                     # planned, but ...
    o = g.reshape(b, (64, 1))         # ... its view is an output: the whole class is external
    g.output("o", o)
    g.output("x_again", x)            # an input as an output
    plan = plan_memory(g)
    check_plan(g, plan)
    assert plan.external == {r.name, b.name, o.name}
    assert set(plan.offsets) == {a.name}
    assert not plan.inplace           # b may not take a's buffer: b is external
    assert plan.naive_bytes == plan.peak_bytes == 256


def test_dead_ends_still_get_bytes():
    g, x = _graph((4, 16))
    dead = g.exp(x)                   # step 0: written, never read
    a = g.relu(x)                     # step 1: may reuse dead's bytes
    g.output("y", g.tanh(a))
    plan = plan_memory(g)
    check_plan(g, plan)
    buf = next(b for b in plan.buffers if dead.name in b.tensors)
    assert (buf.first, buf.last) == (0, 0)
    assert plan.offsets[a.name] == plan.offsets[dead.name] == 0
    assert (plan.peak_bytes, plan.naive_bytes) == (256, 512)


def _inputs():
    g = Graph("t")
    return g, g.input("x1", (4, 32), "float32"), g.input("x2", (4, 16), "float32")  # 512, 256 B


def test_best_fit_takes_the_smallest_hole():
    g, x1, x2 = _inputs()
    a = g.relu(x1)        # step 0: [0, 512)
    k = g.relu(x2)        # step 1: [512, 768)
    s = g.tanh(x2)        # step 2: [768, 1024)
    m = g.exp(x2)         # step 3: [1024, 1280)
    g.output("o1", g.tanh(a))   # step 4: a dies -> hole [0, 512)
    g.output("o2", g.tanh(s))   # step 5: s dies -> hole [768, 1024)
    n = g.relu(x2)        # step 6: 256 B: first fit would take 0, best fit takes 768
    g.output("o3", g.add(k, m))  # step 7 (n is a dead end)
    plan = plan_memory(g)
    check_plan(g, plan)
    assert [plan.offsets[t.name] for t in (a, k, s, m, n)] == [0, 512, 768, 1024, 768]
    assert plan.peak_bytes == 1280


def test_freed_neighbours_coalesce():
    g, x1, x2 = _inputs()
    a = g.relu(x2)        # step 0: [0, 256)
    b = g.tanh(x2)        # step 1: [256, 512)
    c = g.exp(x2)         # step 2: [512, 768), read at the end
    g.output("o1", g.add(a, b))  # step 3: holes [0, 256) + [256, 512) -> [0, 512)
    d = g.relu(x1)        # step 4: 512 B fit only in the merged hole
    g.output("o2", g.exp(c))
    plan = plan_memory(g)
    check_plan(g, plan)
    assert plan.offsets[d.name] == 0 and plan.peak_bytes == 768


def test_the_arena_grows_from_a_hole_at_its_end():
    g, x1, x2 = _inputs()
    a = g.relu(x2)        # step 0: [0, 256)
    g.output("o1", g.tanh(a))    # step 1: a dies -> hole [0, 256) touching the end
    d = g.relu(x1)        # step 2: 512 B: no hole fits; grow from 0, not from 256
    g.output("o2", g.exp(d))
    plan = plan_memory(g)
    check_plan(g, plan)
    assert plan.offsets[d.name] == 0 and plan.peak_bytes == 512


def test_empty_graphs():
    g, x = _graph()
    g.output("y", x)
    plan = plan_memory(g)
    check_plan(g, plan)
    assert (plan.buffers, plan.peak_bytes, plan.naive_bytes) == ((), 0, 0)
    assert plan.summary() == "memory: no intermediate tensors to plan"

    g, x = _graph()
    g.output("a", g.relu(x))
    g.output("b", g.tanh(x))
    plan = plan_memory(g)
    check_plan(g, plan)
    assert (plan.buffers, plan.peak_bytes, plan.naive_bytes) == ((), 0, 0)
    assert len(plan.external) == 2


# ---------------------------------------------------------------------------- check_plan
def test_check_plan_names_what_is_wrong():
    g = _chain((4, 16))
    plan = plan_memory(g, inplace=False)
    check_plan(g, plan)
    first, *rest = plan.buffers
    out = g.outputs["y"]

    def broken(**changes):
        return dataclasses.replace(plan, buffers=(dataclasses.replace(first, **changes), *rest))

    with pytest.raises(AssertionError, match="not aligned"):
        check_plan(g, dataclasses.replace(broken(offset=32), offsets={
            **plan.offsets, first.tensors[0]: 32}))
    with pytest.raises(AssertionError, match="outside the arena"):
        check_plan(g, dataclasses.replace(plan, peak_bytes=256))
    with pytest.raises(AssertionError, match="output"):
        check_plan(g, dataclasses.replace(
            broken(tensors=(first.tensors[0], out)),
            offsets={**plan.offsets, out: 0}, external=frozenset()))
    with pytest.raises(AssertionError, match="input"):
        check_plan(g, dataclasses.replace(broken(tensors=(first.tensors[0], "x")),
                                          offsets={**plan.offsets, "x": 0}))
    with pytest.raises(AssertionError, match="neither in the arena nor external"):
        check_plan(g, dataclasses.replace(plan, buffers=tuple(rest), offsets={
            t: o for t, o in plan.offsets.items() if t != first.tensors[0]}))


def test_check_plan_rejects_an_overwrite_before_the_last_read():
    g, x = _graph()
    a = g.relu(x)
    b = g.tanh(a)
    g.output("y", g.add(a, b))
    plan = plan_memory(g)
    assert not plan.inplace
    merged = (dataclasses.replace(plan.buffers[0], tensors=(a.name, b.name)),)
    bad = dataclasses.replace(plan, buffers=merged, offsets={a.name: 0, b.name: 0},
                              inplace={b.name: a.name})
    with pytest.raises(AssertionError, match="still reads"):
        check_plan(g, bad)


# ---------------------------------------------------------------------------- reporting
def test_summary_mentions_both_numbers():
    g = _chain((64, 64))  # 16 KiB per tensor
    plan = plan_memory(g, inplace=False)
    text = plan.summary()
    assert format_bytes(plan.naive_bytes) in text and format_bytes(plan.peak_bytes) in text
    assert text.startswith("memory reduced from 80.0 KiB to 32.0 KiB, to 40% (-60%), in ")
    assert format_bytes(3 * 2**20 + 2**19) == "3.5 MiB"
    assert format_bytes(1023) == "1023 B"


def test_verbose_prints_the_summary(capsys):
    g = _chain((4, 16))
    plan = plan_memory(g, verbose=True)
    assert capsys.readouterr().out.strip() == plan.summary()


def test_plot_draws_one_rectangle_per_buffer():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.axes import Axes

    g = _chain((4, 16))
    for plan in (plan_memory(g, inplace=False), plan_memory(g, enabled=False)):
        ax = plan.plot(graph=g)
        assert isinstance(ax, Axes)
        assert len(ax.patches) == len(plan.buffers)
        plt.close(ax.figure)
    fig, ax = plt.subplots()
    assert plan_memory(g).plot(ax=ax) is ax and len(ax.patches) == 1
    plt.close(fig)


def test_plot_saved_plainly_keeps_its_labels_and_reads_in_mib(tmp_path):
    """A plain ``savefig`` of the plot cuts off none of the rotated op names nor the axis
    labels, and the y axis counts MiB for an arena of MiBs (KiB for one of KiBs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for shape, unit, scale in (((512, 512), "MiB", 2**20), ((64, 64), "KiB", 2**10)):
        g = _chain(shape)
        plan = plan_memory(g, inplace=False)
        ax = plan.plot(graph=g)
        assert len(ax.get_xticklabels()) == len(g.nodes)
        assert_saved_figure_keeps_its_text(ax.figure, tmp_path / "arena.png")
        assert ax.get_ylabel() == f"arena offset ({unit})"
        assert ax.get_ylim()[1] == pytest.approx(plan.peak_bytes / scale * 1.05)
        tops = sorted(p.get_y() + p.get_height() for p in ax.patches)
        assert tops[-1] == pytest.approx(plan.peak_bytes / scale)
        plt.close(ax.figure)
