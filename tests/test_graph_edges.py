"""``blasst_ref.graph`` at the edges: what each call returns, inputs no graph was built for,
and arguments that compile but could not run.

Each case here once went wrong: two outputs of one call shared memory, a broadcasting mask
changed the fused attention's output shape, a NaN calibration sample made an int8 graph
all NaN, a float16 graph compiled and then failed on every call, a big-endian feed reached
a kernel, a shape of 2.5 was truncated, ``attention_block=(0, 0)`` failed only when called,
and a tensor of 2**64 bytes reported 0."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_outputs_close, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import random_graphs

from blasst_ref import graph as bg

# ---------------------------------------------------------------------------------------
# outputs are independent arrays


def _check_outputs_are_independent(run, feeds, other_feeds):
    """Writing into any output of ``run(**feeds)`` changes no other output and no input,
    and a later call changes none of them (so none shares memory with an arena)."""
    feeds_before = {n: x.copy() for n, x in feeds.items()}
    outs = run(**feeds)
    for name, arr in outs.items():
        assert arr.flags.writeable, name
        before = {n: o.copy() for n, o in outs.items() if n != name}
        arr[...] = 7 if arr.dtype.kind in "iu" else -123.25
        for other, value in before.items():
            np.testing.assert_array_equal(outs[other], value, err_msg=f"{name} -> {other}")
        for n, x in feeds.items():
            np.testing.assert_array_equal(x, feeds_before[n], err_msg=f"{name} -> input {n}")
    kept = {n: o.copy() for n, o in outs.items()}
    run(**other_feeds)
    for n, o in outs.items():
        np.testing.assert_array_equal(o, kept[n], err_msg=f"a later call changed {n}")


def _double_transpose_graph():
    g = bg.Graph("tt")
    a = g.relu(g.input("x", (3, 4)))
    g.output("a", a)
    g.output("b", g.transpose(g.transpose(a, (1, 0)), (1, 0)))  # merged into a view of a
    return g


def _same_tensor_twice_graph():
    g = bg.Graph("twice")
    y = g.tanh(g.input("x", (2, 5)))
    g.output("y1", y)
    g.output("y2", y)
    return g


def _reshape_of_output_graph():
    g = bg.Graph("reshape")
    y = g.exp(g.tanh(g.input("x", (4, 6))))
    g.output("y", y)
    g.output("flat", g.reshape(y, (24,)))
    g.output("flat2", g.reshape(y, (6, 4)))
    return g


def _input_passed_through_graph():
    g = bg.Graph("through")
    x = g.input("x", (2, 3))
    g.output("x_again", x)
    g.output("x_view", g.reshape(x, (3, 2)))
    g.output("y", g.relu(x))
    return g


ALIASING_GRAPHS = {"transpose-transpose": _double_transpose_graph,
                   "same-tensor-twice": _same_tensor_twice_graph,
                   "reshape-of-output": _reshape_of_output_graph,
                   "input-passed-through": _input_passed_through_graph}


@pytest.mark.parametrize("switches", [dict(), dict(fuse=False), dict(plan_memory=False)])
@pytest.mark.parametrize("name", sorted(ALIASING_GRAPHS))
def test_outputs_never_share_memory(name, switches):
    g = ALIASING_GRAPHS[name]()
    cg = bg.compile(g, **switches)
    feeds = bg.models.example_inputs(g, seed=1)
    other = bg.models.example_inputs(g, seed=2)
    assert_outputs_close(cg(**feeds), bg.interpret(g, **feeds))
    _check_outputs_are_independent(cg, feeds, other)
    _check_outputs_are_independent(lambda **f: bg.interpret(g, **f), feeds, other)


@settings(max_examples=20)
@given(data=random_graphs(), again=st.booleans(), view=st.booleans(),
       switches=st.sampled_from([dict(), dict(matmul_kernel="blas"), dict(fuse=False)]))
def test_outputs_of_random_graphs_never_share_memory(data, again, view, switches):
    g, feeds = data
    first = next(iter(g.outputs.values()))
    if again:  # one tensor under two names
        g.output("again", first)
    if view:  # a view of an output, as an output
        g.output("view", g.reshape(first, (-1,)))
    other = {n: (x * 0.5 - 0.25).astype(x.dtype) for n, x in feeds.items()}
    cg = bg.compile(g, **switches)
    assert_outputs_close(cg(**feeds), bg.interpret(g, **feeds), tol=1e-4)
    _check_outputs_are_independent(cg, feeds, other)

