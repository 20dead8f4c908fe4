"""Every Hypothesis strategy of the test suite, in one place.

Tests describe *what* they check; this module describes *which inputs* they check it on:

* :func:`problems` draws the shape of an attention call (a :class:`Problem`): batch, query
  and kv heads (``Hq % Hkv == 0``: MHA, GQA, MQA), lengths for prefill or decode
  (``Lq <= 16``), head dims (``Dv`` may differ from ``Dqk``), causal or not, and tile sizes
  ``block_q``/``block_k`` -- any positive size, most of which do not divide the lengths. The
  number of tiles is bounded (the reference backend visits tiles in a Python loop), so that
  the whole suite stays fast.
* :func:`make_inputs` builds fresh random ``q, k, v`` from a seed with a numpy ``Generator``
  (never zeros, never a constant); :func:`inputs` draws the seed and the peakedness.
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
from hypothesis import strategies as st

from blasst_ref import tiling

#: dtypes of the host backends (float64 is a CPU-only dtype, DESIGN.md §3).
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


def make_inputs(problem: Problem, dtype, seed: int, q_scale: float = 1.0, sink: float = 0.0):
    """Fresh ``q, k, v`` for ``problem`` in ``dtype``, from ``numpy.random.default_rng(seed)``.

    ``q_scale`` multiplies the queries (the scaled scores' spread grows with it). ``sink > 0``
    plants an attention sink: the first ``n_sink`` keys of each kv head and every query of its
    group get a shared unit direction ``u``, so that the sink keys' scaled scores rise by about
    ``sink`` above the rest. Values are standard normal. Nothing is ever all zeros."""
    rng = np.random.default_rng(seed)
    p = problem
    q = rng.standard_normal(p.q_shape) * q_scale
    k = rng.standard_normal(p.k_shape)
    v = rng.standard_normal(p.v_shape)
    if sink > 0:
        n_sink = min(p.lk, int(rng.integers(1, 4)))
        u = rng.standard_normal((p.batch, p.hkv, 1, p.dqk))
        u /= np.linalg.norm(u, axis=-1, keepdims=True)
        amp = math.sqrt(sink * math.sqrt(p.dqk))  # amp**2 * scale == sink
        k[:, :, :n_sink] += amp * u
        q += amp * np.repeat(u, p.group, axis=1)
    return tuple(np.ascontiguousarray(x.astype(dtype)) for x in (q, k, v))


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


#: Ranges of the peaked inputs' knobs (see :func:`make_inputs`). A sink of 6 already lifts the
#: sink keys ~3 natural-log units (a factor 20) above typical scores; 24 makes the heads very
#: peaked. q_scale spreads the other scores, which works against the sink.
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
    q, k, v = make_inputs(p, dtype, seed, q_scale, sink)
    return Case(p, q, k, v, seed, q_scale, sink)
