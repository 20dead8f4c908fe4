"""Every Hypothesis strategy of the test suite, in one place.

Tests describe *what* they check; this module describes *which inputs* they check it on:

* :func:`problems` draws the shape of an attention call (a :class:`Problem`): batch, query
  and kv heads (``Hq % Hkv == 0``: MHA, GQA, MQA), lengths for prefill or decode
  (``Lq <= 16``), head dims (``Dv`` may differ from ``Dqk``), causal or not, and tile sizes
  ``block_q``/``block_k`` -- any positive size, most of which do not divide the lengths. The
  number of tiles is bounded (the reference backend visits tiles in a Python loop), so that
  the whole suite stays fast.
* :func:`cases` draws a problem, a seed and the peakedness, and builds fresh ``q, k, v``
  with :func:`helpers.random_qkv` (never zeros, never a constant).
* "Peaked" inputs: random Gaussian q/k give almost uniform attention, where no tile is ever
  negligible and ``thresh > 0`` would skip nothing (and so test nothing). Peaked inputs scale
  the queries up (sharper softmax) and plant an *attention sink* -- the first keys of every kv
  head share a direction with every query of the group -- as real LLM heads have. The row
  maxima then sit in the first tile and later tiles fall far below them, so the skip rule
  fires. ``tests/test_attention_properties.py::test_peaked_inputs_make_tiles_skip`` checks
  that it does.
* :func:`thresholds` draws BLASST thresholds in ``(0, 1)``, log-uniformly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from helpers import random_qkv
from hypothesis import strategies as st

from blasst_ref import tiling

#: dtypes of the host backends (float64 is a CPU-only dtype, docs/DESIGN.md §3).
HOST_DTYPES = [np.float64, np.float32, np.float16]

#: Tile budget of one problem (prefill: ``B * Hq * n_q_tiles * n_k_tiles``; decode:
#: ``B * Hkv * n_k_tiles``). The reference visits each tile in a Python loop (tens of us).
MAX_TILES = 360


@dataclass(frozen=True)
class Problem:
    """The shape of one attention call and its tile sizes."""

    batch: int
    hq: int
    hkv: int
    lq: int
    lk: int
    dqk: int
    dv: int
    causal: bool
    block_q: int
    block_k: int

    @property
    def group(self) -> int:
        return self.hq // self.hkv

    @property
    def decode(self) -> bool:
        return tiling.is_decode(self.lq)

    @property
    def q_shape(self):
        return (self.batch, self.hq, self.lq, self.dqk)

    @property
    def k_shape(self):
        return (self.batch, self.hkv, self.lk, self.dqk)

    @property
    def v_shape(self):
        return (self.batch, self.hkv, self.lk, self.dv)

    @property
    def out_shape(self):
        return (self.batch, self.hq, self.lq, self.dv)

    @property
    def sizes(self) -> tuple[int, ...]:
        """``(batch, hq, hkv, lq, lk, dqk, dv)``: the shape arguments of
        :func:`helpers.random_qkv`."""
        return (self.batch, self.hq, self.hkv, self.lq, self.lk, self.dqk, self.dv)

    @property
    def blocks(self) -> dict:
        """``block_q``/``block_k`` as keyword arguments of ``attention()``."""
        return {"block_q": self.block_q, "block_k": self.block_k}


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value
class Case:
    """A problem with its inputs (in the dtype under test) and how they were made."""

    problem: Problem
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    seed: int
    q_scale: float
    sink: float


def seeds():
    return st.integers(min_value=0, max_value=2**32 - 1)


def dtypes():
    return st.sampled_from(HOST_DTYPES)


def thresholds(min_value: float = 1e-4, max_value: float = 0.9):
    """Thresholds in ``[min_value, max_value]``, log-uniform, with a few round values."""
    lo, hi = math.log(min_value), math.log(max_value)
    log_uniform = st.floats(lo, hi).map(lambda x: min(max(math.exp(x), min_value), max_value))
    round_values = [v for v in (1e-3, 1e-2, 0.05, 0.1, 0.3, 0.5) if min_value <= v <= max_value]
    if not round_values:
        return log_uniform
    return st.one_of(st.sampled_from(round_values), log_uniform)


def _block(draw, length: int, max_tiles: int, small: tuple[int, ...] = ()) -> int:
    """A tile size for ``length`` giving at most ``max_tiles`` tiles (any size: most do not
    divide the length; sizes larger than the length give one partial tile)."""
    lo = max(1, -(-length // max(1, max_tiles)))
    hi = max(lo, 64)
    choices = [st.integers(lo, hi)]
    fits = [s for s in small if s >= lo]
    if fits:
        choices.append(st.sampled_from(fits))
    return draw(st.one_of(*choices))


@st.composite
def problems(
    draw,
    phase: str | None = None,
    causal: bool | None = None,
    batch: int | None = None,
    hkv: int | None = None,
    group: int | None = None,
    dqk: int | None = None,
    dv: int | None = None,
    lq: int | None = None,
    max_lq: int = 150,
    max_lk: int = 200,
    max_tiles: int = MAX_TILES,
):
    """An attention :class:`Problem`. Any argument given is fixed; the rest are drawn.

    ``phase`` is ``"prefill"`` (``Lq > 16``), ``"decode"`` (``Lq <= 16``, split-KV, the kv
    group decides together) or None (either). In prefill ``Lk`` is drawn independently of
    ``Lq`` (so causal problems with ``Lq > Lk`` -- rows that see no key -- occur) or equal to
    it; in decode ``Lk`` reaches past ``MIN_TILES_PER_SPLIT`` small tiles, so several
    split-KV chunks occur."""
    if phase is None:
        phase = draw(st.sampled_from(["prefill", "decode"]))
    assert phase in ("prefill", "decode"), phase
    b = batch if batch is not None else draw(st.integers(1, 2))
    hkv_ = hkv if hkv is not None else draw(st.integers(1, 2))
    group_ = group if group is not None else draw(st.sampled_from([1, 2, 3, 4]))
    hq = hkv_ * group_
    if phase == "prefill":
        lo_q = tiling.DECODE_MAX_Q_LEN + 1
        lq_ = lq if lq is not None else draw(st.integers(lo_q, max(lo_q, max_lq)))
        lk = draw(st.one_of(st.just(lq_), st.integers(1, max_lk)))
    else:
        lq_ = lq if lq is not None else draw(
            st.one_of(st.just(1), st.integers(2, tiling.DECODE_MAX_Q_LEN))
        )
        lk = draw(st.integers(1, max(1, 2 * max_lk)))
    dqk_ = dqk if dqk is not None else draw(
        st.one_of(st.sampled_from([8, 16, 32, 64]), st.integers(1, 64))
    )
    dv_ = dv if dv is not None else draw(st.one_of(st.just(dqk_), st.integers(1, 48)))
    causal_ = draw(st.booleans()) if causal is None else causal

    if phase == "prefill":
        block_q = _block(draw, lq_, 12, small=(16, 32))
        n_qt = tiling.num_tiles(lq_, block_q)
        block_k = _block(draw, lk, max_tiles // (b * hq * n_qt), small=(16, 32))
    else:
        block_q = draw(st.integers(1, 128))  # not used in decode, but must be accepted
        block_k = _block(draw, lk, max_tiles // (b * hkv_), small=(2, 3, 4, 5, 8))
    return Problem(b, hq, hkv_, lq_, lk, dqk_, dv_, causal_, block_q, block_k)


#: Ranges of the peaked inputs' knobs (see :func:`helpers.random_qkv`). A sink of 6 already
#: lifts the sink keys ~3 natural-log units (a factor 20) above typical scores; 24 makes the
#: heads very peaked. q_scale spreads the other scores, which works against the sink.
PEAK_Q_SCALE = (1.0, 4.0)
PEAK_SINK = (6.0, 24.0)


@st.composite
def peaks(draw):
    """``(q_scale, sink)`` of a peaked input: sharper scores and an attention sink."""
    q_scale = draw(st.floats(*PEAK_Q_SCALE))
    sink = draw(st.floats(*PEAK_SINK))
    return q_scale, sink


@st.composite
def cases(draw, dtype, peaked: bool | None = None, problem=None, **problem_kwargs):
    """A :class:`Case`: a problem (drawn with ``problem_kwargs``, or the given strategy) and
    fresh inputs in ``dtype``. ``peaked``: True for peaked inputs, False for plain Gaussian
    ones, None for either."""
    p = draw(problem if problem is not None else problems(**problem_kwargs))
    if peaked is None:
        peaked = draw(st.booleans())
    q_scale, sink = draw(peaks()) if peaked else (1.0, 0.0)
    seed = draw(seeds())
    q, k, v = random_qkv(seed, *p.sizes, dtype=dtype, q_scale=q_scale, sink=sink)
    return Case(p, q, k, v, seed, q_scale, sink)


# =============================================================================================
# Random graphs for blasst_ref.graph
# =============================================================================================
# :func:`random_graphs` draws a small graph of the blasst_ref.graph IR (float32 unless
# asked) and matching feeds, for properties of the memory planner and for "compiled equals interpret" tests.
# Structure (ops, operands, shapes, outputs) is drawn by Hypothesis, so it shrinks to small
# graphs; values (inputs, constants) come from a numpy Generator seeded by a drawn seed.
# Values are kept finite *by construction*: Exp only ever sees Tanh outputs (or another
# bounded tensor), Div only divides by a positive constant or by exp(tanh(.)) >= 1/e, and the
# builder evaluates every node as it goes and squashes with Tanh any tensor whose |values|
# exceed GRAPH_VALUE_LIMIT before anything else may read it.

from blasst_ref.graph import Graph
from blasst_ref.graph import ops as _graph_ops

#: Largest |value| a tensor of a random graph may have and still be an operand or an output.
GRAPH_VALUE_LIMIT = 64.0

_GRAPH_MOVES = ("unary", "exp", "binary", "div", "matmul", "softmax", "layernorm",
                "transpose", "reshape")


def _nonzero_values(rng, shape, lo=0.5, hi=1.5, scale=1.0) -> np.ndarray:
    """Random float32 values with lo <= |v| <= hi (times scale), random signs: never zero."""
    mag = rng.uniform(lo, hi, size=shape) * rng.choice((-1.0, 1.0), size=shape)
    return np.asarray(mag * scale, dtype=np.float32)


def _broadcasts_to(small, big) -> bool:
    try:
        return np.broadcast_shapes(tuple(small), tuple(big)) == tuple(big)
    except ValueError:
        return False


def _matmul_rhs_fits(s, sa, transposed: bool = False) -> bool:
    """Whether a tensor of shape ``s`` (or its last-two-axes transpose) can be the right
    operand of a MatMul whose left operand has shape ``sa``."""
    if (s[-1] if transposed else s[-2]) != sa[-1]:
        return False
    try:
        np.broadcast_shapes(tuple(s[:-2]), tuple(sa[:-2]))  # batch dims
        return True
    except ValueError:
        return False


def _reshape_targets(shape) -> list[tuple[int, ...]]:
    """Rank-2 and rank-3 shapes with as many elements as ``shape``."""
    size = int(np.prod(shape))
    divisors = [d for d in range(1, size + 1) if size % d == 0]
    out = [(d, size // d) for d in divisors]
    out += [(d1, d2, size // (d1 * d2)) for d1 in divisors for d2 in divisors
            if (size // d1) % d2 == 0]
    return out


@st.composite
def random_graphs(draw, max_nodes: int = 12, dtype: str = "float32"):
    """``(graph, feeds)``: a random :class:`blasst_ref.graph.Graph` of at most ``max_nodes``
    nodes and ``{input name: array}`` feeds for it, every tensor of ``dtype`` (float32 by
    default; float16 and float64 work too).

    The graph has 1-2 inputs (``x`` of a 2-D/3-D shape with dims 1..5; maybe ``y``:
    the same shape, a broadcastable row, or a MatMul partner), non-zero random constants,
    and a random DAG of Add/Sub/Mul/Div, Relu/Gelu/Tanh/Exp, MatMul (with a constant weight,
    another tensor or a transposed tensor), Softmax (any axis), LayerNorm, Transpose and
    Reshape. Operands are often the newest tensor (chains, in-place chances) and otherwise
    any earlier one (tensors read several times, long liveness); tensors neither read nor
    returned are dead ends. 1-3 distinct value tensors are outputs. Under
    :func:`blasst_ref.graph.interpret` with the returned feeds every value is finite.
    """
    if max_nodes < 1:
        raise ValueError("random_graphs needs max_nodes >= 1")
    rng = np.random.default_rng(draw(seeds()))
    g = Graph("random")
    vals: dict[str, np.ndarray] = {}

    def add_input(name, shape):
        g.input(name, shape, dtype)
        vals[name] = rng.standard_normal(shape).astype(dtype)
        return name

    def constant(base, value):
        name = g.add_constant(base, np.asarray(value, dtype=dtype))
        vals[name] = g.constants[name]
        return name

    def build(op, *operands, **attrs) -> str:
        """Add one node and evaluate it now (as interpret would)."""
        name = g.op(op, *operands, **attrs).name
        node = g.nodes[-1]
        arrays = [vals[i] if i in vals else g.constants[i] for i in node.inputs]  # scalars
        result = _graph_ops.get(node.op).evaluate(arrays, node.attrs)[0]
        info = g.tensors[name]
        vals[name] = np.asarray(result).astype(info.dtype, copy=False).reshape(info.shape)
        return name

    rank = draw(st.sampled_from((2, 3)))
    shape = tuple(draw(st.integers(1, 5)) for _ in range(rank))
    pool = [add_input("x", shape)]  # tensors that may be read: |values| <= the limit
    if draw(st.booleans()):
        kind = draw(st.sampled_from(("same", "row", "matmul")))
        shape2 = {"same": shape, "row": (1, shape[-1]),
                  "matmul": (shape[-1], draw(st.integers(1, 5)))}[kind]
        pool.append(add_input("y", shape2))
    bounded: set[str] = set()  # tensors with |values| <= 1 whatever the feeds (Exp-safe)

    def pick() -> str:
        if draw(st.booleans()):
            return pool[-1]
        return pool[draw(st.integers(0, len(pool) - 1))]

    def pick_where(cond, *args) -> str | None:
        """Any tensor of the pool whose shape ``s`` has ``cond(s, *args)``, or None."""
        fits = [t for t in pool if cond(g.tensors[t].shape, *args)]
        return fits[draw(st.integers(0, len(fits) - 1))] if fits else None

    target = draw(st.integers(1, max_nodes))
    while len(g.nodes) < target:
        budget = target - len(g.nodes)
        a = pick()
        sa = g.tensors[a].shape
        move = draw(st.sampled_from(_GRAPH_MOVES))
        out = None
        if move == "exp" and budget >= 1 + (a not in bounded):
            src = a if a in bounded else build("Tanh", a)
            out = build("Exp", src)
        elif move == "binary":
            op = draw(st.sampled_from(("Add", "Sub", "Mul")))
            source = draw(st.sampled_from(("tensor", "constant", "row", "scalar")))
            b = pick_where(_broadcasts_to, sa) if source == "tensor" else None
            if source == "constant":
                b = constant("c", _nonzero_values(rng, sa))
            elif source == "row" or (source == "tensor" and b is None):
                b = constant("c", _nonzero_values(rng, sa[-1:]))
            elif source == "scalar":
                b = float(_nonzero_values(rng, ()))
            out = build(op, a, b) if draw(st.booleans()) or isinstance(b, float) \
                else build(op, b, a)
        elif move == "div":
            source = draw(st.sampled_from(("exp", "constant", "row", "scalar")))
            b = pick_where(_broadcasts_to, sa) if source == "exp" else None
            if b is not None and budget >= 2 + (b not in bounded):
                d = build("Exp", b if b in bounded else build("Tanh", b))  # in [1/e, e]
            elif source == "constant":
                d = constant("d", np.abs(_nonzero_values(rng, sa)))
            elif source == "scalar":
                d = float(np.abs(_nonzero_values(rng, ())))
            else:
                d = constant("d", np.abs(_nonzero_values(rng, sa[-1:])))
            out = build("Div", a, d)
        elif move == "matmul":
            k = sa[-1]
            source = draw(st.sampled_from(("constant", "tensor", "transposed")))
            b = None
            if source == "tensor":
                b = pick_where(_matmul_rhs_fits, sa)
            elif source == "transposed" and budget >= 2:
                c = pick_where(_matmul_rhs_fits, sa, True)
                if c is not None:
                    rc = len(g.tensors[c].shape)
                    b = build("Transpose", c, perm=tuple(range(rc - 2)) + (rc - 1, rc - 2))
            if b is None:
                p = draw(st.integers(1, 5))
                b = constant("w", _nonzero_values(rng, (k, p), scale=1.0 / math.sqrt(k)))
            out = build("MatMul", a, b)
        elif move == "softmax":
            axis = draw(st.sampled_from((-1,) + tuple(range(len(sa)))))
            out = build("Softmax", a, axis=axis)
            bounded.add(out)
        elif move == "layernorm":
            n = sa[-1]
            gamma = constant("gamma", _nonzero_values(rng, (n,)))
            beta = constant("beta", _nonzero_values(rng, (n,)))
            out = build("LayerNorm", a, gamma, beta)
        elif move == "transpose":
            perm = tuple(draw(st.permutations(range(len(sa)))))
            out = build("Transpose", a, perm=perm)
        elif move == "reshape":
            out = build("Reshape", a, shape=draw(st.sampled_from(_reshape_targets(sa))))
        if out is None:  # "unary", or a move the budget could not afford
            op = draw(st.sampled_from(("Relu", "Gelu", "GeluTanh", "Tanh")))
            if op == "GeluTanh":
                out = build("Gelu", a, approximate="tanh")
            else:
                out = build(op, a)
            if op == "Tanh":
                bounded.add(out)
        if a in bounded and move in ("transpose", "reshape"):
            bounded.add(out)  # same values, other layout
        if np.max(np.abs(vals[out]), initial=0.0) <= GRAPH_VALUE_LIMIT:
            pool.append(out)
        elif len(g.nodes) < target:  # too large to read further: squash it (a is a dead end)
            out = build("Tanh", out)
            bounded.add(out)
            pool.append(out)

    values = [t for t in pool if g.tensors[t].kind == "value"] or [g.nodes[-1].outputs[0]]
    chosen = draw(st.lists(st.sampled_from(values), min_size=1,
                           max_size=min(3, len(values)), unique=True))
    for i, t in enumerate(chosen):
        g.output(f"out{i}", t)
    assert all(np.all(np.isfinite(v)) for v in vals.values()), "random graph: non-finite"
    feeds = {name: vals[name] for name in g.inputs}
    return g, feeds
