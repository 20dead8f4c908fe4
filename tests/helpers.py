"""The helpers every numeric test shares: one error measure and one input builder.

* :func:`rel_err`: ``||got - want|| / ||want||`` in float64, the relative-norm error each
  test compares against a tolerance chosen per dtype;
* :func:`random_qkv`: fresh, seeded Gaussian ``q, k, v`` in the layout of
  :func:`blasst_ref.attention` (never zeros, never a constant), optionally with sharper
  scores or an attention sink so that ``thresh > 0`` has tiles to skip;
* :func:`assert_error_bound`: docs/DESIGN.md §3.4's per-row error bound of a BLASST output,
  and the lemma it rests on, from float64 scores and the tile code of every (row, key);
* :func:`assert_outputs_close`: two runs of a graph (``{output name: array}``) agree;
* :func:`record_calls`: a spy that counts the calls of a function (e.g. "weights are packed
  once, at compile time").

Hypothesis strategies (:mod:`strategies`) draw the shapes and seeds and build their inputs
with :func:`random_qkv` too.
"""

from __future__ import annotations

import math

import numpy as np


def rel_err(got, want) -> float:
    """Relative error ``||got - want|| / ||want||`` (norms over all elements, in float64).

    ``want`` all zeros: 0 when ``got`` is too, else inf. A NaN in ``got`` (an output element
    a kernel never wrote, if the test poisoned it) makes the result NaN, and a NaN fails
    every ``rel_err(...) < tol``."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    num = float(np.linalg.norm(got - want))
    den = float(np.linalg.norm(want))
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


def random_qkv(seed, b: int, hq: int, hkv: int, lq: int, lk: int, dqk: int,
               dv: int | None = None, *, dtype=np.float64, q_scale: float = 1.0,
               k_scale: float = 1.0, sink: float = 0.0):
    """Fresh ``q (b, hq, lq, dqk)``, ``k (b, hkv, lk, dqk)``, ``v (b, hkv, lk, dv)``.

    Args:
        seed: an int for ``numpy.random.default_rng``, or a ``numpy.random.Generator`` to
            draw from (q, then k, then v: standard normal).
        dv: the value dim (default ``dqk``).
        dtype: of the returned arrays (drawn in float64, then rounded once).
        q_scale, k_scale: multiply the queries and the keys: the scaled scores' spread grows
            with ``q_scale * k_scale``, and sharper softmax rows leave more tiles negligible.
        sink: ``> 0`` plants an attention sink: the first ``n_sink`` (1 to 3) keys of each kv
            head and every query of its group get a shared unit direction, so that the sink
            keys' scaled scores rise by about ``sink`` above the rest, as in real LLM heads.

    Returns:
        ``(q, k, v)``, C-contiguous, of ``dtype``.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    dv = dqk if dv is None else dv
    q = rng.standard_normal((b, hq, lq, dqk)) * q_scale
    k = rng.standard_normal((b, hkv, lk, dqk)) * k_scale
    v = rng.standard_normal((b, hkv, lk, dv))
    if sink > 0:
        n_sink = min(lk, int(rng.integers(1, 4)))
        u = rng.standard_normal((b, hkv, 1, dqk))
        u /= np.linalg.norm(u, axis=-1, keepdims=True)
        amp = math.sqrt(sink * math.sqrt(dqk))  # amp**2 * scale == sink
        k[:, :, :n_sink] += amp * u
        q += amp * np.repeat(u, hq // hkv, axis=1)
    return tuple(np.ascontiguousarray(x.astype(dtype)) for x in (q, k, v))


def assert_outputs_close(got: dict, want: dict, tol: float = 2e-5):
    """Two runs of one graph agree: the same outputs in the same order, each of the same
    shape and dtype, finite in the same places, and within ``tol`` in :func:`rel_err`."""
    assert list(got) == list(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert got[name].dtype == want[name].dtype, name
        assert np.all(np.isfinite(got[name]) == np.isfinite(want[name])), name
        assert rel_err(got[name], want[name]) <= tol, (name, rel_err(got[name], want[name]))


def record_calls(monkeypatch, owner, name: str) -> list[tuple]:
    """Wrap ``owner.name`` for the rest of the test so that every call's positional
    arguments are appended to the returned list (the call itself still runs)."""
    real = getattr(owner, name)
    calls: list[tuple] = []

    def recording(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, recording)
    return calls


def assert_saved_figure_keeps_its_text(fig, path) -> None:
    """``fig.savefig(path)`` as a user would (no ``bbox_inches``), then everything each Axes
    draws -- tick labels, axis labels, title -- lies inside the saved page: nothing is cut
    off."""
    fig.savefig(path)  # draws the figure as saved, layout included
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    for ax in fig.axes:
        box = ax.get_tightbbox(renderer)
        inside = (box.x0 >= page.x0 - 1 and box.y0 >= page.y0 - 1
                  and box.x1 <= page.x1 + 1 and box.y1 <= page.y1 + 1)
        assert inside, f"the Axes {ax.get_title()!r} draws outside the page: {box} vs {page}"


#: Absolute slack of the §3.4 bound per dtype, in units of the head's ``max |v|`` (the
#: rounding of the kernel's own arithmetic, which the bound does not model).
ABS_TOL_V = {np.float64: 1e-11, np.float32: 2e-5, np.float16: 1.5e-3}
#: Slack of a score recomputed in float64 against the backend's (float32 for float16), relative
#: to ``1 + max |score|`` (float32 dot products of length <= 576).
SCORE_TOL = {np.float64: 1e-12, np.float32: 1e-5, np.float16: 1e-5}


def assert_error_bound(out, dense, s, codes, v, thresh, dtype) -> float:
    """Checks docs/DESIGN.md §3.4 per row: ``|out - dense| <= 2 max|v| thresh n_skipped /
    l_kept`` (+ :data:`ABS_TOL_V`), and the lemma the bound rests on: every key a row sees in
    a skipped tile has ``exp(s - m) < thresh`` with ``m`` the row's final max, so the tile
    holding the max is never skipped and ``l_kept >= 1``.

    Args:
        out: ``(B, Hq, Lq, Dv)`` the BLASST output; ``dense``: the float64 dense oracle.
        s: ``(B, Hq, Lq, Lk)`` float64 scaled scores, ``-inf`` where masked.
        codes: ``(B, Hq, Lq, Lk)`` the tile-map code of the tile holding each (row, key).
        v: ``(B, Hq, Lk, Dv)`` values per query head (kv heads repeated over their group).
        thresh: the threshold; ``dtype``: the inputs' dtype (picks the tolerances).

    Returns the worst ``err / bound`` (for Hypothesis' notes)."""
    from blasst_ref.reference import NOT_VISITED, SKIPPED

    visible = np.isfinite(s)
    sees = visible.any(axis=-1)
    m = np.where(sees, s.max(axis=-1, initial=-np.inf), 0.0)
    assert np.all(codes[visible] != NOT_VISITED), "a visible key lies in a tile never visited"
    skipped = visible & (codes == SKIPPED)

    # the lemma: skipped keys are below thresh relative to the row's final max
    s_tol = SCORE_TOL[dtype] * (1.0 + np.max(np.abs(s[visible]), initial=0.0))
    gap = np.where(skipped, s - m[..., None], -np.inf).max(axis=-1)
    assert np.all(gap < math.log(thresh) + s_tol), np.max(gap) - math.log(thresh)
    p_kept = np.where(visible & ~skipped, np.exp(np.where(visible, s, 0.0) - m[..., None]), 0.0)
    l_kept = p_kept.sum(axis=-1)
    assert np.all(l_kept[sees] >= 1.0 - s_tol)

    vmax = np.abs(np.asarray(v, np.float64)).max(axis=(2, 3))[:, :, None]  # (B, Hq, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = np.where(sees, 2 * vmax * thresh * skipped.sum(axis=-1) / l_kept, 0.0)
    bound = bound + ABS_TOL_V[dtype] * vmax
    err = np.abs(out.astype(np.float64) - dense).max(axis=-1)
    worst = float(np.max(err / bound))
    assert np.all(err <= bound), f"worst err/bound={worst:.3g}"
    return worst
